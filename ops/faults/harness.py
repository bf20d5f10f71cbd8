"""What every fault row shares: a Redis of its own, worker and coordinator processes, sending jobs, and counting what users would see (sent, completed, failed, lost, duplicated, retried)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


@dataclass
class Row:
    fault: str
    sent: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    retried: int = 0
    max_latency_s: float = 0.0
    ok: bool = True
    checks: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def check(self, name: str, passed: bool, detail=None) -> bool:
        self.checks[name] = {"ok": bool(passed), **({"detail": detail} if detail is not None else {})}
        if not passed:
            self.ok = False
        return passed


class Harness:
    def __init__(self, workdir: str, quick: bool = False, visibility_s: int = 15):
        from ops.localcluster import LocalCluster

        self.workdir = Path(workdir)
        self.quick = quick
        from ops.localcluster import RedisServer

        # append-only with fsync on every write, and a password: the restart rows restart it in place
        self.redis = RedisServer(
            directory=str(self.workdir / "redis"), appendonly=True, password="faults-" + secrets.token_hex(8)
        ).start()
        url = self.redis.url
        self.env = {
            "REDIS_URL": url,
            "REPRISE_REDIS_URL": url,
            "HF_HUB_OFFLINE": "1",
            "REPRISE_VISIBILITY_TIMEOUT_S": str(visibility_s),
            "REPRISE_RESTORE_INTERVAL_S": "1",
            "REPRISE_HEARTBEAT_S": "2",
            "REPRISE_TORCH_THREADS": "1",
            "REPRISE_METRICS_PORT": "0",
            "REPRISE_SHARE_TENANTS": "studio",
            "REPRISE_CACHE_REOPEN_S": "2",
            "REPRISE_FAULT_JOURNAL": str(self.workdir / "journal.jsonl"),
            "REPRISE_FAULT_ARTIFACT_FULL_FILE": str(self.workdir / "artifacts-full.flag"),
        }
        os.environ.update(self.env)  # this process is a producer of the same cluster
        from scheduler.settings import get_settings

        get_settings.cache_clear()
        self.cluster = LocalCluster(workdir=str(self.workdir), redis_url=url, env=self.env)
        self.cluster.ensure_redis()
        self.coordinators: list[subprocess.Popen] = []

    # --- processes ------------------------------------------------------------------------------
    def start_worker(self, model: str = "tiny", devices: str = "cpu", wait: bool = True, **env):
        """A real `reprise worker`, run under the fault hooks (which do nothing unless REPRISE_FAULT_* asks),
        with a cache folder of its own unless ``env`` names one."""
        n = getattr(self.cluster, "_started", 0)  # the index start_worker gives it
        env.setdefault("REPRISE_CACHE_PATH", str(self.workdir / f"qdrant-w{n}"))
        return self.cluster.start_worker(model, devices, wait=wait, timeout=180, hooks=True, **env)

    def start_coordinator(self, name: str, **env) -> subprocess.Popen:
        from ops.localcluster import free_port

        env = {
            "REPRISE_COORDINATOR_LEASE_S": "1.5",
            "REPRISE_COORDINATOR_SWEEP_INTERVAL_S": "0.5",
            "REPRISE_COORDINATOR_METRICS_PORT": str(free_port()),
            **env,
        }
        log = open(self.workdir / f"coordinator-{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.faults", "--with-hooks", "coordinator", "run"],
            env=self.cluster.process_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.metrics_port = int(env["REPRISE_COORDINATOR_METRICS_PORT"])
        self.coordinators.append(proc)
        return proc

    def close(self) -> None:
        for p in self.coordinators:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.cluster.own_redis = None
        self.cluster.stop()
        self.redis.stop()

    # --- jobs -----------------------------------------------------------------------------------
    def send(self, payload: dict | None = None, args: list | None = None, model: str = "tiny"):
        """send_task as another service would; returns (task id, accepted at) or raises if not accepted."""
        from scheduler.app import GENERATE_TASK, get_app

        ar = get_app().send_task(
            GENERATE_TASK,
            kwargs=payload,
            args=args,
            queue=f"reprise.{model}",
            headers={"reprise_queued_at": time.time()},
        )
        return ar.id, time.time()

    def outcome(self, task_id: str, sent_at: float, timeout: float) -> dict:
        """Wait for one job through the client's own wait (which rides out Redis restarts)."""
        from celery.result import AsyncResult

        from scheduler.app import get_app
        from scheduler.client import Job
        from scheduler.errors import RepriseError
        from scheduler.schema import GenerationRequest

        job = Job(AsyncResult(task_id, app=get_app()), GenerationRequest(prompt="(fault suite)"))
        out = {"id": task_id}
        try:
            result = job.wait(timeout)
            out.update(state="SUCCESS", result=result.model_dump(mode="json"))
        except RepriseError as exc:
            out.update(
                state="FAILURE" if exc.code != "timeout" else "LOST", error=type(exc).__name__, message=str(exc)[:200]
            )
        try:
            meta = get_app().backend.get_task_meta(task_id)
            done = meta.get("date_done")
            if done:
                done = datetime.fromisoformat(done) if isinstance(done, str) else done
                if done.tzinfo is None:
                    done = done.replace(tzinfo=timezone.utc)
                out["latency_s"] = round(done.timestamp() - sent_at, 3)
        except Exception:
            pass
        return out

    def journal(self) -> list[dict]:
        path = self.workdir / "journal.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def account(row: Row, harness: Harness, outcomes: list[dict], since: float, expect_failure: bool = False) -> None:
    """Fill the row's counters from the outcomes and the journal (executions since `since`)."""
    from PIL import Image

    ids = {o["id"] for o in outcomes}
    runs: dict[str, list[dict]] = {}
    starts: dict[str, int] = {}
    for e in harness.journal():
        if e.get("t", 0) < since or e.get("job") not in ids:
            continue
        if e["event"] == "start":
            starts[e["job"]] = starts.get(e["job"], 0) + 1
        elif e["event"] == "done":
            runs.setdefault(e["job"], []).append(e)
    row.sent += len(outcomes)
    bad_images = []
    for o in outcomes:
        if o["state"] == "SUCCESS":
            row.completed += 1
        elif o["state"] == "FAILURE":
            row.failed += 1
        else:
            row.lost += 1
        row.max_latency_s = max(row.max_latency_s, o.get("latency_s") or 0.0)
        shas = {
            r["sha"] for r in runs.get(o["id"], []) if r.get("hit") != "exact" or r["uri"].endswith(o["id"] + ".png")
        }
        duplicate = len(shas) > 1
        if o["state"] == "SUCCESS":
            uri = o["result"]["image_uri"].removeprefix("file://")
            try:
                with Image.open(uri) as img:
                    img.load()
                    meta = json.loads(img.text["reprise"])
                if meta["seed"] != o["result"]["seed"]:
                    bad_images.append((o["id"], "seed differs from the stored image's"))
                if shas and _sha(uri) not in {r["sha"] for r in runs.get(o["id"], [])}:
                    duplicate = True  # the result names an image other than any this job computed
            except Exception as exc:
                bad_images.append((o["id"], f"{type(exc).__name__}: {exc}"))
                duplicate = True
        row.duplicated += int(duplicate)
        row.retried += int(starts.get(o["id"], 0) > 1)
    lost = [o["id"] for o in outcomes if o["state"] not in ("SUCCESS", "FAILURE")]
    if lost:  # where did they go? A job no worker ever logged as received was lost in the broker transport
        logs = "".join(p.read_text(errors="replace") for p in harness.workdir.glob("worker*.log"))
        row.notes.append({"lost": [{"id": i, "received_by_a_worker": f"[{i}] received" in logs} for i in lost[:10]]})
    row.check("no lost jobs", row.lost == 0, row.lost or None)
    row.check("no duplicated results", row.duplicated == 0, row.duplicated or None)
    row.check("every served image is whole and its own", not bad_images, bad_images[:5] or None)
    if not expect_failure:
        row.check("every accepted job completed", row.completed == row.sent, f"{row.completed}/{row.sent}")


def _wait_all(harness: Harness, sent: list[tuple[str, float]], timeout: float) -> list[dict]:
    # One at a time: Celery's Redis result consumer is not thread-safe. The latency comes from date_done.
    deadline = time.monotonic() + timeout
    return [harness.outcome(task_id, at, max(1.0, deadline - time.monotonic())) for task_id, at in sent]


def _artifacts(harness: Harness) -> Path:
    return harness.workdir / "artifacts"


# =============================================================================================
# The faults.
# =============================================================================================


def _qmodel(h: Harness) -> str:
    from workers.model_loading import save_builtin

    path = h.workdir / "qmodel"
    if not path.exists():
        save_builtin("tiny", path, seed=0)
    return str(path)


def _run_jobs(h: Harness, payloads: list[dict], model: str, timeout: float = 60) -> list[dict]:
    sent = [h.send(p, model=model) for p in payloads]
    return _wait_all(h, sent, timeout)


def _service_s(o: dict) -> float:
    """Seconds the job spent in the worker (its queue wait excluded)."""
    t = o["result"]["timings"]
    return round(t["total_s"] - t["queue_wait_s"], 3)


def _hits(outcomes: list[dict]) -> list[str]:
    return [o["result"]["cache"]["hit"] if o["state"] == "SUCCESS" else o["state"] for o in outcomes]


def _log_lines(worker, pattern: str) -> list[str]:
    return [line for line in worker.log.read_text(errors="replace").splitlines() if re.search(pattern, line)]
