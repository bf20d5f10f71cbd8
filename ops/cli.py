"""`reprise`: the one command for everything a user runs.

The command line is the one place that may depend on every layer: it puts together the scheduler's
commands (`scheduler.cli`: schema, submit, flower, models, cache, coordinator), the worker's
(`workers.cli`: worker, settings) and the operators' tools here in `ops` (demo, benchmarks, load
tests, evaluations). Each subcommand imports its module only when it runs.
"""

from __future__ import annotations

import argparse
import sys

from scheduler import cli as scheduler_cli
from scheduler.cli import PASSTHROUGH, new_parser, passthrough, run
from workers import cli as workers_cli

BENCHES = {
    "overhead": "ops.bench_overhead",
    "feature": "ops.bench_feature",
    "lookup": "ops.bench_lookup",
    "cache": "ops.bench_cache",
    "scale": "ops.bench_scale",
    "batching": "ops.bench_batching",
    "lora": "ops.bench_lora",
}


EVALS = {"quality": "ops.eval_quality", "stream": "ops.eval_stream"}


def _cmd_eval(args) -> int:
    """`reprise eval [quality|stream] ...`: quality when no harness is named."""
    import importlib

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    which = rest[0] if rest[:1] and rest[0] in EVALS else "quality"
    return importlib.import_module(EVALS[which]).main(rest[1:] if rest[:1] == [which] else rest) or 0


def _cmd_bench(args) -> int:
    import importlib

    return importlib.import_module(BENCHES[args.which]).main(args.rest) or 0


def _checker_scorer(**options):
    from ops.shapes.scorer import make

    return make(**options)


def add_commands(sub) -> None:
    from workers.scorers import register_scorer

    register_scorer("checker", _checker_scorer)  # the shapes model's ground truth, for `reprise calibrate`
    s = sub.add_parser("bench", help=f"benchmarks: {' | '.join(BENCHES)} (see --help of each)")
    s.add_argument("which", choices=list(BENCHES))
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_bench)
    passthrough(sub, "demo", "ops.demo", "start a local cluster, run a handful of prompts, print a table")
    passthrough(sub, "loadtest", "ops.loadtest", "drive load against a running cluster")
    s = sub.add_parser("eval", help="quality harness: eval quality ... | eval stream ...", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_eval)
    PASSTHROUGH.add("eval")
    passthrough(sub, "gpu-check", "ops.gpu_check", "measure a GPU in five minutes: batching, DeepCache, exact resume")


def build_parser() -> argparse.ArgumentParser:
    return new_parser(scheduler_cli.add_commands, workers_cli.add_commands, add_commands)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
