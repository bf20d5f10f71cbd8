"""`reprise cache ...`: invalidate, purge, evict and inspect the cache of every node.

reprise cache invalidate --model tiny            # bump the model's cache generation
reprise cache invalidate --tenant acme           # delete a tenant's entries everywhere
reprise cache invalidate --prompt-prefix "a cat" # delete entries whose prompt starts so
reprise cache purge --older-than 7d
reprise cache evict --to 80% [--policy lcbfu]
reprise cache stats [--json]
reprise cache table show [--model shapes]        # tables stored per (model version, embedder)
reprise cache table set --model shapes --table 0.99:0.5,0.9:0.2 [--version FP] [--embedder minilm]
reprise cache table set --from calibration.json  # the table `reprise calibrate --json` fitted
reprise cache table delete --model shapes [--version FP] [--embedder minilm]
reprise cache table calibrate --model shapes --prompts log.jsonl ...   # reprise calibrate ... --store
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from scheduler.cache_admin import CacheAdmin
from scheduler.errors import InvalidRequest


class TableCommandError(InvalidRequest):
    """A `reprise cache table` command that cannot do what it was asked (no version, bad table)."""

    code = "invalid_table"


# `reprise cache table calibrate ...` runs a calibration, which needs the worker layer (torch, the model):
# the full `reprise` command (workers.cli) sets this to `reprise calibrate ... --store`.
TABLE_CALIBRATE = None

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age like 90s, 15m, 12h, 7d, 2w")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_fraction(text: str) -> float:
    value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0% and 100%")
    return value


def table_main(argv: list[str]) -> int:
    """`reprise cache table show|set|delete|calibrate`: the skip tables stored per model version."""
    if argv[:1] == ["calibrate"]:
        if TABLE_CALIBRATE is None:
            raise TableCommandError(
                "cache table calibrate needs the worker layer: run it with the full `reprise` command"
            )
        return TABLE_CALIBRATE(argv[1:])
    from cache.skip_table_store import EMBEDDERS, TableStore, TableStoreError
    from scheduler.redis_conn import redis_client
    from scheduler.settings import get_settings

    p = argparse.ArgumentParser(prog="reprise cache table", description=table_main.__doc__)
    sub = p.add_subparsers(dest="op", required=True)
    s = sub.add_parser("show", help="stored tables, and the version each model runs now")
    s.add_argument("--model")
    s = sub.add_parser("set", help="store a table for a model version (default: the version the cluster runs)")
    s.add_argument("--model")
    s.add_argument("--version", help="model fingerprint (default: the one registered by its workers)")
    s.add_argument("--embedder", choices=EMBEDDERS, default=None, help="default: REPRISE_CACHE_EMBEDDER")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--table", help="'s:f,s:f,...' (similarity: fraction of steps skipped)")
    src.add_argument("--from", dest="from_json", help="a `reprise calibrate --json` report")
    s = sub.add_parser("delete", help="drop the table stored for a model version")
    s.add_argument("--model", required=True)
    s.add_argument("--version")
    s.add_argument("--embedder", choices=EMBEDDERS, default=None)
    sub.add_parser("calibrate", help="reprise calibrate ... --store (see reprise calibrate --help)")
    for s in sub.choices.values():
        s.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)

    cluster = get_settings()
    client = redis_client(cluster.redis_url)
    store = TableStore(client, cluster.queue_prefix)

    def running_version(model: str) -> str | None:
        value = client.get(f"{cluster.queue_prefix}:fingerprint:{model}")
        return value.decode() if isinstance(value, bytes) else value

    def default_embedder(model: str) -> str:
        """REPRISE_CACHE_EMBEDDER; for `auto`, the embedder the model's live workers report using."""
        from cache.settings import CacheSettings
        from scheduler.registry import ModelRegistry

        chosen = CacheSettings().embedder
        if chosen != "auto":
            return chosen
        used = {
            n.get("skip_table_embedder")
            for n in ModelRegistry(client, cluster.queue_prefix).nodes().values()
            if n.get("model") == model and n.get("skip_table_embedder")
        }
        if len(used) != 1:
            raise TableCommandError(
                f"REPRISE_CACHE_EMBEDDER=auto and {'no live worker' if not used else 'live workers disagree'} "
                f"of {model} says which embedder it uses ({sorted(used)}): pass --embedder minilm|clip"
            )
        return used.pop()

    try:
        if args.op == "show":
            records = store.records(args.model)
            for r in records:
                r["current"] = running_version(r["model"]) == r["fingerprint"]
            out = {"tables": records}
            if args.model:
                out["running_version"] = running_version(args.model)
        elif args.op == "set":
            meta, model, version, embedder = {}, args.model, args.version, args.embedder
            if args.from_json:
                report = json.loads(open(args.from_json).read())
                m = report["meta"]
                model, version, embedder = model or m["model"], version or m["fingerprint"], embedder or m["embedder"]
                table = report["table"]
                meta = {"tolerance": report.get("tolerance"), "scorer": m.get("scorer"), "steps": m.get("steps")}
                meta["source"] = f"reprise cache table set --from {args.from_json}"
            else:
                table = _parse_table(args.table)
                meta["source"] = "reprise cache table set"
            if not model:
                raise TableCommandError("cache table set needs --model (or --from a calibration report)")
            version = version or running_version(model)
            out = store.set(model, version, embedder or default_embedder(model), table, **meta)
        elif args.op == "delete":
            version = args.version or running_version(args.model)
            embedder = args.embedder or default_embedder(args.model)
            out = {"deleted": store.delete(version or "", embedder), "fingerprint": version, "embedder": embedder}
        else:  # "calibrate" is handled above; reached only by `reprise cache table calibrate --help`-like misuse
            raise TableCommandError("cache table calibrate takes the arguments of `reprise calibrate`")
    except (TableStoreError, OSError, KeyError, ValueError) as exc:
        raise TableCommandError(str(exc)) from None
    if args.json or args.op != "show":
        print(json.dumps(out, indent=2, default=str))
    else:
        running = out.get("running_version")
        if running is not None:
            print(f"{args.model} runs version {running}")
        if not out["tables"]:
            print("no stored tables: workers serve with their settings' or the embedder's default table")
        for r in out["tables"]:
            mark = "current" if r["current"] else "other version"
            print(
                f"{r['model']:<12} {r['fingerprint']} {r['embedder']:<6} ({mark})  {r['table']}  "
                f"tolerance {r.get('tolerance')} {r.get('scorer') or ''}  [{r.get('source', '')}]"
            )
    return 0


def _parse_table(text: str) -> list[tuple[float, float]]:
    try:
        return [tuple(float(x) for x in row.split(":")) for row in text.split(",") if row.strip()]
    except ValueError:
        raise TableCommandError(f"--table {text!r}: rows 'similarity:fraction' separated by commas") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        return table_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="reprise cache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="op", required=True)
    s = sub.add_parser("invalidate")
    s.add_argument("--model")
    s.add_argument("--tenant")
    s.add_argument("--prompt-prefix")
    s = sub.add_parser("purge")
    s.add_argument("--older-than", type=parse_age, required=True)
    s.add_argument("--model")
    s = sub.add_parser("evict")
    s.add_argument("--to", type=parse_fraction, required=True, help="fraction of each node's capacity, e.g. 80%%")
    s.add_argument("--policy", choices=["lcbfu", "lru", "lfu", "fifo", "lifo", "random"])
    sub.add_parser("stats")
    sub.add_parser("table", help="skip tables per model version: show | set | delete | calibrate")
    for s in sub.choices.values():
        s.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)

    admin = CacheAdmin()
    if args.op == "invalidate":
        if not (args.model or args.tenant or args.prompt_prefix):
            p.error("invalidate needs --model, --tenant or --prompt-prefix")
        out = admin.invalidate(model=args.model, tenant=args.tenant, prompt_prefix=args.prompt_prefix)
        if "seq" in out:  # deletion rules: have the live nodes apply them now and report
            out["nodes"] = admin.apply_rules_now()
    elif args.op == "purge":
        out = admin.purge(args.older_than, model=args.model)
        out["nodes"] = admin.apply_rules_now()
    elif args.op == "evict":
        out = {"nodes": admin.evict(to_fraction=args.to, policy=args.policy)}
    else:
        out = admin.stats()
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        _print_human(args.op, out)
    return 0


def _print_human(op: str, out: dict) -> None:
    if op == "stats":
        t = out["totals"]
        print(f"entries {t['entries']}  states {t['states']}  ~{t['approx_bytes'] / 2**20:.1f} MiB  per K {t['per_k']}")
        for model, gen in sorted(out["generations"].items()):
            rates = out["hits"].get(model, {}).get("hit_rate", {})
            print(f"  {model}: generation {gen}  hit rates " + ", ".join(f"{k} {v:.0%}" for k, v in rates.items()))
        for node, reply in sorted(out["nodes"].items()):
            print(f"  node {node}: {reply.get('entries', reply)} entries")
        return
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
