"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models (also under the seeds'
/{tenant}/deployments/v2/llms/{deployment}/v1/...). The adapter is the `model`; "" or the base
model's name means no adapter. Chat prompts use the adapter's own chat template when it ships one,
and replies are read in that template's format: reasoning and native tool calls."""

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
from server.structured.chat_format import ReplyDelta, ReplyParser, chat_format
from server.structured.guide import MAX_SCHEMA_DEPTH, nesting_depth
from server.structured.tools import ToolPlan, parse_tools, render_messages

router = APIRouter()
MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_TEMPLATE_KWARGS_BYTES = 16 * 1024
# apply_chat_template's own parameters and what the route sets itself: not for chat_template_kwargs
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})
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
    # fields the request leaves out take the checkpoint's generation_config.json defaults, as vLLM does
    defaults = engine.loaded.generation
    temperature = _first(body.temperature, defaults.temperature, 1.0)
    return GenerationInput(
        prompt=prompt,
        params=SamplingParams(temperature=temperature, top_k=_first(body.top_k, defaults.top_k, 0),
                              top_p=_first(body.top_p, defaults.top_p, 1.0),
                              repetition_penalty=_first(body.repetition_penalty, defaults.repetition_penalty, 1.0),
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


def _first(*values):
    return next(v for v in values if v is not None)


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


def requested_format(body: SamplingFields) -> Optional[dict]:
    """The request's response_format, or vLLM's extra body fields (guided_json / guided_regex /
    guided_choice / guided_grammar, or structured_outputs {json | regex | choice | grammar}) as the
    response_format they mean; at most one of them."""
    guided = {kind: getattr(body, f"guided_{kind}") for kind in _GUIDED if getattr(body, f"guided_{kind}") is not None}
    guided.update({k: v for k, v in (body.structured_outputs or {}).items() if k in _GUIDED and v is not None})
    given = len(guided) + (body.response_format is not None)
    _check(given <= 1, "give one of response_format, guided_json, guided_regex, guided_choice, guided_grammar "
                       "and structured_outputs")
    if not guided:
        return body.response_format
    kind, value = guided.popitem()
    if kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValidationError("guided_json must be a JSON schema") from None
    return _GUIDED[kind](value)


_GUIDED = {"json": lambda v: {"type": "json_schema", "json_schema": {"schema": v}},
           "regex": lambda v: {"type": "regex", "pattern": v},
           "choice": lambda v: {"type": "choice", "choices": v},
           "grammar": lambda v: {"type": "grammar", "grammar": v}}


def chat_template_of(engine: AsyncEngine, adapter: Optional[AdapterWeights]) -> str:
    """The adapter's own chat template when it ships one, else the base model's."""
    if adapter is not None and adapter.chat_template:
        return adapter.chat_template
    return engine.loaded.tokenizer.chat_template or ""


def template_kwargs(body: ChatCompletionRequest) -> dict:
    """chat_template_kwargs (vLLM's extra body field), checked: variables the template may read."""
    kwargs = body.chat_template_kwargs or {}
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    _check(not reserved, f"chat_template_kwargs may not set {', '.join(reserved)}")
    _check(nesting_depth(kwargs) <= MAX_SCHEMA_DEPTH, f"chat_template_kwargs nest more than {MAX_SCHEMA_DEPTH} levels")
    _check(len(json.dumps(kwargs)) <= MAX_TEMPLATE_KWARGS_BYTES,
           f"chat_template_kwargs are larger than {MAX_TEMPLATE_KWARGS_BYTES} bytes")
    return kwargs


def chat_prompt(body: ChatCompletionRequest, engine: AsyncEngine, template: str, plan: Optional[ToolPlan]) -> str:
    for m in body.messages:
        _check(not isinstance(m.content, list) or all(p.get("type") == "text" for p in m.content),
               "only text content parts are supported")
    messages = [{**m.model_dump(exclude_none=True, include={"role", "tool_calls", "tool_call_id", "name"}),
                 "content": m.text()} for m in body.messages]
    knows_tools = "tools" in template
    extra = {"tools": body.tools} if plan is not None and knows_tools else {}
    try:
        return engine.loaded.tokenizer.apply_chat_template(
            render_messages(messages, plan, knows_tools), chat_template=template or None, tokenize=False,
            add_generation_prompt=True, **template_kwargs(body), **extra)
    except Exception as exc:  # a template that rejects these messages (e.g. roles out of order)
        raise ValidationError(f"the chat template could not render these messages: {exc}") from None


def constrained_format(body: ChatCompletionRequest, plan: Optional[ToolPlan]) -> Optional[dict]:
    """A forced tool call is a JSON schema constraint; otherwise the request's own response_format."""
    requested = requested_format(body)
    if plan is None or plan.forced is None:
        return requested
    _check(requested in (None, {"type": "text"}), "response_format and a forced tool call exclude each other")
    return {"type": "json_object", "schema": plan.schema}


def reply_parser(body: ChatCompletionRequest, request: Request, template: str, prompt: str,
                 plan: Optional[ToolPlan], response_format: Optional[dict]) -> ReplyParser:
    """A fresh parser for one choice, in the format of the template's model (or the configured one)."""
    chat = request.app.state.settings.chat
    fmt = chat_format(template, chat.tool_call_parser, chat.reasoning_parser)
    constrained = bool(response_format) and response_format.get("type") != "text"
    return ReplyParser.for_reply(fmt, prompt, plan, body.parallel_tool_calls, constrained)


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
    template = chat_template_of(engine, adapter)
    prompt = chat_prompt(body, engine, template, plan)
    inp = replace(generation_input(body, prompt, engine, body.max_completion_tokens or body.max_tokens, top,
                                   add_special_tokens=False),
                  response_format=constrained_format(body, plan))
    readers = [ReplyReader(inp.stop_sequences, reply_parser(body, request, template, prompt, plan, inp.response_format))
               for _ in range(body.n)]
    handles = await submit_choices(engine, inp, body.n)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model,
            "system_fingerprint": f"loraserve-{__version__}"}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        choices = [ChoiceStream(i, reader, body.logprobs, body.include_reasoning, engine)
                   for i, reader in enumerate(readers)]
        await wait_started(handles)
        return EventSourceResponse(_chat_stream(handles, meta, choices, include_usage, body.n), ping=15,
                                   background=closing(handles))
    results = await asyncio.gather(*(h.result() for h in handles))
    choices = []
    for index, (reader, (tokens, reason)) in enumerate(zip(readers, results)):
        deltas = [d for t in tokens for d in reader.read(t)] + reader.end()
        logprobs = {"content": [chat_logprob(t, engine) for t in tokens if not t.special]} if body.logprobs else None
        choices.append({"index": index, "message": chat_message(deltas, body.include_reasoning), "logprobs": logprobs,
                        "finish_reason": "tool_calls" if reader.parser.called else FINISH[reason]})
    return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": usage(handles, body.n)})


class ReplyReader:
    """One choice's reply as the client sees it: special tokens dropped (but for the format's own
    tags, which real tokenizers often make special), stop sequences cut, then parsed."""

    def __init__(self, stops: tuple[str, ...], parser: ReplyParser) -> None:
        self.trimmer, self.parser = StopTrimmer(stops), parser

    def read(self, token: TokenInfo) -> list[ReplyDelta]:
        if token.special and token.text not in self.parser.markers:
            return []
        return self.parser.feed(self.trimmer.feed(token.text))

    def end(self) -> list[ReplyDelta]:
        return self.parser.feed(self.trimmer.flush()) + self.parser.finish()


def chat_message(deltas: list[ReplyDelta], include_reasoning: bool) -> dict:
    """The assistant message: content (null when the reply is only tool calls), tool_calls, and
    reasoning_content when the model reasoned."""
    content = "".join(d.content for d in deltas)
    calls = [d.call.as_openai() for d in deltas if d.call is not None]
    reasoning = "".join(d.reasoning for d in deltas)
    message: dict = {"role": "assistant", "content": None if calls and not content.strip() else content}
    if calls:
        message["tool_calls"] = calls
    if reasoning and include_reasoning:
        message["reasoning_content"] = reasoning
    return message


class ChoiceStream:
    """Turns one choice's events into chunk payloads: reasoning and content deltas as they come,
    each tool call as soon as it is complete (a head with id and name, then its arguments)."""

    def __init__(self, index: int, reader: ReplyReader, logprobs: bool, include_reasoning: bool,
                 engine: AsyncEngine) -> None:
        self.index, self.reader, self.logprobs, self.engine = index, reader, logprobs, engine
        self.include_reasoning = include_reasoning
        self.calls = 0

    def _choice(self, delta: dict, finish: Optional[str] = None, logprobs=None) -> dict:
        return {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def on_token(self, token: TokenInfo) -> list[dict]:
        payloads = self._payloads(self.reader.read(token))
        if self.logprobs and not token.special:
            lp = {"content": [chat_logprob(token, self.engine)]}
            payloads = [{**payloads[0], "logprobs": lp}, *payloads[1:]] if payloads else [self._choice({}, None, lp)]
        return payloads

    def on_finish(self, reason: FinishReason) -> list[dict]:
        payloads = self._payloads(self.reader.end())
        return payloads + [self._choice({}, "tool_calls" if self.reader.parser.called else FINISH.get(reason, "stop"))]

    def _payloads(self, deltas: list[ReplyDelta]) -> list[dict]:
        out = []
        for d in deltas:
            if d.reasoning and self.include_reasoning:
                out.append(self._choice({"reasoning_content": d.reasoning}))
            if d.content:
                out.append(self._choice({"content": d.content}))
            if d.call is not None:
                head = {"index": self.calls, "id": d.call.id, "type": "function",
                        "function": {"name": d.call.name, "arguments": ""}}
                out.append(self._choice({"tool_calls": [head]}))
                out.append(self._choice({"tool_calls": [{"index": self.calls,
                                                         "function": {"arguments": d.call.arguments}}]}))
                self.calls += 1
        return out


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
        if event.token is not None:
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
            inp = replace(generation_input(body, prompt, engine, body.max_tokens or 16, body.logprobs or 0, True),
                          response_format=requested_format(body))
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
