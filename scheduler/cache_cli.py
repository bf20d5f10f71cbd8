"""`reprise cache ...`: invalidate, purge, evict and inspect the cache of every node.

reprise cache invalidate --model tiny            # bump the model's cache generation
reprise cache invalidate --tenant acme           # delete a tenant's entries everywhere
reprise cache invalidate --prompt-prefix "a cat" # delete entries whose prompt starts so
reprise cache purge --older-than 7d
reprise cache evict --to 80% [--policy lcbfu]
reprise cache stats [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from scheduler.cache_admin import CacheAdmin

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


def main(argv: list[str] | None = None) -> int:
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
