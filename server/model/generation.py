"""What a checkpoint's generation_config.json says about ending and sampling: the ids that end
a reply (Llama 3 Instruct ends on any of three) and the sampling defaults its authors chose."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: frozenset[int] = frozenset()
    temperature: Optional[float] = None  # None: the checkpoint sets no default
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None

    @classmethod
    def read(cls, model_dir: Path) -> "GenerationDefaults":
        path = model_dir / "generation_config.json"
        if not path.is_file():
            return cls()
        try:
            config: dict[str, Any] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.warning("ignoring %s: not valid JSON (%s)", path, exc)
            return cls()
        sampling = config.get("do_sample", False)  # transformers ignores the sampling fields without it
        return cls(
            eos_token_ids=frozenset(_ids(config.get("eos_token_id"))),
            temperature=_number(config, "temperature") if sampling else None,
            top_p=_number(config, "top_p") if sampling else None,
            top_k=int(config["top_k"]) if sampling and isinstance(config.get("top_k"), int) else None,
            repetition_penalty=_number(config, "repetition_penalty"),
        )


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _number(config: dict[str, Any], key: str) -> Optional[float]:
    value = config.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
