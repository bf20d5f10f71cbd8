"""Row redis_restart: Redis restarted under a stream of jobs."""

from __future__ import annotations

import threading
import time

from ops.faults.harness import Harness, Row, _wait_all, account


def fault_redis_restart(h: Harness, row: Row) -> None:
    """SIGKILL, then SIGTERM, the Redis server under load; restart it on the same port and folder."""
    since = time.time()
    workers = [w for w in h.cluster.workers if w.alive() and w.model == "tiny"]
    if not workers:
        workers = [h.start_worker("tiny")]
    pids = sorted(w.pid for w in workers)
    sent: list[tuple[str, float]] = []
    refused = [0]
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                sent.append(h.send({"prompt": f"redis restart prompt {i}", "steps": 6, "seed": i}))
            except Exception:
                refused[0] += 1  # not accepted: the caller saw an error and knows to resend
            i += 1
            time.sleep(0.15)

    producer = threading.Thread(target=load, daemon=True)
    producer.start()
    events = []
    for hard, down_s in ((True, 3.0), (False, 2.0)):
        time.sleep(4)
        h.redis.stop(hard=hard)
        events.append(f"{'SIGKILL' if hard else 'SIGTERM'} redis, down {down_s:g}s")
        time.sleep(down_s)
        h.redis.proc = None
        h.redis.start()
    restarted_at = time.time()
    time.sleep(5)
    stop.set()
    producer.join()
    outcomes = _wait_all(h, sent, 120)
    account(row, h, outcomes, since)
    alive = sorted(w.pid for w in workers if w.alive())
    row.check("workers reconnected by themselves (same processes)", alive == pids, {"before": pids, "after": alive})
    late = {s[0] for s in sent if s[1] > restarted_at}
    done_late = sum(1 for o in outcomes if o["id"] in late and o["state"] == "SUCCESS")
    row.check(
        "jobs sent after the last restart completed", bool(late) and done_late == len(late), f"{done_late}/{len(late)}"
    )
    row.notes.append(
        f"{'; '.join(events)}; sends refused while Redis was down (not accepted, caller told): {refused[0]}"
    )
