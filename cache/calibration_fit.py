"""Fit a similarity -> K table from measured losses: the evidence rule of ``reprise calibrate``.

A *pair* is one (neighbour, target) prompt pair: ``similarity`` (the cache's embedder), ``fresh`` (the
score of the target generated fresh) and ``resumed`` ({str(fraction): score of the target resumed from
the neighbour's state at that fraction of the steps}); scores in points, higher is better, so the loss
of a hit is ``fresh - resumed``. What a score is (checker accuracy, SSIM to the fresh image, CLIP
score) is the scorer's business: the rule below only needs points.

For each K fraction f, the threshold t_f is the lowest similarity such that, for every t >= t_f, the
pairs above t lose at most ``tolerance`` points (optionally: loss + z standard errors), and so do the
``min_pairs`` pairs just above t: a threshold is placed only where the evidence nearest to it holds,
not where a mean over the whole tail does. Re-rolls (the same text, another seed) lose nothing by
construction and are often a log's largest mass at s = 1, so they vouch only for themselves: pairs of
other text are judged without them. Rows a larger f dominates are dropped; then each band of the table
(the pairs it sends to one K) must have ``min_pairs`` pairs of its own (of other text where it has any)
within the tolerance, or its threshold moves up until it does or the row goes: no K is granted to a
band without its own evidence.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from cache.skip_table import (
    CLIP_SKIP_TABLE,
    MINILM_SKIP_TABLE,
    SkipTable,
    choose_skip_fraction,
    fraction_to_k,
    validate_table,
)

TOLERANCES = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 100.0)
STATE_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)


SAME_TEXT = 0.99999  # a neighbour this similar is one no threshold can tell from the same text


def same_text(pair: dict) -> bool:
    """The neighbour is the same prompt text (a re-roll: another seed), or a text the embedder cannot tell
    from it (an uncased embedder gives "A red cat" and "a red cat" s = 1): no table separates the two."""
    if pair["similarity"] >= SAME_TEXT:
        return True
    return "source_prompt" in pair and pair.get("source_prompt") == pair.get("target_prompt")


def loss(pairs: Sequence[dict], fraction: float) -> float:
    """Mean accuracy lost (points) by resuming at ``fraction`` instead of generating fresh."""
    return float(np.mean([p["fresh"] - p["resumed"][str(fraction)] for p in pairs]))


def within(pairs: Sequence[dict], fraction: float, tolerance: float, z: float) -> bool:
    """Loss + z standard errors (paired) <= tolerance: z = 0 trusts the mean, z > 0 asks for evidence."""
    losses = np.array([p["fresh"] - p["resumed"][str(fraction)] for p in pairs])
    se = losses.std(ddof=1) / np.sqrt(len(losses)) if len(losses) > 1 else 0.0
    return float(losses.mean() + z * se) <= tolerance


# --- fitting -----------------------------------------------------------------------------------------


def candidates(pairs: Sequence[dict]) -> list[float]:
    """Thresholds just below each measured similarity (a pair passes when s > t), lowest first."""
    sims = sorted({round(p["similarity"], 4) for p in pairs})
    return [round(s - 1e-4, 4) for s in sims]


def tail_threshold(
    pairs: Sequence[dict], fraction: float, tolerance: float, min_pairs: int, z: float = 0.0
) -> float | None:
    """Lowest t such that, for every t' >= t with at least min_pairs pairs judged above it, those pairs and
    the min_pairs of them just above t' lose <= tolerance points. Pairs of other text are judged without
    the re-rolls; a tail of re-rolls alone is judged on its own."""
    best = None
    for t in reversed(candidates(pairs)):  # from the top down: stop at the first failing tail
        tail = sorted((p for p in pairs if p["similarity"] > t), key=lambda p: p["similarity"])
        judged = [p for p in tail if not same_text(p)] or tail
        if len(judged) < min_pairs:
            continue
        if not (within(judged, fraction, tolerance, z) and within(judged[:min_pairs], fraction, tolerance, z)):
            break
        best = t
    return best


def evidence(band: Sequence[dict], fraction: float, tolerance: float, min_pairs: int, z: float = 0.0) -> bool:
    """A band earns its K with min_pairs pairs of its own within the tolerance: of other text where it has
    any (re-rolls vouch only for themselves), and the re-rolls in it within the tolerance too."""
    others = [p for p in band if not same_text(p)]
    judged = others or list(band)
    return (
        len(judged) >= min_pairs
        and within(judged, fraction, tolerance, z)
        and (len(judged) == len(band) or within([p for p in band if same_text(p)], fraction, tolerance, z))
    )


def assign(similarity: float, table: SkipTable) -> float:
    return choose_skip_fraction(similarity, table) if table else 0.0


def fit_table(
    pairs: Sequence[dict],
    tolerance: float = 2.0,
    min_pairs: int = 15,
    fractions: Sequence[float] = STATE_FRACTIONS,
    z: float = 0.0,
) -> SkipTable:
    """The table that skips the most steps while every tail and every band stays within ``tolerance``."""
    rows: list[tuple[float, float]] = []
    for f in sorted(fractions, reverse=True):
        t = tail_threshold(pairs, f, tolerance, min_pairs, z)
        if t is None:
            continue
        if rows and t >= rows[-1][0]:  # a larger skip already covers every pair this row would take
            continue
        rows.append((t, f))
    thresholds = candidates(pairs)
    for _ in range(len(thresholds) * max(len(rows), 1)):  # bands: raise a failing band's threshold
        table = validate_table(rows) if rows else ()
        failing = None
        for i, (_t, f) in enumerate(rows):
            band = [p for p in pairs if assign(p["similarity"], table) == f]
            if not evidence(band, f, tolerance, min_pairs, z):
                failing = i
                break
        if failing is None:
            return table
        t, f = rows[failing]
        above = [c for c in thresholds if c > t]
        upper = rows[failing - 1][0] if failing > 0 else 1.0
        if not above or above[0] >= upper:
            rows.pop(failing)
        else:
            rows[failing] = (above[0], f)
    return validate_table(rows) if rows else ()


def score_table(pairs: Sequence[dict], table: SkipTable, steps: int) -> dict:
    """Over all pairs: hit rate, steps saved, accuracy with the table (misses generated fresh) vs fresh."""
    got, fresh, saved, hits = [], [], [], 0
    bands: dict[str, list[dict]] = {}
    for p in pairs:
        f = assign(p["similarity"], table)
        fresh.append(p["fresh"])
        if f > 0:
            hits += 1
            got.append(p["resumed"][str(f)])
            saved.append(fraction_to_k(f, steps) / steps)
            bands.setdefault(str(f), []).append(p)
        else:
            got.append(p["fresh"])
            saved.append(0.0)
    hit_pairs = [p for p in pairs if assign(p["similarity"], table) > 0]
    diffs = np.array(got) - np.array(fresh)
    return {
        "table": [list(r) for r in table],
        "pairs": len(pairs),
        "hit_pct": round(100.0 * hits / len(pairs), 2),
        "steps_saved_pct": round(100.0 * float(np.mean(saved)), 2),
        "accuracy": round(float(np.mean(got)), 3),
        "fresh_accuracy": round(float(np.mean(fresh)), 3),
        "delta": round(float(np.mean(got) - np.mean(fresh)), 3),
        "delta_se": round(float(diffs.std(ddof=1) / np.sqrt(len(diffs))), 3) if len(diffs) > 1 else None,
        "hits_delta": round(
            -float(np.mean([p["fresh"] - p["resumed"][str(assign(p["similarity"], table))] for p in hit_pairs])), 3
        )
        if hit_pairs
        else None,
        "bands": {
            f: {"n": len(b), "loss": round(loss(b, float(f)), 3), "relations": counts(p.get("relation", "") for p in b)}
            for f, b in sorted(bands.items(), reverse=True)
        },
    }


def counts(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def curve(
    pairs: Sequence[dict],
    steps: int,
    min_pairs: int,
    fractions: Sequence[float] = STATE_FRACTIONS,
    z: float = 0.0,
    references: dict[str, SkipTable] | None = None,
) -> dict:
    """Tables fitted at every tolerance of TOLERANCES, the ``references`` (default: the shipped tables) and
    "always K=f", each scored over the same pairs: the curve of steps saved against points lost."""
    fitted = [
        {"tolerance": tol, **score_table(pairs, fit_table(pairs, tol, min_pairs, fractions, z), steps)}
        for tol in TOLERANCES
    ]
    lowest = min(p["similarity"] for p in pairs) - 1e-4
    if references is None:
        references = {"shipped MiniLM table": MINILM_SKIP_TABLE, "NIRVANA CLIP table": CLIP_SKIP_TABLE}
    references = {"no cache": (), **references}
    references.update({f"always K={fraction_to_k(f, steps)}/{steps}": ((lowest, f),) for f in fractions})
    return {
        "fitted": fitted,
        "references": {name: score_table(pairs, table, steps) for name, table in references.items()},
    }
