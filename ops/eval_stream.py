"""Accuracy of a request stream served with the skip table in force: ``reprise eval stream``.

    reprise eval stream --stream generated --n 150
    reprise eval stream --stream mixed --n 150 --prompts ../shared/prompts
    reprise eval stream --skip-table shipped --skip-table 0.97:0.5,0.93:0.4,0.90:0.3   # compare tables

The calibration (``python -m ops.calibration_shapes``) prices (source, target) pairs one at a time; this command
checks the fitted table the way it is used: a stream of requests served in order through one
``GenerationService`` over a real embedded cache (exact and approximate lookups, every generation
written back, one tenant), so a request can hit any earlier one, including entries that were
themselves approximate. Every shape request is scored by the checker against its own prompt, and every
request that was served from the cache is also generated fresh (same prompt and seed, cache off) for a
paired comparison.

Streams (``--stream``):

- ``generated``: shape captions with a serving workload's structure: Zipf-popular scenes, so a popular
  one drawn again is an exact repeat; sessions that refine the previous request, keeping its seed (one
  attribute edited in the same wording, or the same scene paraphrased); re-rolls (same prompt, new
  seed).
- ``mixed``: the same with real prompts from the files under ``--prompts`` (``../shared/prompts``)
  interleaved (``--mix``, half the requests by default). They are served and cached like any other
  request and a shape prompt may resume from one of them; only shape requests are scored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ops.eval_quality import EDITS, QualityHarness, edit_scene, psnr, target_prompt
from ops.shapes import scene as sc
from ops.shapes.checker import check

SESSION_MOVES = {"edit": 0.5, "paraphrase": 0.25, "reroll": 0.25}
PROMPT_SUFFIXES = (".tsv", ".csv", ".txt", ".jsonl")


@dataclass(frozen=True)
class StreamItem:
    prompt: str
    seed: int
    kind: str  # popular | edit:<attribute> | paraphrase | reroll | real
    scene: sc.Scene | None  # what the checker scores against; None for real prompts


def _canonical_seed(text: str) -> int:
    return zlib.crc32(text.encode()) % 1_000_000


def real_prompts(path: str | os.PathLike, limit: int, rng: np.random.Generator) -> list[str]:
    """``limit`` prompts drawn from every prompt file under ``path`` (a file or a folder)."""
    from ops.workload import read_prompts

    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in PROMPT_SUFFIXES) if p.is_dir() else [p]
    prompts = sorted({r.prompt for f in files for r in read_prompts(f)})
    if not prompts:
        raise SystemExit(f"{path}: no prompts")
    picks = rng.choice(len(prompts), size=min(limit, len(prompts)), replace=False)
    return [prompts[int(i)] for i in picks]


def build_stream(
    kind: str,
    n: int,
    seed: int = 0,
    *,
    pool_size: int | None = None,
    zipf: float = 1.1,
    session_p: float = 0.5,
    mix: float = 0.5,
    prompts: str = "../shared/prompts",
) -> list[StreamItem]:
    if kind not in ("generated", "mixed"):
        raise SystemExit(f"--stream: 'generated' or 'mixed', not {kind!r}")
    rng = np.random.default_rng(seed)
    pool_size = pool_size or max(4, n // 3)
    pool = []  # (scene, caption, the caption's random state)
    for _ in range(pool_size):
        scene = sc.random_scene(rng)
        wording = rng.bit_generator.state
        pool.append((scene, sc.caption(scene, rng), wording))
    weights = 1.0 / np.arange(1, pool_size + 1) ** zipf
    weights /= weights.sum()
    real = real_prompts(prompts, pool_size, rng) if kind == "mixed" else []
    moves, move_p = list(SESSION_MOVES), list(SESSION_MOVES.values())
    items: list[StreamItem] = []
    prev = None  # (scene, prompt, wording, seed) of the session's last shape request
    while len(items) < n:
        if real and rng.random() < mix:
            text = real[int(rng.choice(pool_size, p=weights)) % len(real)]
            items.append(StreamItem(text, _canonical_seed(text), "real", None))
            continue
        if prev is not None and rng.random() < session_p:
            scene, prompt, wording, s = prev
            move = moves[int(rng.choice(len(moves), p=move_p))]
            if move == "edit":
                attribute = str(rng.choice(list(EDITS)))
                target = edit_scene(scene, attribute, rng)
                text = target_prompt(attribute, prompt, target, wording, rng)
                item, prev = StreamItem(text, s, f"edit:{attribute}", target), (target, text, wording, s)
            elif move == "paraphrase":
                for _ in range(20):
                    new_wording = rng.bit_generator.state
                    text = sc.caption(scene, rng)
                    if text != prompt:
                        break
                item, prev = StreamItem(text, s, "paraphrase", scene), (scene, text, new_wording, s)
            else:
                s = int(rng.integers(1_000_000))
                item, prev = StreamItem(prompt, s, "reroll", scene), (scene, prompt, wording, s)
        else:
            scene, text, wording = pool[int(rng.choice(pool_size, p=weights))]
            s = _canonical_seed(text)
            item, prev = StreamItem(text, s, "popular", scene), (scene, text, wording, s)
        items.append(item)
    return items


def _accuracy(image: np.ndarray, scene: sc.Scene) -> float:
    return 100.0 * float(np.mean(list(check(image, scene).values())))


def run_stream(items: Sequence[StreamItem], harness: QualityHarness, progress=None) -> list[dict]:
    """Serve the stream in order (write-backs drained between requests, as with requests spaced in time)."""
    fresh: dict[tuple[str, int], np.ndarray] = {}  # (prompt, seed) -> the image generated with no cache lookup
    records = []
    for i, item in enumerate(items):
        request = harness._request(item.prompt, item.seed, "stream", exact=True, approximate=True, write=True)
        result, image, wall = harness._run(request)
        harness.service.drain_writebacks()
        c = result.cache
        rec = {
            "i": i,
            "kind": item.kind,
            "prompt": item.prompt,
            "seed": item.seed,
            "hit": c.hit,
            "k": c.k,
            "similarity": c.similarity,
            "source": c.source_id,
            "steps_computed": c.steps_computed,
            "steps_saved": c.steps_saved,
            "wall_s": round(wall, 4),
        }
        if c.hit == "miss":
            fresh.setdefault((item.prompt, item.seed), image)  # a miss is the fresh generation
        if item.scene is not None:
            key = (item.prompt, item.seed)
            if key not in fresh:
                ref, ref_image, _ = harness._run(harness._request(item.prompt, item.seed, "fresh", write=True))
                fresh[key] = ref_image
            rec.update(
                target=item.scene.as_dict(),
                accuracy=_accuracy(image, item.scene),
                fresh_accuracy=_accuracy(fresh[key], item.scene),
            )
            p = psnr(image, fresh[key])
            rec["psnr"] = None if math.isinf(p) else round(p, 2)
        records.append(rec)
        if progress is not None:
            progress(i + 1, len(items))
    return records


def _paired(records: Sequence[dict]) -> dict:
    if not records:
        return {"n": 0}
    served = np.array([r["accuracy"] for r in records])
    ref = np.array([r["fresh_accuracy"] for r in records])
    d = served - ref
    return {
        "n": len(records),
        "accuracy": round(float(served.mean()), 2),
        "fresh_accuracy": round(float(ref.mean()), 2),
        "delta": round(float(d.mean()), 2),
        "delta_se": round(float(d.std(ddof=1) / math.sqrt(len(d))), 2) if len(d) > 1 else None,
        "worse": int((d < 0).sum()),
        "better": int((d > 0).sum()),
    }


def summarise(records: Sequence[dict], steps: int, tolerance: float) -> dict:
    scored = [r for r in records if "accuracy" in r]
    approx = [r for r in scored if r["hit"] == "approximate"]
    hits = {h: sum(r["hit"] == h for r in records) for h in ("exact", "approximate", "miss")}
    by_kind = {}
    for r in approx:
        by_kind.setdefault(r["kind"], []).append(r)
    summary = {
        "requests": len(records),
        "scored": len(scored),
        "hit_pct": {h: round(100.0 * v / len(records), 1) for h, v in hits.items()},
        "steps_saved_pct": round(100.0 * sum(r["steps_saved"] for r in records) / (steps * len(records)), 1),
        "approximate_hits": _paired(approx),
        "approximate_by_kind": {k: _paired(v) for k, v in sorted(by_kind.items())},
        "stream": _paired(scored),
    }
    a = summary["approximate_hits"]
    summary["within_tolerance"] = a["n"] == 0 or a["delta"] >= -tolerance
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reprise eval stream", description=__doc__.splitlines()[0])
    parser.add_argument("--stream", default="generated", choices=["generated", "mixed"])
    parser.add_argument("--n", type=int, default=150, help="requests in the stream")
    parser.add_argument(
        "--prompts", default="../shared/prompts", help="real prompt files (a file or folder) for --stream mixed"
    )
    parser.add_argument("--mix", type=float, default=0.5, help="share of real prompts in a mixed stream")
    parser.add_argument(
        "--session", type=float, default=0.5, help="probability that a request refines the previous one"
    )
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent of the scene pool")
    parser.add_argument(
        "--skip-table",
        action="append",
        default=None,
        help="'shipped' (the default table of the embedder) or 's:f,s:f,...'; repeat to compare tables on the same stream",
    )
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tolerance", type=float, default=2.0, help="points approximate hits may lose against fresh generation"
    )
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument(
        "--save-log",
        default=None,
        help="write the stream as a prompt log (.jsonl: prompt, seed, steps) and stop: what `reprise calibrate` reads",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 <= args.mix < 1 or not 0 <= args.session <= 1 or args.n < 1:
        raise SystemExit("--mix in [0, 1), --session in [0, 1], --n >= 1")

    import torch

    from cache.settings import CacheSettings

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    items = build_stream(
        args.stream, args.n, args.seed, zipf=args.zipf, session_p=args.session, mix=args.mix, prompts=args.prompts
    )
    if args.save_log:
        save_log(items, args.save_log, args.steps)
        print(f"wrote {len(items)} requests of the {args.stream} stream to {args.save_log}")
        return 0
    kinds = {}
    for it in items:
        kinds[it.kind.split(":")[0]] = kinds.get(it.kind.split(":")[0], 0) + 1
    print(
        f"stream {args.stream}: {len(items)} requests " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
        flush=True,
    )
    report = {
        "meta": {
            "stream": args.stream,
            "n": args.n,
            "mix": args.mix if args.stream == "mixed" else 0.0,
            "session": args.session,
            "zipf": args.zipf,
            "steps": args.steps,
            "seed": args.seed,
            "tolerance": args.tolerance,
            "kinds": kinds,
        },
        "tables": {},
    }
    ok = True
    for text in args.skip_table or ["shipped"]:
        table = None if text == "shipped" else CacheSettings(skip_table=text).table()
        started = time.perf_counter()
        harness = QualityHarness(args.model, args.steps, args.guidance, skip_table=table)
        try:
            in_force = [list(r) for r in harness.cache.settings.table()]
            report["meta"].update(
                model=harness.model, model_version=harness.components.fingerprint, guidance_scale=harness.guidance
            )

            def progress(done, total, text=text, started=started):
                if done % 25 == 0 or done == total:
                    print(f"  [{text}] {done}/{total} requests ({time.perf_counter() - started:.0f} s)", flush=True)

            records = run_stream(items, harness, progress)
        finally:
            harness.close()
        summary = summarise(records, args.steps, args.tolerance)
        summary["table"] = in_force
        summary["wall_s"] = round(time.perf_counter() - started, 1)
        report["tables"][text] = {"summary": summary, "records": records}
        ok &= summary["within_tolerance"]
        _print_summary(text, summary, args.tolerance)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json_out}")
    return 0 if ok else 1


def save_log(items: Sequence[StreamItem], path: str, steps: int) -> None:
    """The stream as a prompt log in request order (scheduler.prompt_log reads it)."""
    with open(path, "w") as f:
        for it in items:
            f.write(json.dumps({"prompt": it.prompt, "seed": it.seed, "steps": steps, "kind": it.kind}) + "\n")


def _print_summary(name: str, s: dict, tolerance: float) -> None:
    a, st = s["approximate_hits"], s["stream"]
    print(
        f"\ntable {name} {s['table']}: {s['requests']} requests ({s['scored']} scored), "
        f"exact {s['hit_pct']['exact']}%  approximate {s['hit_pct']['approximate']}%  miss {s['hit_pct']['miss']}%  "
        f"steps saved {s['steps_saved_pct']}%  ({s['wall_s']:.0f} s)"
    )
    if a["n"]:
        print(
            f"  approximate hits: n={a['n']}  accuracy {a['accuracy']} vs fresh {a['fresh_accuracy']}  "
            f"delta {a['delta']:+} ± {a['delta_se'] or 0} s.e.  ({a['worse']} worse, {a['better']} better)  "
            f"{'within' if s['within_tolerance'] else 'OUTSIDE'} {tolerance:g} points"
        )
        for kind, v in s["approximate_by_kind"].items():
            print(f"    {kind:<18} n={v['n']:<3} delta {v['delta']:+}")
    else:
        print("  approximate hits: none")
    print(f"  whole stream: accuracy {st['accuracy']} vs fresh {st['fresh_accuracy']} (delta {st['delta']:+})")


if __name__ == "__main__":
    raise SystemExit(main())
