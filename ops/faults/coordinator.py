"""Row coordinator_kill: the leading coordinator killed; another takes the lease."""

from __future__ import annotations

import os
import random
import signal
import time

from ops.faults.harness import Harness, Row


def fault_coordinator(h: Harness, row: Row) -> None:
    """SIGKILL the leading coordinator during its duty rounds, several times; a standby takes over."""
    from scheduler.cache_admin import CacheAdmin
    from scheduler.coordinator import status

    rounds = 2 if h.quick else 4
    coords = [h.start_coordinator("a"), h.start_coordinator("b")]
    takeovers, refused = [], []
    deadline = time.monotonic() + 40
    while not status()["leader"]:
        assert time.monotonic() < deadline, "no coordinator took the lease"
        time.sleep(0.1)
    for i in range(rounds):
        s = status()
        old = s["token"]
        pid = int(s["leader"].split("-")[-2])
        victim = next(p for p in coords if p.pid == pid)
        time.sleep(random.uniform(0.1, 0.6))  # lands during or between duty rounds (every 0.5 s)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        t = time.monotonic()
        while True:
            s = status()
            if s["leader"] and s["token"] > old:
                break
            if time.monotonic() - t > 15:
                break
            time.sleep(0.05)
        takeovers.append(round(time.monotonic() - t, 2))
        replies = CacheAdmin().broadcast("gc", token=old, timeout=5)
        refused.append(bool(replies) and all("refused" in r for r in replies.values() if isinstance(r, dict)))
        coords.remove(victim)
        coords.append(h.start_coordinator(f"r{i}"))
    time.sleep(2)
    final = status()
    row.sent = rounds
    row.completed = sum(1 for t in takeovers if t < 15)
    row.lost = rounds - row.completed
    row.max_latency_s = max(takeovers)
    row.check("a standby took over after every kill", row.lost == 0, takeovers)
    row.check("takeover within 2 leases + 1 s", max(takeovers) < 2 * 1.5 + 1, max(takeovers))
    row.check("the killed leader's token is refused by every node", all(refused), refused)
    row.check("duty rounds kept running", final["sweeps"].get("gc", 0) >= 1, final["sweeps"])
    row.notes.append("sent = leader kills; completed = takeovers; latency = seconds to a new leader")
    for p in coords:
        p.terminate()
        p.wait(10)
    h.coordinators.clear()
