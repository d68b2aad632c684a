"""Dataset files as the SDK uploads them: JSONL, JSON or CSV, read by file name (the SDK's MIME
types say nothing: a .jsonl arrives as text/plain), checked row by row, and classified.

Three kinds of rows: `prompt` + `completion` and chat `messages` (fine-tuning, with an optional
`split` of train/evaluation), and OpenAI batch rows (`custom_id`, `body`) for batch inference. A file
is one kind throughout; the first bad row is named in the error.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}
SPLITS = ("train", "evaluation")
ROLES = ("system", "user", "assistant", "tool")
BATCH_URLS = ("/v1/chat/completions", "/v1/completions")


class DatasetFileError(ValueError):
    """The file can't be used: the message says which row and why."""


class DatasetKind(str, Enum):
    COMPLETION = "prompt_completion"
    CHAT = "messages"
    BATCH = "batch"


@dataclass(frozen=True)
class DatasetSummary:
    kind: DatasetKind
    rows: int
    train_rows: int
    evaluation_rows: int
    columns: tuple[str, ...]


@dataclass(frozen=True)
class SftExample:
    split: str  # "train" | "evaluation"
    prompt: Optional[str] = None  # prompt/completion rows
    completion: Optional[str] = None
    messages: Optional[tuple[dict, ...]] = None  # chat rows: [{"role", "content"}, ...]


@dataclass(frozen=True)
class BatchRow:
    custom_id: str
    url: str
    body: dict


def file_format(file_name: str) -> str:
    suffix = Path(file_name).suffix.lower()
    if suffix not in FORMATS:
        known = ", ".join(FORMATS)
        raise DatasetFileError(f"unsupported dataset file {file_name!r}: use one of {known} (parquet and xlsx are "
                               "not read by this server; convert them to JSONL or CSV)")
    return FORMATS[suffix]


def read_rows(path: Path, file_name: Optional[str] = None) -> list[dict[str, Any]]:
    """Every row of the file as a dict; `file_name` (as uploaded) decides the format."""
    fmt = file_format(file_name or path.name)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetFileError(f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows}[fmt](text)
    if not rows:
        raise DatasetFileError("the file has no rows")
    return rows


def _jsonl_rows(text: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(_object(json.loads(line), number))
            except json.JSONDecodeError as exc:
                raise DatasetFileError(f"line {number} is not valid JSON: {exc.msg}") from None
    return rows


def _json_rows(text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetFileError(f"not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetFileError("a .json dataset must be a list of row objects")
    return [_object(row, number) for number, row in enumerate(data, 1)]


def _csv_rows(text: str) -> list[dict]:
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [dict(row) for row in reader]
    except csv.Error as exc:
        raise DatasetFileError(f"not valid CSV: {exc}") from None
    for number, row in enumerate(rows, 1):
        if None in row:
            raise DatasetFileError(f"row {number} has more fields than the header")
        if isinstance(row.get("messages"), str):  # a chat column written as JSON text
            try:
                row["messages"] = json.loads(row["messages"])
            except json.JSONDecodeError:
                raise DatasetFileError(f"row {number}: `messages` is not a JSON list") from None
    return rows


def _object(row: Any, number: int) -> dict:
    if not isinstance(row, dict):
        raise DatasetFileError(f"row {number} is not an object")
    return row


def kind_of(rows: list[dict]) -> DatasetKind:
    first = rows[0]
    if "custom_id" in first or "body" in first:
        return DatasetKind.BATCH
    if "messages" in first:
        return DatasetKind.CHAT
    if "prompt" in first and "completion" in first:
        return DatasetKind.COMPLETION
    raise DatasetFileError(f"unrecognised columns {sorted(first)}: fine-tuning needs `prompt` and `completion` "
                           "or `messages`; batch inference needs `custom_id` and `body`")


def summarize(path: Path, file_name: Optional[str] = None) -> DatasetSummary:
    """Read and check every row: what the dataset is and how many rows each split has."""
    rows = read_rows(path, file_name)
    kind = kind_of(rows)
    if kind is DatasetKind.BATCH:
        parsed = batch_rows_of(rows)
        return DatasetSummary(kind, len(parsed), len(parsed), 0, tuple(rows[0]))
    examples = sft_examples_of(rows, kind)
    train = sum(e.split == "train" for e in examples)
    if train == 0:
        raise DatasetFileError("no training rows: every row has split `evaluation`")
    return DatasetSummary(kind, len(examples), train, len(examples) - train, tuple(rows[0]))


def sft_examples(path: Path, file_name: Optional[str] = None) -> list[SftExample]:
    rows = read_rows(path, file_name)
    kind = kind_of(rows)
    if kind is DatasetKind.BATCH:
        raise DatasetFileError("this dataset holds batch-inference rows (`custom_id`, `body`), not training rows")
    return sft_examples_of(rows, kind)


def sft_examples_of(rows: list[dict], kind: DatasetKind) -> list[SftExample]:
    return [_sft_example(row, number, kind) for number, row in enumerate(rows, 1)]


def _sft_example(row: dict, number: int, kind: DatasetKind) -> SftExample:
    split = str(row.get("split") or "train").strip().lower()
    if split not in SPLITS:
        raise DatasetFileError(f"row {number}: split must be train or evaluation; got {row.get('split')!r}")
    if kind is DatasetKind.CHAT:
        return SftExample(split, messages=_messages(row.get("messages"), number))
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DatasetFileError(f"row {number}: `prompt` and `completion` must both be text")
    if not completion:
        raise DatasetFileError(f"row {number}: `completion` is empty (nothing to learn)")
    return SftExample(split, prompt=prompt, completion=completion)


def _messages(messages: Any, number: int) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise DatasetFileError(f"row {number}: `messages` must be a non-empty list")
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DatasetFileError(f"row {number}: each message needs a role ({', '.join(ROLES)}) and text content")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise DatasetFileError(f"row {number}: no assistant turn (nothing to learn)")
    return tuple({"role": t["role"], "content": t["content"]} for t in messages)


def batch_rows(path: Path, file_name: Optional[str] = None) -> list[BatchRow]:
    rows = read_rows(path, file_name)
    if kind_of(rows) is not DatasetKind.BATCH:
        raise DatasetFileError("batch inference needs OpenAI batch rows (`custom_id`, `url`, `body`)")
    return batch_rows_of(rows)


def batch_rows_of(rows: list[dict]) -> list[BatchRow]:
    parsed, seen = [], set()
    for number, row in enumerate(rows, 1):
        custom_id, url, body = row.get("custom_id"), row.get("url", BATCH_URLS[0]), row.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            raise DatasetFileError(f"row {number}: `custom_id` must be a non-empty string")
        if custom_id in seen:
            raise DatasetFileError(f"row {number}: custom_id {custom_id!r} is not unique")
        if url not in BATCH_URLS:
            raise DatasetFileError(f"row {number}: url must be one of {', '.join(BATCH_URLS)}; got {url!r}")
        if not isinstance(body, dict):
            raise DatasetFileError(f"row {number}: `body` must be an object")
        seen.add(custom_id)
        parsed.append(BatchRow(custom_id, url, body))
    return parsed
