"""The injection points patched inside a real process (`python -m ops.faults --with-hooks <reprise args>`): kills at a phase, slow lookups, a full disk, skewed clocks, the job journal."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import threading
import time
import uuid
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
        from workers import node_cache

        node_cache.RedisClock = lambda *args, **kwargs: lambda: time.time()  # the cache reads the node's wall clock

    from workers import service as service_mod
    from workers.artifacts import ArtifactStore
    from workers.denoise_loop import DenoiseLoop

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

    write_back_many = latent_cache.LatentCache._write_back_many

    def write_back_hooked(self, items):
        """Every write-back (the node's writer stores them in batches): die right after the insert."""
        if kill_at == "writeback" and due("writeback"):
            self.store.insert_many([self.build_entry(*item) for item in items])
            _die("writeback")
        return write_back_many(self, items)

    latent_cache.LatentCache._write_back_many = write_back_hooked

    delay_ms = float(env.get("REPRISE_FAULT_CACHE_DELAY_MS") or 0)
    delay_flag = env.get("REPRISE_FAULT_CACHE_DELAY_FILE")
    if delay_ms:
        for name in ("_lookup_exact", "_lookup_approx", "lookup_approx_many"):
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
