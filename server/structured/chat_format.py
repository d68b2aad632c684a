"""How a chat template's model writes its replies, and one reply parsed as it streams.

`chat_format` decides once per chat template (cached) which reasoning format and which tool-call
format its model uses; `ReplyParser` then turns one reply's text into reasoning, content and tool
calls, delta by delta, the same way whether the reply is streamed or returned whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Union

from server.structured.reasoning import NoReasoning, ReasoningFormat, ReasoningSplitter, ThinkTags
from server.structured.tool_parsers import (
    JSON,
    TOOL_CALL_FORMATS,
    ToolCall,
    ToolCallFormat,
    ToolCallParser,
    detect_tool_call_format,
)
from server.structured.tools import ToolPlan

TOOL_CALL_PARSERS = ("auto", *TOOL_CALL_FORMATS)
REASONING_PARSERS = ("auto", "think", "none")


@dataclass(frozen=True)
class ChatFormat:
    reasoning: Union[ThinkTags, NoReasoning]
    tool_calls: ToolCallFormat


@lru_cache(maxsize=64)
def chat_format(template: str, tool_call_parser: str = "auto", reasoning_parser: str = "auto") -> ChatFormat:
    """The formats a template's model uses; "auto" recognises them by the markers the template renders."""
    tools = detect_tool_call_format(template) if tool_call_parser == "auto" else TOOL_CALL_FORMATS[tool_call_parser]
    thinks = "</think>" in template if reasoning_parser == "auto" else reasoning_parser == "think"
    return ChatFormat(ThinkTags() if thinks else NoReasoning(), tools)


@dataclass(frozen=True)
class ReplyDelta:
    reasoning: str = ""
    content: str = ""
    call: Optional[ToolCall] = None


class ReplyParser:
    """One reply: reasoning is split off first, then the rest is searched for tool calls."""

    def __init__(self, reasoning: ReasoningSplitter, tools: Optional[ToolCallParser], markers: frozenset[str]) -> None:
        self.reasoning, self.tools = reasoning, tools
        self.markers = markers  # special tokens' text that belongs in the reply (tags), unlike e.g. EOS
        self.called = False

    @classmethod
    def for_reply(cls, fmt: ChatFormat, prompt: str, plan: Optional[ToolPlan], parallel_calls: bool,
                  constrained: bool) -> "ReplyParser":
        """A grammar-constrained reply (a forced call, a response_format) has no reasoning; a forced
        call is the grammar's bare JSON object whatever the template's own format."""
        reasoning: ReasoningFormat = NoReasoning() if constrained else fmt.reasoning
        tools = None
        if plan is not None:
            forced = plan.forced is not None
            tools = ToolCallParser(JSON if forced else fmt.tool_calls, frozenset(t.name for t in plan.tools),
                                   max_calls=1 if forced or not parallel_calls else None)
        markers = (tools.fmt.markers if tools else ()) + (reasoning.markers if isinstance(reasoning, ThinkTags) else ())
        return cls(reasoning.splitter(prompt), tools, frozenset(markers))

    def feed(self, text: str) -> list[ReplyDelta]:
        split = self.reasoning.feed(text)
        return self._deltas(split.reasoning, self.tools.feed(split.content) if self.tools else [split.content])

    def finish(self) -> list[ReplyDelta]:
        split = self.reasoning.finish()
        pieces = self.tools.feed(split.content) + self.tools.finish() if self.tools else [split.content]
        return self._deltas(split.reasoning, pieces)

    def _deltas(self, reasoning: str, pieces: list) -> list[ReplyDelta]:
        out = [ReplyDelta(reasoning=reasoning)] if reasoning else []
        for piece in pieces:
            if isinstance(piece, ToolCall):
                self.called = True
                out.append(ReplyDelta(call=piece))
            elif piece:
                out.append(ReplyDelta(content=piece))
        return out
