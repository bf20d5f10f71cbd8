"""Row clock_skew: skewed and stepped clocks; leases and cache TTLs hold, and naive clocks are caught."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from ops.faults.harness import Harness, Row


def fault_clock_skew(h: Harness, row: Row) -> None:
    """Every local clock of the processes skewed (wall and monotonic), and the same runs with a naive
    implementation on local wall clocks (REPRISE_FAULT_CLOCK_NAIVE), which the same checks must catch."""
    seconds = 5 if h.quick else 10
    real = leases_under_skew(h.start_coordinator, seconds)
    h.coordinators.clear()
    naive = leases_under_skew(h.start_coordinator, seconds, naive=True)
    h.coordinators.clear()
    row.sent, row.completed = real["samples"], real["samples"] - real["both_leading"]
    row.duplicated = real["both_leading"]
    row.check(
        "leases: coordinators at -1 h and +1 h never both lead (each one's own view, sampled every 50 ms)",
        real["both_leading"] == 0 and real["samples"] > 20,
        real,
    )
    row.check("leases: the survivor leads within 2 leases + 1 s of the leader's SIGKILL", real["takeover_s"] < 4, real)
    row.check(
        "leases on local wall clocks give two leaders at once (the fault is real)",
        naive["both_leading"] > 0,
        naive,
    )
    from workers.model_loading import save_builtin

    model = str(h.workdir / "skewmodel")  # a queue of its own: only the node under test takes these jobs
    if not Path(model).exists():
        save_builtin("tiny", model, seed=0)
    kept = cache_ttl_across_clock_step(h.start_worker, model, h.workdir / "clock-step.flag")
    lost = cache_ttl_across_clock_step(h.start_worker, model, h.workdir / "clock-step.flag", naive=True)
    row.check(
        "cache: an entry (TTL 1 h) is still an exact hit after its node's wall clock steps +2 h", kept == "exact", kept
    )
    row.check("cache on the node's wall clock misses it there (the fault is real)", lost == "miss", lost)
    row.notes.append(
        "leases: SET NX PX and PEXPIRE run on the Redis server's clock; cache TTLs: expires_at and "
        "every 'now' from RedisClock (server TIME + local monotonic), tolerance = one TIME round trip"
    )


def _leading(p) -> int | None:
    """A coordinator's own view (its reprise_coordinator_is_leader gauge); None while it does not answer."""
    import requests

    try:
        text = requests.get(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=0.5).text
        m = re.search(r"^reprise_coordinator_is_leader (\S+)", text, re.M)
        return int(float(m.group(1))) if m else None
    except requests.RequestException:
        return None


def leases_under_skew(start, seconds: float, naive: bool = False) -> dict:
    """Two coordinators, every local clock of one 1 h behind and of the other 1 h ahead; the one behind leads
    first. ``start(name, **env)`` starts a hooked coordinator (``.metrics_port`` set). Samples both views for
    ``seconds``, then SIGKILLs the leader and times the survivor's takeover."""
    from scheduler.cache_admin import CacheAdmin

    # A leader blocks on its broadcasts (README, known gaps): wait until every node the registry lists
    # answers (a node stopped a moment ago stays listed for up to 3 heartbeats), so that only clocks are tested.
    admin, deadline = CacheAdmin(), time.monotonic() + 30
    while not set(admin.registry.live_nodes()) <= set(admin.broadcast("stats", timeout=2)):
        assert time.monotonic() < deadline, "some listed node never answered"
    extra = {"REPRISE_FAULT_CLOCK_NAIVE": "1"} if naive else {}
    behind = start("behind" + "-naive" * naive, REPRISE_FAULT_CLOCK_SKEW_S="-3600", **extra)
    procs = [behind]
    out = {"samples": 0, "both_leading": 0, "none_leading": 0, "takeover_s": float("inf")}
    try:
        deadline = time.monotonic() + 60
        while _leading(behind) != 1:
            assert time.monotonic() < deadline and behind.poll() is None, "the first coordinator never led"
            time.sleep(0.05)
        ahead = start("ahead" + "-naive" * naive, REPRISE_FAULT_CLOCK_SKEW_S="3600", **extra)
        procs.append(ahead)
        while _leading(ahead) is None:
            assert time.monotonic() < deadline and ahead.poll() is None, "the second coordinator never answered"
            time.sleep(0.05)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            views = [_leading(p) for p in procs]
            if None not in views:
                out["samples"] += 1
                out["both_leading"] += int(sum(views) == 2)
                out["none_leading"] += int(sum(views) == 0)
            time.sleep(0.05)
        victim = ahead if _leading(ahead) == 1 else behind
        survivor = behind if victim is ahead else ahead
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        t = time.monotonic()
        while time.monotonic() - t < 10:
            if _leading(survivor) == 1:
                out["takeover_s"] = round(time.monotonic() - t, 2)
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        if naive:  # its lease is no PX lease: leave nothing for the next coordinators
            admin.r.delete(f"{admin.prefix}:coordinator:leader")
    return out


def cache_ttl_across_clock_step(start, model_dir: str, flag: Path, naive: bool = False) -> str:
    """A real node (``start(model_dir, **env)`` starts it under the hooks) caches a job with a 1 h TTL, then its
    wall clock steps 2 h ahead; returns the cache answer for the same request after the step."""
    from scheduler.client import submit

    flag.unlink(missing_ok=True)
    env = {
        "REPRISE_CACHE_TTL_SECONDS": "3600",
        "REPRISE_FAULT_CLOCK_SKEW_S": "7200",
        "REPRISE_FAULT_CLOCK_SKEW_FILE": str(flag),
        **({"REPRISE_FAULT_CLOCK_NAIVE": "1"} if naive else {}),
    }
    worker = start(model_dir, **env)
    probe = dict(prompt=f"an entry cached before the clock step {'naive' if naive else 'real'}", steps=6, seed=1)
    probe["model"] = Path(model_dir).name
    try:
        deadline = time.monotonic() + 60
        while submit(**probe).wait(60).cache.hit != "exact":  # the write-back is asynchronous
            assert time.monotonic() < deadline, "the entry was never cached"
            time.sleep(0.3)
        flag.touch()
        return submit(**probe).wait(60).cache.hit
    finally:
        flag.unlink(missing_ok=True)
        worker.stop()


# --- bad and hostile input ------------------------------------------------------------------
