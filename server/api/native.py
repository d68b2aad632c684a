"""Native Predibase / LoRAX routes: POST /generate, POST /generate_stream (SSE) and POST / (the route
lorax-client uses), each also under the seeds' path /{tenant}/deployments/v2/llms/{deployment}/."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from server.api.schemas import (
    AlternativeToken,
    BestOfSequence,
    Details,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from server.config import Limits
from server.engine.async_engine import AsyncEngine, GenerationInput, RequestHandle, resolved_seed
from server.engine.request import FinishReason, OutputOptions, SamplingParams, TokenInfo
from server.engine.request import Request as EngineRequest
from server.errors import NotFoundError, UnavailableError, ValidationError

router = APIRouter()
DEPLOYMENT_PREFIX = "/{tenant}/deployments/v2/llms/{deployment}"
MAX_ALTERNATIVES = 10


def engine_of(request: Request) -> AsyncEngine:
    engine: Optional[AsyncEngine] = getattr(request.app.state, "engine", None)
    if engine is None:
        raise UnavailableError("the model is still loading")
    return engine


def check_deployment(request: Request, tenant: str, deployment: str) -> None:
    """The seeds' URLs name a deployment: it must be this server's model or an alias (configured, or
    made over the control plane). The
    tenant is ignored; it is a parameter so the OpenAPI document declares every path parameter."""
    engine = engine_of(request)
    names = {engine.loaded.name.lower(), *(n.lower() for n in request.app.state.settings.http.deployment_names)}
    control = getattr(request.app.state, "control", None)
    if control is not None:  # names made over the control plane's POST /v2/deployments
        names |= control.deployments.aliases()
    if deployment.lower() not in names:
        raise NotFoundError(f"deployment {deployment!r} not found; this server serves {sorted(names)}")


# -- parameters -----------------------------------------------------------------------------------
def to_generation_input(inputs: str, p: GenerateParameters, limits: Limits, stream: bool) -> GenerationInput:
    """LoRAX's parameter validation and meaning, as one pure function (422 names the field)."""
    _check(not p.watermark, "`watermark` is not supported")
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
    _check(not (p.decoder_input_details and stream), "`decoder_input_details` == true is not supported when streaming")
    _check(p.return_k_alternatives is None or 0 < p.return_k_alternatives <= MAX_ALTERNATIVES,
           f"`return_k_alternatives` must be between 1 and {MAX_ALTERNATIVES}")
    warpers = (p.temperature not in (None, 1.0)) or bool(p.top_k) or (p.top_p or 1.0) < 1 or (p.typical_p or 1.0) < 1
    _check_best_of(p, limits, stream, sampling=p.do_sample or warpers)
    return GenerationInput(
        prompt=inputs,
        params=SamplingParams(
            temperature=1.0 if p.temperature is None else p.temperature,
            top_k=p.top_k or 0,
            top_p=p.top_p or 1.0,
            typical_p=p.typical_p or 1.0,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            presence_penalty=p.presence_penalty or 0.0,
            do_sample=p.do_sample or warpers,
            seed=p.seed,
        ),
        max_new_tokens=p.max_new_tokens,
        stop_sequences=tuple(p.stop),
        ignore_eos=p.ignore_eos_token,
        truncate=p.truncate,
        adapter_id=p.adapter_id or None,
        adapter_source=p.adapter_source,
        merged_adapters=p.merged_adapters,
        options=OutputOptions(top_alternatives=p.return_k_alternatives or 0, prefill_logprobs=p.decoder_input_details),
        response_format=p.response_format,
    )


def _check_best_of(p: GenerateParameters, limits: Limits, stream: bool, sampling: bool) -> None:
    if p.best_of is None or p.best_of == 1:
        return
    _check(p.best_of > 1, "`best_of` must be strictly positive")
    _check(p.best_of <= limits.max_best_of, f"`best_of` must be <= {limits.max_best_of}. Given: {p.best_of}")
    _check(sampling, "`best_of` != 1 is not allowed for greedy decoding: set do_sample or a temperature")
    _check(not stream, "`best_of` != 1 is not supported when streaming tokens")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValidationError(message)


# -- responses ------------------------------------------------------------------------------------
def _token(info: TokenInfo, engine: AsyncEngine) -> Token:
    alternatives = None
    if info.alternatives:
        alternatives = [AlternativeToken(id=a.id, text=engine.token_text(a.id), logprob=a.logprob)
                        for a in info.alternatives]
    return Token(id=info.id, text=info.text, logprob=info.logprob, special=info.special,
                 alternative_tokens=alternatives)


def _prefill(req: EngineRequest, engine: AsyncEngine) -> list[PrefillToken]:
    return [PrefillToken(id=t, text=engine.token_text(t), logprob=lp)
            for t, lp in zip(req.prompt_ids, req.prefill_logprobs)]


def _timing_headers(req: EngineRequest, started: float) -> dict[str, str]:
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


async def _run_best_of(engine: AsyncEngine, inp: GenerationInput, n: int):
    """n sampled candidates (seeds seed, seed+1, ... when a seed is given); best total log-prob first."""
    def variant(i: int) -> GenerationInput:
        seed = None if inp.params.seed is None else (inp.params.seed + i) % 2**64
        return replace(inp, params=replace(inp.params, seed=seed))

    handles: list[RequestHandle] = []
    try:  # a later candidate's 429, or a disconnect, must not strand the earlier ones
        for i in range(n):
            handles.append(await engine.submit(variant(i)))
        results = await asyncio.gather(*(h.result() for h in handles))
    finally:
        for h in handles:
            h.close()
    ranked = sorted(zip(handles, results), key=lambda hr: -sum(hr[0].request.output_logprobs))
    return ranked


async def generate_response(body: GenerateRequest, request: Request) -> tuple[GenerateResponse, dict[str, str]]:
    engine = engine_of(request)
    started = time.monotonic()
    p = body.parameters
    inp = to_generation_input(body.inputs, p, engine.limits, stream=False)
    ranked = await _run_best_of(engine, inp, p.best_of or 1)
    (best, (tokens, reason)), others = ranked[0], ranked[1:]
    prefix = body.inputs if p.return_full_text else ""
    details = None
    if p.details or p.decoder_input_details:
        details = Details(
            finish_reason=reason.value,
            prompt_tokens=best.request.num_prompt_tokens,
            generated_tokens=best.request.num_generated,
            seed=resolved_seed(best.request),
            prefill=_prefill(best.request, engine),
            tokens=[_token(t, engine) for t in tokens],
            best_of_sequences=[_best_of_sequence(h, toks, why, prefix, engine) for h, (toks, why) in others] or None,
        )
    return GenerateResponse(generated_text=prefix + best.request.output_text, details=details), \
        _timing_headers(best.request, started)


def _best_of_sequence(handle: RequestHandle, tokens, reason: FinishReason, prefix: str,
                      engine: AsyncEngine) -> BestOfSequence:
    req = handle.request
    return BestOfSequence(generated_text=prefix + req.output_text, finish_reason=reason.value,
                          generated_tokens=req.num_generated, seed=resolved_seed(req),
                          prefill=_prefill(req, engine), tokens=[_token(t, engine) for t in tokens])


# -- routes ---------------------------------------------------------------------------------------
def closing(handles: list[RequestHandle]) -> BackgroundTask:
    """Runs after a stream ends however it ended: a stream cut before its first event never ran the
    iterator whose `finally` would have closed the handles (closing twice is harmless)."""
    async def close() -> None:
        for handle in handles:
            handle.close()

    return BackgroundTask(close)


def _dump(response: GenerateResponse) -> dict:
    """JSON as LoRAX writes it: optional parts left out when unused, a prefill's first logprob null."""
    body = response.model_dump()
    details = body["details"]
    if details is None:
        del body["details"]
        return body
    if details["best_of_sequences"] is None:
        del details["best_of_sequences"]
    for sequence in [details, *details.get("best_of_sequences", [])]:
        for token in sequence["tokens"]:
            if token["alternative_tokens"] is None:
                del token["alternative_tokens"]
    return body


async def generate(body: GenerateRequest, request: Request) -> JSONResponse:
    response, headers = await generate_response(body, request)
    return JSONResponse(_dump(response), headers=headers)


async def generate_stream(body: GenerateRequest, request: Request) -> EventSourceResponse:
    engine = engine_of(request)
    inp = to_generation_input(body.inputs, body.parameters, engine.limits, stream=True)
    handle = await engine.submit(inp)
    await handle.wait_started()  # an error before the first token is still an HTTP status (e.g. 429)
    prefix = body.inputs if body.parameters.return_full_text else ""
    return EventSourceResponse(_stream_events(handle, prefix, engine), ping=15, background=closing([handle]))


async def compat_generate(body: GenerateRequest, request: Request):
    """POST / as lorax-client and TGI use it: a one-element list, or SSE when `stream` is true."""
    if body.stream:
        return await generate_stream(body, request)
    response, headers = await generate_response(body, request)
    return JSONResponse([_dump(response)], headers=headers)


async def _stream_events(handle: RequestHandle, prefix: str, engine: AsyncEngine) -> AsyncIterator[dict]:
    req = handle.request
    async for event in handle:
        if event.error is not None:
            yield {"data": json.dumps({"error": event.error, "error_type": event.error_type})}
        elif event.token is not None:
            out = StreamResponse(token=_token(event.token, engine))
            if event.finish_reason is not None:
                out.generated_text = prefix + req.output_text
                out.details = StreamDetails(finish_reason=event.finish_reason.value,
                                            prompt_tokens=req.num_prompt_tokens,
                                            generated_tokens=req.num_generated, seed=resolved_seed(req))
            yield {"data": out.model_dump_json()}


for _prefix, _deps in (("", []), (DEPLOYMENT_PREFIX, [Depends(check_deployment)])):
    router.add_api_route(_prefix + "/generate", generate, methods=["POST"], response_model=GenerateResponse,
                         dependencies=_deps)
    router.add_api_route(_prefix + "/generate_stream", generate_stream, methods=["POST"], dependencies=_deps)
    router.add_api_route(_prefix or "/", compat_generate, methods=["POST"], dependencies=_deps)
