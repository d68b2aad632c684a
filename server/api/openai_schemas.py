"""Pydantic request types of the OpenAI-compatible API (responses are built as plain dicts in
server/api/openai.py, following OpenAI's wire format field by field)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        """Content as text; multi-part content keeps its text parts (images are refused upstream)."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions, plus LoRAX's extra body fields."""

    model_config = ConfigDict(extra="ignore")  # `user`, `metadata` and unknown fields are accepted quietly

    model: str = ""
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # LoRAX extensions
    adapter_source: Optional[str] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    ignore_eos_token: bool = False
    # Constrained output (docs/structured-output.md): OpenAI's and Predibase's response_format, plus
    # regex / choice / grammar variants, and vLLM's extra body fields meaning the same.
    response_format: Optional[dict[str, Any]] = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    structured_outputs: Optional[dict[str, Any]] = None  # vLLM >= 0.10: {json | regex | choice | grammar: ...}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool = True  # false: at most one call per reply
    chat_template_kwargs: Optional[dict[str, Any]] = None  # vLLM's: e.g. {"enable_thinking": false} for Qwen3
    include_reasoning: bool = True  # vLLM's: false leaves reasoning_content out


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str]]
    logprobs: Optional[int] = None  # the legacy API: how many top log-probs per token
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None
