"""Prompt pairs from the shared prompt files and their similarity under an embedder.

Tooling for calibrating a skip table, kept out of the product's `cache` package:
`python -m ops.prompt_pairs [prompts_dir]` prints the similarity quantiles per kind of pair.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from cache.skip_table import CLIP_SKIP_TABLE, MINILM_SKIP_TABLE, SkipTable, choose_skip_fraction, fraction_to_k


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


if __name__ == "__main__":  # python -m ops.prompt_pairs [prompts_dir]
    import sys

    from cache.embedding import PromptEmbedder

    embedder = PromptEmbedder()
    directory = sys.argv[1] if len(sys.argv) > 1 else "../shared/prompts"
    pairs = calibration_pairs(directory, embed_many=embedder.embed_many)
    for name, table in (("MiniLM table", MINILM_SKIP_TABLE), ("CLIP table on MiniLM", CLIP_SKIP_TABLE)):
        print(f"== {name}: {table}")
        print_calibration(pairs, embedder.embed_many, table)
