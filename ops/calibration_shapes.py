"""Fit the MiniLM similarity -> K table from measured accuracy: ``python -m ops.calibration_shapes``.

    python -m ops.calibration_shapes --n 24 --json calibration.json --plot calibration.png

1. Runs the quality harness (``ops.eval_quality``) with fresh and approximate-at-every-K conditions
   over many (source, target) caption pairs of the shapes model: paraphrases, one attribute changed
   (shape colour, shape, position, background, size), two changed, and unrelated scenes. Each pair
   gets its MiniLM cosine similarity s, the checker accuracy of the fresh target and of the target
   resumed from the source's state at each K. (``--records`` reuses the records of earlier runs.)
2. For each K fraction f, the threshold t_f is the lowest similarity such that every upper tail
   {pairs with s > t}, t >= t_f (with at least ``--min-pairs`` pairs), keeps the paired accuracy of
   "resume at f" within ``--tolerance`` points of fresh generation. Rows a larger f dominates are
   dropped; then each band of the table (the pairs it sends to one K) must itself stay within the
   tolerance, or its threshold moves up. No threshold goes below the lowest similarity measured.
3. The curve: tables fitted at other tolerances, plus the old tables and "always K=f", as (steps
   saved, accuracy) over the same pairs. JSON and a PNG plot.
4. Mixed real streams (``../shared/prompts``): share of prompts whose most similar earlier prompt in
   the file passes each threshold (MiniLM only, no generation), and the steps the table would skip.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cache import CacheSettings
from cache.calibration_fit import (  # noqa: F401  (the fitting lives in the product; re-exported for ops tools)
    TOLERANCES,
    assign,
    candidates,
    curve,
    fit_table,
    loss,
    score_table,
    tail_threshold,
    within,
)
from cache.skip_table import (
    CLIP_SKIP_TABLE,
    MINILM_SKIP_TABLE,
    SkipTable,
    fraction_to_k,
)
from ops.eval_quality import ALL_RELATIONS, STATE_FRACTIONS, Condition, evaluate, write_json
from ops.prompt_pairs import calibration_pairs

# --- pairs from harness records ----------------------------------------------------------------------


def pairs_from_records(records: Iterable[dict], steps: int, fractions: Sequence[float] = STATE_FRACTIONS) -> list[dict]:
    """One row per (scene, target): similarity, relation, fresh accuracy, accuracy resumed at each fraction."""
    by_k = {fraction_to_k(f, steps): f for f in fractions}
    pairs: dict[tuple, dict] = {}
    for r in records:
        if "error" in r or r.get("family") not in ("fresh", "approx"):
            continue
        row = pairs.setdefault(
            (r["scene"], r["target_prompt"], r.get("seed")),
            {
                "scene": r["scene"],
                "relation": r["relation"],
                "similarity": r["similarity"],
                "source_prompt": r["source_prompt"],
                "target_prompt": r["target_prompt"],
                "resumed": {},
            },
        )
        if r["family"] == "fresh":
            row["fresh"] = r["accuracy"]
            row["fresh_inherited"] = _share(r.get("inherited"))
        elif r.get("k") in by_k:
            row["resumed"][str(by_k[r["k"]])] = r["accuracy"]
            row.setdefault("inherited", {})[str(by_k[r["k"]])] = _share(r.get("inherited"))
    return [p for p in pairs.values() if "fresh" in p and len(p["resumed"]) == len(fractions)]


def _share(checks: dict | None) -> float | None:
    return 100.0 * float(np.mean(list(checks.values()))) if checks else None


# A model that ignores its prompt but draws valid scenes scores about this (1/8, 1/7, 1/9, 1/2, 1/3 per attribute).
CHANCE_ACCURACY = 100.0 * (1 / 8 + 1 / 7 + 1 / 9 + 1 / 2 + 1 / 3) / 5


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 2) if values else None


def relation_profile(pairs: Sequence[dict], fractions: Sequence[float] = STATE_FRACTIONS) -> list[dict]:
    """Per relation: similarity quantiles and the accuracy lost at each K."""
    out = []
    for relation in dict.fromkeys(p["relation"] for p in pairs):
        rs = [p for p in pairs if p["relation"] == relation]
        sims = np.array([p["similarity"] for p in rs])
        out.append(
            {
                "relation": relation,
                "n": len(rs),
                "similarity": {
                    q: round(float(np.quantile(sims, v)), 3) for q, v in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))
                },
                "fresh": round(float(np.mean([p["fresh"] for p in rs])), 2),
                "loss_at": {str(f): round(loss(rs, f), 2) for f in fractions},
                "inherited_at": {
                    str(f): _mean_or_none(p.get("inherited", {}).get(str(f)) for p in rs) for f in fractions
                },
                "fresh_inherited": _mean_or_none(p.get("fresh_inherited") for p in rs),
                "loss_se_at": {
                    str(f): round(
                        float(np.std([p["fresh"] - p["resumed"][str(f)] for p in rs], ddof=1) / np.sqrt(len(rs))), 2
                    )
                    if len(rs) > 1
                    else None
                    for f in fractions
                },
            }
        )
    return out


def prompt_embedder(model: str):
    """The embedder the cache uses for ``model`` (REPRISE_CACHE_EMBEDDER): MiniLM, or the model's own text encoder."""
    from cache.embedding import CallableEmbedder, PromptEmbedder

    settings = CacheSettings()
    if settings.embedder == "minilm":
        return PromptEmbedder()
    from workers.model_loading import load_components
    from workers.node_cache import cache_settings_for

    settings, fn = cache_settings_for(settings, load_components(model))
    if settings.embedder != "clip":  # auto, without a table for the model's encoder
        return PromptEmbedder()
    return CallableEmbedder(fn, version="clip", dim=settings.clip_dim)


def relation_similarities(
    relations: Sequence[str], n: int = 300, seed: int = 7, model: str = "shapes"
) -> dict[str, dict]:
    """Similarity (the cache's embedder) of many more shape caption pairs per relation than are generated (no
    images): how well similarity alone tells a paraphrase from an edit or an unrelated scene."""
    from ops.eval_quality import build_cases

    embedder = prompt_embedder(model)
    cases = build_cases("generated", n, relations, seed)
    left = embedder.embed_many([c.source_prompt for c in cases])
    right = embedder.embed_many([c.target_prompt for c in cases])
    sims = np.sum(left * right, axis=1)
    out = {}
    for relation in relations:
        s = sims[[c.relation == relation for c in cases]]
        out[relation] = {
            q: round(float(np.quantile(s, v)), 3) for q, v in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9), ("max", 1.0))
        }
    return out


# --- real prompt streams (similarity only) -----------------------------------------------------------

STREAM_FILES = {
    "PartiPrompts": "PartiPrompts.tsv",
    "COCO (first 3000)": "coco_captions_30k.txt",
    "Krea 1k (by time)": "krea_1k_by_time.csv",
    "DrawBench": "drawbench_imagen.csv",
}


def stream_similarities(prompts_dir: str, limit: int = 3000) -> dict[str, dict]:
    """MiniLM similarities the stream report needs (table-independent, so they can be stored and reused):
    per file, each prompt's most similar earlier prompt (exact repeats apart: exact-cache hits); per kind
    of edited pair (ops.prompt_pairs.calibration_pairs), the pair's similarity."""
    from cache.embedding import PromptEmbedder
    from ops.workload import read_prompts

    embedder = PromptEmbedder()
    out: dict[str, dict] = {"files": {}, "pair kinds": {}}
    for name, filename in STREAM_FILES.items():
        path = Path(prompts_dir) / filename
        if not path.exists():
            continue
        prompts = [r.prompt for r in read_prompts(path)][:limit]
        vecs = embedder.embed_many(prompts)
        sims = vecs @ vecs.T
        best = np.array([sims[i, :i].max() if i else -1.0 for i in range(len(prompts))])
        repeats = best > 0.9999
        out["files"][name] = {
            "prompts": len(prompts),
            "exact_repeats": int(repeats.sum()),
            "nearest_earlier": [round(float(v), 4) for v in best[~repeats]],
        }
    for kind, pairs in calibration_pairs(prompts_dir, limit=600, embed_many=embedder.embed_many).items():
        left = embedder.embed_many([a for a, _ in pairs])
        right = embedder.embed_many([b for _, b in pairs])
        out["pair kinds"][kind] = [round(float(v), 4) for v in np.sum(left * right, axis=1)]
    return out


def stream_report(similarities: dict, tables: dict[str, SkipTable], steps: int = 50) -> dict:
    """Per file and table: the share of prompts whose most similar earlier prompt would hit at each K
    and the steps skipped (an infinite cache, prompts in file order); per kind of pair, the hit share."""
    out: dict[str, dict] = {}
    for name, entry in similarities["files"].items():
        nearest = np.asarray(entry["nearest_earlier"])
        row = {
            "prompts": entry["prompts"],
            "exact_repeats_pct": round(100.0 * entry["exact_repeats"] / entry["prompts"], 2),
            "nearest_earlier": {
                q: round(float(np.quantile(nearest, v)), 3) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
            },
            "tables": {},
        }
        for tname, table in tables.items():
            ks = [fraction_to_k(assign(float(s), table), steps) for s in nearest]
            row["tables"][tname] = {
                "hit_pct": round(100.0 * float(np.mean([k > 0 for k in ks])), 2),
                "steps_saved_pct": round(100.0 * float(np.mean(ks)) / steps, 2),
                f"share_by_K_of_{steps}": {
                    str(k): round(100.0 * ks.count(k) / len(ks), 2) for k in sorted(set(ks), reverse=True)
                },
            }
        out[name] = row
    out["pair kinds"] = {
        kind: {
            "n": len(s),
            "p50": round(float(np.median(s)), 3),
            "hit_pct": {
                tname: round(100.0 * float(np.mean([assign(float(v), t) > 0 for v in s])), 1)
                for tname, t in tables.items()
            },
        }
        for kind, s in similarities["pair kinds"].items()
    }
    return out


# --- plot --------------------------------------------------------------------------------------------


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    fitted = report["curve"]["fitted"]
    fresh = fitted[0]["fresh_accuracy"]
    ax.plot(
        [p["steps_saved_pct"] for p in fitted], [p["accuracy"] for p in fitted], "o-", label="fitted tables (tolerance)"
    )
    for p in fitted:
        ax.annotate(
            f"{p['tolerance']:g}",
            (p["steps_saved_pct"], p["accuracy"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    for name, p in report["curve"]["references"].items():
        marker = "s" if name.startswith("always") else "^"
        ax.plot(p["steps_saved_pct"], p["accuracy"], marker, label=name)
    ax.axhline(fresh, color="gray", lw=0.8)
    ax.axhline(
        fresh - report["tolerance"], color="gray", lw=0.8, ls="--", label=f"fresh - {report['tolerance']:g} points"
    )
    ax.set_xlabel("steps saved over the calibration pairs (%)")
    ax.set_ylabel("checker attribute accuracy (points)")
    ax.set_title(f"{report['meta']['model']}: accuracy vs steps saved ({len(report['pairs'])} pairs)")
    ax.legend(fontsize=7)
    pairs = report["pairs"]
    relations = list(dict.fromkeys(p["relation"] for p in pairs))
    fractions = [float(f) for f in pairs[0]["resumed"]]
    for f in fractions:
        xs = np.array([p["similarity"] for p in pairs])
        loss = np.array([p["fresh"] - p["resumed"][str(f)] for p in pairs])
        order = np.argsort(xs)
        # loss of the upper tail above each similarity (tails of at least min_pairs): what a threshold there costs
        judged = max(len(order) - report["meta"]["min_pairs"] + 1, 1)
        tails = [loss[order][i:].mean() for i in range(judged)]
        bx.plot(
            xs[order][:judged], tails, label=f"K={fraction_to_k(f, report['meta']['steps'])}/{report['meta']['steps']}"
        )
    for t, _f in report["table"]:
        bx.axvline(t, color="gray", lw=0.6, ls=":")
    bx.axhline(report["tolerance"], color="gray", ls="--", lw=0.8)
    bx.set_xlabel("MiniLM cosine similarity threshold t")
    bx.set_ylabel("accuracy lost by pairs with s > t (points)")
    bx.set_title("tail loss per K (dotted: fitted thresholds); relations: " + ", ".join(relations), fontsize=8)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- the command -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.calibration_shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="source scenes (each gives one pair per relation)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--relations", default=",".join(ALL_RELATIONS))
    parser.add_argument(
        "--records",
        nargs="*",
        default=[],
        help="reuse the records of earlier runs (eval quality or calibrate JSON); similarities are recomputed "
        "with the embedder in force (REPRISE_CACHE_EMBEDDER)",
    )
    parser.add_argument("--no-run", action="store_true", help="only the --records, no new generations")
    parser.add_argument(
        "--tolerance", type=float, default=2.0, help="accuracy points a hit may lose against fresh generation"
    )
    parser.add_argument("--min-pairs", type=int, default=15, help="smallest tail or band judged")
    parser.add_argument(
        "--min-above-chance",
        type=float,
        default=15.0,
        help="fresh accuracy must beat a prompt-ignoring model by this many points for the table to be trusted",
    )
    parser.add_argument(
        "--z", type=float, default=0.0, help="also require loss + z standard errors <= tolerance (0: the mean alone)"
    )
    parser.add_argument(
        "--streams", default="../shared/prompts", help="prompt files for the stream report ('' to skip)"
    )
    parser.add_argument(
        "--stream-cache", default=None, help="keep the streams' MiniLM similarities in this JSON and reuse them"
    )
    parser.add_argument("--json", dest="json_out", default="calibration.json")
    parser.add_argument("--plot", default="calibration.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    records, meta = [], {"model": args.model, "steps": args.steps}
    for path in args.records:
        data = json.loads(Path(path).read_text())
        if data["meta"]["steps"] != args.steps:
            raise SystemExit(f"{path}: {data['meta']['steps']} steps, not {args.steps}")
        offset = 10_000 * (len(records) + 1)  # keep scene numbers of different runs apart
        records += [{**r, "scene": r["scene"] + offset, "seed": r.get("seed")} for r in data["records"]]
        meta = data["meta"]
    if not args.no_run:
        relations = [r.strip() for r in args.relations.split(",") if r.strip()]
        conditions = [Condition("fresh", "fresh")] + [
            Condition(f"approx K={fraction_to_k(f, args.steps)}/{args.steps}", "approx", fraction=f)
            for f in STATE_FRACTIONS
        ]
        run = evaluate("generated", args.n, args.steps, args.model, args.seed, relations, conditions)
        write_json(run, Path(args.json_out).with_suffix(".records.json"))
        records += run["records"]
        meta = run["meta"]
    pairs = pairs_from_records(records, args.steps)
    if not pairs:
        raise SystemExit("no complete (fresh + every K) pairs in the records")
    # Accuracy does not depend on the embedder, similarity does: score every pair with the embedder in force,
    # so one set of generations calibrates MiniLM and `clip` alike.
    embedder = prompt_embedder(args.model)
    left = embedder.embed_many([p["source_prompt"] for p in pairs])
    right = embedder.embed_many([p["target_prompt"] for p in pairs])
    for p, s in zip(pairs, np.sum(left * right, axis=1)):
        p["similarity"] = round(float(s), 5)
    table = fit_table(pairs, args.tolerance, args.min_pairs, z=args.z)
    fresh = float(np.mean([p["fresh"] for p in pairs]))
    report = {
        "prompt_following": {
            "fresh_accuracy": round(fresh, 2),
            "chance_accuracy": round(CHANCE_ACCURACY, 2),
            "trusted": fresh - CHANCE_ACCURACY >= args.min_above_chance,
        },
        "meta": {
            **meta,
            "calibration_s": round(time.perf_counter() - started, 1),
            "min_pairs": args.min_pairs,
            "z": args.z,
        },
        "tolerance": args.tolerance,
        "table": [list(r) for r in table],
        "score": score_table(pairs, table, args.steps),
        "relations": relation_profile(pairs),
        "embedder": "clip" if embedder.version == "clip" else "minilm",
        "relation_similarities": relation_similarities(
            list(dict.fromkeys(p["relation"] for p in pairs)), model=args.model
        ),
        "curve": curve(pairs, args.steps, args.min_pairs, z=args.z),
        "pairs": pairs,
    }
    if args.streams:
        cached = Path(args.stream_cache) if args.stream_cache else None
        if cached is not None and cached.exists():
            similarities = json.loads(cached.read_text())
        else:
            similarities = stream_similarities(args.streams)
            if cached is not None:
                cached.write_text(json.dumps(similarities))
        report["streams"] = stream_report(
            similarities, {"calibrated": table, "shipped MiniLM": MINILM_SKIP_TABLE, "CLIP (NIRVANA)": CLIP_SKIP_TABLE}
        )
    Path(args.json_out).write_text(json.dumps(report, indent=1))
    plot(report, args.plot)
    print_report(report)
    print(f"\nwrote {args.json_out} and {args.plot} ({time.perf_counter() - started:.0f} s)")
    return 0


def print_report(report: dict) -> None:
    s = report["score"]
    pf = report["prompt_following"]
    print(
        f"\n{len(report['pairs'])} pairs; fresh accuracy {s['fresh_accuracy']:.1f} points (a prompt-ignoring model: "
        f"{pf['chance_accuracy']:.1f}){'' if pf['trusted'] else '  -- the model barely follows its prompts: the table below says little'}"
    )
    print(
        f"{'relation':<12} {'n':>4} {'s p10':>6} {'p50':>6} {'p90':>6} {'fresh':>6}  loss at K fraction "
        + " ".join(f"{f:>5}" for f in STATE_FRACTIONS)
        + "   inherited % (fresh, per K)"
    )
    for r in report["relations"]:
        q = r["similarity"]
        inh = (
            ""
            if r["fresh_inherited"] is None
            else f"   {r['fresh_inherited']:.0f}, " + " ".join(f"{v:.0f}" for v in r["inherited_at"].values())
        )
        print(
            f"{r['relation']:<12} {r['n']:>4} {q['p10']:>6.3f} {q['p50']:>6.3f} {q['p90']:>6.3f} {r['fresh']:>6.1f}  {'':18} "
            + " ".join(f"{v:>5.1f}" for v in r["loss_at"].values())
            + inh
        )
    print(
        f"\n{report.get('embedder', 'minilm')} similarity of shape caption pairs by relation (300 pairs each, no generation):"
    )
    for relation, q in report["relation_similarities"].items():
        print(f"  {relation:<12} " + "  ".join(f"{k} {v:.3f}" for k, v in q.items()))
    print(f"\ncalibrated table (tolerance {report['tolerance']:g} points): {report['table']}")
    print(
        f"  hits {s['hit_pct']}%  steps saved {s['steps_saved_pct']}%  accuracy {s['accuracy']} vs fresh {s['fresh_accuracy']} "
        f"(delta {s['delta']:+} ± {s['delta_se']} s.e.; on hits {s['hits_delta']})  bands {s['bands']}"
    )
    print("\ncurve (tolerance: steps saved %, accuracy):")
    for p in report["curve"]["fitted"]:
        print(
            f"  tol {p['tolerance']:>5g}: saved {p['steps_saved_pct']:>5.1f}%  acc {p['accuracy']:.1f} (delta {p['delta']:+.1f})  table {p['table']}"
        )
    for name, p in report["curve"]["references"].items():
        print(
            f"  {name:<22} saved {p['steps_saved_pct']:>5.1f}%  acc {p['accuracy']:.1f} (delta {p['delta']:+.1f} ± {p['delta_se'] or 0:.1f})"
        )
    for name, entry in report.get("streams", {}).items():
        if name == "pair kinds":
            for g, v in entry.items():
                print(f"  pairs {g:<28} n={v['n']:<5} p50 {v['p50']:.3f}  hit% {v['hit_pct']}")
            continue
        print(f"stream {name}: {entry['prompts']} prompts, nearest earlier {entry['nearest_earlier']}")
        for tname, t in entry["tables"].items():
            print(
                f"    {tname:<14} hit {t['hit_pct']:>5.1f}%  steps saved {t['steps_saved_pct']:>5.2f}%  K shares {list(t.values())[2]}"
            )


if __name__ == "__main__":
    raise SystemExit(main())
