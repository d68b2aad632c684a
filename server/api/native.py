"""Native Predibase / LoRAX routes: POST /generate and POST /generate_stream (SSE)."""

from __future__ import annotations

import json
import time
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from server.api.schemas import (
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    StreamDetails,
    StreamResponse,
    Token,
)
from server.config import Limits
from server.engine.async_engine import AsyncEngine, GenerationInput, RequestHandle, resolved_seed
from server.engine.request import FinishReason, RequestEvent, SamplingParams, TokenInfo
from server.errors import GenerationError, UnavailableError, ValidationError

router = APIRouter()


def engine_of(request: Request) -> AsyncEngine:
    engine: Optional[AsyncEngine] = getattr(request.app.state, "engine", None)
    if engine is None:
        raise UnavailableError("the model is still loading")
    return engine


def to_generation_input(inputs: str, p: GenerateParameters, limits: Limits) -> GenerationInput:
    """LoRAX's parameter validation and meaning, as one pure function (422 names the field)."""
    _reject_unsupported(p)
    _check(p.temperature is None or p.temperature >= 0, "`temperature` must be >= 0 (0 means greedy)")
    _check(p.repetition_penalty is None or p.repetition_penalty > 0, "`repetition_penalty` must be strictly positive")
    _check(p.top_k is None or p.top_k > 0, "`top_k` must be strictly positive")
    _check(p.top_p is None or 0 < p.top_p <= 1, "`top_p` must be > 0.0 and <= 1.0")
    _check(p.typical_p is None or 0 < p.typical_p <= 1, "`typical_p` must be > 0.0 and <= 1.0")
    _check(p.max_new_tokens is None or p.max_new_tokens > 0, "`max_new_tokens` must be strictly positive")
    _check(p.truncate is None or p.truncate > 0, "`truncate` must be strictly positive")
    _check(p.seed is None or 0 <= p.seed < 2**64, "`seed` must be a non-negative 64-bit integer")
    _check(len(p.stop) <= limits.max_stop_sequences,
           f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(p.stop)}")
    warpers = (p.temperature not in (None, 1.0)) or bool(p.top_k) or (p.top_p or 1.0) < 1 or (p.typical_p or 1.0) < 1
    params = SamplingParams(
        temperature=1.0 if p.temperature is None else p.temperature,
        top_k=p.top_k or 0,
        top_p=p.top_p or 1.0,
        typical_p=p.typical_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        presence_penalty=p.presence_penalty or 0.0,
        do_sample=p.do_sample or warpers,
        seed=p.seed,
    )
    return GenerationInput(
        prompt=inputs,
        params=params,
        max_new_tokens=p.max_new_tokens,
        stop_sequences=tuple(p.stop),
        ignore_eos=p.ignore_eos_token,
        truncate=p.truncate,
        adapter_id=p.adapter_id or None,
        adapter_source=p.adapter_source,
        merged_adapters=p.merged_adapters,
    )


def _reject_unsupported(p: GenerateParameters) -> None:
    """Fields this build parses but does not act on are refused, never silently ignored."""
    _check(p.best_of in (None, 1), "`best_of` > 1 is not supported")
    _check(not p.watermark, "`watermark` is not supported")
    _check(not p.decoder_input_details, "`decoder_input_details` is not supported")
    _check(not p.return_k_alternatives, "`return_k_alternatives` is not supported")
    _check(p.response_format is None, "`response_format` is not supported")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValidationError(message)


def _token(info: TokenInfo) -> Token:
    return Token(id=info.id, text=info.text, logprob=info.logprob, special=info.special)


async def _collect(handle: RequestHandle) -> tuple[list[TokenInfo], FinishReason]:
    tokens: list[TokenInfo] = []
    async for event in handle:
        if event.token is not None:
            tokens.append(event.token)
        if event.finish_reason is not None:
            if event.error is not None:
                raise GenerationError(event.error)
            return tokens, event.finish_reason
    raise GenerationError("request ended without a result")


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request) -> JSONResponse:
    engine = engine_of(request)
    started = time.monotonic()
    handle = await engine.submit(to_generation_input(body.inputs, body.parameters, engine.limits))
    tokens, reason = await _collect(handle)
    req = handle.request
    text = (body.inputs if body.parameters.return_full_text else "") + req.output_text
    details = None
    if body.parameters.details:
        details = Details(
            finish_reason=reason.value,
            prompt_tokens=req.num_prompt_tokens,
            generated_tokens=req.num_generated,
            seed=resolved_seed(req),
            tokens=[_token(t) for t in tokens],
        )
    body_out = GenerateResponse(generated_text=text, details=details).model_dump(exclude_none=True)
    return JSONResponse(body_out, headers=_timing_headers(req, started))


def _timing_headers(req, started: float) -> dict[str, str]:
    ttft = (req.first_token_time or time.monotonic()) - req.arrival_time
    adapter = req.adapter.key if req.adapter is not None else None
    return {
        "x-adapter-id": adapter.id if adapter else "",
        "x-adapter-source": adapter.source if adapter else "",
        "x-prompt-tokens": str(req.num_prompt_tokens),
        "x-generated-tokens": str(req.num_generated),
        "x-time-to-first-token": f"{ttft * 1000:.1f}",
        "x-total-time": f"{(time.monotonic() - started) * 1000:.1f}",
    }


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request) -> EventSourceResponse:
    engine = engine_of(request)
    handle = await engine.submit(to_generation_input(body.inputs, body.parameters, engine.limits))
    prefix = body.inputs if body.parameters.return_full_text else ""
    return EventSourceResponse(_stream_events(handle, prefix), ping=15)


async def _stream_events(handle: RequestHandle, prefix: str) -> AsyncIterator[dict]:
    req = handle.request
    async for event in handle:
        if event.error is not None:
            yield {"data": json.dumps({"error": event.error, "error_type": "generation"})}
        elif event.token is not None:
            yield {"data": _stream_response(event, req, prefix).model_dump_json()}


def _stream_response(event: RequestEvent, req, prefix: str) -> StreamResponse:
    out = StreamResponse(token=_token(event.token))
    if event.finish_reason is not None:
        out.generated_text = prefix + req.output_text
        out.details = StreamDetails(
            finish_reason=event.finish_reason.value,
            prompt_tokens=req.num_prompt_tokens,
            generated_tokens=req.num_generated,
            seed=resolved_seed(req),
        )
    return out
