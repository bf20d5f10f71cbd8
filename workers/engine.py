"""The node engine: every request of a node that needs a device goes through here.

vLLM's layering, for diffusion: the engine owns the requests that are on a device; one scheduler per
device (a thread) decides, at each iteration, which of its active requests share the next denoiser
call; the device runs that one batched call, each sample with its own timestep, and every request's
own diffusers scheduler then steps its slice of the output. A fresh request at step 0 and one resumed
from the cache at step K share a call. New requests join at the next iteration; finished ones leave to
decode. Admission and lookups happen before (workers/service.py), on the callers' threads.

A request reaches the engine free of any device (its ``start``: the arguments of its trajectory, its
conditioning, its feature cache's settings). The device thread that takes it binds it: the trajectory
(latents, its own scheduler with any multistep state, the conditioning moved onto the device) and the
feature-cache runner, made on that device's own modules, which only that thread calls. A resume found by
the lookup is bound the same way when it is swapped in. So nothing of a request is ever made for one
device and run on another, and no runner touches a module another device is running.

Requests share a call when they have the same size and feature cache. DeepCache requests share a call
with those whose runner makes the same kind of pass at this step (all full, or all partial around their
own kept features); a block-caching request (its runner patches the U-Net's blocks per request) or one
marked ``deterministic`` runs in a group of its own. Groups take turns, the longest-waiting first.

The approximate lookup overlaps the first steps: a request that missed the exact cache goes to its device
at once, as a fresh request, while its job thread embeds the prompt and searches for a neighbour. The
device may run it up to ``hold_at`` (the earliest step a stored state can resume at) and then leaves it
out of the calls until the lookup is resolved; a hit swaps in the trajectory resumed at K (always
K >= hold_at, so the swap never goes back), a miss lets it run on. Either way the image is the one the
lookup's answer gives, never a race's; the steps run before a swap are reported as discarded. So a
lookup costs a miss no device time and, where the first steps take longer than the lookup, no latency.

Progress, cancellation and time limits stay per request, and the device thread does no network I/O:
before every iteration it reads each active request's stop flag (set by the request's own job thread,
which polls the cancel flag in Redis while it waits, every 0.1 s) and checks its deadline; after each
step it hands the step to the node's publisher thread (``Publisher``), which makes the caller's progress
call (a Redis write, retried while Redis restarts) off the device and keeps only the newest step per
request while a write is slow. Results leave through each request's own event queue to its job thread.

Failures stay per request. A batched call that raises is run again in halves (bisection) down to single
requests, so only a request that fails alone fails: with ``DenoiserFailed``, final; its batch-mates step
once, from the same inputs (nothing is advanced before a call returns). An out-of-memory error halves the
group as well and lowers the device's batch limit to half the failed batch; every ``oom_recover_s``
without another one raises it by one, back to ``max_batch`` (additive increase, multiplicative decrease).
A failure of the device rather than the request (out of memory on one request alone, a device error, every
request of a batch failing alone, a second request in a row failing alone, a stalled device thread) is ``DeviceFailed``: the worker sends the job
again (workers/tasks.py) instead of acknowledging a failure.

A watchdog thread watches the device threads: one that spends longer than ``stall_s`` in one iteration
(a hung kernel, a dead device) marks the node unhealthy: its requests and every waiting one are released
with ``DeviceFailed`` (and so redelivered), and the engine takes no more work.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from scheduler.errors import DenoiserFailed, DeviceFailed
from workers.denoise_loop import LoopOutput, PlainUNet, StopRequested, Trajectory
from workers.families import Conditioning
from workers.lora import compatible

log = logging.getLogger("reprise.engine")


@dataclass
class EngineRequest:
    """One request inside the engine: its trajectory, whom it may share a call with, and its way back."""

    start: Any  # the request's start, free of any device: ``start.bind(loop)`` -> (Trajectory, runner or None)
    group: tuple  # requests share a U-Net call only within one group
    job_id: str = ""  # whose request it is (logs, DeviceStats.last_call)
    # Bound by the device thread that takes the request (``start.bind``), on its own device and modules:
    trajectory: Trajectory | None = None
    runner: Any = None  # a feature-cache runner, or None for the plain denoiser
    priority: int = 5
    deadline: float | None = None  # time.time() past which it stops before its next step
    decode_on_device: bool = False
    stop: str | None = None  # "cancelled", set by the caller
    is_cancelled: Any = None  # () -> bool, asked by the job thread while it waits (NodeEngine.wait)
    on_progress: Any = None  # (step, total), called by the publisher thread after each step
    events: queue.Queue = field(default_factory=queue.Queue)
    device: Any = None
    scheduler: Any = None  # the DeviceScheduler that took it
    first_step_at: float | None = None
    last_stepped: int = -1  # the iteration that last stepped it (fair turns between groups)
    # The overlapped lookup (NodeEngine.resolve): while ``lookup_pending``, the device steps the request
    # no further than ``hold_at``; ``resume`` is the start of a hit at K, bound and swapped in by the device.
    lookup_pending: bool = False
    hold_at: int | None = None
    # The lookup's time box (REPRISE_CACHE_LOOKUP_TIMEOUT_MS): held longer than this, the request runs on
    # fresh and a later answer is ignored, so a slow cache never holds a device slot.
    hold_limit_s: float | None = None
    held_since: float | None = None
    held_s: float = 0.0  # how long its device held it for the lookup (set when the hold ends)
    lookup_expired: bool = False
    resume: Any = None
    resumed: bool = False
    steps_discarded: int = 0  # steps run before a swap to a resumed trajectory
    adapters: tuple = ()  # the request's LoRA adapters (workers.lora.ActiveLora), made active for its calls

    @property
    def held(self) -> bool:
        """Waiting for its lookup at the earliest step a resume could start from."""
        waiting = self.lookup_pending or self.resume is not None  # a resume not yet swapped in holds it too
        return waiting and self.hold_at is not None and self.trajectory.i >= self.hold_at

    def turn_key(self) -> tuple:
        """Whom it may share this iteration's call with: its group, and for a feature cache that can batch
        (DeepCache) the kind of pass its runner makes at this step (full or partial)."""
        batch_key = getattr(self.runner, "batch_key", None)
        if batch_key is None:
            return self.group
        return self.group + batch_key(self.trajectory.i, self.trajectory.rows)


BUSY_WINDOW_S = 60.0  # the window of DeviceStats.busy_ratio (reprise_device_busy_ratio)


@dataclass
class DeviceStats:
    """What the device thread measures of its own denoiser calls (read by workers/metrics.py)."""

    calls: int = 0
    requests_stepped: int = 0  # sum of batch sizes, in requests
    rows: int = 0  # sum of batch sizes, in U-Net samples (2 per request with guidance)
    call_s: float = 0.0  # time inside denoiser calls, failed ones included: the device's busy time
    failed_calls: int = 0  # calls that raised (their requests were run again in halves)
    oom_events: int = 0  # out-of-memory errors, each of which halved a batch
    batch_limit: int = 0  # requests the device steps at once now (max_batch, lowered after out of memory)
    started: float = field(default_factory=time.monotonic)
    last_call: tuple[str, ...] = ()  # job ids of the requests in the call in flight, or the latest one
    window_s: float = BUSY_WINDOW_S
    intervals: collections.deque = field(default_factory=collections.deque)  # (start, end) of recent calls
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def mean_batch(self) -> float:
        return self.requests_stepped / self.calls if self.calls else 0.0

    @property
    def request_step_s(self) -> float:
        """Device seconds one request's step costs: each call's time shared by the requests it stepped."""
        return self.call_s / self.requests_stepped if self.requests_stepped else 0.0

    def record(self, start: float, seconds: float, requests: int, rows: int, ok: bool) -> None:
        """One denoiser call (monotonic ``start``). Intervals older than the window go at once: the memory
        is bounded by the calls of one window, whether or not anyone reads the ratio."""
        with self.lock:
            self.call_s += seconds
            if ok:
                self.calls += 1
                self.requests_stepped += requests
                self.rows += rows
            else:
                self.failed_calls += 1
            self.intervals.append((start, start + seconds))
            self._prune(start + seconds)

    def _prune(self, now: float) -> None:
        while self.intervals and self.intervals[0][1] < now - self.window_s:
            self.intervals.popleft()

    def busy_ratio(self, now: float | None = None) -> float:
        """Share of the last ``window_s`` seconds (or of the device's life, if shorter) spent inside calls."""
        now = time.monotonic() if now is None else now
        lo = max(now - self.window_s, self.started)
        with self.lock:
            self._prune(now)
            busy = sum(max(0.0, min(end, now) - max(start, lo)) for start, end in self.intervals)
        return min(1.0, busy / max(now - lo, 1e-6))


class Publisher(threading.Thread):
    """Carries the device threads' reports (each request's progress) off them: ``post`` only records the
    report; this thread makes the call. While a call is slow (Redis restarting: the backend retries for
    up to a minute), newer reports replace the pending one of the same request, so the pending work is
    bounded by the requests in flight and the device never waits."""

    def __init__(self) -> None:
        super().__init__(name="reprise-publisher", daemon=True)
        self._pending: dict[int, tuple] = {}  # id(request) -> (request, fn, args), oldest first
        self._current: int | None = None
        self._cond = threading.Condition()
        self._closed = False
        self.published = 0
        self.replaced = 0

    def post(self, key: Any, fn, *args) -> None:
        with self._cond:
            if self._pending.pop(id(key), None) is not None:
                self.replaced += 1
            self._pending[id(key)] = (key, fn, args)
            self._cond.notify()

    def settle(self, key: Any, timeout: float = 10.0) -> None:
        """Drop the request's pending report and wait (at most ``timeout``) for the one being made: called
        by its job thread before it answers, so a late progress write never lands over the result."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._pending.pop(id(key), None)
            while self._current == id(key) and time.monotonic() < deadline:
                self._cond.wait(0.05)

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                key = next(iter(self._pending))
                _, fn, args = self._pending.pop(key)
                self._current = key
            try:
                fn(*args)
                self.published += 1
            except Exception as exc:  # progress is advisory: never fail a request over it
                log.warning("progress report failed: %s", exc)
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.join(timeout)


def _device_error(exc: BaseException) -> bool:
    """A failure of the device rather than of the request's inputs."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(exc, accelerator):
        return True
    return "CUDA error" in str(exc)


def _pass_counts(runner) -> tuple | None:
    """A feature-cache runner's pass counters (counted before its call): restored when the call fails."""
    if runner is None or not hasattr(runner, "full_passes"):
        return None
    return runner.full_passes, runner.partial_passes


class DeviceScheduler(threading.Thread):
    """Runs one device: takes waiting requests while it has room, and each iteration makes one batched
    denoiser call for the group whose turn it is."""

    def __init__(
        self,
        device,
        waiting: queue.PriorityQueue,
        max_batch: int,
        kick: threading.Event | None = None,
        threads: int | None = None,
        publisher: Publisher | None = None,
        oom_recover_s: float = 30.0,
        call_began: threading.Condition | None = None,
    ):
        super().__init__(name=f"reprise-engine-{device.name}", daemon=True)
        self.device, self.waiting, self.max_batch = device, waiting, max_batch
        self.threads = threads  # torch intra-op threads of this device thread (None: torch's default)
        self.kick = kick or threading.Event()  # set when a held request's lookup is resolved
        self.publisher = publisher
        self.oom_recover_s = oom_recover_s
        self.limit = max_batch  # lowered by out-of-memory errors, raised again by one every oom_recover_s
        self.limit_changed = time.monotonic()
        self.active: list[EngineRequest] = []
        self.stats = DeviceStats(batch_limit=max_batch)
        self.iteration = 0
        self.stopped = threading.Event()
        self.beat = time.monotonic()  # start of the current iteration (the watchdog reads it)
        self.lone_failures = 0  # requests that failed alone since the last call that succeeded
        self.stalled = False  # set by the watchdog: this thread's requests were released; it touches none again
        # When the call in flight should end (monotonic; the last call's length from its start), None between
        # calls: NodeEngine.quiet_for reads it so that the cache's writer holds the interpreter lock while
        # this thread waits in its call, not when it comes back to step its requests.
        self.call_ends: float | None = None
        self.last_call_s = 0.0
        self.call_began = call_began or threading.Condition()  # notified as each call begins (NodeEngine.wait_quiet)

    def run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while not self.stopped.is_set() and not self.stalled:
                self.beat = time.monotonic()
                try:
                    self._raise_limit()
                    self._take_waiting()
                    group = self._next_group()
                    if group:
                        self._step(group)
                    elif self.active:  # every active request waits for its lookup: wait for one to resolve
                        self.kick.wait(0.01)
                        self.kick.clear()
                except Exception as exc:  # never leave a caller waiting: fail the active requests, go on
                    log.exception("engine iteration failed on %s", self.device.name)
                    for request in list(self.active):
                        self._leave(request)
                        request.events.put(("error", exc))

    # --- scheduling --------------------------------------------------------------------------------
    def _take_waiting(self) -> None:
        # A request held at its resume step for its lookup takes no part in the calls, so it does not count
        # against the batch limit: another request takes its place in the calls meanwhile (its latents are
        # all it keeps on the device). Held requests leave the hold within the lookup's time box; the bound
        # of twice the limit only guards a cache whose time box was set very long.
        while len(self.active) - sum(r.held for r in self.active) < self.limit and len(self.active) < 2 * self.limit:
            try:
                _, _, request = self.waiting.get(timeout=0.2) if not self.active else self.waiting.get_nowait()
            except queue.Empty:
                return
            if request is None:  # shutdown
                self.stopped.set()
                return
            if request.resume is not None:  # the lookup answered before a device took it: start from the hit
                request.start, request.resume, request.resumed = request.resume, None, True
            try:  # everything device-specific is made here, by the thread that will step it
                request.trajectory, request.runner = request.start.bind(self.device.loop)
            except Exception as exc:  # this request cannot start (e.g. a feature cache refused): it alone fails
                log.exception("request %s cannot start on %s", request.job_id, self.device.name)
                request.events.put(("error", exc))
                continue
            request.device, request.scheduler = self.device, self
            self.active.append(request)

    def _raise_limit(self) -> None:
        if self.limit < self.max_batch and time.monotonic() - self.limit_changed >= self.oom_recover_s:
            self.limit += 1
            self.limit_changed = time.monotonic()
            self.stats.batch_limit = self.limit
            log.info("batch limit of %s raised to %d (of %d)", self.device.name, self.limit, self.max_batch)

    def _lower_limit(self, failed_batch: int) -> None:
        self.stats.oom_events += 1
        self.limit_changed = time.monotonic()
        lowered = max(1, min(self.limit, failed_batch // 2))
        if lowered < self.limit:
            self.limit = self.stats.batch_limit = lowered
            log.warning(
                "out of memory on %s at a batch of %d: batch limit now %d", self.device.name, failed_batch, lowered
            )

    def _next_group(self) -> list[EngineRequest]:
        """The group of the request that waited longest since its last step (at most ``limit`` of them, the
        longest-waiting first); stopped requests leave."""
        for request in list(self.active):
            reason = self._stop_reason(request)
            if reason:
                self._leave(request)
                t = request.trajectory
                request.events.put(("error", StopRequested(reason, t.i + 1, t.steps)))
        for request in list(self.active):
            if request.resume is not None:
                self._swap_in(request)
        now = time.monotonic()
        for request in self.active:
            if request.lookup_pending and request.hold_limit_s is not None and request.held:
                request.held_since = request.held_since or now
                if now - request.held_since > request.hold_limit_s:  # the lookup is late: run on fresh
                    request.lookup_pending, request.lookup_expired = False, True
                    request.held_s = now - request.held_since
        ready = [r for r in self.active if not r.held]
        if not ready:
            return []
        first = min(ready, key=lambda r: (r.last_stepped, r.priority))
        key = first.turn_key()
        group = [r for r in sorted(ready, key=lambda r: (r.last_stepped, r.priority)) if r.turn_key() == key]
        if any(r.adapters for r in group):  # one scale per adapter in a call: the longest waiting keep theirs
            kept = {id(group[i]) for i in compatible([r.adapters for r in group])}
            group = [r for r in group if id(r) in kept]
        return group[: self.limit]

    def _swap_in(self, request: EngineRequest) -> None:
        """A cache hit resolved while the request ran fresh: continue from the resumed trajectory."""
        start, request.resume = request.resume, None
        if request.trajectory.i > start.start_step:  # cannot happen under hold_at; never go back
            log.warning("a resume at step %d came after step %d: ignored", start.start_step, request.trajectory.i)
            return
        try:
            trajectory, runner = start.bind(self.device.loop)
        except Exception as exc:
            log.exception("request %s cannot resume on %s", request.job_id, self.device.name)
            self._leave(request)
            request.events.put(("error", exc))
            return
        request.steps_discarded = request.trajectory.steps_computed
        request.trajectory, request.runner, request.resumed = trajectory, runner, True

    @staticmethod
    def _stop_reason(request: EngineRequest) -> str | None:
        """In memory only: the cancel flag's Redis key is polled by the request's job thread (NodeEngine.wait)."""
        if request.stop:
            return request.stop
        if request.deadline is not None and time.time() > request.deadline:
            return "time limit"
        return None

    def _leave(self, request: EngineRequest) -> None:
        self.active.remove(request)

    # --- one iteration -----------------------------------------------------------------------------
    def _load_adapters(self, group: list[EngineRequest]) -> list[EngineRequest]:
        """The requests of ``group`` whose adapters are loaded on this device now (a request whose adapter
        cannot load fails alone); the adapters of every active request stay loaded meanwhile."""
        adapters = self.device.loop.c.adapters
        if adapters is None or not any(r.adapters for r in group):
            return group
        pinned = {a.key for r in self.active for a in r.adapters}
        ready = []
        for request in group:
            try:
                adapters.prepare(request.adapters, pinned)
                ready.append(request)
            except Exception as exc:
                log.exception("adapters of %s cannot load on %s", request.job_id, self.device.name)
                self._leave(request)
                request.events.put(("error", exc))
        return ready

    def _step(self, group: list[EngineRequest]) -> None:
        group = self._load_adapters(group)
        if not group:
            return
        self.iteration += 1
        now = time.time()
        for request in group:
            request.first_step_at = request.first_step_at or now
        outcomes = self._call_or_split(group)
        if self.stalled:  # released by the watchdog meanwhile: its requests are redelivered, touch none
            return
        if len(group) > 1 and len(outcomes) == len(group) and all(isinstance(o, DenoiserFailed) for _, o in outcomes):
            # every request of the batch failed alone: the device fails everything, not one request
            outcomes = [
                (r, DeviceFailed(f"job {r.job_id}: every request of a batch of {len(group)} failed alone: {o}"))
                for r, o in outcomes
            ]
        for request, out in outcomes:
            if isinstance(out, BaseException):
                self._leave(request)
                request.events.put(("error", out))
                continue
            request.last_stepped = self.iteration
            try:
                request.trajectory.advance(out)
            except Exception as exc:  # its own scheduler's step (guidance, solver) failed: it alone fails
                log.exception("the scheduler step of job %s failed on %s", request.job_id, self.device.name)
                self._leave(request)
                details = {"device": self.device.name, "error": type(exc).__name__, "step": request.trajectory.i}
                message = f"job {request.job_id}: its scheduler step failed: {type(exc).__name__}: {exc}"
                request.events.put(("error", DenoiserFailed(message, details)))
                continue
            request.events.put(("step", request.trajectory.i, request.trajectory.steps))
            if request.on_progress is not None:
                if self.publisher is not None:
                    self.publisher.post(request, request.on_progress, request.trajectory.i, request.trajectory.steps)
                else:  # an engine without a publisher (a bare DeviceScheduler): report in place
                    try:
                        request.on_progress(request.trajectory.i, request.trajectory.steps)
                    except Exception as exc:
                        log.warning("progress report failed: %s", exc)
            if request.trajectory.done:
                self._leave(request)
                self._finish(request)

    def _call_or_split(self, group: list[EngineRequest]) -> list[tuple[EngineRequest, Any]]:
        """(request, its output rows) for each request of one call; where the call raises, the same call in
        halves, down to single requests: (request, the typed error) for one that fails alone."""
        counts = [_pass_counts(r.runner) for r in group]
        self.stats.last_call = tuple(r.job_id for r in group)
        rows = [r.trajectory.rows for r in group]
        start, t0 = time.monotonic(), time.perf_counter()
        self.call_ends = start + self.last_call_s
        with self.call_began:
            self.call_began.notify_all()
        try:
            outputs = self._call(group)
        except Exception as exc:
            self.call_ends = None
            self.stats.record(start, time.perf_counter() - t0, len(group), sum(rows), ok=False)
            for request, saved in zip(group, counts):
                if saved is not None:
                    request.runner.full_passes, request.runner.partial_passes = saved
            return self._after_failure(group, exc)
        self.call_ends, self.last_call_s = None, time.perf_counter() - t0
        self.stats.record(start, self.last_call_s, len(group), sum(rows), ok=True)
        self.lone_failures = 0
        return list(zip(group, outputs))

    def _after_failure(self, group: list[EngineRequest], exc: Exception) -> list[tuple[EngineRequest, Any]]:
        jobs = ", ".join(r.job_id for r in group)
        oom = isinstance(exc, torch.OutOfMemoryError)
        if len(group) == 1:
            request = group[0]
            details = {"device": self.device.name, "error": type(exc).__name__, "step": request.trajectory.i}
            if _device_error(exc):
                log.error("device %s failed on job %s alone (%s: %s)", self.device.name, jobs, type(exc).__name__, exc)
                message = f"job {request.job_id}: device {self.device.name} failed on it alone: {exc}"
                return [(request, DeviceFailed(message, details))]
            self.lone_failures += 1
            if self.lone_failures > 1:  # a second request in a row failing alone, none succeeding between
                log.error(
                    "device %s failed again, on job %s alone (%s: %s)", self.device.name, jobs, type(exc).__name__, exc
                )
                message = f"job {request.job_id}: device {self.device.name} fails every request: {exc}"
                return [(request, DeviceFailed(message, details))]
            log.error(
                "denoiser call failed on %s for job %s alone (%s: %s)", self.device.name, jobs, type(exc).__name__, exc
            )
            message = f"job {request.job_id}: the denoiser raised on this request alone: {type(exc).__name__}: {exc}"
            return [(request, DenoiserFailed(message, details))]
        if oom:
            self._lower_limit(len(group))
        log.warning(
            "denoiser call failed on %s (%s: %s; jobs %s): running its %d requests again in halves",
            self.device.name,
            type(exc).__name__,
            str(exc)[:200],
            jobs,
            len(group),
        )
        half = (len(group) + 1) // 2
        return self._call_or_split(group[:half]) + self._call_or_split(group[half:])

    def _call(self, group: list[EngineRequest]) -> list[torch.Tensor]:
        """One denoiser call for the group: each request's output rows. Changes no request's state."""
        c = self.device.loop.c
        inputs = [r.trajectory.model_input() for r in group]
        rows = [r.trajectory.rows for r in group]
        if c.adapters is not None:  # this call's adapters (none: LoRA off), by this device thread only
            c.adapters.activate([r.adapters for r in group], rows)
        try:
            if len(group) == 1:  # alone, exactly as DenoiseLoop.denoise runs it
                request, (model_in, t) = group[0], inputs[0]
                runner = request.runner or PlainUNet()
                return [runner(c.unet, model_in, t, request.trajectory.i, request.trajectory.context)]
            sample = torch.cat([x for x, _ in inputs])
            timesteps = torch.cat([t.reshape(1).float().expand(n) for n, (_, t) in zip(rows, inputs)])
            context = Conditioning.cat([r.trajectory.context for r in group])
            if group[0].runner is not None:  # a feature cache that batches (same turn key)
                runners = [r.runner for r in group]
                steps = [r.trajectory.i for r in group]
                noise = type(runners[0]).run_batch(runners, c.unet, sample, timesteps, context, rows, steps)
            else:
                noise = context.call(c.unet, sample, timesteps)
            return list(noise.split(rows))
        finally:
            if c.adapters is not None:
                c.adapters.release()

    def _finish(self, request: EngineRequest) -> None:
        t = request.trajectory
        out = t.output(time.time() - (request.first_step_at or time.time()))
        image, decode_s = None, 0.0
        if request.decode_on_device:
            start = time.perf_counter()
            try:
                image = self.device.loop.decode(out.latents)
            except Exception as exc:
                request.events.put(("error", exc))
                return
            decode_s = time.perf_counter() - start
        if self.stalled:
            return
        self.device.jobs_done += 1
        request.events.put(("done", out, image, decode_s))


class NodeEngine:
    """The node's devices and their schedulers. ``submit`` hands a request in; ``wait`` is the caller's
    side: it polls the cancel flag, and returns (LoopOutput, image or None, decode_s)."""

    def __init__(
        self,
        devices: list,
        max_batch: int = 8,
        threads: int | None = None,
        stall_s: float = 300.0,
        oom_recover_s: float = 30.0,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if stall_s <= 0:
            raise ValueError(f"stall_s must be > 0, got {stall_s}")
        self.max_batch, self.stall_s = max_batch, stall_s
        self.waiting: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self.kick = threading.Event()
        self.call_began = threading.Condition()
        self.healthy = True
        self.unhealthy_reason: str | None = None
        self.publisher = Publisher()
        self.publisher.start()
        self.schedulers = [
            DeviceScheduler(
                d, self.waiting, max_batch, self.kick, threads, self.publisher, oom_recover_s, self.call_began
            )
            for d in devices
        ]
        for s in self.schedulers:
            s.start()
        self._closed = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, name="reprise-engine-watchdog", daemon=True)
        self.watchdog.start()

    def quiet_for(self, margin_s: float) -> bool:
        """True while no device thread will want the interpreter lock within ``margin_s``: each is idle (no
        request) or inside a denoiser call expected to last that long yet. A device thread between calls
        (stepping, binding, taking requests) or at the end of its call is not quiet."""
        now = time.monotonic()
        for s in self.schedulers:
            ends = s.call_ends
            if (ends is None and s.active) or (ends is not None and ends - now < margin_s):
                return False
        return True

    def wait_quiet(self, margin_s: float, timeout_s: float) -> bool:
        """Wait until ``quiet_for(margin_s)``, checked as each device call begins (and every 10 ms, for a
        device that went idle); False after ``timeout_s`` without."""
        deadline = time.monotonic() + timeout_s
        with self.call_began:
            while not self.quiet_for(margin_s):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.call_began.wait(min(left, 0.01))
        return True

    def submit(self, request: EngineRequest) -> None:
        if not self.healthy:
            raise DeviceFailed(f"job {request.job_id}: this node takes no work: {self.unhealthy_reason}")
        self.waiting.put((request.priority, next(self._order), request))

    def resolve(self, request: EngineRequest, resume: Any = None) -> None:
        """The request's lookup is answered: ``resume`` = the start resumed at K for a hit, None for a miss.
        The device binds it and swaps it in before its next step of the request."""
        if request.lookup_expired:  # answered after the hold's time box: the request ran on fresh meanwhile
            return
        if request.held_since is not None:
            request.held_s = time.monotonic() - request.held_since
        request.resume = resume
        request.lookup_pending = False
        self.kick.set()

    def wait(
        self, request: EngineRequest, on_progress=None, is_cancelled=None, deadline: float | None = None
    ) -> tuple[LoopOutput, Any, float]:
        """The request's answer. ``deadline`` (time.time()): past it, the request is stopped and
        ``DeviceFailed`` raised; by default the request's own deadline plus the watchdog's ``stall_s``
        (its device had that long to stop it), and none for a request without one (the watchdog then
        bounds every step). A device thread that died, or was released by the watchdog, fails it too."""
        if request.on_progress is not None:  # the publisher reports every step
            on_progress = None
        is_cancelled = is_cancelled or request.is_cancelled
        if deadline is None and request.deadline is not None:
            deadline = request.deadline + self.stall_s
        try:
            return self._wait(request, on_progress, is_cancelled, deadline)
        finally:
            self.publisher.settle(request)

    def _wait(self, request, on_progress, is_cancelled, deadline):
        while True:
            try:
                event = request.events.get(timeout=0.1)
            except queue.Empty:
                event = None
            latest = None
            while event is not None:  # report only the newest step of those that arrived meanwhile
                kind = event[0]
                if kind == "step":
                    latest = event
                elif kind == "done":
                    if latest is not None and on_progress is not None:
                        on_progress(latest[1], latest[2])
                    return event[1], event[2], event[3]
                else:
                    raise event[1]
                try:
                    event = request.events.get_nowait()
                except queue.Empty:
                    event = None
            if latest is not None and on_progress is not None:
                on_progress(latest[1], latest[2])
            if request.stop is None and is_cancelled is not None:
                try:
                    if is_cancelled():
                        request.stop = "cancelled"
                except Exception as exc:  # the flag's store away: the caller's revoke check still stands
                    log.debug("cancel check failed: %s", exc)
            scheduler = request.scheduler
            if scheduler is not None and (scheduler.stalled or not scheduler.is_alive()) and request.events.empty():
                raise DeviceFailed(f"job {request.job_id}: device {scheduler.device.name} stopped answering")
            if deadline is not None and time.time() > deadline:
                request.stop = request.stop or "deadline"
                raise DeviceFailed(
                    f"job {request.job_id}: no answer from the engine by its deadline",
                    {"device": getattr(request.device, "name", None), "step": getattr(request.trajectory, "i", None)},
                )

    # --- the watchdog ------------------------------------------------------------------------------
    def _watch(self) -> None:
        every = min(1.0, self.stall_s / 4)
        while not self._closed.wait(every):
            now = time.monotonic()
            for s in self.schedulers:
                if not s.stalled and s.is_alive() and now - s.beat > self.stall_s:
                    self.release(s, f"device {s.device.name} stalled: one iteration ran over {self.stall_s:g}s")

    def release(self, scheduler: DeviceScheduler, reason: str) -> None:
        """Mark the node unhealthy: the device's requests and every waiting one fail with DeviceFailed (their
        jobs are sent again), and no new request is taken."""
        scheduler.stalled = True
        self.healthy, self.unhealthy_reason = False, reason
        log.error("NODE UNHEALTHY: %s; releasing its requests for redelivery and taking no more work", reason)
        for request in list(scheduler.active):
            request.events.put(
                ("error", DeviceFailed(f"job {request.job_id}: {reason}", {"device": scheduler.device.name}))
            )
        markers = []
        while True:
            try:
                item = self.waiting.get_nowait()
            except queue.Empty:
                break
            if item[2] is None:  # a shutdown marker: it stays for the other device threads
                markers.append(item)
                continue
            item[2].events.put(("error", DeviceFailed(f"job {item[2].job_id}: {reason}")))
        for item in markers:
            self.waiting.put(item)

    def stats(self) -> dict[str, DeviceStats]:
        return {s.device.name: s.stats for s in self.schedulers}

    def close(self) -> None:
        self._closed.set()
        for _ in self.schedulers:
            self.waiting.put((-1, next(self._order), None))
        for s in self.schedulers:
            if not s.stalled:
                s.join(timeout=5)
        self.publisher.close()
