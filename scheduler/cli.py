"""`reprise`: the one command for everything a user runs.

Subcommands import their layer lazily: the scheduler package itself holds no model code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import socket
import sys

from scheduler.errors import RepriseError, error_payload


def _cmd_schema(args) -> int:
    from scheduler.schema import request_json_schema

    print(json.dumps(request_json_schema(), indent=2))
    return 0


def _cmd_worker(args) -> int:
    import redis

    from scheduler.app import get_app
    from scheduler.schema import queue_for
    from scheduler.settings import get_settings
    from workers.node import Heartbeat, build_service, node_info, serve_metrics
    from workers.settings import WorkerSettings

    logging.basicConfig(
        level=getattr(logging, args.loglevel.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {k: v for k, v in {"model": args.model, "devices": args.devices}.items() if v}
    if args.no_cache:
        overrides["cache_enabled"] = False
    wsettings = WorkerSettings(**overrides)
    cluster = get_settings()
    client = redis.Redis.from_url(cluster.redis_url)
    print(f"reprise worker: loading {wsettings.model} on {wsettings.devices} ...", flush=True)
    service = build_service(wsettings, cluster, redis_client=client)
    from workers import tasks

    tasks.install(service, client, cluster.progress_interval_s)
    queue = queue_for(service.model_name, cluster.queue_prefix)
    serve_metrics(service, wsettings, client, cluster.queue_prefix)
    hostname = args.hostname or f"reprise-{service.model_name}-{os.getpid()}@{socket.gethostname()}"
    service.queue = queue
    info = node_info(service, queue)
    info["node"] = hostname
    Heartbeat(service.registry, service.model_name, info, wsettings.heartbeat_s).start()
    app = get_app()
    from kombu import Queue

    control_queue = f"{cluster.queue_prefix}.control"
    app.conf.task_queues = [Queue(queue), Queue(control_queue)]
    from workers import control  # registers the cache control command and tasks

    if service.cache is not None:
        control.start_control(service, client, cluster)
    print(
        f"reprise worker: serving {service.model_name} (version {info['model_version']}) on "
        f"{', '.join(info['devices'])}; queue {queue}",
        flush=True,
    )
    argv = [
        "worker",
        "-P",
        "threads",
        "-c",
        str(service.slots),
        "-Q",
        f"{queue},{control_queue}",
        "-E",
        "-n",
        hostname,
        "--loglevel",
        args.loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)
    service.close()
    return 0


def _cmd_submit(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from scheduler.client import submit

    fields = {
        "prompt": args.prompt,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "model": args.model,
        "scheduler": args.scheduler,
        "tenant": args.tenant,
        "priority": args.priority,
        "negative_prompt": args.negative,
    }
    if args.seed is not None:
        fields["seed"] = args.seed
    if args.size:
        fields["width"] = fields["height"] = args.size
    if args.no_cache:
        fields["cache"] = {"exact": False, "approximate": False, "write": False}
    if args.feature:
        fields.setdefault("cache", {})["feature"] = {"method": args.feature}
    fields = {k: v for k, v in fields.items() if v is not None}
    job = submit(**fields)
    if not args.wait:
        print(json.dumps({"job_id": job.id}) if args.json else job.id)
        return 0
    if args.json:
        result = job.wait(args.timeout)
    else:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TimeElapsedColumn(),
            transient=False,
        ) as bar:
            task = bar.add_task(job.id[:8], total=args.steps)

            def show(p: dict) -> None:
                bar.update(
                    task,
                    completed=p.get("step") or 0,
                    total=p.get("total") or args.steps,
                    description=f"{job.id[:8]} {p['state'].lower()}",
                )

            result = job.wait(args.timeout, on_progress=show)
    print(
        result.model_dump_json(indent=2)
        if args.json
        else f"{result.image_uri}  ({result.timings.total_s:.2f}s, cache {result.cache.hit}, seed {result.seed}, {result.device})"
    )
    return 0


def _cmd_flower(args) -> int:
    from scheduler.settings import get_settings

    s = get_settings()
    password = s.flower_password or secrets.token_urlsafe(12)
    if not s.flower_password:
        print(
            f"reprise flower: no REPRISE_FLOWER_PASSWORD set; generated one for this run: {s.flower_user}:{password}",
            flush=True,
        )
    port = args.port or s.flower_port
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "scheduler.flower_app",
        "flower",
        f"--port={port}",
        "--address=" + args.address,
        f"--basic-auth={s.flower_user}:{password}",
    ]
    os.execv(sys.executable, argv)
    return 0  # not reached


def _cmd_models(args) -> int:
    import redis

    from scheduler.registry import ModelRegistry
    from scheduler.settings import get_settings

    s = get_settings()
    reg = ModelRegistry(redis.Redis.from_url(s.redis_url), s.queue_prefix)
    served = reg.all_served()
    gens = reg.generations()
    for name, info in served.items():
        info["generation"] = gens.get(name, 0)
    print(json.dumps(served, indent=2))
    return 0


def _cmd_bench(args) -> int:
    module = {
        "overhead": "ops.bench_overhead",
        "feature": "ops.bench_feature",
        "lookup": "cache.bench_lookup",
        "cache": "ops.bench_cache",
        "scale": "ops.bench_scale",
        "batching": "ops.bench_batching",
    }[args.which]
    import importlib

    return importlib.import_module(module).main(args.rest) or 0


def _cmd_demo(args) -> int:
    from ops.demo import main

    return main(args.rest) or 0


def _passthrough(module: str):
    def run(args) -> int:
        import importlib

        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return importlib.import_module(module).main(rest) or 0

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reprise", description="Reprise: a text-to-image generation cluster with a shared latent cache."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("schema", help="print the versioned JSON schema of a request and a result")
    s.set_defaults(func=_cmd_schema)

    s = sub.add_parser("worker", help="run a worker node: one pipeline per device, one process")
    s.add_argument(
        "--model",
        help="built-in name (tiny, sd15-small, sd15, shapes), diffusers directory or hub id (default: REPRISE_MODEL or tiny)",
    )
    s.add_argument("--devices", help="auto | cpu | sim | cuda:0,cuda:1 (default: REPRISE_DEVICES or auto)")
    s.add_argument("--no-cache", action="store_true", help="serve without the latent cache")
    s.add_argument("--hostname", help="Celery node name (default reprise-<model>-<pid>@<host>)")
    s.add_argument("--loglevel", default="INFO")
    s.set_defaults(func=_cmd_worker)

    s = sub.add_parser("submit", help="enqueue a prompt (and wait for it with --wait)")
    s.add_argument("prompt")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=5.0)
    s.add_argument("--seed", type=int)
    s.add_argument("--size", type=int, help="width = height in pixels (default: the model's)")
    s.add_argument("--model", default=None)
    s.add_argument("--scheduler", default="ddim", help="ddim | euler | dpmpp_2m")
    s.add_argument("--negative", default="")
    s.add_argument("--tenant", default="public")
    s.add_argument("--priority", type=int, default=5)
    s.add_argument("--feature", help="feature cache: off | deepcache | block | recommended")
    s.add_argument("--no-cache", action="store_true")
    s.add_argument("--wait", action="store_true", help="wait with a live progress bar")
    s.add_argument("--timeout", type=float, default=600)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_submit)

    s = sub.add_parser("flower", help="run Flower on this cluster with basic auth")
    s.add_argument("--port", type=int)
    s.add_argument("--address", default="127.0.0.1")
    s.set_defaults(func=_cmd_flower)

    s = sub.add_parser("models", help="models served now, with their limits and cache generation")
    s.set_defaults(func=_cmd_models)

    s = sub.add_parser(
        "bench", help="benchmarks: overhead | feature | lookup | cache | scale | batching (see --help of each)"
    )
    s.add_argument("which", choices=["overhead", "feature", "lookup", "cache", "scale", "batching"])
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("demo", help="start a local cluster, run a handful of prompts, print a table")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_demo)

    for name, module, text in (
        ("cache", "ops.cache_cli", "cache operations: invalidate | purge | evict | stats"),
        ("coordinator", "scheduler.coordinator", "run the coordinator (or: coordinator status)"),
        ("loadtest", "ops.loadtest", "drive load against a running cluster"),
        ("eval", "ops.eval_quality", "quality harness: eval quality ... | eval stream ..."),
        ("settings", "ops.settings_doc", "every setting: environment variable, default, meaning"),
    ):
        s = sub.add_parser(name, help=text, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=_passthrough(module))
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in ("cache", "coordinator", "loadtest", "eval") and argv[1:2] != ["--"]:
        argv.insert(1, "--")  # argparse's REMAINDER cannot start with an option (`reprise loadtest --rate 2`)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RepriseError as exc:
        print(
            json.dumps(error_payload(exc)) if getattr(args, "json", False) else f"error ({exc.code}): {exc}",
            file=sys.stderr,
        )
        if getattr(exc, "details", None) and not getattr(args, "json", False):
            for d in exc.details or []:
                print(f"  - {d}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
