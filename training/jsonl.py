"""Reading the project's JSONL prompt files (``id``, ``category``, ``prompt``, sometimes an answer
field): one reader for every entry point, so a missing file or a malformed line gets the same clear
error everywhere (``InputError`` naming the file, the line number and what is wrong)."""

from __future__ import annotations

import json
from pathlib import Path

from models.errors import InputError

__all__ = ["read_jsonl"]


def read_jsonl(path: str | Path, required: tuple[str, ...] = ("prompt",), hint: str = "") -> list[dict]:
    """Rows of a JSONL file (blank lines skipped). Each row must be a JSON object with the
    ``required`` keys; ``prompt`` (when required) must be a non-empty string. ``hint`` says which
    config key names the file."""
    path = Path(path)
    where = f" ({hint})" if hint else ""
    if not path.is_file():
        raise InputError(f"prompt file not found: {path}{where}")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise InputError(f"{path}, line {number}: missing key(s) {missing} (has {sorted(row)})")
            if "prompt" in required and (not isinstance(row["prompt"], str) or not row["prompt"].strip()):
                raise InputError(f"{path}, line {number}: 'prompt' must be a non-empty string")
            rows.append(row)
    return rows
