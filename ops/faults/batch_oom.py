"""Row batch_oom: a `sim` device out of memory above a batch of 3 under a stream; batches halve, the limit recovers, every request completes once."""

from __future__ import annotations

import time

from ops.faults.harness import Harness, Row, _log_lines, _wait_all, account


def fault_batch_oom(h: Harness, row: Row) -> None:
    """A `sim` device that runs out of memory above a batch of 3 requests (REPRISE_SIM_OOM_ABOVE=6 samples, 2 per
    request with guidance), under a stream, on a node of one device and one of two: each out-of-memory batch is halved and run again, the device's
    batch limit drops and climbs back (REPRISE_OOM_RECOVER_S), and every request completes once. Then a device
    out of memory on one request alone: the device's failure, so the job is sent again (REPRISE_DEVICE_RETRIES),
    never acknowledged as final while retries are left, and only then fails, typed (DeviceFailed)."""
    halved: list[str] = []
    raised: list[str] = []
    n = 12 if h.quick else 24
    for devices in ("sim:0", "sim:0,sim:1"):  # one device and two
        since = time.time()
        worker = h.start_worker(
            "sim", devices, REPRISE_SIM_OOM_ABOVE="6", REPRISE_OOM_RECOVER_S="1", REPRISE_CACHE_ENABLED="false"
        )
        sent = []
        for i in range(n):  # a stream: 4 at once, every 0.3 s
            payload = {"prompt": f"an out-of-memory stream {devices} {i}", "steps": 20, "seed": i}
            sent.append(h.send(payload, model="sim"))
            if i % 4 == 3:
                time.sleep(0.3)
        outcomes = _wait_all(h, sent, 120)
        retried_before = row.retried
        account(row, h, outcomes, since)
        halved_here = _log_lines(worker, r"out of memory on sim:\d at a batch of")
        raised_here = _log_lines(worker, r"batch limit of sim:\d raised")
        row.check(f"{devices}: out-of-memory batches were halved (limit lowered)", bool(halved_here), len(halved_here))
        row.check(f"{devices}: the batch limit climbed back", bool(raised_here), len(raised_here))
        row.check(f"{devices}: no request of the stream ran twice", row.retried == retried_before, row.retried)
        halved += halved_here
        raised += raised_here
        worker.stop()
        h.cluster.workers.remove(worker)

    alone_since = time.time()
    retries = 2
    worker = h.start_worker(
        "sim",
        "sim:0",
        REPRISE_SIM_OOM_ABOVE="1",  # not even one request (2 samples) fits
        REPRISE_DEVICE_RETRIES=str(retries),
        REPRISE_CACHE_ENABLED="false",
        REPRISE_WARMUP="false",  # its warm-up generation would run out of memory too
    )
    job = [h.send({"prompt": "out of memory alone", "steps": 8, "seed": 1}, model="sim")]
    alone = _wait_all(h, job, 60)
    account(row, h, alone, alone_since, expect_failure=True)
    starts = [e for e in h.journal() if e["event"] == "start" and e["job"] == job[0][0] and e["t"] >= alone_since]
    row.check(
        f"a device out of memory on one request alone: the job was sent again {retries} times, then failed typed",
        alone[0]["state"] == "FAILURE" and alone[0].get("error") == "DeviceFailed" and len(starts) == retries + 1,
        {"state": alone[0]["state"], "error": alone[0].get("error"), "runs started": len(starts)},
    )
    row.notes.append(
        {"halvings": len(halved), "limit raised": len(raised), "first halving": halved[0][-160:] if halved else None}
    )
    worker.stop()
    h.cluster.workers.remove(worker)
