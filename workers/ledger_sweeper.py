"""The ledger sweeper: every node sends again an accepted job that no queue, worker or result holds any more."""

from __future__ import annotations

import logging
import os
import threading
import time

from scheduler.settings import ClusterSettings

log = logging.getLogger("reprise.worker")


class LedgerSweeper(threading.Thread):
    """Sends again an accepted job that no queue, no worker and no result holds any more.

    The one way that happens: a worker SIGKILLed just after Redis' BRPOP handed it the message and
    before kombu recorded it as unacknowledged (scheduler/app.py, ledger_key). A job is only suspected
    once it is older than the visibility timeout, so a job still queued, running or being restored is
    never touched. Every node runs one; a Redis lock lets one sweep at a time."""

    def __init__(self, r, cluster: ClusterSettings):
        super().__init__(name="reprise-ledger-sweeper", daemon=True)
        self.r, self.cluster = r, cluster
        self.every_s = max(2.0, min(60.0, cluster.visibility_timeout_s / 3))
        self.grace_s = cluster.visibility_timeout_s + 3 * cluster.restore_interval_s + 5
        self.stopped = threading.Event()
        self.resent = 0

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                if self.r.set(
                    f"{self.cluster.queue_prefix}:ledger:sweeping", os.getpid(), nx=True, px=int(self.every_s * 1000)
                ):
                    self.sweep()
            except Exception as exc:  # Redis restarting: next round
                log.warning("ledger sweep failed: %s", exc)

    def sweep(self) -> int:
        import json

        from scheduler.app import GENERATE_TASK, get_app, ledger_key

        key = ledger_key(self.cluster.queue_prefix)
        now = time.time()
        suspects = {}
        for job_id, raw in self.r.hgetall(key).items():
            entry = json.loads(raw)
            if now - float(entry.get("at", now)) > self.grace_s:
                suspects[job_id.decode()] = entry
        if not suspects:
            return 0
        held = b"".join(self.r.hvals("unacked"))  # kombu's unacknowledged messages
        resent = 0
        for job_id, entry in suspects.items():
            meta = self.r.get(f"celery-task-meta-{job_id}")
            if meta and json.loads(meta).get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
                self.r.hdel(key, job_id)
                continue
            queue = entry.get("queue") or ""
            queued = b"".join(
                b"".join(self.r.lrange(q, 0, -1)) for q in [queue] + [f"{queue}:{p}" for p in range(1, 10)]
            )
            if (
                job_id.encode() in held
                or job_id.encode() in queued
                or job_id.encode() in b"".join(self.r.hvals("unacked"))
            ):
                continue
            log.warning("job %s was accepted but no queue, worker or result holds it: sending it again", job_id)
            get_app().send_task(
                GENERATE_TASK,
                args=entry.get("args") or None,
                kwargs=entry.get("kwargs") or None,
                task_id=job_id,
                queue=queue or None,
                headers={"reprise_queued_at": entry.get("queued_at")},
            )
            self.r.hincrby(f"{self.cluster.queue_prefix}:ledger:resent", "jobs", 1)
            resent += 1
        self.resent += resent
        return resent
