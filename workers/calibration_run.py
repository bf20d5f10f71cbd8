"""Fit the similarity -> K table for your model and your traffic: ``reprise calibrate``.

    reprise calibrate --model sd15 --prompts my_log.jsonl --scorer pixel --tolerance 2 --json cal.json --plot cal.png

1. Replays the prompt log in order, the way the cache sees it (``scheduler.prompt_log`` formats; a row
   without a seed gets the hash of its text, as a workload does): each prompt's most similar earlier
   prompt under the embedder (``--embedder``, default the cache's) is its neighbour. An exact repeat
   (same prompt and seed) is an exact-cache hit and is left out. This is the real distribution of
   neighbours, not synthetic relations (``python -m ops.calibration_shapes`` keeps those for ``shapes``).
2. Takes ``--pairs`` (neighbour, target) pairs (default 100), most of them where thresholds fall (see
   ``sample_pairs``), and for each generates the neighbour (capturing its noise states at the cache's
   stored K), the target fresh from the neighbour's seed, and the target resumed from the neighbour's
   state at each K.
3. Scores every resumed image against the fresh one and the prompt (``--scorer``: ``pixel`` SSIM,
   ``clip`` CLIP score from ``--clip-model``, ``checker`` for shapes), and fits the table with the
   evidence rule of ``cache.calibration_fit``: every tail and band of similarities loses at most
   ``--tolerance`` points (plus ``--z`` standard errors), re-rolls vouch only for themselves, and no
   band gets a K without ``--min-pairs`` pairs of its own.
4. Prints the curve (tables fitted at other tolerances: steps saved on the log against points lost)
   and writes the JSON and a plot. ``--store`` (or ``reprise cache table calibrate``) stores the table
   in Redis for this model version and embedder, where every worker serving the version picks it up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cache.calibration_fit import TOLERANCES, curve, fit_table, same_text, score_table
from cache.skip_table import DEFAULT_TABLES, SkipTable, choose_skip_fraction, fraction_to_k, state_steps
from scheduler.errors import InvalidRequest


class CalibrationError(InvalidRequest):
    """A calibration that cannot run as asked (no prompts, too few neighbour pairs, bad option)."""

    code = "invalid_calibration"


# --- 1. the log, replayed ----------------------------------------------------------------------------


def replay_log(rows: Sequence, embed_many: Callable[[list[str]], np.ndarray]) -> tuple[list[dict], int]:
    """(one neighbour record per prompt that has an earlier, non-identical request, exact repeats).

    ``rows``: objects with ``prompt`` and ``seed`` (None: the hash of the prompt), in log order."""
    from scheduler.prompt_log import canonical_seed

    keys = [(r.prompt, r.seed if r.seed is not None else canonical_seed(r.prompt)) for r in rows]
    texts = list(dict.fromkeys(p for p, _ in keys))
    index = {t: i for i, t in enumerate(texts)}
    vecs = np.asarray(embed_many(texts), dtype=np.float32)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    sims = vecs @ vecs.T
    out, seen, repeats = [], set(), 0
    order: list[int] = []  # indices of distinct earlier requests
    for i, (prompt, seed) in enumerate(keys):
        if (prompt, seed) in seen:
            repeats += 1
            continue
        if order:
            row = sims[index[prompt], [index[keys[j][0]] for j in order]]
            best = int(np.argmax(row))
            j = order[best]
            out.append(
                {
                    "index": i,
                    "target_prompt": prompt,
                    "target_seed": seed,
                    "source_index": j,
                    "source_prompt": keys[j][0],
                    "source_seed": keys[j][1],
                    "similarity": round(float(min(row[best], 1.0)), 5),
                }
            )
        seen.add((prompt, seed))
        order.append(i)
    return out, repeats


def _even(indices: Sequence[int], k: int) -> list[int]:
    """``k`` of ``indices`` at evenly spaced positions."""
    if k <= 0 or not indices:
        return []
    return [indices[i] for i in np.unique(np.linspace(0, len(indices) - 1, k).round().astype(int))]


def sample_pairs(neighbours: Sequence[dict], n: int) -> list[dict]:
    """``n`` pairs, most of them where the thresholds are decided.

    Re-rolls (the same text, another seed) resume from their own prompt's state and lose nothing by
    construction, so they get a sixth of the pairs (enough to judge the table's top band, no more). Of
    the rest, half are at evenly spaced ranks of the other neighbours (the log's own distribution below
    identical text) and half at evenly spaced similarities over the closer half of them (above their
    median), where close edits live and where a table's thresholds fall: a tail mean carried by re-rolls
    at s = 1 cannot stand in for them."""
    if n >= len(neighbours):
        return sorted(neighbours, key=lambda p: p["similarity"])
    sims = np.array([p["similarity"] for p in neighbours])
    by_sim = [int(i) for i in np.argsort(sims, kind="stable")]
    same = [i for i in by_sim if same_text(neighbours[i])]
    other = [i for i in by_sim if not same_text(neighbours[i])]
    used = set(_even(same, min(len(same), max(n // 6, n - len(other)))))
    rest = n - len(used)
    used |= set(_even(other, (rest + 1) // 2))
    if other:
        lo = float(np.median(sims[other]))
        upper = [i for i in other if sims[i] >= lo]
        for target in np.linspace(sims[upper].max(), lo, n - len(used)):
            free = [i for i in upper if i not in used]
            if not free:
                break
            used.add(min(free, key=lambda i: abs(sims[i] - target)))
    for i in [*reversed(other), *same]:  # short of pairs somewhere: the closest left over
        if len(used) >= n:
            break
        used.add(i)
    return sorted((neighbours[i] for i in used), key=lambda p: p["similarity"])


# --- 2. generation -----------------------------------------------------------------------------------


class PairRunner:
    """Generates, for one pair, the target fresh and resumed at each K from the neighbour's states."""

    def __init__(self, components, steps: int, guidance: float, fractions: Sequence[float]) -> None:
        from workers.denoise_loop import DenoiseLoop

        self.loop = DenoiseLoop(components)
        self.steps, self.guidance = steps, guidance
        self.size = components.spec.default_size
        self.ks = {f: fraction_to_k(f, steps) for f in fractions}

    def _image(self, out) -> np.ndarray:
        return np.asarray(self.loop.decode(out.latents).convert("RGB"))

    def run(self, pair: dict) -> tuple[np.ndarray, dict[float, np.ndarray]]:
        import torch

        common = dict(steps=self.steps, guidance_scale=self.guidance, width=self.size, height=self.size)
        source = self.loop.denoise(
            prompt=pair["source_prompt"],
            seed=pair["source_seed"],
            capture_at=state_steps(self.steps, list(self.ks)),
            snap_dtype=torch.float16,  # the cache stores float16 states
            **common,
        )
        # The resumed image continues the neighbour's noise, so the fresh reference uses the neighbour's seed.
        fresh = self._image(self.loop.denoise(prompt=pair["target_prompt"], seed=pair["source_seed"], **common))
        by_k = {
            k: self._image(
                self.loop.denoise(
                    prompt=pair["target_prompt"],
                    seed=pair["source_seed"],
                    start_latents=source.captured[k],
                    start_step=k,
                    **common,
                )
            )
            for k in sorted(set(self.ks.values()))
        }
        return fresh, {f: by_k[k] for f, k in self.ks.items()}


# --- 3. fit and report -------------------------------------------------------------------------------


def log_steps_saved(neighbours: Sequence[dict], prompts: int, table: SkipTable, steps: int) -> float:
    """Steps an unbounded cache with ``table`` skips over the whole log (% of all its requests' steps)."""
    saved = sum(fraction_to_k(choose_skip_fraction(p["similarity"], table), steps) for p in neighbours) if table else 0
    return round(100.0 * saved / (max(prompts, 1) * steps), 2)


def report_curve(pairs, neighbours, prompts, steps, min_pairs, fractions, z, references) -> dict:
    c = curve(pairs, steps, min_pairs, fractions, z, references=references)
    for entry in [*c["fitted"], *c["references"].values()]:
        entry["steps_saved_on_log_pct"] = log_steps_saved(neighbours, prompts, tuple(map(tuple, entry["table"])), steps)
    return c


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    fitted = report["curve"]["fitted"]
    xs = [p["steps_saved_on_log_pct"] for p in fitted]
    ys = [-(p["hits_delta"] or 0.0) for p in fitted]
    ax.plot(xs, ys, "o-", label="fitted tables (tolerance)")
    for p, x, y in zip(fitted, xs, ys):
        ax.annotate(f"{p['tolerance']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for name, p in report["curve"]["references"].items():
        ax.plot(
            p["steps_saved_on_log_pct"],
            -(p["hits_delta"] or 0.0),
            "s" if name.startswith("always") else "^",
            label=name,
        )
    ax.axhline(report["tolerance"], color="gray", ls="--", lw=0.8, label=f"tolerance {report['tolerance']:g}")
    ax.set_xlabel("steps saved over the prompt log (%)")
    ax.set_ylabel(f"{report['meta']['scorer']} points lost by approximate hits")
    ax.set_title(f"{report['meta']['model']} ({report['meta']['embedder']}): loss vs steps saved", fontsize=9)
    ax.legend(fontsize=7)
    pairs = report["pairs"]
    sims = np.array([p["similarity"] for p in pairs])
    for f in report["meta"]["fractions"]:
        bx.plot(
            sims,
            [p["fresh"] - p["resumed"][str(f)] for p in pairs],
            ".",
            label=f"K={fraction_to_k(f, report['meta']['steps'])}",
        )
    for t, _f in report["table"]:
        bx.axvline(t, color="gray", lw=0.6, ls=":")
    bx.axhline(report["tolerance"], color="gray", ls="--", lw=0.8)
    bx.set_xlabel(f"{report['meta']['embedder']} similarity to the nearest earlier prompt")
    bx.set_ylabel("points lost (fresh - resumed)")
    bx.set_title("per pair and K (dotted: fitted thresholds)", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_embedder(name: str, components):
    """The cache's prompt embedder: MiniLM, or the model's own text encoder (pooled) for ``clip``."""
    from cache.embedding import CallableEmbedder, PromptEmbedder

    if name == "minilm":
        return PromptEmbedder()
    if name == "clip":
        from workers.node_cache import clip_embedder

        return CallableEmbedder(clip_embedder(components), version="clip", dim=components.family.pooled_dim(components))
    raise CalibrationError(f"unknown embedder {name!r}: minilm or clip")


def calibrate(args, out: Callable[[str], None] = print) -> dict:
    from cache import CacheSettings
    from scheduler.prompt_log import read_prompts
    from workers.model_loading import load_components, model_extra
    from workers.scorers import make_scorer

    started = time.perf_counter()
    try:
        rows = read_prompts(args.prompts)[: args.limit]
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"--prompts: {exc}") from None
    names = [n.strip() for n in args.scorer.split(",") if n.strip()]
    if not names:
        raise CalibrationError("--scorer: one or more of pixel, clip, checker (comma-separated)")
    scorers = [make_scorer(n, clip_model=args.clip_model, model=args.model) for n in names]
    scorer = scorers[0]  # the table's; the others score the same images, for comparison
    settings = CacheSettings()
    embedder_name = args.embedder or settings.embedder
    fractions = sorted(settings.state_fractions)
    out(f"calibrate: loading {args.model} ...")
    components = load_components(args.model)
    extra = model_extra(args.model)
    steps = args.steps or int(extra.get("default_steps", 25))
    guidance = args.guidance if args.guidance is not None else float(extra.get("default_guidance_scale", 4.0))
    if embedder_name == "auto":
        from workers.skip_table_choice import auto_embedder

        embedder_name = auto_embedder(components)
    embedder = make_embedder(embedder_name, components)
    neighbours, repeats = replay_log(rows, embedder.embed_many)
    if len(neighbours) < 2:
        raise CalibrationError(f"{args.prompts}: {len(rows)} prompts give {len(neighbours)} neighbour pairs; need 2+")
    sims = np.array([p["similarity"] for p in neighbours])
    out(
        f"calibrate: {len(rows)} prompts of {args.prompts}, {repeats} exact repeats, {len(neighbours)} neighbour pairs; "
        f"{embedder_name} similarity to the nearest earlier prompt p10 {np.quantile(sims, 0.1):.3f} "
        f"p50 {np.median(sims):.3f} p90 {np.quantile(sims, 0.9):.3f} max {sims.max():.3f}"
    )
    chosen = sample_pairs(neighbours, args.pairs)
    runner = PairRunner(components, steps, guidance, fractions)
    ks = " ".join(f"K={fraction_to_k(f, steps)}" for f in fractions)
    out(f"calibrate: {len(chosen)} pairs x (neighbour, fresh, {ks}) of {steps} steps, scorer {scorer.name}")
    by_scorer: dict[str, list[dict]] = {s.name: [] for s in scorers}
    for i, pair in enumerate(chosen, 1):
        t = time.perf_counter()
        fresh, resumed = runner.run(pair)
        for each in scorers:
            scores = each(pair["target_prompt"], fresh, [resumed[f] for f in fractions])
            row = {
                **pair,
                "fresh": round(scores.fresh, 4),
                "resumed": {str(f): round(v, 4) for f, v in zip(fractions, scores.resumed)},
            }
            if scores.details:
                row["details"] = scores.details
            by_scorer[each.name].append(row)
        row = by_scorer[scorer.name][-1]
        losses = " ".join(f"{row['fresh'] - v:5.1f}" for v in row["resumed"].values())
        out(
            f"  pair {i}/{len(chosen)}  s={pair['similarity']:.3f}  loss at {ks}: {losses}  ({time.perf_counter() - t:.1f} s)"
        )
    meta = {
        "model": components.name,
        "fingerprint": components.fingerprint,
        "embedder": embedder_name,
        "scorer": scorer.name,
        "prompts": str(args.prompts),
        "log_prompts": len(rows),
        "exact_repeats": repeats,
        "steps": steps,
        "guidance_scale": guidance,
        "fractions": fractions,
        "calibration_s": round(time.perf_counter() - started, 1),
    }
    return fit_report(by_scorer, [p["similarity"] for p in neighbours], meta, args)


def fit_report(by_scorer: dict[str, list[dict]], neighbour_sims: list[float], meta: dict, args) -> dict:
    """Fit the first scorer's table (and, for comparison, one per other scorer) and price the curve."""
    names = list(by_scorer)
    pairs, steps, fractions, prompts = by_scorer[names[0]], meta["steps"], meta["fractions"], meta["log_prompts"]
    neighbours = [{"similarity": s} for s in neighbour_sims]
    min_pairs = args.min_pairs or max(1, min(15, len(pairs) // 8))
    table = fit_table(pairs, args.tolerance, min_pairs, fractions, args.z)
    references = {f"default {meta['embedder']} table": DEFAULT_TABLES[meta["embedder"]]}
    report = {
        "meta": {**meta, "min_pairs": min_pairs, "z": args.z},
        "tolerance": args.tolerance,
        "table": [list(r) for r in table],
        "score": {
            **score_table(pairs, table, steps),
            "steps_saved_on_log_pct": log_steps_saved(neighbours, prompts, table, steps),
        },
        "curve": report_curve(pairs, neighbours, prompts, steps, min_pairs, fractions, args.z, references),
        "neighbour_similarities": list(neighbour_sims),
        "pairs": pairs,
    }
    if len(names) > 1:  # the same images, scored and fitted by the other scorers
        report["other_scorers"] = {}
        for name in names[1:]:
            scored = by_scorer[name]
            other = fit_table(scored, args.tolerance, min_pairs, fractions, args.z)
            report["other_scorers"][name] = {
                "table": [list(r) for r in other],
                "score": {
                    **score_table(scored, other, steps),
                    "steps_saved_on_log_pct": log_steps_saved(neighbours, prompts, other, steps),
                },
                "primary_table_scored": score_table(scored, table, steps),
                "pairs": scored,
            }
    return report


def refit(args) -> dict:
    """``--refit REPORT [REPORT ...]``: fit again (another tolerance, z or min-pairs) from earlier reports'
    scored pairs, no generation; several reports of one model version, steps and scorers are pooled (the
    log figures are the first report's)."""
    by_scorer: dict[str, list[dict]] = {}
    meta = None
    for i, path in enumerate(args.refit):
        try:
            old = json.loads(Path(path).read_text())
            scored = {old["meta"]["scorer"]: old["pairs"]}
            scored.update({name: o["pairs"] for name, o in old.get("other_scorers", {}).items()})
            this = {k: v for k, v in old["meta"].items() if k not in ("min_pairs", "z", "refit_of")}
            sims = old["neighbour_similarities"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CalibrationError(f"--refit {path}: not a calibration report ({type(exc).__name__}: {exc})") from None
        if meta is None:
            meta, neighbour_sims = this, sims
        else:
            same = ("fingerprint", "embedder", "steps", "fractions")
            if any(this.get(k) != meta.get(k) for k in same) or set(scored) != set(by_scorer):
                raise CalibrationError(f"--refit {path}: another model version, embedder, step count or scorers")
        for name, rows in scored.items():
            by_scorer.setdefault(name, []).extend({**r, "report": i} for r in rows)
    return fit_report(by_scorer, neighbour_sims, {**meta, "refit_of": [str(p) for p in args.refit]}, args)


def print_report(report: dict, out: Callable[[str], None] = print) -> None:
    s, m = report["score"], report["meta"]
    out(
        f"\ntable fitted at {report['tolerance']:g} {m['scorer']} points ({m['embedder']}, version {m['fingerprint']}): {report['table']}"
    )
    out(
        f"  on the pairs: hits {s['hit_pct']}%  points lost by hits {-(s['hits_delta'] or 0):.2f}  "
        f"overall delta {s['delta']:+.2f}; steps saved on the log {s['steps_saved_on_log_pct']}%"
    )
    out("\ncurve (tolerance: steps saved on the log, points lost by hits, table):")
    for p in report["curve"]["fitted"]:
        out(
            f"  tol {p['tolerance']:>5g}: saved {p['steps_saved_on_log_pct']:>5.1f}%  lost {-(p['hits_delta'] or 0):5.2f}  {p['table']}"
        )
    for name, p in report["curve"]["references"].items():
        out(f"  {name:<22} saved {p['steps_saved_on_log_pct']:>5.1f}%  lost {-(p['hits_delta'] or 0):5.2f}")
    for name, o in report.get("other_scorers", {}).items():
        mine = o["primary_table_scored"]
        out(
            f"\nscored by {name}: the {m['scorer']} table loses {-(mine['hits_delta'] or 0):.2f} {name} points on its hits; "
            f"the table fitted on {name} at {report['tolerance']:g}: {o['table']} "
            f"(steps saved on the log {o['score']['steps_saved_on_log_pct']}%, loses {-(o['score']['hits_delta'] or 0):.2f})"
        )


def store(report: dict, prefix: str | None = None, client=None) -> dict:
    """Store the fitted table in Redis for the report's model version and embedder."""
    from cache.skip_table_store import TableStore
    from scheduler.settings import get_settings

    settings = get_settings()
    if client is None:
        from scheduler.redis_conn import redis_client

        client = redis_client(settings.redis_url)
    m = report["meta"]
    return TableStore(client, prefix or settings.queue_prefix).set(
        m["model"],
        m["fingerprint"],
        m["embedder"],
        report["table"],
        tolerance=report["tolerance"],
        scorer=m["scorer"],
        steps=m["steps"],
        pairs=len(report["pairs"]),
        steps_saved_on_log_pct=report["score"]["steps_saved_on_log_pct"],
        source="reprise calibrate",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="built-in name, model directory or hub id (default tiny)")
    p.add_argument("--prompts", help="prompt log: .tsv/.csv with a Prompt column, .jsonl or one per line")
    p.add_argument("--scorer", default="pixel", help="pixel | clip (with --clip-model) | checker (shapes)")
    p.add_argument("--clip-model", help="CLIP model directory for --scorer clip")
    p.add_argument("--tolerance", type=float, default=2.0, help="points an approximate hit may lose (default 2)")
    p.add_argument(
        "--embedder",
        choices=["minilm", "clip"],
        help="default: the cache's (REPRISE_CACHE_EMBEDDER; auto: the model's own encoder where it ships a table for it)",
    )
    p.add_argument("--pairs", type=int, default=100, help="neighbour pairs generated (default 100)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's, else 25)")
    p.add_argument("--guidance", type=float, help="default: the model's, else 4")
    p.add_argument("--limit", type=int, default=3000, help="first prompts of the log replayed (default 3000)")
    p.add_argument(
        "--min-pairs",
        type=int,
        help="pairs a tail, threshold or band needs as its own evidence (default: pairs/8, at most 15)",
    )
    p.add_argument(
        "--z",
        type=float,
        default=2.0,
        help="require loss + z standard errors <= tolerance (default 2; 0: the mean alone)",
    )
    p.add_argument("--json", dest="json_out", help="write the report here")
    p.add_argument("--refit", nargs="+", help="fit again from earlier reports' scored pairs (pooled; no generation)")
    p.add_argument("--plot", help="write the curve here (PNG)")
    p.add_argument("--store", action="store_true", help="store the table in Redis for this model version")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)")


def run(args) -> int:
    if args.pairs < 2 or args.tolerance < 0 or (args.steps is not None and args.steps < 2) or args.limit < 2:
        raise CalibrationError("--pairs >= 2, --tolerance >= 0, --steps >= 2, --limit >= 2")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.refit:
        report = refit(args)
    elif not args.prompts:
        raise CalibrationError("--prompts (a prompt log) or --refit (an earlier report) is needed")
    else:
        report = calibrate(args, out=lambda line: print(line, flush=True))
    print_report(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json_out}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    if args.store:
        record = store(report)
        print(f"stored for {record['model']} version {record['fingerprint']} ({record['embedder']}): {record['table']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reprise calibrate", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(sys.argv[1:] if argv is None else argv))


__all__ = ["TOLERANCES", "calibrate", "main", "replay_log", "sample_pairs"]
