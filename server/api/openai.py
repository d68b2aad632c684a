"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models (also under the seeds'
/{tenant}/deployments/v2/llms/{deployment}/v1/...). The adapter is the `model`; "" or the base
model's name means no adapter. Chat prompts use the adapter's own chat template when it ships one."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from server import __version__
from server.adapters.weights import AdapterWeights
from server.api.errors import openai_error
from server.api.native import DEPLOYMENT_PREFIX, check_deployment, closing, engine_of
from server.api.openai_schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.engine.async_engine import AsyncEngine, GenerationInput, RequestHandle
from server.engine.request import FinishReason, OutputOptions, RequestEvent, SamplingParams, TokenInfo
from server.errors import NotFoundError, ValidationError, error_of_type
from server.structured.tools import ToolPlan, as_tool_call, parse_tools, render_messages

router = APIRouter()
MAX_N = 8
MAX_TOP_LOGPROBS = 20
FINISH = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


# -- request -> GenerationInput ---------------------------------------------------------------------
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValidationError(message)


def adapter_id_of(body: SamplingFields, engine: AsyncEngine) -> Optional[str]:
    return None if body.model in ("", engine.loaded.name) else body.model


def generation_input(body: SamplingFields, prompt: str, engine: AsyncEngine, max_tokens: Optional[int],
                     top_logprobs: int, add_special_tokens: bool) -> GenerationInput:
    _check(1 <= body.n <= MAX_N, f"n must be between 1 and {MAX_N}")
    _check(body.temperature is None or 0 <= body.temperature <= 2, "temperature must be between 0 and 2")
    _check(body.top_p is None or 0 < body.top_p <= 1, "top_p must be > 0 and <= 1")
    _check(all(-2 <= p <= 2 for p in (body.presence_penalty or 0, body.frequency_penalty or 0)),
           "presence_penalty and frequency_penalty must be between -2 and 2")
    _check(max_tokens is None or max_tokens > 0, "max_tokens must be at least 1")
    _check(body.top_k is None or body.top_k > 0, "top_k must be strictly positive")
    _check(body.repetition_penalty is None or body.repetition_penalty > 0, "repetition_penalty must be positive")
    _check(0 <= top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    _check(len(stops) <= engine.limits.max_stop_sequences,
           f"stop supports up to {engine.limits.max_stop_sequences} sequences")
    temperature = 1.0 if body.temperature is None else body.temperature
    return GenerationInput(
        prompt=prompt,
        params=SamplingParams(temperature=temperature, top_k=body.top_k or 0, top_p=body.top_p or 1.0,
                              repetition_penalty=body.repetition_penalty or 1.0,
                              frequency_penalty=body.frequency_penalty or 0.0,
                              presence_penalty=body.presence_penalty or 0.0,
                              do_sample=temperature > 0, seed=body.seed),
        max_new_tokens=max_tokens,
        stop_sequences=tuple(stops),
        ignore_eos=body.ignore_eos_token,
        adapter_id=adapter_id_of(body, engine),
        adapter_source=body.adapter_source,
        processors=(logit_bias_processor(body.logit_bias, len(engine.loaded.tokenizer)),) if body.logit_bias else (),
        options=OutputOptions(top_alternatives=top_logprobs),
        add_special_tokens=add_special_tokens,
    )


def logit_bias_processor(bias: dict[str, float], vocab_size: int):
    try:
        ids = {int(k): float(v) for k, v in bias.items()}
    except ValueError:
        raise ValidationError("logit_bias keys must be token ids") from None
    _check(all(0 <= i < vocab_size for i in ids), f"logit_bias token ids must be in [0, {vocab_size})")
    _check(all(-100 <= v <= 100 for v in ids.values()), "logit_bias values must be between -100 and 100")

    def apply(logits, request):  # [vocab] -> [vocab]
        logits = logits.clone()
        for token_id, value in ids.items():
            logits[token_id] += value
        return logits

    return apply


def chat_prompt(body: ChatCompletionRequest, engine: AsyncEngine, adapter: Optional[AdapterWeights],
                plan: Optional[ToolPlan]) -> str:
    for m in body.messages:
        _check(not isinstance(m.content, list) or all(p.get("type") == "text" for p in m.content),
               "only text content parts are supported")
    messages = [{**m.model_dump(exclude_none=True, include={"role", "tool_calls", "tool_call_id", "name"}),
                 "content": m.text()} for m in body.messages]
    template = adapter.chat_template if adapter is not None and adapter.chat_template else None
    knows_tools = "tools" in (template or engine.loaded.tokenizer.chat_template or "")
    extra = {"tools": body.tools} if plan is not None and knows_tools else {}
    try:
        return engine.loaded.tokenizer.apply_chat_template(
            render_messages(messages, plan, knows_tools), chat_template=template, tokenize=False,
            add_generation_prompt=True, **extra)
    except Exception as exc:  # a template that rejects these messages (e.g. roles out of order)
        raise ValidationError(f"the chat template could not render these messages: {exc}") from None


def constrained_format(body: ChatCompletionRequest, plan: Optional[ToolPlan]) -> Optional[dict]:
    """A forced tool call is a JSON schema constraint; otherwise the request's own response_format."""
    if plan is None or plan.forced is None:
        return body.response_format
    _check(body.response_format in (None, {"type": "text"}),
           "response_format and a forced tool call exclude each other")
    return {"type": "json_object", "schema": plan.schema}


# -- running n choices ------------------------------------------------------------------------------
async def submit_choices(engine: AsyncEngine, inp: GenerationInput, n: int) -> list[RequestHandle]:
    """n independent generations; with a seed, choice i uses seed + i (reproducible, yet distinct)."""
    handles = []
    try:
        for i in range(n):
            seed = None if inp.params.seed is None else (inp.params.seed + i) % 2**64
            handles.append(await engine.submit(replace(inp, params=replace(inp.params, seed=seed))))
    except BaseException:  # a 429 for a later choice, or the client went away: free the earlier ones
        for handle in handles:
            handle.close()
        raise
    return handles


async def wait_started(handles: list[RequestHandle]) -> None:
    """Every choice has its first token (or the error that becomes this response's status)."""
    try:
        await asyncio.gather(*(h.wait_started() for h in handles))
    except BaseException:
        for handle in handles:
            handle.close()
        raise


def stream_error(event: RequestEvent) -> dict:
    """An error after the stream started: one data line in OpenAI's error shape."""
    _, error_type, code = openai_error(error_of_type(event.error_type, event.error))
    return {"data": json.dumps({"error": {"message": event.error, "type": error_type, "param": None, "code": code}})}


async def merged_events(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, RequestEvent]]:
    """Events of several requests as they come, tagged with the choice index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        async for event in handle:
            await queue.put((index, event))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        for _ in range(len(handles)):
            while True:
                index, event = await queue.get()
                yield index, event
                if event.finish_reason is not None:
                    break
    finally:
        for task in tasks:
            task.cancel()
        for handle in handles:
            handle.close()


class StopTrimmer:
    """OpenAI leaves the stop sequence out of the text: hold back what may start one, cut at a match."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.pending, self.stopped = [s for s in stops if s], "", False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.pending += delta
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def trimmed_text(text: str, stops: tuple[str, ...]) -> str:
    trimmer = StopTrimmer(stops)
    return trimmer.feed(text) + trimmer.flush()


# -- logprobs -------------------------------------------------------------------------------------
def chat_logprob(token: TokenInfo, engine: AsyncEngine) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = engine.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {**entry(token.id, token.logprob), "top_logprobs": [entry(a.id, a.logprob) for a in token.alternatives]}


def usage(handles: list[RequestHandle], n: int) -> dict:
    """Each prompt counts once however many choices it has (handles come in runs of n per prompt)."""
    prompt = sum(h.request.num_prompt_tokens for h in handles[::n])
    completion = sum(h.request.num_generated for h in handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -- chat completions -----------------------------------------------------------------------------
async def chat_completions(body: ChatCompletionRequest, request: Request):
    engine = engine_of(request)
    plan = parse_tools(body.tools, body.tool_choice)
    adapter = await engine.adapter(adapter_id_of(body, engine), body.adapter_source)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    _check(body.logprobs or not body.top_logprobs, "top_logprobs requires logprobs: true")
    inp = replace(generation_input(body, chat_prompt(body, engine, adapter, plan), engine,
                                   body.max_completion_tokens or body.max_tokens, top, add_special_tokens=False),
                  response_format=constrained_format(body, plan))
    handles = await submit_choices(engine, inp, body.n)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
            "system_fingerprint": f"loraserve-{__version__}"}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        choices = [ChoiceStream(i, inp.stop_sequences, plan, body.logprobs, engine) for i in range(body.n)]
        await wait_started(handles)
        return EventSourceResponse(_chat_stream(handles, meta, choices, include_usage, body.n), ping=15,
                                   background=closing(handles))
    results = await asyncio.gather(*(h.result() for h in handles))
    choices = []
    for index, (handle, (tokens, reason)) in enumerate(zip(handles, results)):
        text = trimmed_text(handle.request.output_text, inp.stop_sequences)
        logprobs = {"content": [chat_logprob(t, engine) for t in tokens if not t.special]} if body.logprobs else None
        call = as_tool_call(text, plan) if plan is not None else None
        message = {"role": "assistant", "content": None, "tool_calls": [call]} if call else \
            {"role": "assistant", "content": text}
        choices.append({"index": index, "message": message, "logprobs": logprobs,
                        "finish_reason": "tool_calls" if call else FINISH[reason]})
    return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": usage(handles, body.n)})


class ChoiceStream:
    """Turns one choice's events into chunk payloads: text deltas as they come, except that a reply
    which may be a tool call (tools given, first visible character "{") is held until it ends."""

    def __init__(self, index: int, stops: tuple[str, ...], plan: Optional[ToolPlan], logprobs: bool,
                 engine: AsyncEngine) -> None:
        self.index, self.plan, self.logprobs, self.engine = index, plan, logprobs, engine
        self.trimmer = StopTrimmer(stops)
        self.held: Optional[str] = "" if plan is not None else None  # None: streaming freely

    def _choice(self, delta: dict, finish: Optional[str] = None, logprobs=None) -> dict:
        return {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def on_token(self, token: TokenInfo) -> list[dict]:
        text = self.trimmer.feed(token.text)
        lp = {"content": [chat_logprob(token, self.engine)]} if self.logprobs else None
        if self.held is not None:
            self.held += text
            if not self.held.strip() or self.held.lstrip().startswith("{"):
                return []  # undecided, or a possible tool call: hold
            text, self.held = self.held, None
        return [self._choice({"content": text}, logprobs=lp)] if text or lp else []

    def on_finish(self, reason: FinishReason) -> list[dict]:
        rest = self.trimmer.flush()
        if self.held is None:
            return [self._choice({"content": rest} if rest else {}, FINISH.get(reason, "stop"))]
        text = self.held + rest
        call = as_tool_call(text, self.plan)
        if call is None:
            return [self._choice({"content": text}), self._choice({}, FINISH.get(reason, "stop"))]
        head = {"index": 0, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}
        args = {"index": 0, "function": {"arguments": call["function"]["arguments"]}}
        return [self._choice({"tool_calls": [head]}), self._choice({"tool_calls": [args]}),
                self._choice({}, "tool_calls")]


async def _chat_stream(handles, meta, choices: list[ChoiceStream], include_usage: bool,
                       n: int) -> AsyncIterator[dict]:
    def chunk(payload: list, usage_value=None) -> dict:
        body = {**meta, "object": "chat.completion.chunk", "choices": payload}
        if include_usage:
            body["usage"] = usage_value
        return {"data": json.dumps(body)}

    for choice in choices:
        yield chunk([choice._choice({"role": "assistant", "content": ""})])
    async for index, event in merged_events(handles):
        if event.error is not None:
            yield stream_error(event)
            return
        if event.token is not None and not event.token.special:
            for payload in choices[index].on_token(event.token):
                yield chunk([payload])
        if event.finish_reason is not None:
            for payload in choices[index].on_finish(event.finish_reason):
                yield chunk([payload])
    if include_usage:
        yield chunk([], usage(handles, n))
    yield {"data": "[DONE]"}


# -- text completions -----------------------------------------------------------------------------
async def completions(body: CompletionRequest, request: Request):
    engine = engine_of(request)
    _check(body.suffix is None, "suffix is not supported")
    _check(body.best_of in (None, 1), "best_of is not supported on /v1/completions")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    _check(bool(prompts) and all(isinstance(p, str) and p for p in prompts), "prompt must be non-empty text")
    handles: list[RequestHandle] = []
    try:
        for prompt in prompts:
            inp = generation_input(body, prompt, engine, body.max_tokens or 16, body.logprobs or 0, True)
            handles += await submit_choices(engine, inp, body.n)
    except BaseException:
        for handle in handles:
            handle.close()
        raise
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
            "system_fingerprint": f"loraserve-{__version__}"}
    echoes = [prompts[i // body.n] if body.echo else "" for i in range(len(handles))]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        await wait_started(handles)
        return EventSourceResponse(_completion_stream(handles, meta, inp.stop_sequences, echoes, include_usage,
                                                      body.n), ping=15, background=closing(handles))
    results = await asyncio.gather(*(h.result() for h in handles))
    choices = []
    for index, (handle, (tokens, reason)) in enumerate(zip(handles, results)):
        text = echoes[index] + trimmed_text(handle.request.output_text, inp.stop_sequences)
        choices.append({"index": index, "text": text, "finish_reason": FINISH[reason],
                        "logprobs": legacy_logprobs(tokens, engine) if body.logprobs is not None else None})
    return JSONResponse({**meta, "object": "text_completion", "choices": choices, "usage": usage(handles, body.n)})


def legacy_logprobs(tokens: list[TokenInfo], engine: AsyncEngine) -> dict:
    visible = [t for t in tokens if not t.special]
    offsets, position = [], 0
    for t in visible:
        offsets.append(position)
        position += len(t.text)
    return {"tokens": [engine.token_text(t.id) for t in visible], "token_logprobs": [t.logprob for t in visible],
            "top_logprobs": [{engine.token_text(a.id): a.logprob for a in t.alternatives} for t in visible],
            "text_offset": offsets}


async def _completion_stream(handles, meta, stops, echoes, include_usage: bool, n: int) -> AsyncIterator[dict]:
    def chunk(choices: list, usage_value=None) -> dict:
        body = {**meta, "object": "text_completion", "choices": choices}
        if include_usage:
            body["usage"] = usage_value
        return {"data": json.dumps(body)}

    trimmers = [StopTrimmer(stops) for _ in handles]
    for index, echo in enumerate(echoes):
        if echo:
            yield chunk([{"index": index, "text": echo, "logprobs": None, "finish_reason": None}])
    async for index, event in merged_events(handles):
        if event.error is not None:
            yield stream_error(event)
            return
        text = trimmers[index].feed(event.token.text) if event.token and not event.token.special else ""
        if event.finish_reason is not None:
            text += trimmers[index].flush()
            yield chunk([{"index": index, "text": text, "logprobs": None,
                          "finish_reason": FINISH.get(event.finish_reason, "stop")}])
        elif text:
            yield chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])
    if include_usage:
        yield chunk([], usage(handles, n))
    yield {"data": "[DONE]"}


# -- models ---------------------------------------------------------------------------------------
def model_cards(engine: AsyncEngine) -> list[dict]:
    created = int(engine.loaded.model_dir.stat().st_mtime)
    ids = [engine.loaded.name, *engine.store.known_ids()]
    return [{"id": i, "object": "model", "created": created, "owned_by": "loraserve",
             "root": engine.loaded.name, "parent": None if i == engine.loaded.name else engine.loaded.name}
            for i in ids]


async def list_models(request: Request) -> dict:
    return {"object": "list", "data": model_cards(engine_of(request))}


async def get_model(model_id: str, request: Request) -> dict:
    for card in model_cards(engine_of(request)):
        if card["id"] == model_id:
            return card
    raise NotFoundError(f"The model '{model_id}' does not exist")


for _prefix, _deps in (("", []), (DEPLOYMENT_PREFIX, [Depends(check_deployment)])):
    router.add_api_route(_prefix + "/v1/chat/completions", chat_completions, methods=["POST"], dependencies=_deps)
    router.add_api_route(_prefix + "/v1/completions", completions, methods=["POST"], dependencies=_deps)
    router.add_api_route(_prefix + "/v1/models", list_models, methods=["GET"], dependencies=_deps)
    router.add_api_route(_prefix + "/v1/models/{model_id:path}", get_model, methods=["GET"], dependencies=_deps)
