"""Pydantic request and response types of the native (Predibase / LoRAX) API."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")

    adapter_id: Optional[str] = Field(None, description='Adapter to apply, e.g. "my-repo/1".')
    adapter_source: Optional[str] = Field(None, description="pbase (default), local, hub or s3.")
    merged_adapters: Optional[dict[str, Any]] = None
    api_token: Optional[str] = None
    do_sample: bool = False
    max_new_tokens: Optional[int] = Field(None, description="null: the rest of max_total_tokens.")
    ignore_eos_token: bool = False
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list)
    seed: Optional[int] = None
    temperature: Optional[float] = Field(None, description="0 means greedy.")
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    typical_p: Optional[float] = None
    truncate: Optional[int] = None
    best_of: Optional[int] = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None


class GenerateRequest(BaseModel):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False  # used by the lorax-client route POST /


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: Optional[float] = None  # None for the first prompt token


class Token(BaseModel):
    id: int
    text: str
    logprob: Optional[float] = None
    special: bool
    alternative_tokens: Optional[list[AlternativeToken]] = None


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: Optional[int] = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class Details(BaseModel):
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    seed: Optional[int] = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    best_of_sequences: Optional[list[BestOfSequence]] = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Optional[Details] = None


class StreamDetails(BaseModel):
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    seed: Optional[int] = None


class StreamResponse(BaseModel):
    token: Token
    generated_text: Optional[str] = None
    details: Optional[StreamDetails] = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class Info(BaseModel):
    model_id: str
    model_dtype: str
    model_device_type: str
    max_input_length: int
    max_total_tokens: int
    max_batch_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_size: int
    max_concurrent_requests: int
    max_stop_sequences: int
    max_active_adapters: int  # an optional cap on device-resident adapters; 0: none
    max_adapter_memory_mb: int  # what bounds the device-resident adapters
    kv_cache: str  # paged | dense
    kv_cache_tokens: int  # paged: the pool's tokens; dense: max_batch_size x max_total_tokens
    kv_cache_memory_mb: int  # paged: the pool; dense: what is allocated now (grown on demand)
    kv_block_size: int  # paged: tokens per block; dense: 0
    version: str
