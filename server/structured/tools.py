"""Function calling: OpenAI's `tools` and `tool_choice`, and prompts for templates without tools.

With tool_choice "required" or a named function the whole reply is constrained to the JSON object
{"name": ..., "arguments": {...}} (name from the declared tools, arguments valid against the tool's
parameters schema); with "auto" the model answers freely, and the calls it writes in its own
format are parsed by structured/tool_parsers.py. Chat templates that know tools get them natively;
for the others a system message describes the tools and the (JSON) format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from server.errors import ValidationError
from server.structured.guide import MAX_SCHEMA_DEPTH, nesting_depth

MAX_TOOLS = 64
MAX_TOOLS_BYTES = 64 * 1024
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for generation: which tools, and must the reply be a call."""

    tools: tuple[Tool, ...]
    forced: Optional[tuple[Tool, ...]]  # the reply must call one of these (required / named); None: auto

    @property
    def schema(self) -> Optional[dict]:
        """The JSON schema a forced reply must satisfy."""
        if self.forced is None:
            return None
        calls = [{"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                  "properties": {"name": {"const": t.name}, "arguments": t.parameters}} for t in self.forced]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}


def parse_tools(tools: Optional[list[dict]], tool_choice: Any) -> Optional[ToolPlan]:
    """Validate OpenAI's `tools` and `tool_choice`; None when no tool may be called."""
    if not tools or tool_choice == "none":
        _check(tool_choice in (None, "none", "auto") or not tools, "tool_choice needs tools")
        return None
    _check(len(tools) <= MAX_TOOLS, f"at most {MAX_TOOLS} tools")
    _check(nesting_depth(tools) <= MAX_SCHEMA_DEPTH,
           f"tool definitions are nested more than {MAX_SCHEMA_DEPTH} levels deep")
    _check(len(json.dumps(tools)) <= MAX_TOOLS_BYTES, f"tool definitions are larger than {MAX_TOOLS_BYTES} bytes")
    parsed = tuple(_tool(t) for t in tools)
    _check(len({t.name for t in parsed}) == len(parsed), "tool names must be unique")
    if tool_choice in (None, "auto"):
        return ToolPlan(parsed, None)
    if tool_choice == "required":
        return ToolPlan(parsed, parsed)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    chosen = [t for t in parsed if t.name == name]
    _check(bool(chosen), f"tool_choice names a function that is not in tools: {name!r}")
    return ToolPlan(parsed, tuple(chosen))


def _tool(raw: dict) -> Tool:
    _check(isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("function"), dict),
           'each tool must be {"type": "function", "function": {...}}')
    fn = raw["function"]
    name = fn.get("name")
    _check(isinstance(name, str) and bool(_NAME.match(name)), f"invalid function name {name!r}")
    parameters = fn.get("parameters") or {"type": "object", "properties": {}}
    _check(isinstance(parameters, dict), f"parameters of {name} must be a JSON schema object")
    return Tool(name, str(fn.get("description", "")), parameters)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValidationError(message)


def tool_system_prompt(plan: ToolPlan) -> str:
    """For chat templates without tool support: describe the tools and the call format."""
    listing = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters})
                        for t in plan.tools)
    return ("You can call these functions:\n" + listing + "\nTo call one, reply with only a JSON object "
            '{"name": <function name>, "arguments": <arguments object>}.')


def render_messages(messages: list[dict], plan: Optional[ToolPlan], template_knows_tools: bool) -> list[dict]:
    """Messages for a template that does not know tools: calls and results become plain text."""
    if template_knows_tools:
        return messages
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": json.dumps(calls[0] if len(calls) == 1 else calls)})
        elif m["role"] == "tool":
            out.append({"role": "tool", "content": m.get("content") or ""})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if plan is not None:
        out.insert(0, {"role": "system", "content": tool_system_prompt(plan)})
    return out


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw
