"""`reprise loadtest`: drive a workload against a running cluster (REDIS_URL) or an embedded one.

    reprise loadtest --prompts ../shared/prompts/PartiPrompts.tsv --rate 2 --duration 60 --embedded \\
        --json load.json --plots plots/

Arrivals: open loop (``--rate R`` Poisson, or ``--ramp R0:R1`` linearly over ``--duration``) or closed
loop (``--concurrency N`` users, each submitting its next job when the last one ends). It stops by
itself after ``--n`` jobs or ``--duration`` seconds (whichever comes first), then waits for the jobs in
flight (each at most ``--timeout`` seconds after it was sent). Requests come from ops/workload.py's
repeat/refinement model (``--as-is`` replays the file once, in order).

Measured per job: queue wait and service time (from the worker's result), end to end (from just before
the submit to the time the result was stored, ``date_done``), the cache outcome. The report: a table,
``--json OUT`` (throughput; p50/p95/p99 of queue wait, service and end-to-end; errors by type; hit
rates by type and by K; steps saved; the workload parameters; how many jobs were sent and succeeded,
and what Flower counted for the same job ids when a Flower is known), ``--plots DIR`` (latency CDF,
throughput and queue depth over time, hit rate over time). ``--compare`` runs the workload twice, caches
off (request cache options all false) then on, and prints the ratios.

``--http URL`` drives a running `reprise api` instead of the broker (the key from ``--key`` or
REPRISE_API_KEY): each job is one ``POST /v1/images/generations``, measured from the response; closed
loop with Locust's ``HttpUser`` (``--concurrency N`` users), open loop (``--rate``, ``--ramp``) with the same
arrivals as a broker run, each posted through a Locust ``HttpSession``. The same report and plots; the
queue depth is left out, the API does not expose it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from ops.load_report import flower_counts, print_table, write_plots
from ops.load_run import CACHE_OFF, HttpLoadRun, LoadRun

# --- output -------------------------------------------------------------------------------------


# --- the command --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reprise loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt file: .tsv/.csv with a Prompt column, Krea CSV, .jsonl, or one per line",
    )
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals at R jobs/s")
    load.add_argument("--ramp", help="open loop: R0:R1, the rate going linearly from R0 to R1 over --duration")
    load.add_argument("--concurrency", type=int, help="closed loop: N users, each waiting for its job before the next")
    p.add_argument("--n", type=int, help="stop after sending this many jobs")
    p.add_argument("--duration", type=float, help="stop sending after this many seconds")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="a job not done this long after it was sent is a client timeout"
    )
    p.add_argument("--model", default=None, help="model to load (default: sim with --embedded, else tiny)")
    w = p.add_argument_group("workload model (ops/workload.py)")
    w.add_argument("--zipf", type=float, default=1.0, help="popularity exponent of fresh draws (0 = uniform)")
    w.add_argument("--session-p", type=float, default=0.5, help="probability a request continues its tenant's session")
    w.add_argument(
        "--edit-p",
        type=float,
        default=0.6,
        help="within a session: probability of an edit (else a re-roll with a new seed)",
    )
    w.add_argument("--tenants", type=int, default=1)
    w.add_argument("--priorities", default="5", help="priority mix, e.g. 5:0.8,0:0.1,9:0.1")
    w.add_argument(
        "--steps", type=int, help="force this many steps (default: the file's where it has them, else --default-steps)"
    )
    w.add_argument("--default-steps", type=int, default=20)
    w.add_argument("--no-file-params", action="store_true", help="ignore the file's seeds, steps, sizes and guidance")
    w.add_argument("--pool", type=int, help="use only the first N prompts of the file")
    w.add_argument("--seed", type=int, default=0, help="seed of the workload and of the arrivals")
    w.add_argument("--as-is", action="store_true", help="replay the file once in order, no synthetic repeats")
    p.add_argument("--compare", action="store_true", help="run twice, caches off then on, and print the ratios")
    p.add_argument("--json", dest="json_out", help="write the report here")
    p.add_argument("--plots", help="write PNG plots into this folder")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    p.add_argument("--flower", help="Flower URL to compare task counts with (embedded: the one started)")
    p.add_argument("--flower-auth", help="user:password of that Flower")
    h = p.add_argument_group("over HTTP (--http)")
    h.add_argument(
        "--http", metavar="URL", help="drive a running `reprise api` at URL (Locust HttpUser; --concurrency)"
    )
    h.add_argument("--key", default=os.environ.get("REPRISE_API_KEY"), help="API key (default: REPRISE_API_KEY)")
    e = p.add_argument_group("embedded cluster (--embedded)")
    e.add_argument(
        "--embedded",
        action="store_true",
        help="start Redis, workers and Flower here (ops/localcluster.py), stop them after",
    )
    e.add_argument("--workers", type=int, default=1, help="worker processes (each owns its own embedded cache)")
    e.add_argument("--devices", default=None, help="devices per worker (default: sim:0..sim:3 for sim, cpu otherwise)")
    e.add_argument("--step-ms", type=float, default=50.0, help="sim: time of one denoising step")
    e.add_argument("--no-flower", action="store_true", help="do not start Flower")
    return p


def start_embedded(args, model: str):
    from ops.localcluster import LocalCluster

    workdir = tempfile.mkdtemp(prefix="reprise-loadtest-")
    Path(workdir, "redis").mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(workdir=workdir, env={"REPRISE_SIM_STEP_MS": args.step_ms})
    cluster.ensure_redis()
    devices = args.devices or ("sim:0,sim:1,sim:2,sim:3" if model == "sim" else "cpu")
    for i in range(args.workers):
        cluster.start_worker(model, devices, wait=False, REPRISE_CACHE_PATH=f"{workdir}/qdrant-w{i}")
    for w in cluster.workers:
        cluster.wait_worker_ready(w, timeout=300)
    if not args.no_flower:
        cluster.start_flower(password="reprise-loadtest")
    print(
        f"embedded cluster: {cluster.how_redis}; {args.workers} worker(s) of {model} on {devices}; "
        f"flower {cluster.flower_url if cluster.flower else 'off'}; logs in {workdir}",
        file=sys.stderr,
    )
    return cluster


def workload_params(args, info: dict, cache: dict | None):
    """The workload of the command line, for the model ``info`` describes (its maximum size)."""
    from ops.workload import WorkloadParams, parse_priorities

    return WorkloadParams(
        zipf=args.zipf,
        session_p=args.session_p,
        edit_p=args.edit_p,
        tenants=args.tenants,
        priorities=parse_priorities(args.priorities),
        steps=args.steps,
        default_steps=args.default_steps,
        file_params=not args.no_file_params,
        pool=args.pool,
        seed=args.seed,
        as_is=args.as_is,
        model=args.model,
        max_size=info.get("max_size"),
        cache=cache,
    )


def run_options(args, label: str) -> dict:
    """How the command line asks a run to send and stop."""
    return dict(
        rate=args.rate,
        ramp=tuple(float(x) for x in args.ramp.split(":")) if args.ramp else None,
        concurrency=args.concurrency,
        n=args.n,
        duration=args.duration,
        timeout_s=args.timeout,
        progress=not args.quiet,
        label=label,
    )


def run_load(args, label: str, cache: dict | None, app) -> dict:
    from ops.workload import Workload, read_prompts
    from scheduler.redis_conn import redis_client
    from scheduler.registry import ModelRegistry
    from scheduler.settings import get_settings

    settings = get_settings()
    info = ModelRegistry(redis_client(settings.redis_url), settings.queue_prefix).served(args.model)
    if info is None:
        raise SystemExit(f"no live worker serves {args.model!r} at {settings.redis_url}")
    params = workload_params(args, info, cache)
    run = LoadRun(app, Workload(read_prompts(args.prompts), params), **run_options(args, label))
    report = run.run()
    report["cluster"] = {"redis_url": settings.redis_url, "model": info}
    return report


def run_http_load(args, label: str, cache: dict | None) -> dict:
    import requests

    from ops.workload import Workload, read_prompts

    models = requests.get(
        args.http.rstrip("/") + "/v1/models", headers={"Authorization": f"Bearer {args.key}"}, timeout=10
    )
    if models.status_code != 200:
        raise SystemExit(f"{args.http}/v1/models answered {models.status_code}: {models.text[:300]}")
    info = next((m for m in models.json()["data"] if m["id"] == args.model), None)
    if info is None:
        raise SystemExit(f"no live worker serves {args.model!r} behind {args.http}")
    params = workload_params(args, info, cache)
    run = HttpLoadRun(args.http, args.key, Workload(read_prompts(args.prompts), params), **run_options(args, label))
    report = run.run()
    report["cluster"] = {"api_url": args.http, "model": info}
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.http and (args.embedded or not args.key):
        raise SystemExit("--http needs --key (or REPRISE_API_KEY), and no --embedded")
    if args.http:
        import locust  # noqa: F401  (gevent patches the standard library: before anything opens a socket)
    args.model = args.model or ("sim" if args.embedded else "tiny")
    cluster = start_embedded(args, args.model) if args.embedded else None
    try:
        runs = [("cache-off", CACHE_OFF), ("cache-on", None)] if args.compare else [("run", None)]
        reports = []
        for label, cache in runs:
            if args.http:
                report = run_http_load(args, label, cache)
            else:
                from scheduler.app import get_app

                report = run_load(args, label, cache, get_app())
            flower = args.flower or (cluster.flower_url if cluster is not None and cluster.flower else None)
            if flower:
                auth = (
                    tuple(args.flower_auth.split(":", 1))
                    if args.flower_auth
                    else (cluster.flower_auth if cluster else None)
                )
                report["flower"] = flower_counts(flower, auth, report["job_ids"])
                report["flower"]["agrees"] = report["flower"].get("succeeded") == report["succeeded"]
            print_table(report)
            reports.append(report)
        out = (
            reports[0]
            if len(reports) == 1
            else {"off": reports[0], "on": reports[1], "ratios": compare(reports[0], reports[1])}
        )
        if args.compare:
            print(
                "cache on ÷ cache off: " + ", ".join(f"{k} {v:.3f}" for k, v in out["ratios"].items() if v is not None)
            )
        if args.plots:
            out_plots = write_plots(reports, args.plots)
            out["plots"] = out_plots
            print("plots: " + ", ".join(out_plots))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))
            print(f"report: {args.json_out}")
        return 0 if all(r["succeeded"] for r in reports) else 1
    finally:
        if cluster is not None:
            cluster.stop()


def compare(off: dict, on: dict) -> dict:
    def ratio(a, b):
        return a / b if a is not None and b else None

    lat_on, lat_off = on["latency_s"], off["latency_s"]
    return {
        "throughput": ratio(on["throughput_jobs_s"], off["throughput_jobs_s"]),
        "end_to_end_p50": ratio(lat_on["end_to_end"]["p50"], lat_off["end_to_end"]["p50"]),
        "end_to_end_p95": ratio(lat_on["end_to_end"]["p95"], lat_off["end_to_end"]["p95"]),
        "service_mean": ratio(lat_on["service"]["mean"], lat_off["service"]["mean"]),
        "steps_saved_fraction_on": on["cache"]["steps_saved_fraction"],
    }


if __name__ == "__main__":
    sys.exit(main())
