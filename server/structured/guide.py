"""Constrained decoding with llguidance: a JSON schema, a regex, a choice of strings or a
context-free grammar (Lark, or GBNF) -> grammar -> per-row token mask.

Why llguidance (see docs/structured-output.md): it passed every schema edge case probed here
(integer bounds, maxProperties, exponent numbers) where outlines-core did not, compiles a schema in
milliseconds and fills a 49k-token mask in ~0.2 ms. Compilation runs on a worker thread, cached by
hash (LRU), so a request waits for its own grammar while other rows keep decoding.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

from server.errors import ValidationError

# Fixed separators and no free whitespace: output stays readable and can never loop on blanks.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_BYTES = 64 * 1024  # also the most a regex, a grammar or a list of choices may take
MAX_SCHEMA_DEPTH = 64  # nested objects/arrays; deeper would overflow the recursive walks (and llguidance's)
MAX_CHOICES = 1024


class SchemaError(ValidationError):
    """The schema, regex or grammar can't be compiled (422 / OpenAI 400, with the reason)."""


@dataclass(frozen=True)
class Constraint:
    """What a constrained reply must match: `kind` names the syntax of `text`."""

    kind: str  # "json_schema" | "regex" | "grammar" (Lark, or GBNF: llguidance converts it)
    text: str

    @classmethod
    def json_schema(cls, schema: Optional[dict]) -> "Constraint":
        """`schema` (None: any JSON object), its declared objects closed, its key order kept."""
        schema = {"type": "object"} if schema is None else schema
        if not isinstance(schema, dict):
            raise SchemaError("the JSON schema must be an object")
        if nesting_depth(schema) > MAX_SCHEMA_DEPTH:
            raise SchemaError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
        return cls._sized("json_schema", json.dumps(close_objects(schema)), "JSON schema")

    @classmethod
    def regex(cls, pattern: Any) -> "Constraint":
        if not isinstance(pattern, str) or not pattern:
            raise SchemaError("the regex must be a non-empty string")
        return cls._sized("regex", pattern, "regex")

    @classmethod
    def choice(cls, choices: Any) -> "Constraint":
        """One of the strings, exactly (as a Lark grammar: JSON string literals are Lark literals)."""
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise SchemaError("choices must be a non-empty list of non-empty strings")
        if len(choices) > MAX_CHOICES:
            raise SchemaError(f"at most {MAX_CHOICES} choices")
        return cls._sized("grammar", "start: " + " | ".join(json.dumps(c) for c in choices), "list of choices")

    @classmethod
    def grammar(cls, grammar: Any) -> "Constraint":
        if not isinstance(grammar, str) or not grammar.strip():
            raise SchemaError("the grammar must be a non-empty string (Lark, or GBNF)")
        return cls._sized("grammar", grammar, "grammar")

    @classmethod
    def _sized(cls, kind: str, text: str, what: str) -> "Constraint":
        if len(text.encode()) > MAX_SCHEMA_BYTES:
            raise SchemaError(f"the {what} is larger than {MAX_SCHEMA_BYTES} bytes")
        return cls(kind, text)


class GrammarGuide:
    """One request's grammar state: masks its logits and advances on each accepted token."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [vocab] -> the same with every token the grammar forbids at -inf (one row; a
        step's rows go together through mask_rows)."""
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)  # [words]
        return logits.masked_fill(~unpack_bits(bits[None].to(logits.device), logits.shape[-1])[0], float("-inf"))

    def advance(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise RuntimeError(f"grammar rejected token {token_id}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The output is complete and nothing may follow it."""
        return self.matcher.is_stopped()


def unpack_bits(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, words] int32 bitmasks (bit i of word w: token 32w + i allowed) -> [rows, vocab] bool;
    tokens past the masks' end (a model vocabulary padded beyond its tokenizer's) are forbidden."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    allowed = ((bits[:, :, None] >> shifts) & 1).view(bits.shape[0], -1).bool()
    if allowed.shape[1] >= vocab:
        return allowed[:, :vocab]
    return torch.cat([allowed, allowed.new_zeros(bits.shape[0], vocab - allowed.shape[1])], dim=1)


def mask_rows(logits: torch.Tensor, rows: list[int], guides: list[GrammarGuide]) -> None:
    """logits[rows] (in place) with every token each row's grammar forbids at -inf, for a step's
    constrained rows together: their masks filled in parallel by llguidance's threads (the GIL
    released) into one buffer, copied to the logits' device once, unpacked there in one op. Called
    before anything waits for the forward pass, the CPU work overlaps the GPU's (on a GPU: 16 rows
    one by one took ~3 ms of each ~15 ms step, each with its own copies and syncs)."""
    words = -(-guides[0].vocab_size // 32)
    bits = torch.empty(len(rows), words, dtype=torch.int32, pin_memory=logits.is_cuda)
    _executor().unsafe_compute_mask_ptr([(g.matcher, i) for i, g in enumerate(guides)], bits.data_ptr(),
                                        words * 4, len(rows))
    index = torch.tensor(rows, device=logits.device)
    allowed = unpack_bits(bits.to(logits.device, non_blocking=True), logits.shape[-1])
    logits[index] = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))


@functools.cache
def _executor() -> Any:
    import llguidance

    return llguidance.LLExecutor()


class GuideFactory:
    """Compiles constraints off the engine loop and hands out fresh per-request guides: a copy of a
    matcher kept, unadvanced, per constraint (7 us, where building one and its first mask took
    0.5-3 ms, one request after another on the compiler thread: a burst of 16 constrained requests
    reached the engine over ~90 ms, missing the step that prefilled the rest of the burst)."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: frozenset[int], cache_size: int = 128) -> None:
        self._hf_tokenizer, self._eos = hf_tokenizer, sorted(eos_token_ids)
        self._tokenizer: Any = None
        self._matchers: OrderedDict[str, Any] = OrderedDict()  # constraint key -> a fresh LLMatcher
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compiler")
        self.compile_seconds: list[float] = []

    def prepare(self) -> Future:
        """Build llguidance's view of the tokenizer now, on the compiler thread, rather than inside
        the first constrained request: that request waited for it (0.27 s alone; 0.34 s time to
        first token against 0.07 s for the next one, through HTTP on 2 cores)."""
        return self._pool.submit(self._llg_tokenizer)

    def guide_for(self, constraint: Constraint) -> Future:
        """A Future of a GrammarGuide for `constraint`: done already where the constraint was
        compiled before (no hop to the compiler thread, which put a burst's constrained requests
        behind the plain ones that arrived with them), else compiled there."""
        guide = self.copy_of(_key(constraint))
        if guide is None:
            return self._pool.submit(self._build, constraint)
        done: Future = Future()
        done.set_result(guide)
        return done

    def copy_of(self, key: str) -> Optional[GrammarGuide]:
        """A fresh guide copied from the kept matcher of a compiled constraint, or None."""
        with self._lock:  # (copies are made under the lock: from any thread, never two at once)
            fresh = self._matchers.get(key)
            if fresh is None:
                return None
            self._matchers.move_to_end(key)
            return GrammarGuide(fresh.deep_copy(), self._tokenizer.vocab_size)

    def _build(self, constraint: Constraint) -> GrammarGuide:
        key = _key(constraint)
        guide = self.copy_of(key)  # (compiled by a request queued ahead of this one)
        if guide is not None:
            return guide
        tokenizer = self._llg_tokenizer()
        fresh = self._matcher(constraint, tokenizer)
        with self._lock:
            self._matchers[key] = fresh
            while len(self._matchers) > self._cache_size:
                self._matchers.popitem(last=False)
            return GrammarGuide(fresh.deep_copy(), tokenizer.vocab_size)

    def _matcher(self, constraint: Constraint, tokenizer: Any) -> Any:
        """A new matcher for the constraint, its first mask computed (that builds its lexer: here,
        not on the engine thread; copies share it)."""
        import llguidance

        matcher = llguidance.LLMatcher(tokenizer, self._grammar(constraint, tokenizer), log_level=0)
        if matcher.is_error():
            raise SchemaError(f"invalid {_WHAT[constraint.kind]}: {matcher.get_error()}")
        matcher.compute_bitmask()
        return matcher

    def _grammar(self, constraint: Constraint, tokenizer: Any) -> str:
        import time

        import llguidance

        started = time.perf_counter()
        try:
            grammar = _COMPILE[constraint.kind](constraint.text)
        except ValueError as exc:
            raise SchemaError(f"invalid {_WHAT[constraint.kind]}: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error and not error.startswith("WARNING"):
            raise SchemaError(f"unsupported {_WHAT[constraint.kind]}: {error}")
        self.compile_seconds.append(time.perf_counter() - started)
        return grammar

    def _llg_tokenizer(self) -> Any:
        if self._tokenizer is None:  # once, on this worker: at start (prepare) or on first use
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, eos_token=self._eos)
        return self._tokenizer


def _key(constraint: Constraint) -> str:
    return hashlib.sha256(f"{constraint.kind}\0{constraint.text}".encode()).hexdigest()


def nesting_depth(value: Any) -> int:
    """How deeply dicts and lists nest in a parsed JSON value (iterative: safe on any depth)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def close_objects(schema: Any) -> Any:
    """Objects that list `properties` but say nothing of `additionalProperties` get `false`.

    Standard JSON Schema leaves such objects open, and a small model then keeps inventing keys
    until it runs out of tokens. Users of Pydantic schemas expect exactly the declared fields
    (xgrammar's strict mode and OpenAI's strict outputs do the same). The output still validates
    against the original schema; write `"additionalProperties": true` to keep an object open.
    """
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {k: close_objects(v) if k not in ("properties", "enum", "const", "default", "examples") else v
              for k, v in schema.items()}
    if "properties" in schema:
        closed["properties"] = {k: close_objects(v) for k, v in schema["properties"].items()}
        closed.setdefault("additionalProperties", False)
    return closed


def constraint_of(response_format: Optional[dict]) -> Optional[Constraint]:
    """The constraint a response_format asks for (None: free text). Shapes: Predibase's / LoRAX's
    {"type": "json_object", "schema"}, OpenAI's json_object and json_schema, and, as vLLM, TGI and
    outlines users write them, {"type": "regex", "pattern" | "regex" | "value"},
    {"type": "choice", "choices" | "value"} and {"type": "grammar", "grammar" | "value"}."""
    if not response_format or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return Constraint.json_schema(response_format.get("schema"))
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return Constraint.json_schema(schema if schema is not None else response_format.get("schema"))
    if kind in _FIELDS:
        value = next((response_format[f] for f in _FIELDS[kind] if f in response_format), None)
        return getattr(Constraint, kind)(value)
    raise ValidationError("response_format type must be text, json_object, json_schema, regex, choice or grammar; "
                          f"got {kind!r}")


_FIELDS = {"regex": ("pattern", "regex", "value"), "choice": ("choices", "value"), "grammar": ("grammar", "value")}
_WHAT = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}


def _compile_json_schema(text: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(text, overrides=_JSON_OPTIONS)


def _compile_regex(text: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_regex(text)


def _compile_grammar(text: str) -> str:
    import llguidance

    return llguidance.grammar_from("grammar", text)  # Lark as it is; GBNF ("::=") converted to Lark


_COMPILE = {"json_schema": _compile_json_schema, "regex": _compile_regex, "grammar": _compile_grammar}
