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

Progress, cancellation and time limits stay per request: before every iteration the device thread asks
each active request whether it was cancelled (an in-memory revoke set and one Redis EXISTS: about 0.1 ms,
against tens of milliseconds for a denoiser call) and checks its deadline, and after each step it
reports the step (the caller's progress callback throttles its own writes). So a cancel stops a request
within one step, wherever its caller's thread is.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.families import Conditioning
from workers.lora import compatible
from workers.sampler import LoopOutput, PlainUNet, StopRequested, Trajectory

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
    is_cancelled: Any = None  # () -> bool, asked by the device thread before each iteration
    on_progress: Any = None  # (step, total), called by the device thread after each step
    events: queue.Queue = field(default_factory=queue.Queue)
    device: Any = None
    first_step_at: float | None = None
    last_stepped: int = -1  # the iteration that last stepped it (fair turns between groups)
    # The overlapped lookup (NodeEngine.resolve): while ``lookup_pending``, the device steps the request
    # no further than ``hold_at``; ``resume`` is the start of a hit at K, bound and swapped in by the device.
    lookup_pending: bool = False
    hold_at: int | None = None
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


@dataclass
class DeviceStats:
    calls: int = 0
    requests_stepped: int = 0  # sum of batch sizes, in requests
    rows: int = 0  # sum of batch sizes, in U-Net samples (2 per request with guidance)
    call_s: float = 0.0  # time inside denoiser calls: the device's busy time
    started: float = field(default_factory=time.perf_counter)
    last_call: tuple[str, ...] = ()  # job ids of the requests in the call in flight, or the latest one

    @property
    def mean_batch(self) -> float:
        return self.requests_stepped / self.calls if self.calls else 0.0


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
    ):
        super().__init__(name=f"reprise-engine-{device.name}", daemon=True)
        self.device, self.waiting, self.max_batch = device, waiting, max_batch
        self.threads = threads  # torch intra-op threads of this device thread (None: torch's default)
        self.kick = kick or threading.Event()  # set when a held request's lookup is resolved
        self.active: list[EngineRequest] = []
        self.stats = DeviceStats()
        self.iteration = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while not self.stopped.is_set():
                try:
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
        while len(self.active) < self.max_batch:
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
            request.device = self.device
            self.active.append(request)

    def _next_group(self) -> list[EngineRequest]:
        """The group of the request that waited longest since its last step; stopped requests leave."""
        for request in list(self.active):
            reason = self._stop_reason(request)
            if reason:
                self._leave(request)
                t = request.trajectory
                request.events.put(("error", StopRequested(reason, t.i + 1, t.steps)))
        for request in list(self.active):
            if request.resume is not None:
                self._swap_in(request)
        ready = [r for r in self.active if not r.held]
        if not ready:
            return []
        first = min(ready, key=lambda r: (r.last_stepped, r.priority))
        key = first.turn_key()
        group = [r for r in ready if r.turn_key() == key]
        if any(r.adapters for r in group):  # one scale per adapter in a call: the longest waiting keep theirs
            turns = sorted(group, key=lambda r: (r.last_stepped, r.priority))
            kept = {id(turns[i]) for i in compatible([r.adapters for r in turns])}
            group = [r for r in group if id(r) in kept]
        return group

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
        if request.stop:
            return request.stop
        if request.is_cancelled is not None:
            try:
                if request.is_cancelled():
                    request.stop = "cancelled"
                    return request.stop
            except Exception as exc:  # the flag's store away: the caller's revoke check still stands
                log.debug("cancel check failed: %s", exc)
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
        c = self.device.loop.c
        group = self._load_adapters(group)
        if not group:
            return
        self.iteration += 1
        try:
            inputs = [r.trajectory.model_input() for r in group]
            for request in group:
                request.first_step_at = request.first_step_at or time.time()
            self.stats.last_call = tuple(r.job_id for r in group)
            t0 = time.perf_counter()
            rows = [r.trajectory.rows for r in group]
            if c.adapters is not None:  # this call's adapters (none: LoRA off), by this device thread only
                c.adapters.activate([r.adapters for r in group], rows)
            if len(group) == 1:  # alone, exactly as DenoiseLoop.denoise runs it
                request, (model_in, t) = group[0], inputs[0]
                runner = request.runner or PlainUNet()
                outputs = [runner(c.unet, model_in, t, request.trajectory.i, request.trajectory.context)]
            else:
                sample = torch.cat([x for x, _ in inputs])
                timesteps = torch.cat([t.reshape(1).float().expand(n) for n, (_, t) in zip(rows, inputs)])
                context = Conditioning.cat([r.trajectory.context for r in group])
                if group[0].runner is not None:  # a feature cache that batches (same turn key)
                    runners = [r.runner for r in group]
                    steps = [r.trajectory.i for r in group]
                    noise = type(runners[0]).run_batch(runners, c.unet, sample, timesteps, context, rows, steps)
                else:
                    noise = context.call(c.unet, sample, timesteps)
                outputs = noise.split(rows)
            if c.adapters is not None:
                c.adapters.release()
            self.stats.call_s += time.perf_counter() - t0
            self.stats.calls += 1
            self.stats.requests_stepped += len(group)
            self.stats.rows += sum(rows)
            for request, out in zip(group, outputs):
                request.last_stepped = self.iteration
                request.trajectory.advance(out)
                request.events.put(("step", request.trajectory.i, request.trajectory.steps))
                if request.on_progress is not None:
                    try:
                        request.on_progress(request.trajectory.i, request.trajectory.steps)
                    except Exception as exc:  # progress is advisory: never fail a step over it
                        log.warning("progress report failed: %s", exc)
        except Exception as exc:  # the whole call failed: every request in it gets the error, the device goes on
            log.exception("denoiser call failed on %s (jobs %s)", self.device.name, ", ".join(self.stats.last_call))
            for request in group:
                self._leave(request)
                request.events.put(("error", exc))
            return
        for request in group:
            if request.trajectory.done:
                self._leave(request)
                self._finish(request)

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
        self.device.jobs_done += 1
        request.events.put(("done", out, image, decode_s))


class NodeEngine:
    """The node's devices and their schedulers. ``submit`` hands a request in; ``wait`` is the caller's
    side: it reports progress, forwards a cancel, and returns (LoopOutput, image or None, decode_s)."""

    def __init__(self, devices: list, max_batch: int = 8, threads: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.waiting: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self.kick = threading.Event()
        self.schedulers = [DeviceScheduler(d, self.waiting, max_batch, self.kick, threads) for d in devices]
        for s in self.schedulers:
            s.start()

    def submit(self, request: EngineRequest) -> None:
        self.waiting.put((request.priority, next(self._order), request))

    def resolve(self, request: EngineRequest, resume: Any = None) -> None:
        """The request's lookup is answered: ``resume`` = the start resumed at K for a hit, None for a miss.
        The device binds it and swaps it in before its next step of the request."""
        request.resume = resume
        request.lookup_pending = False
        self.kick.set()

    def wait(self, request: EngineRequest, on_progress=None, is_cancelled=None) -> tuple[LoopOutput, Any, float]:
        if request.on_progress is not None:  # the device thread reports every step itself
            on_progress = None
        while True:
            try:
                event = request.events.get(timeout=0.25)
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
            if request.stop is None and is_cancelled is not None and is_cancelled():
                request.stop = "cancelled"

    def stats(self) -> dict[str, DeviceStats]:
        return {s.device.name: s.stats for s in self.schedulers}

    def close(self) -> None:
        for _ in self.schedulers:
            self.waiting.put((-1, next(self._order), None))
        for s in self.schedulers:
            s.join(timeout=5)
