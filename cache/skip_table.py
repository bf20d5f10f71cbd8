"""How many denoising steps a cached noise state may skip, given prompt similarity.

A table is a tuple of (minimum cosine similarity, fraction of the N steps to skip), strictest
first. `choose_k` turns a similarity into K (steps to skip) for N steps and then takes the
largest K' <= K that is actually stored (eviction leaves holes).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np

SkipTable = tuple[tuple[float, float], ...]

# NIRVANA's table for CLIP text embeddings (as re-implemented in MoDM): 25/20/15/10/5 of 50 steps.
CLIP_SKIP_TABLE: SkipTable = ((0.95, 0.5), (0.90, 0.4), (0.85, 0.3), (0.75, 0.2), (0.65, 0.1))

# all-MiniLM-L6-v2 table, calibrated in accuracy (Dec 2026, README: "The similarity -> K table"):
# `python -m ops.calibrate` over 262 (source, target) caption pairs of the trained `shapes` model
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


# --- calibration --------------------------------------------------------------------------


def similarity_quantiles(
    pairs: Sequence[tuple[str, str]],
    embed_many: Callable[[Sequence[str]], np.ndarray],
    quantiles: Sequence[float] = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99),
) -> dict[str, float]:
    """Cosine similarity distribution of prompt pairs under an embedder (vectors unit-normalised)."""
    if not pairs:
        return {}
    left = embed_many([a for a, _ in pairs])
    right = embed_many([b for _, b in pairs])
    sims = np.sum(left * right, axis=1)
    out = {f"p{round(q * 100)}": float(np.quantile(sims, q)) for q in quantiles}
    out["n"] = len(pairs)
    return out


def print_calibration(groups: dict[str, Sequence[tuple[str, str]]], embed_many, table: SkipTable | None = None) -> dict:
    """Print the similarity quantiles per kind of pair and, given a table, the share of pairs per K/50."""
    report = {}
    for name, pairs in groups.items():
        q = similarity_quantiles(pairs, embed_many)
        line = "  ".join(f"{k} {v:.3f}" for k, v in q.items() if k != "n")
        extra = ""
        if table is not None and pairs:
            left = embed_many([a for a, _ in pairs])
            right = embed_many([b for _, b in pairs])
            sims = np.sum(left * right, axis=1)
            ks = [fraction_to_k(choose_skip_fraction(float(s), table), 50) for s in sims]
            counts = {k: ks.count(k) / len(ks) for k in sorted(set(ks))}
            extra = "  K/50: " + " ".join(f"{k}:{v:.0%}" for k, v in counts.items())
            q["k_shares"] = counts
        print(f"{name:<28} n={q['n']:<5} {line}{extra}")
        report[name] = q
    return report


_STYLE_SUFFIXES = (
    ", highly detailed",
    ", digital art",
    ", oil painting",
    ", 4k photograph",
    ", trending on artstation",
    ", in the style of a watercolor",
    ", cinematic lighting",
)
_SWAPS = {
    "red": "blue",
    "blue": "green",
    "green": "yellow",
    "yellow": "red",
    "black": "white",
    "white": "black",
    "two": "three",
    "three": "two",
    "small": "large",
    "large": "small",
    "dog": "cat",
    "cat": "dog",
    "man": "woman",
    "woman": "man",
}


def calibration_pairs(
    prompts_dir: str, limit: int = 1500, seed: int = 0, embed_many=None
) -> dict[str, list[tuple[str, str]]]:
    """Pairs from the shared prompt files: style edits, one-word swaps, nearest other caption, random."""
    import csv
    import random
    from pathlib import Path

    base = Path(prompts_dir)
    rng = random.Random(seed)
    with open(base / "PartiPrompts.tsv", newline="") as f:
        parti = [row["Prompt"] for row in csv.DictReader(f, delimiter="\t") if row["Prompt"].strip()]
    coco = [line.strip() for line in open(base / "coco_captions_30k.txt") if line.strip()][:3000]
    pool = [p for p in parti + coco if len(p.split()) >= 4]
    rng.shuffle(pool)
    pool = pool[:limit]
    groups: dict[str, list[tuple[str, str]]] = {}
    groups["style suffix added"] = [(p, p.rstrip(". ") + rng.choice(_STYLE_SUFFIXES)) for p in pool]
    swapped = []
    for p in pool:
        words = p.split()
        idx = [i for i, w in enumerate(words) if w.lower() in _SWAPS]
        if idx:
            i = rng.choice(idx)
            words[i] = _SWAPS[words[i].lower()]
            swapped.append((p, " ".join(words)))
    groups["one word swapped"] = swapped
    groups["random pair"] = [(rng.choice(pool), rng.choice(pool)) for _ in range(len(pool))]
    if embed_many is not None:
        vecs = embed_many(coco)
        sims = vecs @ vecs.T
        np.fill_diagonal(sims, -1.0)
        # exclude exact duplicates: those are exact-cache hits, not approximate ones
        sims[sims > 0.9999] = -1.0
        best = sims.argmax(axis=1)
        groups["nearest other COCO caption"] = [(coco[i], coco[j]) for i, j in enumerate(best)]
    return groups


if __name__ == "__main__":  # python -m cache.skip_table [prompts_dir]
    import sys

    from cache.embedding import PromptEmbedder

    embedder = PromptEmbedder()
    directory = sys.argv[1] if len(sys.argv) > 1 else "../shared/prompts"
    pairs = calibration_pairs(directory, embed_many=embedder.embed_many)
    for name, table in (("MiniLM table", MINILM_SKIP_TABLE), ("CLIP table on MiniLM", CLIP_SKIP_TABLE)):
        print(f"== {name}: {table}")
        print_calibration(pairs, embedder.embed_many, table)
