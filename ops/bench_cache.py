"""`reprise bench cache`: what the latent cache buys on a prompt stream, measured through the cluster.

Replays one stream twice through the same running workers and model — caches off, then on (the
model's cache generation is bumped before every pass, so each starts cold, the node's memos included)
— and reports throughput,
hit rates, steps computed and latency. The stream is a prompt file plus the repeat/refinement model
of ops/workload.py (its parameters are in the JSON); `--as-is` replays the file as it is.

    reprise bench cache --prompts ../shared/prompts/PartiPrompts.tsv --n 200 --steps 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ops.workload import Workload, WorkloadParams, read_prompts
from workers.cache_path import COUNTERS

CACHE_OFF = {"exact": False, "approximate": False, "write": False}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def replay_pass(requests: list[dict], concurrency: int, cache: dict | None, timeout: float = 600) -> dict:
    """One closed-loop pass of the stream (``concurrency`` clients each submit and wait, until the stream is
    done): each request's (latency, result) and stream index, the errors, the wall time."""
    from scheduler.client import submit

    results, errors, lock, order = [], [], threading.Lock(), []
    queue = list(enumerate(requests))

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                index, req = queue.pop(0)
            req = dict(req, cache=dict(cache)) if cache is not None else dict(req)
            t0 = time.perf_counter()
            try:
                result = submit(req, check_model=False).wait(timeout)
                with lock:
                    results.append((time.perf_counter() - t0, result))
                    order.append(index)
            except Exception as exc:  # counted and reported, never hidden
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "order": order, "errors": errors, "wall_s": time.perf_counter() - started}


def summarise(passes: list[dict]) -> dict:
    """The figures of one or more passes of the same stream taken together (throughput: all the requests
    over all the passes' wall time)."""
    results = [row for p in passes for row in p["results"]]
    order = [(r, i) for r, p in enumerate(passes) for i in p["order"]]
    errors = [e for p in passes for e in p["errors"]]
    wall = sum(p["wall_s"] for p in passes)
    latencies = [lat for lat, _ in results]
    counted = {k: sum(p["counted"][k] for p in passes) for k in passes[0]["counted"]} if passes else {}
    hits = [r.cache.hit for _, r in results]
    steps = [r.steps for _, r in results]
    computed = [r.cache.steps_computed + r.cache.steps_discarded for _, r in results]  # all device steps run
    lookups = [r.cache.lookup_ms for _, r in results if r.cache.lookup_ms is not None]
    n = len(results)
    by_k: dict[str, int] = {}
    for _, r in results:
        if r.cache.hit == "approximate":
            by_k[str(r.cache.k)] = by_k.get(str(r.cache.k), 0) + 1
    per_request = sorted(
        (
            {
                "round": round_,
                "i": i,  # its place in the stream: the first ``concurrency`` were submitted at once
                "latency_s": round(lat, 4),
                "hit": r.cache.hit,
                "k": r.cache.k,
                "lookup_ms": None if r.cache.lookup_ms is None else round(r.cache.lookup_ms, 1),
                "steps_computed": r.cache.steps_computed + r.cache.steps_discarded,
                "device": r.device,  # which device ran it (placement across the node's devices)
                "to_first_step_ms": round(r.timings.load_s * 1000, 1),
            }
            for (round_, i), (lat, r) in zip(order, results)
        ),
        key=lambda row: (row["round"], row["i"]),
    )
    return {
        "per_request": per_request,
        "completed": n,
        "errors": errors,
        "wall_s": wall,
        "throughput": n / wall if wall else 0.0,
        "hit_rate_exact": hits.count("exact") / n if n else 0.0,
        "hit_rate_approx": hits.count("approximate") / n if n else 0.0,
        "approx_hits_by_k": by_k,
        "mean_steps_computed": statistics.fmean(computed) if computed else 0.0,
        "steps_saved_fraction": 1 - sum(computed) / sum(steps) if steps else 0.0,
        "node_counters": counted,
        # the device side: mean requests per denoiser call, and the devices' time inside calls per second
        "mean_batch": counted["requests_stepped"] / counted["calls"] if counted.get("calls") else None,
        "device_busy_s_per_s": counted["call_s"] / wall if counted and wall else None,
        # CPU the worker processes spent per image: unlike throughput, idle moments and a machine that
        # runs slower for a while (other tenants) barely move it, so it shows what the caches cost the host
        "worker_cpu_ms_per_image": counted["worker_cpu_s"] * 1000 / n if counted.get("worker_cpu_s") and n else None,
        "mean_latency": statistics.fmean(latencies) if latencies else None,
        "p50_latency": _pct(latencies, 0.5),
        "p95_latency": _pct(latencies, 0.95),
        "lookup_p50_ms": _pct(lookups, 0.5),
        "lookup_p99_ms": _pct(lookups, 0.99),
        # Where a job's time goes (medians, s): queue wait, admission to its first step (exact lookup and
        # the wait for a device slot), denoise, decode, and the client's latency beyond the worker's total.
        "stages_p50_s": {
            "queue_wait": _pct([r.timings.queue_wait_s for _, r in results], 0.5),
            "to_first_step": _pct([r.timings.load_s for _, r in results], 0.5),
            "denoise": _pct([r.timings.denoise_s for _, r in results], 0.5),
            "decode": _pct([r.timings.decode_s for _, r in results], 0.5),
            "worker_total": _pct([r.timings.total_s for _, r in results], 0.5),
            "beyond_worker": _pct([lat - r.timings.total_s for lat, r in results], 0.5),
        },
    }


ENGINE = ("calls", "requests_stepped", "call_s")  # the engine's denoiser calls (workers/tasks.py, NodeInfo)


def node_counters(app) -> dict[str, float]:
    """The cache path's counters, the engine's call totals and the worker processes' CPU seconds (Celery's
    ``rusage`` of each worker process: every thread of it, not MiniLM's child process where it has one),
    summed over the live nodes (`celery inspect stats`, as Flower reads them)."""
    totals: dict[str, float] = dict.fromkeys((*COUNTERS, *ENGINE, "worker_cpu_s"), 0)
    for stats in (app.control.inspect(timeout=5).stats() or {}).values():
        usage = stats.get("rusage")
        if isinstance(usage, dict):  # "N/A" where the platform has no getrusage
            totals["worker_cpu_s"] += float(usage.get("utime") or 0) + float(usage.get("stime") or 0)
        node = stats.get("reprise") or {}
        for name in COUNTERS:
            totals[name] += int((node.get("jobs") or {}).get(name) or 0)
        for name in ENGINE:
            totals[name] += float((node.get("engine") or {}).get(name) or 0)
    return totals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="reprise bench cache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--prompts", required=True, help="prompt file (TSV, CSV, JSONL or one prompt per line)")
    p.add_argument("--n", type=int, default=200, help="requests in the stream")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="tiny")
    p.add_argument("--concurrency", type=int, default=2, help="closed-loop clients")
    p.add_argument(
        "--saturate",
        action="store_true",
        help="as many clients as the serving node batches at once (devices x REPRISE_MAX_BATCH, e.g. 32 for "
        "4 devices at batch 8): every device's batch full, where a saved step frees a slot for another request",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="replay the stream this many times each way (off/on, then on/off, ...; every pass cold); "
        "the figures pool the rounds, and each round's on/off ratio is printed beside",
    )
    p.add_argument("--as-is", action="store_true", help="replay the file in order, no synthetic repeats")
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--session-p", type=float, default=0.5)
    p.add_argument("--edit-p", type=float, default=0.6)
    p.add_argument("--tenants", type=int, default=1)
    p.add_argument("--pool", type=int, default=None, help="use only the first N prompts of the file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--embedded", action="store_true", help="start a local cluster (Redis if needed, one worker) for the run"
    )
    p.add_argument("--devices", default="cpu", help="with --embedded: the worker's devices")
    p.add_argument(
        "--skip-table",
        default=None,
        help="with --embedded: the worker's similarity->fraction table 's:f,s:f' (default: the shipped one for its embedder)",
    )
    p.add_argument(
        "--on-cache",
        default=None,
        help="the caches-on pass's request cache options as JSON, e.g. '{\"approximate\": false}' to measure what "
        "the exact tier and the write-backs cost alone (default: the request defaults, every tier on)",
    )
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    try:
        on_cache = json.loads(args.on_cache) if args.on_cache else None
        if on_cache is not None and not isinstance(on_cache, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        p.error(f"--on-cache: {exc}")

    rows = read_prompts(args.prompts)
    params = WorkloadParams(
        zipf=args.zipf,
        session_p=args.session_p,
        edit_p=args.edit_p,
        tenants=args.tenants,
        steps=args.steps,
        pool=args.pool,
        seed=args.seed,
        as_is=args.as_is,
        model=args.model,
        file_params=False,
    )
    workload = Workload(rows, params)
    stream = [req for req, _ in workload.take(args.n)]
    console = Console()

    cluster = None
    if args.embedded:
        from ops.localcluster import LocalCluster

        workdir = Path("var/bench-cache").resolve()
        shutil.rmtree(workdir, ignore_errors=True)  # its own Redis starts at generation 0: old entries would match
        cluster = LocalCluster(workdir=str(workdir)).__enter__()
        console.print(f"{cluster.how_redis}; starting a {args.model} worker on {args.devices} ...")
        env = {"REPRISE_CACHE_SKIP_TABLE": args.skip_table} if args.skip_table else {}
        cluster.start_worker(args.model, args.devices, timeout=300, **env)
    try:
        from scheduler.cache_admin import CacheAdmin
        from scheduler.registry import ModelRegistry

        admin = CacheAdmin()
        served = ModelRegistry(admin.r).served(args.model)
        if served is None:
            console.print(
                f"[red]no live worker serves {args.model!r}: start one (`reprise worker --model {args.model}`) or pass --embedded"
            )
            return 2
        devices = len(served.get("devices") or []) or len(args.devices.split(","))
        if args.saturate:
            args.concurrency = devices * int(os.environ.get("REPRISE_MAX_BATCH", "8"))
        console.print(f"{args.concurrency} clients, {devices} devices")
        offs, ons = [], []
        for r in range(args.rounds):
            # off then on, then on then off, ...: a drift of the machine over the run weighs on both alike
            for kind in ("off", "on") if r % 2 == 0 else ("on", "off"):
                n_pass = len(offs) + len(ons) + 1
                # Before every pass, not only the caches-on ones: an invalidation also drops the node's memos (the
                # text encoder's and MiniLM's), and a caches-off pass after an earlier one would otherwise find
                # every prompt's conditioning memoised while each caches-on pass encoded them all again.
                admin.invalidate_model(args.model, reason=f"bench cache: cold start for pass {n_pass}")
                label = "caches off" if kind == "off" else "caches on (cold)"
                console.print(f"pass {n_pass}/{2 * args.rounds}: {label}, {len(stream)} requests ...")
                before = node_counters(admin.app)
                done = replay_pass(stream, args.concurrency, CACHE_OFF if kind == "off" else on_cache)
                after = node_counters(admin.app)
                done["counted"] = {k: after[k] - before[k] for k in after}
                (offs if kind == "off" else ons).append(done)
        round_ratios = [
            (len(on["results"]) / on["wall_s"]) / (len(off["results"]) / off["wall_s"]) for off, on in zip(offs, ons)
        ]
        off, on = summarise(offs), summarise(ons)
    finally:
        if cluster is not None:
            cluster.__exit__(None, None, None)

    report = {
        "n": len(stream),
        "model": args.model,
        "steps": args.steps,
        "prompts": str(args.prompts),
        "throughput_off": off["throughput"],
        "throughput_on": on["throughput"],
        "throughput_ratio": on["throughput"] / off["throughput"] if off["throughput"] else None,
        "rounds": args.rounds,
        "round_ratios": round_ratios,  # each round's on/off
        # on a machine whose speed flips for minutes at a time, one round can be off by 15 % either way with
        # no change at all between its passes (docs/measured.md): the median of many short rounds resists that
        "median_round_ratio": statistics.median(round_ratios) if round_ratios else None,
        "concurrency": args.concurrency,
        "devices": devices,
        # what one paid device-second yields: images ÷ (wall time × devices)
        "images_per_device_s_off": off["throughput"] / devices,
        "images_per_device_s_on": on["throughput"] / devices,
        "node_counters_on": on["node_counters"],  # the cache path's batches, skips and drops in the on pass
        "node_counters_off": off["node_counters"],
        "mean_batch_off": off["mean_batch"],
        "mean_batch_on": on["mean_batch"],
        # the devices' share of the wall time inside denoiser calls (busy ÷ devices)
        "device_busy_off": off["device_busy_s_per_s"] / devices if off["device_busy_s_per_s"] is not None else None,
        "device_busy_on": on["device_busy_s_per_s"] / devices if on["device_busy_s_per_s"] is not None else None,
        "mean_latency_off": off["mean_latency"],
        "mean_latency_on": on["mean_latency"],
        "worker_cpu_ms_per_image_off": off["worker_cpu_ms_per_image"],
        "worker_cpu_ms_per_image_on": on["worker_cpu_ms_per_image"],
        "hit_rate_exact": on["hit_rate_exact"],
        "hit_rate_approx": on["hit_rate_approx"],
        "approx_hits_by_k": on["approx_hits_by_k"],
        "mean_steps_computed": on["mean_steps_computed"],
        "steps_saved_fraction": on["steps_saved_fraction"],
        "p50_latency_on": on["p50_latency"],
        "p95_latency_on": on["p95_latency"],
        "p50_latency_off": off["p50_latency"],
        "p95_latency_off": off["p95_latency"],
        "lookup_p50_ms": on["lookup_p50_ms"],
        "lookup_p99_ms": on["lookup_p99_ms"],
        "stages_p50_s": {"off": off["stages_p50_s"], "on": on["stages_p50_s"]},
        "errors": {"off": off["errors"], "on": on["errors"]},
        "per_request": {"off": off["per_request"], "on": on["per_request"]},  # in stream order
        "skip_table": served.get("skip_table"),  # as the serving worker reported it
        "workload": workload.describe(),
    }
    table = Table(title=f"reprise bench cache — {report['n']} requests, {args.model}, {args.steps} steps")
    table.add_column("metric")
    table.add_column("caches off", justify="right")
    table.add_column("caches on", justify="right")
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    table.add_row("throughput (jobs/s)", fmt(off["throughput"]), fmt(on["throughput"]))
    table.add_row(
        "images per device-second",
        fmt(off["throughput"] / devices, "{:.3f}"),
        fmt(on["throughput"] / devices, "{:.3f}"),
    )
    table.add_row(
        "device: mean batch / busy",
        f"{fmt(report['mean_batch_off'])} / {fmt(report['device_busy_off'], '{:.1%}')}",
        f"{fmt(report['mean_batch_on'])} / {fmt(report['device_busy_on'], '{:.1%}')}",
    )
    table.add_row("mean latency (s)", fmt(off["mean_latency"], "{:.3f}"), fmt(on["mean_latency"], "{:.3f}"))
    table.add_row(
        "worker CPU per image (ms)",
        fmt(report["worker_cpu_ms_per_image_off"], "{:.1f}"),
        fmt(report["worker_cpu_ms_per_image_on"], "{:.1f}"),
    )
    table.add_row(
        "p50 / p95 latency (s)",
        f"{fmt(off['p50_latency'])} / {fmt(off['p95_latency'])}",
        f"{fmt(on['p50_latency'])} / {fmt(on['p95_latency'])}",
    )
    table.add_row("hit rate exact / approx", "-", f"{on['hit_rate_exact']:.1%} / {on['hit_rate_approx']:.1%}")
    table.add_row(
        "mean steps computed", fmt(off["mean_steps_computed"], "{:.1f}"), fmt(on["mean_steps_computed"], "{:.1f}")
    )
    table.add_row("steps saved", "-", f"{on['steps_saved_fraction']:.1%}")
    table.add_row("lookup p99 (ms)", "-", fmt(on["lookup_p99_ms"], "{:.1f}"))
    c = on["node_counters"]
    table.add_row(
        "lookup batches / skipped / nothing to match / gated",
        "-",
        f"{c['lookup_batches']} / {c['lookup_skipped']} / {c['lookup_empty']} / {c['lookup_gated']}",
    )
    per = lambda name: "-" if not c["lookups"] else f"{c[name] / c['lookups']:.0f}"  # noqa: E731
    table.add_row(
        "lookup queue wait / embed / search (mean ms)",
        "-",
        f"{per('lookup_wait_ms')} / {per('lookup_embed_ms')} / {per('lookup_search_ms')}",
    )
    holds = c["lookup_holds"]
    table.add_row(
        "held for the lookup: requests / mean ms",
        "-",
        f"{holds} / {c['lookup_held_ms'] / holds:.0f}" if holds else "0 / -",
    )
    table.add_row(
        "before the device: cache (mean ms)",
        "-",
        f"{c['exact_lookup_ms'] / c['exact_lookups']:.1f}" if c["exact_lookups"] else "-",
    )
    table.add_row(
        "write-backs written / raced / dropped / failed (retried)",
        "-",
        f"{c['writeback_written']} / {c['writeback_raced']} / {c['writeback_dropped']} / {c['writeback_failed']}"
        f" ({c['writeback_retried']})",
    )
    stored = c["writeback_written"] + c["writeback_raced"]
    table.add_row(
        "writer's wait for the devices' calls (mean ms an entry)",
        "-",
        f"{c.get('writeback_wait_ms', 0) / stored:.1f}" if stored else "-",
    )
    for stage in off["stages_p50_s"]:
        ms = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
        table.add_row(
            f"p50 {stage.replace('_', ' ')} (ms)", ms(off["stages_p50_s"][stage]), ms(on["stages_p50_s"][stage])
        )
    table.add_row("errors", str(len(off["errors"])), str(len(on["errors"])))
    console.print(table)
    each = ", ".join(f"{x:.3f}" for x in round_ratios)
    console.print(
        f"throughput ratio (on/off): {fmt(report['throughput_ratio'])}x"
        + (f" (rounds: {each}; median {report['median_round_ratio']:.3f})" if args.rounds > 1 else "")
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
        console.print(f"wrote {args.json_out}")
    return 0 if not (off["errors"] or on["errors"]) else 1


if __name__ == "__main__":
    sys.exit(main())
