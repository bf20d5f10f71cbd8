"""`python -m ops.faults`: the rows in order, the table, the JSON report."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from ops.faults.artifacts import fault_artifacts
from ops.faults.batch_kill import fault_batch_kill
from ops.faults.batch_oom import fault_batch_oom
from ops.faults.cache_entries import fault_cache_entries
from ops.faults.clock_skew import fault_clock_skew
from ops.faults.coordinator import fault_coordinator
from ops.faults.device_stall import fault_device_stall
from ops.faults.fuzz import fault_fuzz
from ops.faults.harness import Harness, Row
from ops.faults.hooks import run_with_hooks
from ops.faults.poison_request import fault_poison_request
from ops.faults.qdrant import fault_qdrant
from ops.faults.redis_failover import fault_redis_failover
from ops.faults.redis_restart import fault_redis_restart
from ops.faults.secret_scan import fault_secrets
from ops.faults.tenants import fault_tenants
from ops.faults.worker_kill import fault_worker_kill

FAULTS = [
    "worker_kill",
    "batch_kill",
    "batch_oom",
    "poison_request",
    "device_stall",
    "redis_restart",
    "redis_failover",
    "qdrant",
    "artifacts",
    "cache_entries",
    "tenants",
    "coordinator_kill",
    "clock_skew",
    "fuzz",
    "secrets",
]

# Rows that start every process they need (on a Redis of their own): no steady worker for them.
SELF_CONTAINED = {"redis_failover"}


def run(
    only: list[str] | None = None,
    quick: bool = False,
    fuzz_cases: int = 10_000,
    workdir: str | None = None,
    json_path: str | None = None,
) -> list[Row]:
    workdir = workdir or tempfile.mkdtemp(prefix="reprise-faults-")
    h = Harness(workdir, quick=quick)
    rows: list[Row] = []
    chosen = [f for f in FAULTS if not only or f in only]
    try:
        if set(chosen) - SELF_CONTAINED:
            h.start_worker("tiny", REPRISE_CACHE_PATH=str(Path(workdir) / "qdrant-steady"))
        for name in chosen:
            row = Row(name)
            t = time.monotonic()
            print(f"--- {name} ...", flush=True)
            try:
                {
                    "worker_kill": fault_worker_kill,
                    "batch_kill": fault_batch_kill,
                    "batch_oom": fault_batch_oom,
                    "poison_request": fault_poison_request,
                    "device_stall": fault_device_stall,
                    "redis_restart": fault_redis_restart,
                    "redis_failover": fault_redis_failover,
                    "qdrant": fault_qdrant,
                    "artifacts": fault_artifacts,
                    "cache_entries": fault_cache_entries,
                    "tenants": fault_tenants,
                    "coordinator_kill": fault_coordinator,
                    "clock_skew": fault_clock_skew,
                    "secrets": fault_secrets,
                    "fuzz": lambda h_, r_: fault_fuzz(h_, r_, fuzz_cases),
                }[name](h, row)
            except Exception as exc:
                import traceback

                row.check("ran to the end", False, f"{type(exc).__name__}: {exc}")
                row.notes.append(traceback.format_exc()[-2000:])
            row.checks["seconds"] = {"ok": True, "detail": round(time.monotonic() - t, 1)}
            rows.append(row)
            print(_line(row), flush=True)
            if json_path:  # after every fault, so that a run cut short still leaves its rows
                Path(json_path).write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=str))
    finally:
        h.close()
    return rows


HEADER = f"{'fault':<17}{'sent':>7}{'done':>7}{'failed':>7}{'lost':>6}{'dup':>5}{'retried':>8}{'max lat s':>10}  result"


def _line(r: Row) -> str:
    bad = [k for k, v in r.checks.items() if not v.get("ok")]
    return (
        f"{r.fault:<17}{r.sent:>7}{r.completed:>7}{r.failed:>7}{r.lost:>6}{r.duplicated:>5}{r.retried:>8}"
        f"{r.max_latency_s:>10.2f}  {'PASS' if r.ok else 'FAIL: ' + '; '.join(bad)}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack
    if argv[:1] == ["--with-hooks"]:
        return run_with_hooks(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m ops.faults",
        description=sys.modules["ops.faults"].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--only", help="comma-separated: " + ",".join(FAULTS))
    p.add_argument("--quick", action="store_true", help="fewer kills, rounds and samples")
    p.add_argument("--fuzz-cases", type=int, default=10_000)
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    rows = run(args.only.split(",") if args.only else None, args.quick, args.fuzz_cases, args.workdir, args.json)
    print()
    print(HEADER)
    for r in rows:
        print(_line(r))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=str))
    return 0 if all(r.ok for r in rows) else 1
