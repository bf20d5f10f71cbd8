"""Row device_stall: a denoiser call that never returns; the watchdog marks the node unhealthy and its requests are answered by another node."""

from __future__ import annotations

import time

from ops.faults.harness import Harness, Row, _log_lines, _wait_all, account


def fault_device_stall(h: Harness, row: Row) -> None:
    """A device thread hangs inside a denoiser call (REPRISE_FAULT_STALL_ON: a hung kernel). The engine's
    watchdog (REPRISE_DEVICE_STALL_S) marks the node unhealthy: it releases the requests it held with
    DeviceFailed, which the task sends again rather than acknowledging, and the node stops consuming; a
    healthy node started afterwards answers every one of them, once."""
    since = time.time()
    victim = h.start_worker(
        "sim",
        "sim:0",
        REPRISE_FAULT_STALL_ON="3",
        REPRISE_DEVICE_STALL_S="3",
        REPRISE_DEVICE_RETRIES="5",
        REPRISE_CACHE_ENABLED="false",
        REPRISE_WARMUP="false",
    )
    n = 4 if h.quick else 6
    sent = [h.send({"prompt": f"a hung device {i}", "steps": 12, "seed": i}, model="sim") for i in range(n)]
    deadline = time.monotonic() + 60
    while not _log_lines(victim, "no longer consuming") and time.monotonic() < deadline:
        time.sleep(0.2)
    unhealthy = _log_lines(victim, "NODE UNHEALTHY")
    row.check("the watchdog found the stalled device and stopped the node's consumer", bool(unhealthy), unhealthy[:1])
    rescuer = h.start_worker("sim", "sim:0", REPRISE_CACHE_ENABLED="false")
    outcomes = _wait_all(h, sent, 120)
    account(row, h, outcomes, since)
    journal = [e for e in h.journal() if e.get("t", 0) >= since]
    stalled = [e for e in journal if e["event"] == "stalled"]
    held = {e["job"] for e in journal if e["event"] == "start" and e["pid"] == victim.pid}
    answered_by = {e["job"]: e["pid"] for e in journal if e["event"] == "done"}
    row.check(
        "every job the stalled node held was sent again and answered by the healthy node",
        bool(stalled) and bool(held) and all(answered_by.get(j) == rescuer.pid for j in held),
        {
            "stalled call": stalled[0]["jobs"] if stalled else None,
            "held": len(held),
            "by rescuer": sum(answered_by.get(j) == rescuer.pid for j in held),
        },
    )
    row.check("the stalled node was not killed (released, not restarted)", victim.alive(), victim.proc.poll())
    row.notes.append({"unhealthy": unhealthy[0][-200:] if unhealthy else None})
    for w in (victim, rescuer):
        w.stop()
        h.cluster.workers.remove(w)
