"""Prompt logs: the files a workload replays and a calibration reads, in file order.

Formats, detected by extension and header:

- ``.tsv`` with a ``Prompt`` column (PartiPrompts);
- ``.csv`` with a ``Prompt``/``prompt`` column, a UTF-8 BOM allowed (DrawBench); Krea's CSV also has
  ``seed``, ``cfg_scale``, ``num_step``, ``width``, ``height``, which become the row's request fields;
- ``.jsonl``: one object per line with ``prompt`` (and optionally ``seed``, ``steps``, ``width``,
  ``height``, ``guidance_scale``);
- anything else: one prompt per line (COCO captions), blank lines skipped.
"""

from __future__ import annotations

import csv
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PromptRow:
    prompt: str
    seed: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance_scale: float | None = None


def _int(value) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _row_from(record: dict) -> PromptRow | None:
    lower = {str(k).strip().lower(): v for k, v in record.items() if k is not None}
    prompt = lower.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    return PromptRow(
        prompt=prompt.strip(),
        seed=_int(lower.get("seed")),
        steps=_int(lower.get("num_step", lower.get("steps"))),
        width=_int(lower.get("width")),
        height=_int(lower.get("height")),
        guidance_scale=_float(lower.get("cfg_scale", lower.get("guidance_scale"))),
    )


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Every prompt of a file in one of the formats above, in file order."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")  # strips a BOM if there is one
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = [_row_from(json.loads(line)) for line in text.splitlines() if line.strip()]
    elif suffix in (".tsv", ".csv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        if not any((name or "").strip().lower() == "prompt" for name in reader.fieldnames or ()):
            raise ValueError(f"{path}: no Prompt column (columns: {reader.fieldnames})")
        rows = [_row_from(record) for record in reader]
    else:
        rows = [PromptRow(prompt=line.strip()) for line in text.splitlines() if line.strip()]
    rows = [r for r in rows if r is not None]
    if not rows:
        raise ValueError(f"{path}: no prompts found")
    return rows


def canonical_seed(text: str) -> int:
    """The seed of a prompt whose row has none: a hash of its text, so a repeat is an exact repeat."""
    return zlib.crc32(text.encode()) % 1_000_000
