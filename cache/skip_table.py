"""How many denoising steps a cached noise state may skip, given prompt similarity.

A table is a tuple of (minimum cosine similarity, fraction of the N steps to skip), strictest
first. `choose_k` turns a similarity into K (steps to skip) for N steps and then takes the
largest K' <= K that is actually stored (eviction leaves holes).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

SkipTable = tuple[tuple[float, float], ...]

# NIRVANA's table for CLIP text embeddings (as re-implemented in MoDM): 25/20/15/10/5 of 50 steps.
CLIP_SKIP_TABLE: SkipTable = ((0.95, 0.5), (0.90, 0.4), (0.85, 0.3), (0.75, 0.2), (0.65, 0.1))

# all-MiniLM-L6-v2 table, calibrated in accuracy (Dec 2026, README: "The similarity -> K table"):
# `python -m ops.calibration_shapes` over 262 (source, target) caption pairs of the trained `shapes` model
# (100 % accurate fresh), 25 DDIM steps, every pair resumed from the source's state at K = 3..13 of
# 25 and scored by the checker; fitted at 2 points' tolerance with z = 2 (loss + 2 s.e. <= 2 points
# for every tail and band). Steps saved and accuracy on those pairs: the README's figures.
# MiniLM ranks the edits that change the picture (position or size word swapped: s p50 0.98) above
# paraphrases of the same scene (0.58), so the large K go only to near-identical text (a re-roll
# with another seed: s = 1) and K = 10 % to moderately similar prompts, which this model corrects.
MINILM_SKIP_TABLE: SkipTable = ((0.9999, 0.5), (0.9967, 0.4), (0.9584, 0.2), (0.8094, 0.1))

DEFAULT_TABLES: dict[str, SkipTable] = {"minilm": MINILM_SKIP_TABLE, "clip": CLIP_SKIP_TABLE}


def validate_table(table: Iterable[Sequence[float]]) -> SkipTable:
    """Sort by threshold (strictest first) and check that a higher similarity never skips less."""
    rows = tuple(sorted(((float(t), float(f)) for t, f in table), reverse=True))
    for threshold, fraction in rows:
        if not (-1.0 <= threshold <= 1.0) or not (0.0 < fraction < 1.0):
            raise ValueError(f"skip table row ({threshold}, {fraction}) out of range")
    fractions = [f for _, f in rows]
    if fractions != sorted(fractions, reverse=True):
        raise ValueError(f"skip table must skip more for higher similarity: {rows}")
    return rows


def choose_skip_fraction(similarity: float, table: SkipTable) -> float:
    """Fraction of steps to skip for this similarity; 0.0 means miss."""
    if not math.isfinite(similarity):
        return 0.0
    for threshold, fraction in table:
        if similarity > threshold:
            return fraction
    return 0.0


def fraction_to_k(fraction: float, steps: int) -> int:
    """Round fraction*N to a step count in 1..N-1 (0 when there is nothing to skip)."""
    if fraction <= 0 or steps < 2:
        return 0
    return min(max(int(math.floor(fraction * steps + 0.5 + 1e-9)), 1), steps - 1)


def state_steps(steps: int, fractions: Sequence[float]) -> list[int]:
    """The K values at which a generation of N steps captures its noise state (deduped, 1..N-1)."""
    return sorted({k for k in (fraction_to_k(f, steps) for f in fractions) if k > 0})


def choose_k(similarity: float, steps: int, table: SkipTable, stored_ks: Iterable[int]) -> int | None:
    """K to resume from: the table's K for this similarity, then the largest stored K' <= K."""
    k = fraction_to_k(choose_skip_fraction(similarity, table), steps)
    if k <= 0:
        return None
    usable = [s for s in stored_ks if 0 < s <= k]
    return max(usable) if usable else None
