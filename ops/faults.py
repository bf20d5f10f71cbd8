"""The fault suite: inject each fault for real and count what users would see.

    python -m ops.faults --json faults.json            # everything (make faults), a few minutes
    python -m ops.faults --only worker_kill,redis_restart --quick

Everything is real: a password-protected redis-server of its own (append-only, on a spare port),
worker processes (`reprise worker`), coordinator processes. Faults that need a precise moment inside a
process (SIGKILL during decode, a slow Qdrant, a full disk, a skewed clock) are injected by running the
real command under `python -m ops.faults --with-hooks <reprise args>`, which patches the named points
from REPRISE_FAULT_* variables before handing over to `ops.cli`:

- REPRISE_FAULT_KILL_AT=load|denoise|decode|artifact|writeback, REPRISE_FAULT_KILL_ON=N: SIGKILL itself
  at that point of its N-th job (artifact: after half the PNG bytes reached the temporary file;
  writeback: right after the cache insert). A denoise death journals the engine's record of the call in
  flight (the job ids of every request batched in it).
- REPRISE_FAULT_STALL_ON=N: the N-th denoiser call of the process never returns (a hung kernel): the
  engine's watchdog must find it (REPRISE_DEVICE_STALL_S).
- REPRISE_FAULT_CACHE_DELAY_MS (while REPRISE_FAULT_CACHE_DELAY_FILE exists): every cache lookup sleeps first.
- REPRISE_FAULT_ARTIFACT_FULL_FILE: while it exists, artifact writes fail with ENOSPC.
- REPRISE_FAULT_CLOCK_SKEW_S: every local clock of the process is off by this much: the wall clock
  (time.time, time.time_ns) and the monotonic clock (time.monotonic, time.monotonic_ns), the one the
  cache clock (RedisClock) and the coordinator's pacing read. With REPRISE_FAULT_CLOCK_SKEW_FILE the
  wall clock steps by that much while the file exists (an NTP step, a resumed VM) and the monotonic
  clock is left alone (it never steps).
- REPRISE_FAULT_CLOCK_NAIVE=1: the broken implementation the clock_skew checks must catch: coordinator
  leases kept on each node's wall clock (LocalClockLease) and the cache clock = the node's wall clock.
- REPRISE_FAULT_JOURNAL: one JSON line per job start and end (pid, seed, sha256 of the image).

Counting, per fault: sent (send_task returned: "accepted"), completed (SUCCESS), failed (a typed
error, where that is the expected answer), lost (accepted, and neither within the deadline),
duplicated (one job id whose executions stored two different images, or whose result names an image
that differs from what it computed, or whose image is unreadable), retried (job ids that started more
than once), max latency (accepted → result stored).
"""

from __future__ import annotations

import argparse
import errno
import glob
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

PHASES = ("load", "denoise", "decode", "artifact", "writeback")


# =============================================================================================
# Inside a worker or coordinator process: the injection points.
# =============================================================================================


def _die(phase: str, **facts) -> None:
    _journal({"event": "killed", "phase": phase, **facts})
    os.kill(os.getpid(), signal.SIGKILL)


def _engine_call(service, job_id: str) -> dict:
    """The engine's own record of the denoiser call that stepped ``job_id`` last (the one in flight when
    called from its progress report, on the device thread): the job ids of every request in it, and the
    device's counters so far."""
    for name, stats in service.engine.stats().items():
        if job_id in stats.last_call:
            return {
                "device": name,
                "jobs": list(stats.last_call),
                "calls": stats.calls,
                "requests_stepped": stats.requests_stepped,
            }
    return {"jobs": []}


def _journal(row: dict) -> None:
    path = os.environ.get("REPRISE_FAULT_JOURNAL")
    if path:
        row = {"pid": os.getpid(), "t": time.time(), **row}
        with open(path, "a") as f:  # O_APPEND: concurrent processes' lines never interleave
            f.write(json.dumps(row) + "\n")


def install_hooks(worker: bool = True) -> None:
    env = os.environ
    skew = float(env.get("REPRISE_FAULT_CLOCK_SKEW_S") or 0)
    if skew:
        skew_clocks(skew, env.get("REPRISE_FAULT_CLOCK_SKEW_FILE"))
    if env.get("REPRISE_FAULT_CLOCK_NAIVE"):
        from scheduler import coordinator

        coordinator.Lease = LocalClockLease
    if not worker:
        return
    if env.get("REPRISE_FAULT_CLOCK_NAIVE"):
        from workers import node

        node.RedisClock = lambda *args, **kwargs: lambda: time.time()  # the cache reads the node's wall clock

    from workers import service as service_mod
    from workers.artifacts import ArtifactStore
    from workers.sampler import DenoiseLoop

    kill_at = env.get("REPRISE_FAULT_KILL_AT", "")
    kill_on = int(env.get("REPRISE_FAULT_KILL_ON") or 1)
    seen: dict[str, int] = {}

    def due(phase: str) -> bool:
        if phase != kill_at:
            return False
        seen[phase] = seen.get(phase, 0) + 1
        return seen[phase] == kill_on

    run = service_mod.GenerationService.run

    def journaled_run(self, payload, job):
        _journal({"event": "start", "job": job.job_id})
        result = run(self, payload, job)
        data = (
            Path(result.image_uri.removeprefix("file://")).read_bytes()
            if result.image_uri.startswith("file://")
            else b""
        )
        _journal(
            {
                "event": "done",
                "job": job.job_id,
                "seed": result.seed,
                "hit": result.cache.hit,
                "sha": hashlib.sha256(data).hexdigest(),
                "uri": result.image_uri,
            }
        )
        return result

    service_mod.GenerationService.run = journaled_run

    lookup = service_mod.GenerationService.lookup

    def lookup_hooked(self, *args, **kwargs):
        if due("load"):
            _die("load")
        return lookup(self, *args, **kwargs)

    service_mod.GenerationService.lookup = lookup_hooked

    on_device = service_mod.GenerationService.on_device

    from workers import engine as engine_mod

    doomed: dict[str, object] = {}  # job id -> its service: it dies inside a call at half its steps
    stall_on = int(env.get("REPRISE_FAULT_STALL_ON") or 0)
    calls = [0]

    def on_device_hooked(self, admitted, *args, **kwargs):
        if kill_at == "denoise" and due("denoise"):
            doomed[admitted.job.job_id] = self
        return on_device(self, admitted, *args, **kwargs)

    service_mod.GenerationService.on_device = on_device_hooked

    device_call = engine_mod.DeviceScheduler._call

    def call_hooked(self, group):
        """On the device thread, inside the denoiser call (DeviceStats.last_call names its jobs)."""
        for r in group:
            if r.job_id in doomed and r.trajectory.i >= max(1, r.trajectory.steps // 2):
                _die("denoise", in_call=_engine_call(doomed[r.job_id], r.job_id))
        calls[0] += 1
        if stall_on and calls[0] == stall_on:  # a hung kernel: this call never returns
            _journal({"event": "stalled", "jobs": [r.job_id for r in group]})
            threading.Event().wait()
        return device_call(self, group)

    engine_mod.DeviceScheduler._call = call_hooked

    decode = DenoiseLoop.decode

    def decode_hooked(self, *args, **kwargs):
        if due("decode"):
            _die("decode")
        return decode(self, *args, **kwargs)

    DenoiseLoop.decode = decode_hooked

    write_bytes = ArtifactStore._write_bytes
    full_flag = env.get("REPRISE_FAULT_ARTIFACT_FULL_FILE")

    def write_bytes_hooked(self, data, path):
        if due("artifact"):  # the temporary file gets half the bytes, then the process dies
            tmp = f"{path}.{uuid.uuid4().hex}.part"
            self.fs.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                _die("artifact")
        if full_flag and os.path.exists(full_flag):
            fs = self.fs

            class FullFS:  # every write answers what a full disk answers
                def __getattr__(self, name):
                    return getattr(fs, name)

                def open(self, p, mode="rb", **kw):
                    if "w" in mode:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), p)
                    return fs.open(p, mode, **kw)

            self.fs = FullFS()
            try:
                return write_bytes(self, data, path)
            finally:
                self.fs = fs
        return write_bytes(self, data, path)

    ArtifactStore._write_bytes = write_bytes_hooked

    from cache import latent_cache

    write_back = latent_cache.LatentCache._write_back

    def write_back_hooked(self, key, vector, states, image_uri, shareable):
        if kill_at == "writeback" and due("writeback"):
            entry_id, prompt_vector, slot_rows, payload = self.build_entry(key, vector, states, image_uri, shareable)
            self.store.insert(entry_id, prompt_vector, slot_rows, payload)
            _die("writeback")
        return write_back(self, key, vector, states, image_uri, shareable)

    latent_cache.LatentCache._write_back = write_back_hooked

    delay_ms = float(env.get("REPRISE_FAULT_CACHE_DELAY_MS") or 0)
    delay_flag = env.get("REPRISE_FAULT_CACHE_DELAY_FILE")
    if delay_ms:
        for name in ("_lookup_exact", "_lookup_approx"):
            original = getattr(latent_cache.LatentCache, name)

            def slow(self, *args, _original=original, **kwargs):
                if not delay_flag or os.path.exists(delay_flag):
                    time.sleep(delay_ms / 1000)
                return _original(self, *args, **kwargs)

            setattr(latent_cache.LatentCache, name, slow)


def skew_clocks(skew_s: float, wall_flag: str | None = None) -> None:
    """Put this process's clocks ``skew_s`` seconds off (see the module docstring). Modules that later call
    time.time()/time.monotonic() read the skewed clocks; so do ``from time import ...`` names bound after this."""
    real_time, real_time_ns = time.time, time.time_ns
    real_mono, real_mono_ns = time.monotonic, time.monotonic_ns
    if wall_flag:

        def wall_skew() -> float:
            return skew_s if os.path.exists(wall_flag) else 0.0

        time.time = lambda: real_time() + wall_skew()
        time.time_ns = lambda: real_time_ns() + int(wall_skew() * 1e9)
        return
    time.time = lambda: real_time() + skew_s
    time.time_ns = lambda: real_time_ns() + int(skew_s * 1e9)
    time.monotonic = lambda: real_mono() + skew_s
    time.monotonic_ns = lambda: real_mono_ns() + int(skew_s * 1e9)


class LocalClockLease:
    """What not to do, for the clock_skew checks to catch: a lease whose expiry is a wall-clock time stored in
    Redis. The holder trusts its own clock until then and renews with a blind write; the others take the lease
    once the stored expiry is past by their own clocks."""

    def __init__(self, r, prefix: str, member: str, lease_s: float):
        self.r, self.member, self.lease_s = r, member, lease_s
        self.key = f"{prefix}:coordinator:leader"
        self.token_key = f"{prefix}:coordinator:token"
        self.token: int | None = None
        self.until = 0.0

    def hold(self) -> bool:
        now = time.time()
        if self.token is not None and now < self.until - self.lease_s / 2:
            return True  # still mine, by my clock
        if self.token is None:
            raw = self.r.get(self.key)
            if raw is not None and float(raw.decode().rsplit("|", 1)[1]) > now:
                return False
            self.token = int(self.r.incr(self.token_key))
        self.until = now + self.lease_s
        self.r.set(self.key, f"{self.member}|{self.token}|{self.until}", px=60_000)  # px: leaves no debris
        return True

    def release(self) -> None:
        self.token = None


def run_with_hooks(argv: list[str]) -> int:
    install_hooks(worker=argv[:1] == ["worker"])
    from ops.cli import main as cli_main

    return cli_main(argv)


# =============================================================================================
# The harness.
# =============================================================================================


@dataclass
class SecretRedis:
    """redis-server with append-only persistence and a password, restartable on the same port and folder."""

    directory: str
    port: int = 0
    password: str = field(default_factory=lambda: "faults-" + secrets.token_hex(8))
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> "SecretRedis":
        from ops.localcluster import _wait, free_port, redis_reachable

        self.port = self.port or free_port()
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.directory,
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--requirepass",
                self.password,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(lambda: redis_reachable(self.url, 0.2), 20, f"redis-server on port {self.port}")
        return self

    def stop(self, hard: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            self.proc.wait(20)


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
        self.redis = SecretRedis(str(self.workdir / "redis")).start()
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
        """A real `reprise worker`, run under the fault hooks (which do nothing unless REPRISE_FAULT_* asks)."""
        from ops.localcluster import WorkerProcess

        c = self.cluster
        c._started = getattr(c, "_started", 0) + 1
        n = c._started - 1
        hostname = f"reprise-{Path(model).name}-w{n}-{os.getpid()}@faults"
        log = self.workdir / f"worker{n}.log"
        env.setdefault("REPRISE_CACHE_PATH", str(self.workdir / f"qdrant-w{n}"))
        cmd = [
            sys.executable,
            "-m",
            "ops.faults",
            "--with-hooks",
            "worker",
            "--model",
            model,
            "--devices",
            devices,
            "--hostname",
            hostname,
        ]
        proc = subprocess.Popen(
            cmd, env=c.process_env(**env), stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        worker = WorkerProcess(proc, log, model, hostname)
        worker.env = env
        c.workers.append(worker)
        if wait:
            c.wait_worker_ready(worker, 180)
        return worker

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


def fault_worker_kill(h: Harness, row: Row) -> None:
    """SIGKILL workers at each named point of a job (and at random moments), repeatedly, under load."""
    since = time.time()
    base = h.start_worker("tiny", REPRISE_CACHE_PATH=str(h.workdir / "qdrant-kill-a"))
    plan = list(PHASES) if not h.quick else ["denoise", "artifact"]
    rng = random.Random(8)
    folders = [str(h.workdir / "qdrant-kill-b")]
    victim = h.start_worker(
        "tiny", REPRISE_CACHE_PATH=folders[0], REPRISE_FAULT_KILL_AT=plan[0], REPRISE_FAULT_KILL_ON="2"
    )
    sent: list[tuple[str, float]] = []
    stop = threading.Event()
    kills: list[str] = []

    def load() -> None:
        i = 0
        while not stop.is_set():
            prompt = f"kill test prompt {i % 7}"  # repeats: exact and approximate hits and write-backs happen
            payload = {"prompt": prompt, "steps": 8}
            if i % 2:
                payload["seed"] = i  # the other half rely on the seed the worker derives from the job id
            try:
                sent.append(h.send(payload))
            except Exception as exc:
                row.notes.append(f"send refused: {exc}")
            i += 1
            time.sleep(0.25)

    producer = threading.Thread(target=load, daemon=True)
    producer.start()
    for phase in plan:
        # wait for the planned death, then restart the node on the same cache folder with the next point
        deadline = time.monotonic() + 60
        while victim.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if victim.alive():
            victim.kill()
            kills.append(f"{phase}:timer")
        else:
            kills.append(phase)
        h.cluster.workers.remove(victim)
        nxt = plan[plan.index(phase) + 1] if plan.index(phase) + 1 < len(plan) else None
        env = {"REPRISE_CACHE_PATH": folders[0]}
        if nxt:
            env.update(REPRISE_FAULT_KILL_AT=nxt, REPRISE_FAULT_KILL_ON=str(rng.randint(1, 3)))
        victim = h.start_worker("tiny", wait=False, **env)
        if not nxt:
            break
    # and one kill at a random moment of the steady worker, restarted at once
    time.sleep(rng.uniform(0.5, 2.0))
    base.kill()
    kills.append("random-moment")
    h.cluster.workers.remove(base)
    base = h.start_worker("tiny", wait=False, REPRISE_CACHE_PATH=str(h.workdir / "qdrant-kill-a"))
    time.sleep(3)
    stop.set()
    producer.join()
    h.cluster.wait_worker_ready(victim, 180)
    h.cluster.wait_worker_ready(base, 180)
    outcomes = _wait_all(h, sent, 150)
    account(row, h, outcomes, since)
    import redis

    from scheduler.app import ledger_key
    from scheduler.settings import get_settings

    resent_key = ledger_key(get_settings().queue_prefix) + ":resent"
    resent = int(redis.Redis.from_url(h.redis.url).hget(resent_key, "jobs") or 0)
    row.notes.append(
        f"jobs lost by the broker transport (popped by a worker killed before it recorded them) and "
        f"sent again from the ledger: {resent}"
    )
    deaths = [e["phase"] for e in h.journal() if e["event"] == "killed" and e["t"] >= since]
    row.check("each planned point killed a worker", set(plan) <= set(deaths), {"kills": kills, "deaths": deaths})
    parts = glob.glob(str(_artifacts(h) / "**" / "*.part"), recursive=True)
    row.notes.append(
        f"kills: {kills}; temporary .part files left by a death mid-write and not yet cleaned: {len(parts)} (never served)"
    )
    h.kill_workers = [base, victim]


def fault_batch_kill(h: Harness, row: Row) -> None:
    """SIGKILL a worker in the middle of a denoiser call that several requests share: every request of that
    batch comes back (visibility timeout), is computed again on another node and answered once, with one
    image each."""
    from workers.models import save_builtin
    from workers.service import seed_for_job

    since = time.time()
    model = str(save_builtin("tiny", h.workdir / "bmodel", seed=0))  # a queue of its own: only the victim takes it
    folder = str(h.workdir / "qdrant-batch")
    n = 4 if h.quick else 6
    victim = h.start_worker(
        model, REPRISE_CACHE_PATH=folder, REPRISE_FAULT_KILL_AT="denoise", REPRISE_FAULT_KILL_ON="1"
    )
    payloads = [{"prompt": f"a batch killed mid-call {i}", "steps": 24, "model": "bmodel"} for i in range(n)]
    for i, p in enumerate(payloads):
        if i % 2:
            p["seed"] = 1000 + i  # the others rely on the seed the worker derives from the job id
    sent = [h.send(p, model="bmodel") for p in payloads]  # at once: they join the engine together
    deadline = time.monotonic() + 90
    while victim.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    row.check("the worker died by SIGKILL", victim.proc.poll() == -signal.SIGKILL, victim.proc.poll())
    h.cluster.workers.remove(victim)
    killed_at = time.time()
    deaths = [e for e in h.journal() if e["event"] == "killed" and e["t"] >= since and e["pid"] == victim.pid]
    in_call = deaths[0].get("in_call", {}).get("jobs", []) if deaths else []
    ids = [task_id for task_id, _ in sent]
    row.check(
        "the engine had a batch of 2 or more in flight at the kill (its own record of the call)",
        len(in_call) >= 2 and set(in_call) <= set(ids),
        deaths[0] if deaths else "no death journaled",
    )
    rescuer = h.start_worker(model, REPRISE_CACHE_PATH=folder)  # the same cache folder, as a restarted node
    outcomes = _wait_all(h, sent, 120)
    account(row, h, outcomes, since)
    by_id = {o["id"]: o for o in outcomes}
    journal = [e for e in h.journal() if e.get("t", 0) >= since]
    art = _artifacts(h) / "public"
    each = {}
    for job_id in in_call:
        o = by_id[job_id]
        starts = [e for e in journal if e["event"] == "start" and e["job"] == job_id]
        dones = [e for e in journal if e["event"] == "done" and e["job"] == job_id]
        files = sorted(p.name for p in art.glob(f"{job_id}*"))
        payload = payloads[ids.index(job_id)]
        each[job_id] = {
            "state": o["state"],
            "runs started": len(starts),
            "runs done": len(dones),
            "files": files,
            "answered after the kill": bool(dones) and min(e["t"] for e in dones) > killed_at,
            "seed kept": o["state"] == "SUCCESS" and o["result"]["seed"] == payload.get("seed", seed_for_job(job_id)),
        }
    row.check(
        "every request of the killed batch was redelivered and answered once, with one image",
        bool(each)
        and all(
            v["state"] == "SUCCESS"
            and v["runs started"] >= 2
            and v["runs done"] == 1
            and v["answered after the kill"]
            and v["seed kept"]
            and v["files"] == [f"{k}.png"]
            for k, v in each.items()
        ),
        each,
    )
    row.notes.append({"engine at the kill": deaths[0] if deaths else None, "rescuer": rescuer.hostname})
    rescuer.stop()
    h.cluster.workers.remove(rescuer)


def _log_lines(worker, pattern: str) -> list[str]:
    return [line for line in worker.log.read_text(errors="replace").splitlines() if re.search(pattern, line)]


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


POISON_PROMPT = "a poisoned request (fault suite)"


def fault_poison_request(h: Harness, row: Row) -> None:
    """One request whose denoiser call raises (the `sim` device rejects the conditioning of
    REPRISE_SIM_POISON_PROMPT, as a kernel rejecting one request's inputs would) inside a batch: the engine
    runs the batch again in halves, so it alone fails, typed (DenoiserFailed, final: not retried), and its
    batch-mates complete once; on a node of one device and one of two."""
    n = 6 if h.quick else 10
    for devices in ("sim:0", "sim:0,sim:1"):  # one device and two
        since = time.time()
        worker = h.start_worker("sim", devices, REPRISE_SIM_POISON_PROMPT=POISON_PROMPT, REPRISE_CACHE_ENABLED="false")
        payloads = [{"prompt": f"a batch-mate of the poison {devices} {i}", "steps": 20, "seed": i} for i in range(n)]
        payloads.insert(n // 2, {"prompt": POISON_PROMPT, "steps": 20, "seed": 7})
        sent = [h.send(p, model="sim") for p in payloads]  # at once: they share calls
        outcomes = _wait_all(h, sent, 120)
        retried_before = row.retried
        account(row, h, outcomes, since, expect_failure=True)
        poison_id = sent[n // 2][0]
        poison = outcomes[n // 2]
        others = [o for o in outcomes if o["id"] != poison_id]
        row.check(
            f"{devices}: the poison request alone failed, typed (DenoiserFailed)",
            poison["state"] == "FAILURE" and poison.get("error") == "DenoiserFailed",
            {k: poison.get(k) for k in ("state", "error", "message")},
        )
        done = sum(o["state"] == "SUCCESS" for o in others)
        row.check(f"{devices}: every other request completed", done == len(others), f"{done}/{len(others)}")
        row.check(
            f"{devices}: nothing ran twice (the poison's failure is final, not retried)",
            row.retried == retried_before,
            row.retried,
        )
        split = [line for line in _log_lines(worker, r"running its \d+ requests again in halves") if poison_id in line]
        row.check(f"{devices}: the poison failed inside a batch first (the engine's log)", bool(split), len(split))
        row.notes.append({devices: split[0][-200:] if split else None})
        worker.stop()
        h.cluster.workers.remove(worker)


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


def _qmodel(h: Harness) -> str:
    from workers.models import save_builtin

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


def fault_artifacts(h: Harness, row: Row) -> None:
    """Artifact store full (ENOSPC) or impossible (a path under a regular file): typed ArtifactWriteError, never done."""
    since = time.time()
    model = _qmodel(h)
    flag = h.workdir / "artifacts-full.flag"
    # A node whose artifact root lies under a regular file (also what a read-only mount answers: an OSError).
    blocker = h.workdir / "not-a-directory"
    blocker.write_text("a file, not a directory")
    steady = getattr(h, "q_worker", None)
    if steady is None or not steady.alive():  # every hooked node of this model fills its disk while the flag exists
        steady = h.q_worker = h.start_worker(model, wait=False, REPRISE_CACHE_PATH=str(h.workdir / "qdrant-q"))
    bad = h.start_worker(
        model, REPRISE_ARTIFACT_URL=str(blocker / "artifacts"), REPRISE_CACHE_PATH=str(h.workdir / "qdrant-art")
    )
    h.cluster.wait_worker_ready(steady, 180)
    flag.write_text("full")
    outcomes = _run_jobs(
        h, [{"prompt": f"unwritable {i}", "steps": 4, "seed": i, "model": "qmodel"} for i in range(4)], "qmodel"
    )
    bad.stop()
    h.cluster.workers.remove(bad)
    full = _run_jobs(
        h, [{"prompt": f"disk full {i}", "steps": 4, "seed": i, "model": "qmodel"} for i in range(2)], "qmodel"
    )
    flag.unlink()
    after = _run_jobs(h, [{"prompt": "disk has room again", "steps": 4, "seed": 1, "model": "qmodel"}], "qmodel")
    account(row, h, outcomes + full, since, expect_failure=True)
    errors = {o.get("error") for o in outcomes + full}
    row.check("every job failed with ArtifactWriteError", errors == {"ArtifactWriteError"}, sorted(map(str, errors)))
    from scheduler.app import get_app

    states = {get_app().AsyncResult(o["id"]).state for o in outcomes + full}
    row.check("none reported as done", states == {"FAILURE"}, sorted(states))
    row.check("the node serves again once the disk has room", after[0]["state"] == "SUCCESS", after[0]["state"])
    causes = sorted(
        {m.group(0) for o in outcomes + full for m in [re.search(r"\[Errno \d+\] [^:']+", o.get("message", ""))] if m}
    )
    row.notes.append(f"causes seen: {causes}")


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
    from workers.models import save_builtin

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


def fuzz_strategies():
    from hypothesis import strategies as st

    weird_text = st.one_of(
        st.text(max_size=20),
        st.sampled_from(
            [
                "",
                " ",
                "\x00",
                "a\x00b",
                "\u202e\u202dRTL",
                "\ud800",
                "\udfff",
                "e\u0301" * 50,
                "🧨" * 600,
                "\uffff",
                "\n\t\r",
                "x" * 2001,
                "x" * 100_000,
                "NaN",
                "null",
                "{}",
                "DROP TABLE",
            ]
        ),
    )
    numbers = st.one_of(
        st.integers(-(2**70), 2**70),
        st.sampled_from([0, -1, 1, 7, 8, 63, 64, 2**32, 2**31 - 1, 2**64, -(2**63)]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([float("nan"), float("inf"), -0.0, 1e308]),
    )
    scalars = st.one_of(st.none(), st.booleans(), numbers, weird_text)
    junk = st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=4,
    )
    field_values = {
        "prompt": st.one_of(weird_text, junk),
        "negative_prompt": st.one_of(weird_text, junk),
        "seed": st.one_of(numbers, junk),
        "steps": st.one_of(numbers, junk),
        "guidance_scale": st.one_of(numbers, junk),
        "width": st.one_of(numbers, junk),
        "height": st.one_of(numbers, junk),
        "scheduler": st.one_of(st.sampled_from(["ddim", "euler", "dpmpp_2m", "DDIM", "lms", ""]), junk),
        "model": st.one_of(
            st.sampled_from(["tiny", "sd15", "../etc/passwd", "tiny\x00", "t" * 65, "", "qmodel"]), junk
        ),
        "priority": st.one_of(numbers, junk),
        "tenant": st.one_of(st.sampled_from(["public", "../root", "a b", "studio", "*"]), junk),
        "schema_version": st.one_of(st.sampled_from(["1.0", "2.0", ""]), junk),
        "cache": st.one_of(
            junk,
            st.fixed_dictionaries(
                {},
                optional={
                    "exact": junk,
                    "approximate": st.booleans(),
                    "share": st.one_of(st.booleans(), junk),
                    "isolate_timing": junk,
                    "feature": st.one_of(
                        junk,
                        st.fixed_dictionaries(
                            {}, optional={"method": junk, "deepcache_interval": numbers, "block_delta": numbers}
                        ),
                    ),
                },
            ),
        ),
    }
    valid_prompt = st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=60
    ).filter(str.strip)
    optional = {k: v for k, v in field_values.items() if k != "prompt"}
    near_valid = st.fixed_dictionaries(
        {"prompt": st.one_of(valid_prompt, valid_prompt, field_values["prompt"])},
        optional={**optional, "junk_field": junk},
    )
    return st.one_of(
        near_valid, st.dictionaries(st.sampled_from(sorted(field_values) + ["junk"]), junk, max_size=6), junk
    )


def fuzz_in_process(n: int, keep: int = 0, seed: int = 0) -> dict:
    """n hypothesis cases through the worker's own validation: each is accepted or an InvalidRequest; nothing else."""
    from types import SimpleNamespace

    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    from scheduler.errors import InvalidRequest
    from workers.families import SD15
    from workers.models import ModelSpec
    from workers.service import Device, DevicePool, GenerationService

    # validation needs only the served name, the size limits and defaults, and the family: the tiny model's
    spec = ModelSpec(
        "tiny", default_size=64, max_size=512, default_steps=25, default_guidance=5.0, default_scheduler="ddim"
    )
    components = SimpleNamespace(spec=spec, vae_scale_factor=8, size_multiple=8, family=SD15)
    service = GenerationService("tiny", DevicePool([Device("cpu", SimpleNamespace(c=components))]), artifacts=None)
    counts = {"cases": 0, "accepted": 0, "typed_errors": 0, "crashes": 0, "crash_examples": []}
    kept: list = []
    rng = random.Random(seed)

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck))
    @given(fuzz_strategies())
    def case(payload):
        counts["cases"] += 1
        if len(kept) < keep:  # a uniform sample of the cases, to replay through the broker
            kept.append(payload)
        elif keep and (j := rng.randrange(counts["cases"])) < keep:
            kept[j] = payload
        try:
            service.validate(payload)
            counts["accepted"] += 1
        except InvalidRequest:
            counts["typed_errors"] += 1
        except Exception as exc:
            counts["crashes"] += 1
            if len(counts["crash_examples"]) < 5:
                counts["crash_examples"].append(f"{type(exc).__name__}: {exc} <- {repr(payload)[:200]}")

    case()
    counts["kept"] = kept
    return counts


def fuzz_through_broker(h: Harness, payloads: list, row: Row) -> dict:
    """Send fuzz cases as raw task messages (kwargs=..., and args=[...]) plus undecodable messages pushed onto
    the queue; every one is answered with a typed error or a result, and no worker restarts."""
    from scheduler.errors import InvalidRequest

    workers = [w for w in h.cluster.workers if w.alive() and w.model == "tiny"] or [h.start_worker("tiny")]
    pids = sorted(w.pid for w in workers)
    sent = []
    refused = 0
    for i, p in enumerate(payloads):
        if isinstance(p, dict) and "steps" not in p:
            p = {**p, "steps": 3}  # valid cases stay cheap
        elif isinstance(p, dict) and isinstance(p.get("steps"), int) and not isinstance(p.get("steps"), bool):
            p = {**p, "steps": max(-5, min(p["steps"], 3))}
        if isinstance(p, dict) and ("width" in p or "height" in p):
            p = {k: v for k, v in p.items() if k not in ("width", "height")} if i % 3 else p
        try:
            sent.append(h.send(p) if isinstance(p, dict) and i % 4 else h.send(None, args=[p]))
        except Exception:
            refused += 1  # not serialisable: the producer refuses it, nothing reaches a worker
    raw = _push_garbage(h)
    outcomes = _wait_all(h, sent, 180)
    from scheduler import errors

    typed = {
        name
        for name in dir(errors)
        if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), InvalidRequest)
    }
    answered_typed = sum(1 for o in outcomes if o["state"] == "FAILURE" and o.get("error") in typed)
    other_failures = [o for o in outcomes if o["state"] == "FAILURE" and o.get("error") not in typed]
    ok = sum(1 for o in outcomes if o["state"] == "SUCCESS")
    lost = [o for o in outcomes if o["state"] not in ("SUCCESS", "FAILURE")]
    alive = sorted(w.pid for w in workers if w.alive())
    after = _wait_all(h, [h.send({"prompt": "still alive after the fuzz", "steps": 3})], 60)
    return {
        "sent": len(sent),
        "refused_by_producer": refused,
        "results": ok,
        "typed_errors": answered_typed,
        "untyped_failures": [f"{o.get('error')}: {o.get('message')}" for o in other_failures][:5],
        "n_untyped": len(other_failures),
        "lost": len(lost),
        "raw_garbage_pushed": raw,
        "worker_restarts": int(alive != pids),
        "serves_after": after[0]["state"],
        "max_latency_s": max((o.get("latency_s") or 0) for o in outcomes) if outcomes else 0,
    }


def _push_garbage(h: Harness) -> int:
    """Messages no producer would send, pushed straight onto the queue."""
    import base64

    import redis

    r = redis.Redis.from_url(h.redis.url)

    def envelope(body, headers):
        return json.dumps(
            {
                "body": base64.b64encode(body).decode(),
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": headers,
                "properties": {
                    "body_encoding": "base64",
                    "delivery_info": {"exchange": "", "routing_key": "reprise.tiny"},
                    "delivery_mode": 2,
                    "delivery_tag": str(uuid.uuid4()),
                    "priority": 0,
                },
            }
        )

    garbage = [
        b"not json at all",
        b"{}",
        b"[]",
        b"\xff\xfe\x00garbage",
        json.dumps({"body": "!!!", "properties": {}}).encode(),
        envelope(b"not-json", {"task": "reprise.generate", "id": str(uuid.uuid4())}).encode(),
        envelope(b'[[], {"prompt": "x"}, {}]', {"task": "reprise.no_such_task", "id": str(uuid.uuid4())}).encode(),
        envelope(b'{"a": 1}', {"task": "reprise.generate", "id": str(uuid.uuid4())}).encode(),
        envelope(b'[[], {"prompt": "x", "steps": 2}, {}]', {"task": "reprise.generate"}).encode(),
    ]
    for g in garbage:
        r.lpush("reprise.tiny", g)
    time.sleep(2)
    return len(garbage)


def fault_fuzz(h: Harness, row: Row, n: int) -> None:
    t = time.monotonic()
    counts = fuzz_in_process(n, keep=60 if h.quick else 300)
    kept = counts.pop("kept")
    row.check(
        "in-process: every case accepted or a typed InvalidRequest",
        counts["crashes"] == 0,
        counts["crash_examples"] or None,
    )
    row.checks["in-process counts"] = {
        "ok": True,
        "detail": {k: v for k, v in counts.items() if k != "crash_examples"},
        "seconds": round(time.monotonic() - t, 1),
    }
    broker = fuzz_through_broker(h, kept, row)
    row.sent = counts["cases"] + broker["sent"] + broker["raw_garbage_pushed"]
    row.completed = counts["accepted"] + broker["results"]
    row.failed = counts["typed_errors"] + broker["typed_errors"]
    row.lost = broker["lost"]
    row.max_latency_s = broker["max_latency_s"]
    row.check(
        "broker: every raw message answered with a result or a typed InvalidRequest",
        broker["n_untyped"] == 0 and broker["lost"] == 0,
        broker,
    )
    row.check(
        "broker: no worker crashed or restarted; still serving",
        broker["worker_restarts"] == 0 and broker["serves_after"] == "SUCCESS",
    )
    row.notes.append(
        "sent = in-process cases + raw messages through Redis + undecodable messages pushed on the queue "
        "(those have no result to wait for); failed = typed errors (the expected answer)"
    )


def fault_cache_entries(h: Harness, row: Row) -> None:
    """Entries planted in a node's cache folder: corrupt states, another model version, another tenant,
    expired, an old generation; none may be served (a clean planted control entry must be)."""
    import numpy as np
    import redis

    from cache import CacheKey, CacheSettings, LatentCache, state_checksum
    from scheduler.registry import ModelRegistry

    model = _qmodel(h)
    worker = getattr(h, "q_worker", None)
    folder = h.workdir / "qdrant-plant"
    if worker is None or not worker.alive():
        worker = h.start_worker(model, REPRISE_CACHE_PATH=str(folder))
    folder = Path(worker.env["REPRISE_CACHE_PATH"])
    reg = ModelRegistry(redis.Redis.from_url(h.redis.url))
    info = reg.served("qmodel")
    version, generation = info["model_version"], reg.generation("qmodel")
    worker.stop()
    h.cluster.workers.remove(worker)
    steps = 10
    kinds = [
        "control",
        "nan",
        "inf",
        "wrong_shape",
        "wrong_dtype",
        "bad_checksum",
        "other_version",
        "other_tenant",
        "expired",
        "old_generation",
        "exact_other_version",
        "exact_other_tenant",
        "exact_missing_image",
        "exact_expired",
    ]
    planted: dict[str, str] = {}
    rng = np.random.default_rng(0)
    with LatentCache.open(CacheSettings(path=str(folder))) as cache:
        image = next((_artifacts(h)).rglob("*.png"), None)
        for i, kind in enumerate(kinds):
            prompt = f"planted entry {kind} {i}"
            tenant = "eve" if kind.endswith("other_tenant") else "alice"
            key = CacheKey(
                "qmodel",
                "deadbeef" if kind.endswith("other_version") else version,
                generation - 1 if kind == "old_generation" else generation,
                prompt,
                "",
                7,
                steps,
                5.0,
                64,
                64,
                "ddim",
                tenant,
            )
            states = {k: rng.standard_normal((4, 8, 8)).astype(np.float32) for k in cache.state_steps(steps)}
            uri = "file:///nonexistent/image.png" if kind == "exact_missing_image" else f"file://{image}"
            entry_id, vec, rows, payload = cache.build_entry(key, cache.embed(prompt), states, uri, False)
            if kind in ("nan", "inf"):
                bad = np.full((4, 8, 8), np.nan if kind == "nan" else np.inf, np.float16)
                from cache.store import state_to_rows

                for k, slot in payload["state_slots"].items():
                    rows[slot] = state_to_rows(bad)
                    payload["checksums"][k] = state_checksum(bad)  # a valid checksum of a poisoned state
            elif kind == "wrong_shape":
                payload["state_shape"] = [4, 9, 9]
            elif kind == "wrong_dtype":
                payload["state_dtype"] = "float32"
            elif kind == "bad_checksum":
                payload["checksums"] = {k: "0" * 64 for k in payload["checksums"]}
            elif kind in ("expired", "exact_expired"):
                payload["expires_at"] = time.time() - 60
            if kind.startswith("exact_other"):  # planted under the id alice's request looks up, with foreign content
                alice = CacheKey("qmodel", version, generation, prompt, "", 7, steps, 5.0, 64, 64, "ddim", "alice")
                entry_id = alice.exact_id(True)
            cache.store.insert(entry_id, vec, rows, payload)
            planted[kind] = entry_id
    worker = h.start_worker(model, REPRISE_CACHE_PATH=str(folder))
    h.q_worker = worker
    payloads = []
    for i, kind in enumerate(kinds):
        prompt = f"planted entry {kind} {i}"
        seed = 7 if kind.startswith("exact_") else 8  # another seed: only the approximate path can reach it
        payloads.append({"prompt": prompt, "steps": steps, "seed": seed, "model": "qmodel", "tenant": "alice"})
    outcomes = _run_jobs(h, payloads, "qmodel")
    served = {}
    for kind, o in zip(kinds, outcomes):
        served[kind] = (
            (o["result"]["cache"]["hit"], o["result"]["cache"]["source_id"] == planted[kind])
            if o["state"] == "SUCCESS"
            else o["state"]
        )
    # An entry whose image is gone still holds valid states: resuming from them (approximate) is right,
    # serving its image (exact) is not. Every other planted entry must not be used at all.
    wrong = [
        k
        for k, v in served.items()
        if k != "control" and isinstance(v, tuple) and v[1] and (k != "exact_missing_image" or v[0] == "exact")
    ]
    row.sent, row.completed = len(outcomes), sum(o["state"] == "SUCCESS" for o in outcomes)
    row.lost = row.sent - row.completed
    row.duplicated = len(wrong)
    row.max_latency_s = max((o.get("latency_s") or 0) for o in outcomes)
    row.check(
        "the clean planted entry is served (the path is reachable)",
        served["control"] == ("approximate", True),
        served["control"],
    )
    row.check(
        "0 corrupt, foreign-version, foreign-tenant, expired or old-generation entries served",
        not wrong,
        {k: v for k, v in served.items() if k != "control"},
    )
    row.check("every job completed", row.lost == 0)
    log_text = worker.log.read_text(errors="replace")
    row.checks["corrupt entries dropped (log lines)"] = {"ok": True, "detail": log_text.count("is corrupt")}
    row.notes.append("duplicated = planted bad entries served")


def fault_tenants(h: Harness, row: Row) -> None:
    """Private entries never hit across tenants; share only when granted; timing padding measured."""
    model = _qmodel(h)
    worker = getattr(h, "q_worker", None)
    if worker is None or not worker.alive():
        worker = h.q_worker = h.start_worker(model, REPRISE_CACHE_PATH=str(h.workdir / "qdrant-tenants"))
    q = "qmodel"

    def one(prompt, tenant, seed=3, **cache):
        return _run_jobs(
            h,
            [
                {
                    "prompt": prompt,
                    "steps": 10,
                    "seed": seed,
                    "model": q,
                    "tenant": tenant,
                    **({"cache": cache} if cache else {}),
                }
            ],
            q,
        )[0]

    outcomes = []
    outcomes.append(one("a private dragon", "alice"))
    time.sleep(0.5)
    bob_exact = one("a private dragon", "bob")
    carol_approx = one("a private dragon", "carol", seed=4)  # another seed: only the approximate path could reach it
    outcomes += [bob_exact, carol_approx]
    row.check(
        "private entries are never hits for another tenant (exact, approximate)",
        bob_exact["result"]["cache"]["hit"] == "miss" and carol_approx["result"]["cache"]["hit"] == "miss",
        [bob_exact["result"]["cache"]["hit"], carol_approx["result"]["cache"]["hit"]],
    )
    poison = one("a poisoned lighthouse", "mallory", share=True)
    time.sleep(0.5)
    victim = one("a poisoned lighthouse", "alice")
    outcomes += [poison, victim]
    row.check(
        "an ungranted share is ignored, with a note",
        "not granted" in (poison["result"]["cache"]["note"] or ""),
        poison["result"]["cache"]["note"],
    )
    row.check(
        "so it cannot reach another tenant",
        victim["result"]["cache"]["hit"] == "miss",
        victim["result"]["cache"]["hit"],
    )
    shared = one("a studio shared castle", "studio", share=True)
    time.sleep(0.5)
    reuse = one("a studio shared castle", "bob")
    outcomes += [shared, reuse]
    a, b = shared["result"]["image_uri"], reuse["result"]["image_uri"]
    row.check(
        "a granted tenant's shared entry serves others",
        reuse["result"]["cache"]["hit"] == "exact",
        reuse["result"]["cache"]["hit"],
    )
    row.check(
        "...from the other tenant's own copy, never the sharer's path",
        a != b and "/bob/" in b and _sha(a.removeprefix("file://")) == _sha(b.removeprefix("file://")),
        [a, b],
    )
    # timing: misses vs exact hits of the same size, with and without isolate_timing
    n = 4 if h.quick else 8
    timing = {}
    for isolate in (False, True):
        prompts = [f"timing probe {isolate} {i}" for i in range(n)]
        for p in prompts[:2]:  # warm the node's step timer on this size
            one(p + " warm", "timer", isolate_timing=isolate)
        miss = [one(p, "timer", isolate_timing=isolate) for p in prompts]
        time.sleep(0.5)
        hit = [one(p, "timer", isolate_timing=isolate) for p in prompts]
        outcomes += miss + hit
        tm = [_service_s(o) for o in miss]
        th = [_service_s(o) for o in hit]
        em = [o["latency_s"] for o in miss if o.get("latency_s")]
        eh = [o["latency_s"] for o in hit if o.get("latency_s")]
        timing["isolated" if isolate else "plain"] = {
            "hits": sum(o["result"]["cache"]["hit"] == "exact" for o in hit),
            "miss_median_ms": round(statistics.median(tm) * 1000, 1),
            "hit_median_ms": round(statistics.median(th) * 1000, 1),
            "residual_median_ms": round((statistics.median(tm) - statistics.median(th)) * 1000, 1),
            "end_to_end_miss_median_ms": round(statistics.median(em) * 1000, 1) if em else None,
            "end_to_end_hit_median_ms": round(statistics.median(eh) * 1000, 1) if eh else None,
            "miss_spread_ms": round((max(tm) - min(tm)) * 1000, 1),
        }
    iso = timing["isolated"]
    row.checks["timing (worker-side, queue wait excluded)"] = {"ok": True, "detail": timing}
    row.check(
        "isolate_timing: hit-vs-miss median within the misses' own spread",
        abs(iso["residual_median_ms"]) <= max(iso["miss_spread_ms"], 25),
        iso,
    )
    account(row, h, outcomes, 0)


def fault_secrets(h: Harness, row: Row) -> None:
    """The Redis password is in every process's URL: it must appear in no log; and no secret is committed."""
    logs = sorted(h.workdir.glob("*.log"))
    leaks = {p.name: p.read_text(errors="replace").count(h.redis.password) for p in logs}
    worker_leaks = {k: v for k, v in leaks.items() if k.startswith("worker") and v}
    other_leaks = {k: v for k, v in leaks.items() if not k.startswith("worker") and v}
    masked = any(":**@" in p.read_text(errors="replace") for p in logs if p.name.startswith("worker"))
    row.sent = len(logs)
    row.check(
        "no worker log holds the Redis password",
        not worker_leaks,
        worker_leaks or {"logs_checked": len(leaks), "celery_masks": masked},
    )
    row.check("no other process log holds it", not other_leaks, other_leaks or None)
    row.check("no secret committed to the repository", not (found := scan_repo()), found[:10] or None)


SECRET_PATTERNS = [
    re.compile(r"redis://[^:/\s]*:(?!\*\*@)[^@\s/'\"{}]{3,}@"),
    re.compile(r"(?i)(password|passwd|secret|api[_-]?key|token)\s*[:=]\s*['\"][A-Za-z0-9+/_\-]{12,}['\"]"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{36}|hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9]{32,})\b"),
]


# Fixed credentials of the local demo and load test (a Flower they start on 127.0.0.1): not secrets.
DEMO_VALUES = re.compile(r"(?i)demo|test|example|changeme|dummy|placeholder")


def scan_repo(root: str | None = None) -> list[str]:
    root = root or str(Path(__file__).resolve().parents[1])
    try:
        files = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        files = []
    found = []
    for name in files:
        path = Path(root) / name
        if (
            path.suffix in (".png", ".safetensors", ".bin", ".pt")
            or not path.is_file()
            or path.stat().st_size > 2_000_000
        ):
            continue
        text = path.read_text(errors="replace")
        for pattern in SECRET_PATTERNS:
            for m in pattern.finditer(text):
                if not DEMO_VALUES.search(m.group(0)):
                    found.append(f"{name}: {m.group(0)[:60]}")
    return found


# =============================================================================================

FAULTS = [
    "worker_kill",
    "batch_kill",
    "batch_oom",
    "poison_request",
    "device_stall",
    "redis_restart",
    "qdrant",
    "artifacts",
    "cache_entries",
    "tenants",
    "coordinator_kill",
    "clock_skew",
    "fuzz",
    "secrets",
]


def run(
    only: list[str] | None = None,
    quick: bool = False,
    fuzz_cases: int = 10_000,
    workdir: str | None = None,
    json_path: str | None = None,
) -> list[Row]:
    workdir = workdir or tempfile.mkdtemp(prefix="reprise-faults-")
    h = Harness(workdir, quick=quick)
    rows: list[Row] = []
    chosen = [f for f in FAULTS if not only or f in only]
    try:
        h.start_worker("tiny", REPRISE_CACHE_PATH=str(Path(workdir) / "qdrant-steady"))
        for name in chosen:
            row = Row(name)
            t = time.monotonic()
            print(f"--- {name} ...", flush=True)
            try:
                {
                    "worker_kill": fault_worker_kill,
                    "batch_kill": fault_batch_kill,
                    "batch_oom": fault_batch_oom,
                    "poison_request": fault_poison_request,
                    "device_stall": fault_device_stall,
                    "redis_restart": fault_redis_restart,
                    "qdrant": fault_qdrant,
                    "artifacts": fault_artifacts,
                    "cache_entries": fault_cache_entries,
                    "tenants": fault_tenants,
                    "coordinator_kill": fault_coordinator,
                    "clock_skew": fault_clock_skew,
                    "secrets": fault_secrets,
                    "fuzz": lambda h_, r_: fault_fuzz(h_, r_, fuzz_cases),
                }[name](h, row)
            except Exception as exc:
                import traceback

                row.check("ran to the end", False, f"{type(exc).__name__}: {exc}")
                row.notes.append(traceback.format_exc()[-2000:])
            row.checks["seconds"] = {"ok": True, "detail": round(time.monotonic() - t, 1)}
            rows.append(row)
            print(_line(row), flush=True)
            if json_path:  # after every fault, so that a run cut short still leaves its rows
                Path(json_path).write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=str))
    finally:
        h.close()
    return rows


HEADER = f"{'fault':<17}{'sent':>7}{'done':>7}{'failed':>7}{'lost':>6}{'dup':>5}{'retried':>8}{'max lat s':>10}  result"


def _line(r: Row) -> str:
    bad = [k for k, v in r.checks.items() if not v.get("ok")]
    return (
        f"{r.fault:<17}{r.sent:>7}{r.completed:>7}{r.failed:>7}{r.lost:>6}{r.duplicated:>5}{r.retried:>8}"
        f"{r.max_latency_s:>10.2f}  {'PASS' if r.ok else 'FAIL: ' + '; '.join(bad)}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import faulthandler

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack
    if argv[:1] == ["--with-hooks"]:
        return run_with_hooks(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m ops.faults", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--only", help="comma-separated: " + ",".join(FAULTS))
    p.add_argument("--quick", action="store_true", help="fewer kills, rounds and samples")
    p.add_argument("--fuzz-cases", type=int, default=10_000)
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    rows = run(args.only.split(",") if args.only else None, args.quick, args.fuzz_cases, args.workdir, args.json)
    print()
    print(HEADER)
    for r in rows:
        print(_line(r))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2, default=str))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
