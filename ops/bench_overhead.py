"""`reprise bench overhead`: what the cluster adds to one job, against calling the model directly.

    reprise bench overhead --json overhead.json

For each model (``tiny`` at its 64 px default, ``sd15-small`` — SD 1.5's block structure, random
weights — at 256 px) it measures:

- *direct*: ``DenoiseLoop.denoise`` + ``decode`` in this process (same device, torch threads, steps,
  seed, guidance, size, scheduler), the median of ``--repeats`` runs;
- *cluster*: the same request submitted through ``scheduler.client.submit`` to a real worker process of
  an embedded cluster (ops/localcluster.py), one job at a time, timed from just before the submit to
  ``Job.wait`` returning, with the caches off in the request
  (``cache: {exact: false, approximate: false, write: false}``), the median of ``--repeats`` jobs.

Every repeat uses its own prompt on both sides (so neither side's text-encoder memo helps), and the
two sides alternate job by job, so background load on a shared machine hits both alike. The report
gives the ratio cluster ÷ direct and the per-job overhead in ms (cluster − direct). The step count of
the larger model is chosen so its job takes at least ``--min-job-s`` (2 s) here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

NO_CACHE = {"exact": False, "approximate": False, "write": False}
_USER_REDIS_URL = os.environ.get("REDIS_URL")  # read before the first cluster points REDIS_URL at its own Redis


def _prompt(i: int) -> str:
    return f"a lighthouse on a cliff at dusk, oil painting, take {i}"


class DirectRunner:
    """The same denoise + decode as a worker, called in this process."""

    def __init__(self, model: str, size: int, guidance: float):
        from workers.denoise_loop import DenoiseLoop
        from workers.model_loading import load_components

        self.loop = DenoiseLoop(load_components(model, "cpu"))
        self.size, self.guidance = size, guidance

    def __call__(self, i: int, steps: int) -> float:
        t = time.perf_counter()
        out = self.loop.denoise(
            prompt=_prompt(i), seed=i, steps=steps, guidance_scale=self.guidance, width=self.size, height=self.size
        )
        self.loop.decode(out.latents)
        return time.perf_counter() - t


def measure(
    model: str, size: int, steps: int | None, repeats: int, min_job_s: float, guidance: float, threads: int
) -> dict:
    """Direct and cluster runs interleaved (direct i, job i, direct i+1, ...): on a machine shared with other
    work, both sides see the same background load."""
    from ops.localcluster import LocalCluster

    workdir = tempfile.mkdtemp(prefix="reprise-bench-overhead-")
    Path(workdir, "redis").mkdir()
    for name in ("REDIS_URL", "REPRISE_REDIS_URL"):  # a fresh Redis per model, unless the user gave one
        os.environ.pop(name, None)
        if _USER_REDIS_URL:
            os.environ[name] = _USER_REDIS_URL
    with LocalCluster(workdir=workdir) as cluster:
        from scheduler.client import submit

        cluster.start_worker(model, "cpu", timeout=600, REPRISE_METRICS_PORT=0, REPRISE_TORCH_THREADS=threads)
        direct = DirectRunner(model, size, guidance)
        direct(10_000, 2)  # warm-up, as a worker does at start
        if steps is None:  # enough steps for a job of at least min_job_s
            probe = 4
            per_step = min(direct(10_001 + k, probe) for k in range(2)) / probe
            steps = max(10, math.ceil(min_job_s * 1.15 / per_step))
        request = dict(model=model, steps=steps, guidance_scale=guidance, width=size, height=size, cache=NO_CACHE)
        submit(prompt=_prompt(10_000), seed=0, **{**request, "steps": 2}).wait(600)  # first job: connections, imports
        direct_s, cluster_s, parts = [], [], []
        for i in range(repeats):
            direct_s.append(direct(i, steps))
            t = time.perf_counter()
            result = submit(prompt=_prompt(i), seed=i, **request).wait(600)
            cluster_s.append(time.perf_counter() - t)
            parts.append(result.timings.model_dump())
    return {
        "steps": steps,
        "direct": {"times_s": direct_s, "median_s": statistics.median(direct_s)},
        "cluster": {
            "times_s": cluster_s,
            "median_s": statistics.median(cluster_s),
            "timings": parts,
            "median_denoise_decode_s": statistics.median(p["denoise_s"] + p["decode_s"] for p in parts),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="reprise bench overhead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        default="tiny:64:25,sd15-small:256:auto",
        help="model:size:steps list; steps 'auto' = enough for --min-job-s",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-job-s", type=float, default=2.0)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on both sides (1: on a shared 2-core machine, 2 OpenMP threads stall whenever a core is taken)",
    )
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    rows = []
    for spec in args.models.split(","):
        model, size, steps = spec.split(":")
        m = measure(
            model,
            int(size),
            None if steps == "auto" else int(steps),
            args.repeats,
            args.min_job_s,
            args.guidance,
            args.threads,
        )
        direct, cluster = m["direct"], m["cluster"]
        row = {
            "model": model,
            "size": int(size),
            "steps": m["steps"],
            "repeats": args.repeats,
            "threads": args.threads,
            "direct_median_s": direct["median_s"],
            "cluster_median_s": cluster["median_s"],
            "ratio": cluster["median_s"] / direct["median_s"],
            "overhead_ms": 1000 * (cluster["median_s"] - direct["median_s"]),
            "worker_denoise_decode_median_s": cluster["median_denoise_decode_s"],
            "direct": direct,
            "cluster": cluster,
        }
        rows.append(row)
        print(
            f"{model}: direct {row['direct_median_s']:.3f}s, cluster {row['cluster_median_s']:.3f}s, "
            f"ratio {row['ratio']:.3f}, overhead {row['overhead_ms']:.0f} ms",
            file=sys.stderr,
        )

    from rich.console import Console
    from rich.table import Table

    t = Table(title="reprise bench overhead (CPU, caches off in the request)")
    for c in ("model", "size", "steps", "direct median s", "cluster median s", "ratio", "overhead ms/job"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            r["model"],
            str(r["size"]),
            str(r["steps"]),
            f"{r['direct_median_s']:.3f}",
            f"{r['cluster_median_s']:.3f}",
            f"{r['ratio']:.3f}",
            f"{r['overhead_ms']:.0f}",
        )
    Console().print(t)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"params": vars(args), "rows": rows}, indent=2))
        print(f"report: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
