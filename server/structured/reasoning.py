"""Reasoning output: the text a reasoning model writes inside <think>...</think> becomes
`reasoning_content`, the rest `content` (vLLM's and DeepSeek's convention).

A format is chosen once per chat template (`ThinkTags` when the template knows </think>, else
`NoReasoning`); each reply gets its own incremental splitter, fed text deltas as they stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol


@dataclass(frozen=True)
class Split:
    """What one piece of reply text adds to the reasoning and to the answer."""

    reasoning: str = ""
    content: str = ""


class ReasoningSplitter(Protocol):
    def feed(self, text: str) -> Split: ...

    def finish(self) -> Split: ...


class ReasoningFormat(Protocol):
    name: str

    def splitter(self, prompt: str) -> ReasoningSplitter: ...


class _PassThrough:
    def feed(self, text: str) -> Split:
        return Split(content=text)

    def finish(self) -> Split:
        return Split()


@dataclass(frozen=True)
class NoReasoning:
    """Templates without thinking: every character is content."""

    name: str = "none"

    def splitter(self, prompt: str) -> ReasoningSplitter:
        return _PassThrough()


@dataclass(frozen=True)
class ThinkTags:
    """<think>reasoning</think> answer. The reply may open the block itself, or the prompt may have
    opened it already (templates that force thinking end the generation prompt with "<think>\\n"),
    in which case only </think> appears in the reply."""

    start: str = "<think>"
    end: str = "</think>"
    name: str = "think"

    @property
    def markers(self) -> tuple[str, ...]:
        return self.start, self.end

    def splitter(self, prompt: str) -> ReasoningSplitter:
        return ThinkSplitter(self.start, self.end, inside=prompt.rstrip().endswith(self.start))


class _State(Enum):
    OPENING = "opening"  # nothing shown yet: the reply may still open a thinking block
    THINKING = "thinking"
    CLOSED = "closed"  # after </think>: blank lines before the answer are dropped
    ANSWER = "answer"


class ThinkSplitter:
    """Incremental: holds back only what may still turn out to be a tag, or whitespace that may end
    the reasoning (reasoning and answer are returned without their surrounding blank lines)."""

    def __init__(self, start: str, end: str, inside: bool) -> None:
        self.start, self.end = start, end
        self.state = _State.THINKING if inside else _State.OPENING
        self.pending = ""
        self.reasoning_started = False

    def feed(self, text: str) -> Split:
        self.pending += text
        reasoning, content = "", ""
        while self.pending:
            before = (self.state, len(self.pending))
            if self.state is _State.OPENING:
                content += self._opening()
            elif self.state is _State.THINKING:
                reasoning += self._thinking()
            elif self.state is _State.CLOSED:
                stripped = self.pending.lstrip()
                self.pending = stripped
                if stripped:
                    self.state = _State.ANSWER
            else:
                content, self.pending = content + self.pending, ""
            if (self.state, len(self.pending)) == before:
                break  # waiting for more text
        return Split(reasoning, content)

    def finish(self) -> Split:
        rest, self.pending = self.pending, ""
        if self.state is _State.THINKING:  # cut off while thinking: it was all reasoning
            rest = rest.rstrip() if self.reasoning_started else rest.strip()
            return Split(reasoning=rest)
        return Split(content=rest if self.state is not _State.CLOSED else rest.lstrip())

    def _opening(self) -> str:
        stripped = self.pending.lstrip()
        if stripped.startswith(self.start):
            self.pending, self.state = stripped[len(self.start) :], _State.THINKING
            return ""
        if self.start.startswith(stripped):
            return ""  # blank, or a prefix of the tag: undecided
        out, self.pending, self.state = self.pending, "", _State.ANSWER
        return out

    def _thinking(self) -> str:
        if not self.reasoning_started:
            self.pending = self.pending.lstrip()
        at = self.pending.find(self.end)
        if at >= 0:
            out, self.pending = self.pending[:at].rstrip(), self.pending[at + len(self.end) :]
            self.state = _State.CLOSED
        else:  # hold a possible start of </think>, and the blanks before it
            out = self.pending[: len(self.pending) - held_prefix(self.pending, (self.end,))].rstrip()
            self.pending = self.pending[len(out) :]
        self.reasoning_started = self.reasoning_started or bool(out)
        return out


def held_prefix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a marker (and may yet complete it)."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)
