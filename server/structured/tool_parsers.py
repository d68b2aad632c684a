"""Tool calls in a model's own output format, parsed into OpenAI `tool_calls` as the reply streams.

One `ToolCallFormat` per family, chosen once from the chat template (or the `tool_call_parser`
setting): hermes (Qwen2.5/Qwen3, Hermes: `<tool_call>{...}</tool_call>`), llama3_json (Llama 3.1+:
a bare `{"name", "parameters"}` object, optionally after `<|python_tag|>`, several joined by `;`),
mistral (`[TOOL_CALLS]` then a JSON list) and json (a reply that is a call object or a list of them:
what the server's own tool prompt asks for). They differ only in what opens a run of calls; inside
one, every format is "JSON call objects between tags, blanks and `,;[]`", so one parser serves all.
"""

from __future__ import annotations

import json
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Optional, Union

from server.structured.reasoning import held_prefix

_DECODER = json.JSONDecoder()
_SEPARATORS = " \t\r\n,;[]"
_ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI sends arguments as a string)

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    openers: tuple[str, ...] = ()  # each starts a run of calls wherever it appears; text before it is content
    closers: tuple[str, ...] = ()  # skipped between calls
    bare_json: bool = False  # a reply whose first visible character is "{" or "[" is a run of calls too
    short_ids: bool = False  # Mistral's templates refuse call ids that are not 9 alphanumeric characters

    @property
    def markers(self) -> tuple[str, ...]:
        """Tags that may be special tokens in a real tokenizer: the reply text must keep them."""
        return self.openers + self.closers

    def new_id(self) -> str:
        if self.short_ids:
            return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))
        return f"call_{uuid.uuid4().hex[:24]}"


HERMES = ToolCallFormat("hermes", openers=("<tool_call>",), closers=("</tool_call>",))
LLAMA3_JSON = ToolCallFormat("llama3_json", openers=("<|python_tag|>",), bare_json=True)
MISTRAL = ToolCallFormat("mistral", openers=("[TOOL_CALLS]",), short_ids=True)
JSON = ToolCallFormat("json", bare_json=True)
TOOL_CALL_FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL, JSON)}


def detect_tool_call_format(template: str) -> ToolCallFormat:
    """The format a chat template teaches its model, recognised by the markers it renders calls with."""
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3_JSON
    return JSON


Piece = Union[str, ToolCall]  # content text, or a complete call


class ToolCallParser:
    """Splits one reply's content into text and complete calls, incrementally.

    Text streams through except what may still be the start of an opener. Inside a run of calls,
    each call is returned as soon as its JSON object closes. Whatever is not a call of a declared
    tool (malformed JSON, an undeclared name, prose) goes back to the content unchanged, from the
    opener that introduced it, so nothing the model wrote is lost.
    """

    def __init__(self, fmt: ToolCallFormat, tool_names: frozenset[str], max_calls: Optional[int]) -> None:
        self.fmt, self.names, self.max_calls = fmt, tool_names, max_calls
        self.buffer = ""
        self.in_calls = False
        self.at_start = True  # no visible content yet: a bare JSON reply may still begin
        self.unclaimed: Optional[int] = None  # where an opener that no call has claimed yet starts
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        self.buffer += text
        out: list[Piece] = []
        while True:
            before = (self.in_calls, len(self.buffer))
            out += self._calls() if self.in_calls else self._text()
            if (self.in_calls, len(self.buffer)) == before:
                return [p for p in out if p != ""]

    def finish(self) -> list[Piece]:
        """The reply ended: an unfinished call, or stray text, is content."""
        out = self.feed("")
        rest, self.buffer = self.buffer, ""
        if self.in_calls and self.unclaimed is None:
            rest = rest[self._skip(rest) :]  # blanks and closing tags after the last call
        elif self.in_calls:
            rest = rest[self.unclaimed :]
        return out + ([rest] if rest else [])

    def _text(self) -> list[Piece]:
        if self.at_start and self.fmt.bare_json:
            stripped = self.buffer.lstrip()
            if not stripped:
                return []
            if stripped[0] in "{[":
                self._open(len(self.buffer) - len(stripped))
                return []
        at = min((i for i in (self.buffer.find(o) for o in self.fmt.openers) if i >= 0), default=-1)
        if at >= 0:
            text = self.buffer[:at]
            self._open(at)
            return [text]
        text = self.buffer[: len(self.buffer) - held_prefix(self.buffer, self.fmt.openers)]
        self.buffer = self.buffer[len(text) :]
        self.at_start = self.at_start and not text.strip()
        return [text]

    def _open(self, at: int) -> None:
        self.buffer, self.in_calls, self.at_start, self.unclaimed = self.buffer[at:], True, False, 0

    def _calls(self) -> list[Piece]:
        out: list[Piece] = []
        while True:
            pos = self._skip(self.buffer)
            rest = self.buffer[pos:]
            if not rest or (rest[0] != "{" and any(t.startswith(rest) for t in self.fmt.markers)):
                return out  # blanks, or part of a tag so far: wait
            start = self.unclaimed if self.unclaimed is not None else pos
            if rest[0] != "{":  # prose after the calls, or no call at all: back to text
                out.append(self.buffer[start:pos])
                self.buffer, self.in_calls, self.unclaimed = rest, False, None
                return out
            try:
                value, end = _DECODER.raw_decode(self.buffer, pos)
            except json.JSONDecodeError:
                return out  # unfinished (or broken, and then content when the reply ends)
            call = self._call(value)
            if call is None:  # JSON, but not a call of a declared tool: text, with what follows it
                out.append(self.buffer[start:end])
                self.buffer, self.in_calls, self.unclaimed = self.buffer[end:], False, None
                return out
            if self.max_calls is None or self.calls < self.max_calls:
                self.calls += 1
                out.append(call)
            self.buffer, self.unclaimed = self.buffer[end:], None

    def _skip(self, text: str) -> int:
        """Past blanks, separators and tags; an opener passed is remembered as unclaimed."""
        pos = 0
        while pos < len(text):
            tag = next((t for t in self.fmt.markers if text.startswith(t, pos)), None)
            if tag is None and text[pos] not in _SEPARATORS:
                return pos
            if tag in self.fmt.openers and self.unclaimed is None:
                self.unclaimed = pos
            pos += len(tag) if tag else 1
        return pos

    def _call(self, value: object) -> Optional[ToolCall]:
        """A call of a declared tool: {"name", "arguments" | "parameters": object or JSON text}."""
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", value.get("parameters"))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ToolCall(self.fmt.new_id(), value["name"], json.dumps(arguments, ensure_ascii=False))
