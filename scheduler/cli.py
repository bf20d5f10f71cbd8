"""The scheduler's commands of `reprise`: schema, submit, flower, models, cache, coordinator.

They need Redis and the schema, never the model code, so a producer host can run them without torch:
`python -m scheduler.cli submit ...`. The full `reprise` command (`ops.cli`) adds the worker's
commands (`workers.cli`) and the benchmarks and evaluations (`ops`). `run` is the one way every
layer's command line parses arguments and reports typed errors.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys

from scheduler.errors import InvalidRequest, RepriseError, UnknownAdapter, error_payload


def _cmd_schema(args) -> int:
    from scheduler.schema import request_json_schema

    print(json.dumps(request_json_schema(), indent=2))
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
    from scheduler.adapters import AdapterRegistry
    from scheduler.redis_conn import redis_client
    from scheduler.registry import ModelRegistry
    from scheduler.settings import get_settings

    s = get_settings()
    reg = ModelRegistry(redis_client(s.redis_url), s.queue_prefix)
    served = reg.all_served()
    gens = reg.generations()
    adapters = AdapterRegistry(reg.r, s.queue_prefix)
    for name, info in served.items():
        info["generation"] = gens.get(name, 0)
        info["loras"] = [_adapter_row(a) for a in adapters.list(name)]
        # per node: the skip table it serves with, and whether it was calibrated for this model version
        info["nodes"] = {
            node: {k: v for k, v in entry.items() if k == "model_version" or k.startswith("skip_table")}
            for node, entry in sorted(reg.nodes().items())
            if entry.get("model") == name
        }
    print(json.dumps(served, indent=2))
    return 0


def _adapter_row(adapter) -> dict:
    return {
        k: adapter.as_dict()[k] for k in ("name", "model", "version", "bytes", "format", "text_encoder", "denoiser")
    }


def _cmd_lora(args) -> int:
    """`reprise lora add | list | remove`: the adapter registry (scheduler/adapters.py)."""
    from scheduler.adapters import AdapterRegistry
    from scheduler.cache_admin import CacheAdmin
    from scheduler.redis_conn import redis_client
    from scheduler.settings import get_settings

    s = get_settings()
    client = redis_client(s.redis_url)
    registry = AdapterRegistry(client, s.queue_prefix, s.artifact_url)
    if args.op == "list":
        rows = [_adapter_row(a) for a in registry.list(args.model)]
        if args.json:
            print(json.dumps(rows, indent=2))
        for row in [] if args.json else rows:
            te = " +text encoder" if row["text_encoder"] else ""
            print(f"{row['model']:<16} {row['name']:<24} {row['version']}  {row['bytes']:>10} B  {row['format']}{te}")
        return 0
    if not args.name or not args.model:
        raise InvalidRequest(f"reprise lora {args.op} needs NAME and --model", [])
    if args.op == "add":
        if not args.source:
            raise InvalidRequest("reprise lora add needs NAME SOURCE --model MODEL", [])
        adapter, old = registry.add(args.name, args.source, args.model)
        out = {"added": _adapter_row(adapter), "replaced": old.version if old else None}
    else:
        old = registry.remove(args.model, args.name)
        if old is None:
            raise UnknownAdapter(f"no adapter {args.name!r} is registered for {args.model}", [])
        adapter, out = None, {"removed": _adapter_row(old)}
    if old is not None and (adapter is None or adapter.version != old.version):
        # the old version's cache entries go from every node (their keys already differ from the new version's)
        out["invalidation"] = CacheAdmin(redis_client=client, prefix=s.queue_prefix).add_rule(
            model=args.model, lora=args.name
        )
    print(json.dumps(out, indent=2))
    return 0


# Commands whose arguments are handed to another parser (argparse's REMAINDER cannot start with an option,
# as in `reprise loadtest --rate 2`, so `run` inserts `--` after them).
PASSTHROUGH: set[str] = set()


def passthrough(sub, name: str, module: str, text: str) -> None:
    """A subcommand whose arguments go to `module.main(argv)`, imported only when it runs."""

    def run_module(args) -> int:
        import importlib

        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return importlib.import_module(module).main(rest) or 0

    s = sub.add_parser(name, help=text, add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=run_module)
    PASSTHROUGH.add(name)


def add_commands(sub) -> None:
    s = sub.add_parser("schema", help="print the versioned JSON schema of a request and a result")
    s.set_defaults(func=_cmd_schema)

    s = sub.add_parser("submit", help="enqueue a prompt (and wait for it with --wait)")
    s.add_argument("prompt")
    s.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    s.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    s.add_argument("--seed", type=int)
    s.add_argument("--size", type=int, help="width = height in pixels (default: the model's)")
    s.add_argument("--model", default=None)
    s.add_argument(
        "--scheduler", help="ddim | euler | dpmpp_2m (U-Nets) | flow_euler (SD3, Flux); default: the model's"
    )
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

    from scheduler.api import cli as api_cli

    api_cli.add_commands(sub)

    s = sub.add_parser("lora", help="LoRA adapters: add NAME SOURCE --model MODEL | list | remove NAME --model MODEL")
    s.add_argument("op", choices=["add", "list", "remove"])
    s.add_argument("name", nargs="?")
    s.add_argument("source", nargs="?", help="a diffusers LoRA folder or file, a kohya/A1111 .safetensors, or a hub id")
    s.add_argument("--model", help="the base model the adapter was made for")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_lora)

    passthrough(sub, "cache", "scheduler.cache_cli", "cache operations: invalidate | purge | evict | stats")
    passthrough(sub, "coordinator", "scheduler.coordinator", "run the coordinator (or: coordinator status)")


def new_parser(*adders) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reprise", description="Reprise: a text-to-image generation cluster with a shared latent cache."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for add in adders:
        add(sub)
    return p


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in PASSTHROUGH and argv[1:2] != ["--"]:
        argv.insert(1, "--")
    args = parser.parse_args(argv)
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


def main(argv: list[str] | None = None) -> int:
    return run(new_parser(add_commands), argv)


if __name__ == "__main__":
    sys.exit(main())
