"""Lookup latency and memory of the latent cache per backend and size (not a test).

    python -m ops.bench_lookup --entries 1000,10000,100000 --json OUT

For each backend and N: insert N entries (random 384-dim prompt vectors, a realistic payload,
no states), time the Edge optimiser, then time filtered top-1 lookups (the approximate lookup's
own filter: model, version, generation, scheduler, steps, guidance, size, expiry, audience).
A second, smaller run stores one SD-1.5-sized state (4x64x64 float16) per entry to measure the
bytes a state adds and the full lookup (search + state fetch + checksum).
qdrant-client local mode searches by brute force in Python (README, "Lookup latency": p50 486 ms
at 10k entries), so it is measured up to --local-max entries only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cache.keys import CacheKey
from cache.latent_cache import LatentCache
from cache.settings import CacheSettings

DIM = 384
TENANTS = [f"tenant{i:02d}" for i in range(20)]


class _NoEmbedder:
    version, dim = "bench-random", DIM

    def embed(self, prompt):
        raise RuntimeError("the benchmark passes vectors directly")

    def drop_memos(self):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _key(rng: np.random.Generator, i: int) -> CacheKey:
    return CacheKey(
        model="sd15",
        model_version="v1",
        generation=1,
        prompt=f"bench prompt {i}",
        negative_prompt="",
        seed=int(rng.integers(1 << 31)),
        steps=int(rng.choice([30, 50])),
        guidance=float(rng.choice([7.0, 7.5])),
        width=512,
        height=512,
        scheduler="ddim",
        tenant=TENANTS[int(rng.integers(len(TENANTS)))],
    )


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _percentiles(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)
    return {
        "p50_ms": round(statistics.median(s), 3),
        "p99_ms": round(s[min(len(s) - 1, int(0.99 * len(s)))], 3),
        "mean_ms": round(statistics.fmean(s), 3),
        "n": len(s),
    }


def run_one(backend: str, n: int, queries: int, with_state: bool, root: Path, seed: int = 0) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{backend}-{n}-", dir=root))
    settings = CacheSettings(
        backend=backend,
        path=str(folder),
        lookup_timeout_ms=60_000,
        optimize_after_writes=10**9,
        optimize_interval_s=10**6,
    )  # the bench optimises itself
    rng = np.random.default_rng(seed)
    rss0 = _rss_bytes()
    cache = LatentCache.open(settings, embedder=_NoEmbedder())
    result: dict = {"backend": backend, "entries": n, "with_state": with_state}
    try:
        vectors = _unit(rng, n)
        keys = [_key(rng, i) for i in range(n)]
        # without states the payload still describes one (K=5) so the lookup filter matches as in production
        state = {5: rng.standard_normal((4, 64, 64)).astype(np.float32) if with_state else np.zeros(1, np.float32)}
        start = time.perf_counter()
        batch = 64 if with_state else 1000
        for lo in range(0, n, batch):
            points = [
                cache.build_entry(keys[i], vectors[i], state, f"file:///img/{i}.png", i % 3 == 0)
                for i in range(lo, min(n, lo + batch))
            ]
            cache.store.insert_many(points if with_state else [(i, v, {}, p) for i, v, _, p in points])
        result["insert_s"] = round(time.perf_counter() - start, 2)
        result["optimize_s"] = round(cache.optimize_now(), 2) if backend == "edge" else None
        cache.store.flush()

        # queries: a new prompt vector near a stored one, with that entry's filter (other tenant 1 time in 2)
        probe = rng.integers(n, size=queries)
        samples, hits = [], 0
        for i in probe:
            k = keys[int(i)]
            if rng.random() < 0.5:
                k = CacheKey(**{**k.as_dict(), "tenant": TENANTS[int(rng.integers(len(TENANTS)))]})
            q = vectors[int(i)] + 0.05 * _unit(rng, 1)[0]
            q /= np.linalg.norm(q)
            t0 = time.perf_counter()
            if with_state:
                hit = cache.lookup_approx(k, q)  # search + state fetch + verification, through the time box
            else:
                hit = cache.store.search(q, cache._approx_where(k, True, time.time()), limit=1)
            samples.append((time.perf_counter() - t0) * 1000)
            hits += bool(hit)
        result.update(_percentiles(samples))
        result["hit_rate"] = round(hits / max(1, len(samples)), 3)
        result["rss_per_entry_bytes"] = round((_rss_bytes() - rss0) / n)
        result["disk_per_entry_bytes"] = round(_dir_bytes(folder) / n)
        result["health"] = dict(cache.health)
    finally:
        cache.close()
        shutil.rmtree(folder, ignore_errors=True)
    return result


def lookup_during_optimize(n: int, root: Path, queries: int = 300, seed: int = 1) -> dict:
    """Edge: lookups while optimize() runs on another thread. They must stay fast: in-process
    optimisation holds the GIL, so the default runs it in a child process and lookups miss
    (store offline) until it is back."""
    folder = Path(tempfile.mkdtemp(prefix="bench-edge-opt-", dir=root))
    settings = CacheSettings(backend="edge", path=str(folder), optimize_after_writes=10**9, optimize_interval_s=10**6)
    cache = LatentCache.open(settings, embedder=_NoEmbedder())
    rng = np.random.default_rng(seed)
    try:
        vectors = _unit(rng, n)
        keys = [_key(rng, i) for i in range(n)]
        for lo in range(0, n, 1000):
            points = [
                cache.build_entry(keys[i], vectors[i], {5: np.zeros(1, np.float32)}, None, False)
                for i in range(lo, min(n, lo + 1000))
            ]
            cache.store.insert_many([(i, v, {}, p) for i, v, _, p in points])
        done = threading.Event()
        took = {}

        def optimise():
            took["s"] = cache.optimize_now()
            done.set()

        threading.Thread(target=optimise).start()
        samples, answered = [], 0
        while not done.is_set():
            i = int(rng.integers(n))
            t0 = time.perf_counter()
            # through the time box, as a lookup does; None while the shard is offline
            res = cache._timeboxed(
                "approx", cache.store.search, vectors[i], cache._approx_where(keys[i], True, time.time()), 1
            )
            samples.append((time.perf_counter() - t0) * 1000)
            answered += res is not None
            time.sleep(0.01)
        done.wait()
        return {
            "entries": n,
            "optimize_s": round(took["s"], 2),
            "answered": answered,
            "health": dict(cache.health),
            **(_percentiles(samples) if samples else {"n": 0}),
        }
    finally:
        cache.close()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="reprise bench lookup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", default="1000,10000,100000", help="comma-separated cache sizes")
    parser.add_argument("--backends", default="edge,local", help="comma-separated: edge, local, server")
    parser.add_argument("--queries", type=int, default=500, help="filtered top-1 lookups per size")
    parser.add_argument("--local-max", type=int, default=10_000, help="largest size run in local mode (brute force)")
    parser.add_argument("--local-queries", type=int, default=100, help="lookups per size in local mode")
    parser.add_argument(
        "--state-entries", type=int, default=2000, help="size of the run with one 4x64x64 state per entry (0: skip)"
    )
    parser.add_argument(
        "--during-optimize", type=int, default=10_000, help="Edge size for lookups during optimize() (0: skip)"
    )
    parser.add_argument("--dir", default=None, help="where the temporary caches go (default: the system temp dir)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the results here")
    args = parser.parse_args(argv)

    root = Path(args.dir or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.entries.split(",") if x.strip()]
    results = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        for n in sizes:
            if backend == "local" and n > args.local_max:
                results.append(
                    {
                        "backend": backend,
                        "entries": n,
                        "skipped": f"local mode is brute force in Python; > --local-max {args.local_max}",
                    }
                )
                continue
            q = args.local_queries if backend == "local" else args.queries
            results.append(run_one(backend, n, q, with_state=False, root=root))
            _print_row(results[-1])
        if args.state_entries:
            q = args.local_queries if backend == "local" else args.queries
            results.append(run_one(backend, args.state_entries, q, with_state=True, root=root))
            _print_row(results[-1])
    during = (
        lookup_during_optimize(args.during_optimize, root) if args.during_optimize and "edge" in args.backends else None
    )
    if during:
        print(
            f"edge lookups while optimize() runs at {during['entries']} entries: p50 {during.get('p50_ms')} ms, "
            f"p99 {during.get('p99_ms')} ms over {during['n']} lookups, {during['answered']} answered, the rest "
            f"missed while the shard was offline (optimize {during['optimize_s']} s)"
        )
    report = {
        "results": results,
        "lookup_during_optimize": during,
        "cpu_count": os.cpu_count(),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


_HEADER = False


def _print_row(r: dict) -> None:
    global _HEADER
    if not _HEADER:
        print(
            f"{'backend':<7} {'entries':>8} {'state':>5} {'insert s':>9} {'optimize s':>10} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'hit':>5} {'RSS B/entry':>11} {'disk B/entry':>12}"
        )
        _HEADER = True
    if "skipped" in r:
        print(f"{r['backend']:<7} {r['entries']:>8}  skipped: {r['skipped']}")
        return
    opt = "-" if r["optimize_s"] is None else f"{r['optimize_s']:.2f}"
    print(
        f"{r['backend']:<7} {r['entries']:>8} {'yes' if r['with_state'] else 'no':>5} {r['insert_s']:>9.2f} {opt:>10} "
        f"{r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['hit_rate']:>5.2f} {r['rss_per_entry_bytes']:>11} {r['disk_per_entry_bytes']:>12}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
