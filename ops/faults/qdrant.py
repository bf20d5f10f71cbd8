"""Row qdrant: the cache slow, unreachable and back; requests are served without it."""

from __future__ import annotations

import random
import shutil
import time

from ops.faults.harness import Harness, Row, _hits, _qmodel, _run_jobs, _service_s, account


def fault_qdrant(h: Harness, row: Row) -> None:
    """The cache locked by another process (unavailable), slow beyond its time box, its folder corrupted."""
    from cache import CacheSettings, LatentCache

    since = time.time()
    model = _qmodel(h)
    folder = h.workdir / "qdrant-q"
    delay_flag = h.workdir / "cache-slow.flag"
    outcomes: list[dict] = []
    holder = LatentCache.open(CacheSettings(path=str(folder)))  # this process holds the folder: the node cannot open it
    worker = h.start_worker(
        model,
        REPRISE_CACHE_PATH=str(folder),
        REPRISE_FAULT_CACHE_DELAY_MS="400",
        REPRISE_FAULT_CACHE_DELAY_FILE=str(delay_flag),
    )
    h.q_worker = worker
    nocache = {"exact": False, "approximate": False, "write": False}
    base = _run_jobs(
        h,
        [{"prompt": f"baseline {i}", "steps": 10, "seed": i, "model": "qmodel", "cache": nocache} for i in range(4)],
        "qmodel",
    )
    baseline = max(_service_s(o) for o in base if o["state"] == "SUCCESS")
    row.checks["no-cache latency (seconds in the worker, max of 4)"] = {"ok": True, "detail": baseline}
    same = {"prompt": "a cache recovery probe", "steps": 10, "seed": 1, "model": "qmodel"}
    down = _run_jobs(h, [dict(same) for _ in range(3)], "qmodel")
    outcomes += down
    row.check(
        "unavailable: jobs served uncached, with a note",
        all(
            o["state"] == "SUCCESS" and o["result"]["cache"]["hit"] == "off" and o["result"]["cache"]["note"]
            for o in down
        ),
        [o["result"]["cache"].get("note") if o["state"] == "SUCCESS" else o["state"] for o in down][:1],
    )
    holder.close()  # "Qdrant is back"
    recovered_at = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        o = _run_jobs(h, [dict(same)], "qmodel")
        outcomes += o
        if o[0]["state"] == "SUCCESS" and o[0]["result"]["cache"]["hit"] == "exact":
            recovered_at = round(30 - (deadline - time.monotonic()), 1)
            break
        time.sleep(0.5)
    row.check(
        "unavailable: the cache came back by itself (exact hit after release)", recovered_at is not None, recovered_at
    )
    # slow: every lookup sleeps 400 ms, the time box is 50 ms
    delay_flag.write_text("slow")
    slow = _run_jobs(h, [{**same, "seed": 100 + i} for i in range(4)] + [dict(same)], "qmodel")
    outcomes += slow
    slow_ok = all(o["state"] == "SUCCESS" and o["result"]["cache"]["hit"] == "miss" for o in slow)
    slow_max = max((_service_s(o) for o in slow if o["state"] == "SUCCESS"), default=0)
    row.check("slow: every job completed as a miss (lookups time-boxed)", slow_ok, _hits(slow))
    row.check(
        "slow: within the no-cache latency plus two time boxes and 0.5 s",
        slow_max <= baseline + 0.1 + 0.5,
        {"max_total_s": slow_max, "baseline_s": baseline},
    )
    delay_flag.unlink()
    time.sleep(1.0)  # lookups still sleeping in the pool finish
    fast = _run_jobs(h, [dict(same)], "qmodel")
    outcomes += fast
    row.check("slow: hits resume once Qdrant is fast again", _hits(fast) == ["exact"], _hits(fast))
    # corrupt: garbage over every file of the embedded folder, then the node restarts on it
    worker.stop()
    h.cluster.workers.remove(worker)
    rng = random.Random(3)
    n = 0
    for path in folder.rglob("*"):
        if path.is_file():
            path.write_bytes(bytes(rng.getrandbits(8) for _ in range(max(64, min(path.stat().st_size, 4096)))))
            n += 1
    worker = h.start_worker(model, REPRISE_CACHE_PATH=str(folder))
    h.q_worker = worker
    broken = _run_jobs(h, [{**same, "seed": 200 + i} for i in range(3)] + [dict(same)], "qmodel")
    outcomes += broken
    row.check(
        "corrupt folder: the node started and every job completed",
        all(o["state"] == "SUCCESS" for o in broken),
        {"files_corrupted": n, "hits": _hits(broken)},
    )
    shutil.rmtree(folder, ignore_errors=True)  # the operator wipes the folder: the node's retry starts a fresh cache
    deadline = time.monotonic() + 30
    fresh = []
    while time.monotonic() < deadline:
        fresh = _run_jobs(h, [dict(same), dict(same)], "qmodel")
        outcomes += fresh
        if _hits(fresh)[-1] == "exact":
            break
        time.sleep(1.0)
    log_text = worker.log.read_text(errors="replace")
    row.check(
        "corrupt folder: cache works again after the folder is wiped",
        _hits(fresh)[-1:] == ["exact"],
        {"hits": _hits(fresh), "logged": "CACHE UNAVAILABLE" in log_text},
    )
    account(row, h, outcomes, since)
