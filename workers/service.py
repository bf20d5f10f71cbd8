"""One node's generation service: validate → exact lookup → approximate lookup → denoise → decode →
store → write back. A plain object (no Celery in here), so it is tested without a broker.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from scheduler.errors import (
    AdapterModelMismatch,
    InvalidRequest,
    JobCancelled,
    JobTimeout,
    SizeOverLimit,
    UnknownAdapter,
    UnknownModel,
)
from scheduler.registry import count_outcome
from scheduler.schema import (
    CacheReport,
    FeatureReport,
    GenerationRequest,
    GenerationResult,
    Timings,
    parse_request,
    with_model,
)
from workers.approx_gate import ApproxGate
from workers.artifacts import ArtifactStore
from workers.cache_path import CachePath
from workers.denoise_loop import DenoiseLoop, StopRequested
from workers.engine import EngineRequest, NodeEngine
from workers.families import Conditioning
from workers.feature_cache import batches, feature_identity, make_unet_runner, methods_for, resolve_feature_options
from workers.lora import ActiveLora, adapter_identity, batch_key
from workers.model_loading import Components

log = logging.getLogger("reprise.worker")


def seed_for_job(job_id: str) -> int:
    """The seed of a request that gave none: fixed by the job id, so every delivery draws the same image."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4], "big")


@dataclass
class JobContext:
    """What the queue tells the service about one job, and how the service talks back."""

    job_id: str
    queued_at: float | None = None
    on_progress: Callable[[int, int], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    deadline: float | None = None  # time.time() past which the job stops at its next step


@dataclass
class Device:
    name: str
    loop: DenoiseLoop
    jobs_done: int = 0
    busy_s: float = 0.0


class DevicePool:
    """The node's devices. Which job runs on which device, and with which others, is the engine's choice
    (workers/engine.py)."""

    def __init__(self, devices: list[Device]):
        self.devices = devices


@dataclass
class StepTimer:
    """Moving average of seconds per denoising step: used to pad cache hits for timing isolation."""

    per_step_s: float | None = None
    decode_s: float = 0.0
    other_s: float = 0.0  # a miss's time outside denoise and decode: lookups, embedding, artifact write
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, steps: int, denoise_s: float, decode_s: float, other_s: float | None = None) -> None:
        if steps <= 0:
            return
        with self.lock:
            s = denoise_s / steps
            self.per_step_s = s if self.per_step_s is None else 0.8 * self.per_step_s + 0.2 * s
            self.decode_s = 0.8 * self.decode_s + 0.2 * decode_s
            if other_s is not None:
                self.other_s = 0.8 * self.other_s + 0.2 * max(0.0, other_s)

    def miss_time(self, steps: int) -> float:
        return (self.per_step_s or 0.0) * steps + self.decode_s + self.other_s


@dataclass(frozen=True)
class Admission:
    """What admission fixed from the request alone (``GenerationService.admit``)."""

    request: GenerationRequest
    width: int
    height: int
    seed: int
    job: JobContext
    started: float
    queue_wait: float
    adapters: tuple = ()  # the request's LoRA adapters as the registry held them at admission (workers.lora)
    use_cache: bool = False
    shareable: bool = False
    stored_uri: str | None = None  # a redelivered job's image, already stored by an earlier delivery
    note: str | None = None  # why the cache is off, or sharing ignored


@dataclass(frozen=True)
class ExactLookup:
    """What the exact lookup found, before any device (``GenerationService.lookup``)."""

    key: Any = None  # cache.CacheKey; None where the request does not use the cache
    generation: int | None = None
    uri: str | None = None  # an exact hit's image (copied for this tenant where another one stored it)
    source_id: str | None = None
    lookup_ms: float | None = None
    capture: tuple[int, ...] = ()  # the steps after which states are kept for the write-back


@dataclass
class NearAnswer:
    """The approximate lookup's answer: written once, on the lookup thread, before the engine lets the job
    past its earliest resume step (so the job's own thread reads it after ``NodeEngine.wait``)."""

    vector: Any = None  # the prompt's embedding, reused by the write-back
    hit: Any = None  # cache.ApproxHit that can resume this request, or None
    ms: float = 0.0


@dataclass(frozen=True)
class DeviceRun:
    """What the device stage made (``GenerationService.on_device``), on the device that ran it."""

    out: Any  # workers.denoise_loop.LoopOutput
    image: Any  # the image where the device thread decoded it (CUDA), else None
    device: str
    loop: DenoiseLoop  # that device's loop (its VAE decodes the image)
    runner: Any  # the feature-cache runner that ran it (a hit's own, where one was swapped in), or None
    load_s: float  # admission, lookups, and the wait for a batch
    decode_s: float
    embed: bool  # False: the write-back is stored without a prompt vector (the lookup was gated)
    near: NearAnswer | None  # None where no approximate lookup was made
    resumed: bool  # the engine resumed it from the approximate hit's state
    steps_discarded: int


@dataclass
class DeviceStart:
    """Where a request's denoising starts, free of any device: the engine's device thread that takes the
    request binds it (``bind``) to its own device, so the trajectory, the scheduler's state and the
    feature-cache runner are made where they run. A cache hit is another start (``state`` at ``start_step``)."""

    request: GenerationRequest
    seed: int
    width: int
    height: int
    capture: list[int]  # the steps after which states are kept for the write-back
    context: Conditioning  # the prompt's conditioning, computed off the device; moved onto it by ``bind``
    feature: dict  # the feature cache's resolved settings (workers.feature_cache.resolve_feature_options)
    state: torch.Tensor | None = None  # a stored state (float32, CPU), or None for fresh noise
    start_step: int = 0

    @property
    def method(self) -> str:
        return self.feature.get("method") or "off"

    def resumed(self, state: np.ndarray, k: int) -> DeviceStart:
        return replace(self, state=torch.from_numpy(np.ascontiguousarray(state, dtype=np.float32)), start_step=k)

    def bind(self, loop: DenoiseLoop):
        """(Trajectory, runner or None) on ``loop``'s device: called by the device thread that will step it."""
        request = self.request
        capture = [k for k in self.capture if k > self.start_step]
        trajectory = loop.trajectory(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            seed=self.seed,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=self.width,
            height=self.height,
            scheduler=request.scheduler,
            start_latents=self.state,
            start_step=self.start_step,
            capture_at=capture,
            snap_dtype=torch.float16 if capture else None,  # the cache stores float16 states
            context=self.context.to(loop.c.device),
        )
        runner = None
        if self.method != "off":
            runner = make_unet_runner(loop.c, None, self.feature, steps=request.steps, start_step=self.start_step)
        return trajectory, runner


class GenerationService:
    def __init__(
        self,
        model_name: str,
        pool: DevicePool,
        artifacts: ArtifactStore,
        cache=None,  # cache.LatentCache or None
        registry=None,  # scheduler.registry.ModelRegistry or None
        feature_defaults: dict | None = None,
        writeback_queue: int = 64,
        hostname: str | None = None,
        max_batch: int = 8,
        job_threads: int | None = None,
        engine_options: dict | None = None,  # NodeEngine's stall_s and oom_recover_s (WorkerSettings)
        adapter_registry=None,  # scheduler.adapters.AdapterRegistry, or None: requests naming adapters are refused
        lora_batching: str = "mixed",
        approx_gate: ApproxGate | None = None,  # workers/approx_gate.py (WorkerSettings); None: every lookup made
    ):
        self.model_name = model_name
        self.pool = pool
        self.artifacts = artifacts
        self.cache = cache
        self.registry = registry
        self.feature_defaults = feature_defaults or {"method": "off"}
        self.hostname = hostname or socket.gethostname()
        self.timer = StepTimer()
        self.max_batch = max_batch
        self.engine_options = engine_options or {}
        self.adapter_registry = adapter_registry
        self.lora_batching = lora_batching
        self.approx_gate = approx_gate or ApproxGate(enabled=False)
        # Torch's intra-op threads: the device threads keep what the process has now; a job's own CPU work
        # (conditioning, embedding, decode on the CPU) uses ``job_threads`` where set. Where the device is
        # the CPU itself, jobs running at once with 2-thread kernels each oversubscribe the cores the device
        # computes on, and OpenMP's spinning threads then slow every one of them (workers/node.py sets 1).
        self.device_threads = torch.get_num_threads()
        self.job_threads = job_threads
        self._local = threading.local()
        self._engine: NodeEngine | None = None
        self._engine_lock = threading.Lock()
        self.writeback_queue = writeback_queue
        self._cache_path: CachePath | None = None  # the batched lookup stage and the writer (workers/cache_path.py)
        self.before_lookup: Callable[[], object] | None = None  # e.g. apply pending invalidation rules
        self.share_grants: frozenset[str] | None = None  # tenants that may set cache.share; None = all
        self.cache_note: str | None = None  # why there is no cache right now (it is being reopened)
        self.counters: dict[str, int] = {
            "jobs": 0,
            "exact": 0,
            "approximate": 0,
            "miss": 0,
            "writeback_failed": 0,
            "writeback_raced": 0,
            "writeback_dropped": 0,
            "writeback_written": 0,  # the cache path counts these four once it runs; a drain reads them before
        }

    @property
    def slots(self) -> int:
        """Jobs the node takes at once: a full batch on each device, and one per device in admission and
        lookup meanwhile, so the next job's lookups overlap the device's work instead of following it."""
        return len(self.pool.devices) * (self.max_batch + 1)

    @property
    def components(self) -> Components:
        return self.pool.devices[0].loop.c

    # --- validation ---------------------------------------------------------------------------
    def validate(self, payload: Any) -> tuple[GenerationRequest, int, int]:
        # A request that names no model reached this worker through its model's queue: the producer routed
        # it to the cluster's default model, which is this one. It is served, and reported, as this model.
        request = with_model(parse_request(payload), self.model_name)
        if request.model != self.model_name:
            raise UnknownModel(
                f"this worker serves {self.model_name!r}, not {request.model!r}",
                [{"field": "model", "problem": f"not served here (serves {self.model_name})"}],
            )
        spec = self.components.spec
        defaults = {
            "steps": spec.default_steps,
            "guidance_scale": spec.default_guidance,
            "scheduler": spec.default_scheduler,
        }
        absent = {k: v for k, v in defaults.items() if getattr(request, k) is None}
        if absent:  # the model's own defaults, fixed here so the cache key and the stored request name them
            request = request.model_copy(update=absent)
        width = request.width or spec.default_size
        height = request.height or spec.default_size
        factor = self.components.size_multiple
        problems = []
        for side, value in (("width", width), ("height", height)):
            if value > spec.max_size:
                problems.append(
                    {"field": side, "problem": f"{value} is over {self.model_name}'s limit of {spec.max_size}"}
                )
            elif value % factor:
                problems.append(
                    {"field": side, "problem": f"{value} is not a multiple of {factor} for {self.model_name}"}
                )
        family = self.components.family
        if request.scheduler not in family.schedulers:
            raise InvalidRequest(
                f"scheduler {request.scheduler!r} does not run {self.model_name} ({family.name}); "
                f"use {', '.join(family.schedulers)}",
                [{"field": "scheduler", "problem": f"not one of {', '.join(family.schedulers)} for {family.name}"}],
            )
        method = request.cache.feature.method
        methods = ["off", *methods_for(self.components)]
        if method is not None and method not in methods:
            raise InvalidRequest(
                f"feature cache {method!r} does not run on {self.model_name} ({family.name}); use {', '.join(methods)}"
                + (" (DeepCache and block caching work on U-Nets)" if family.denoiser != "unet" else ""),
                [{"field": "cache.feature.method", "problem": f"{method} is not available for {family.name}"}],
            )
        if method == "taylorseer" and request.cache.feature.taylorseer_lite and not family.taylorseer_lite:
            raise InvalidRequest(
                f"TaylorSeer's lite mode does not run on {self.model_name} ({family.name})",
                [{"field": "cache.feature.taylorseer_lite", "problem": f"not available for {family.name}"}],
            )
        if problems:
            raise SizeOverLimit("; ".join(p["field"] + ": " + p["problem"] for p in problems), problems)
        return request, width, height

    # --- one job: admit → lookup → device → decode → store -------------------------------------
    def run(self, payload: Any, job: JobContext) -> GenerationResult:
        """Serve one job. Only the device stage holds a device: admission, lookups, the artifact write
        and the write-back run on the caller's thread, so a cache miss costs the device nothing. Each stage
        returns what it found or made (``Admission``, ``ExactLookup``, ``DeviceRun``); the report is made
        once, from them (``_report``)."""
        if self.job_threads is not None and getattr(self._local, "threads", None) != self.job_threads:
            torch.set_num_threads(self.job_threads)  # this thread only (and threads started after it)
            self._local.threads = self.job_threads
        admission = self.admit(payload, job)
        found = self.lookup(admission)
        ran, uri, decode_s = None, admission.stored_uri or found.uri, 0.0
        if uri is None:
            ran = self.on_device(admission, found)
            image, decode_s = self.decode(ran)
            uri = self.store(admission, found, ran, image, decode_s)
        report = self._report(admission, found, ran)
        self._pad_for_isolation(admission, report.hit)
        result = self._result(admission, report, uri, ran, decode_s)
        self._count(result)
        return result

    def admit(self, payload: Any, job: JobContext) -> Admission:
        """Validate, fix the seed, and find the image of a redelivered job that was already stored."""
        started = time.time()
        request, width, height = self.validate(payload)
        # A redelivered job (worker died, visibility timeout) must redo the same image: no seed, one per job id.
        seed = request.seed if request.seed is not None else seed_for_job(job.job_id)
        adapters = self.resolve_adapters(request)
        admission = Admission(
            request=request,
            width=width,
            height=height,
            seed=seed,
            job=job,
            started=started,
            queue_wait=max(0.0, started - job.queued_at) if job.queued_at else 0.0,
            adapters=adapters,
            note=self.cache_note if self.cache is None else None,
        )
        done = self._already_stored(request, seed, width, height, job, adapters)
        if done is not None:  # a redelivery of a job whose image was fully written: reuse it, never redo it
            return replace(admission, stored_uri=done, note="redelivered job: its image was already stored")
        shareable, note = request.cache.share, admission.note
        if shareable and self.share_grants is not None and request.tenant not in self.share_grants:
            shareable = False
            note = f"share ignored: tenant {request.tenant!r} is not granted sharing (REPRISE_SHARE_TENANTS)"
        use_cache = self.cache is not None and (request.cache.exact or request.cache.approximate or request.cache.write)
        return replace(admission, shareable=shareable, use_cache=use_cache, note=note)

    def resolve_adapters(self, request: GenerationRequest) -> tuple:
        """The request's adapters, resolved again here (the producer checked them before queueing, but an
        adapter may have been removed or replaced since): typed errors for unknown or foreign ones."""
        if not request.loras:
            return ()
        if self.adapter_registry is None:
            raise UnknownAdapter(
                f"this worker serves no LoRA adapters (no registry): {', '.join(x.name for x in request.loras)}",
                [{"field": "loras", "problem": "no adapter registry on this worker"}],
            )
        resolved = self.adapter_registry.resolve(self.model_name, request.loras)
        family = self.components.family
        for i, (adapter, _) in enumerate(resolved):
            if adapter.denoiser != family.denoiser:  # e.g. a Flux adapter registered for an SD 1.5 model
                raise AdapterModelMismatch(
                    f"adapter {adapter.name!r} targets a {adapter.denoiser}; {self.model_name} ({family.name}) "
                    f"has a {family.denoiser}",
                    [{"field": f"loras.{i}.name", "problem": f"made for a {adapter.denoiser}"}],
                )
        return tuple(ActiveLora(a.name, a.version, scale, a.uri, a.text_encoder) for a, scale in resolved)

    def lookup(self, admission: Admission) -> ExactLookup:
        """The exact lookup, before any device: a hit ends the job here. The rest of the lookup (prompt
        embedding, approximate lookup, state fetch) overlaps the job's first steps (``on_device``)."""
        if admission.stored_uri is not None or not admission.use_cache:
            return ExactLookup()
        request = admission.request
        began = time.perf_counter()
        if self.before_lookup is not None:
            self.before_lookup()
        key, generation = self._cache_key(
            request, admission.seed, admission.width, admission.height, admission.adapters
        )
        capture = tuple(self.cache.state_steps(request.steps)) if request.cache.write else ()
        t = time.perf_counter()
        uri = source_id = None
        if request.cache.exact:
            hit = self.cache.lookup_exact(key, allow_shared=request.cache.use_shared)
            if hit is not None and self.artifacts.exists(hit.image_uri):
                uri, source_id = hit.image_uri, hit.entry_id
                if hit.tenant != request.tenant:
                    uri = self.artifacts.copy_for(hit.image_uri, request.tenant, admission.job.job_id)
                # An exact hit saves all N steps; LCBFU scores states, so credit the deepest one
                # (K_max x hits keeps the entry, and with it the image, among the most beneficial).
                ks = self.cache.state_steps(request.steps)
                self.cache.record_hit(hit.entry_id, ks[-1] if ks else request.steps)
        lookup_ms = (time.perf_counter() - t) * 1000
        self.cache_path.note_exact(time.perf_counter() - began)
        return ExactLookup(key, generation, uri, source_id, lookup_ms, capture)

    @property
    def cache_path(self) -> CachePath:
        """The node's batched cache stages, started with the first request that uses the cache."""
        with self._engine_lock:
            if self._cache_path is None:
                settings = getattr(self.cache, "settings", None)
                self._cache_path = CachePath(
                    lambda: self.cache,
                    self.counters,
                    writeback_queue=self.writeback_queue,
                    batch_max=getattr(settings, "batch_max", 64),
                    embed_threads=getattr(settings, "embed_threads", 1),
                    gate=self.approx_gate,
                    when_quiet=None if self.host_computes else self._when_quiet,
                )
            return self._cache_path

    @property
    def host_computes(self) -> bool:
        """Some device of this node computes on the host's own cores (``cpu``; not ``sim``, whose calls
        sleep). Its calls want the interpreter lock and the cores from start to end, so no moment inside
        one is quiet, and waiting for one only delays the entry into the next call: the writer then stores
        each entry at once, on its lower-priority thread (``CachePath`` without ``when_quiet``)."""
        return any(d.loop.c.device.type == "cpu" and not d.loop.c.extra.get("simulated") for d in self.pool.devices)

    def _when_quiet(self, margin_s: float, timeout_s: float) -> bool:
        return self._engine is None or self._engine.wait_quiet(margin_s, timeout_s)

    def lookup_near(self, key, request: GenerationRequest, start: DeviceStart, entry: EngineRequest) -> NearAnswer:
        """Prompt embedding, approximate lookup and state fetch in the node's next lookup batch, while the
        job's first steps run: the lookup thread fills the answer and resolves ``entry`` (resumed at K for a
        hit, None otherwise), or skips the lookup if the engine already ran the job on fresh (held past the
        lookup's time box)."""
        answer, t = NearAnswer(), time.perf_counter()

        def answered(vector, ahit) -> None:  # on the lookup thread, before the engine lets the job past K
            resume = None
            try:
                answer.vector = vector
                if ahit is not None and 0 < ahit.k < request.steps:
                    answer.hit = ahit
                    resume = start.resumed(ahit.state, ahit.k)
            finally:
                answer.ms = (time.perf_counter() - t) * 1000
                self.engine.resolve(entry, resume)

        # past its useful step: held there beyond the lookup's time box, the job runs on fresh
        self.cache_path.submit(key, request.prompt, request.cache.use_shared, lambda: entry.lookup_expired, answered)
        return answer

    def on_device(self, admission: Admission, found: ExactLookup) -> DeviceRun:
        """The device stage: the job's start (its conditioning computed here, off the device) goes to the
        node engine, whose device thread that takes it binds it to its device and steps it in batches with
        the other active jobs, while the node's lookup thread answers its approximate lookup
        (``lookup_near``); a hit is bound and swapped in by the engine before the earliest step a stored
        state can resume at, so the image never depends on which finished first."""
        loop, request, job = self.pool.devices[0].loop, admission.request, admission.job
        # The conditioning is the one device-free tensor computed here; the device thread that takes the
        # request moves it onto its device and binds the rest. Adapters with text-encoder weights apply them
        # for this encode only, alone on the text encoders (workers/lora.py), and bypass the text memo.
        text_adapters = any(x.text_encoder for x in admission.adapters)

        def conditioning():
            return loop.conditioning(
                request.prompt,
                request.negative_prompt,
                request.guidance_scale,
                request.cache.feature.text_memo and not text_adapters,
                admission.width,
                admission.height,
            )

        context = loop.c.adapters.encode(admission.adapters, conditioning) if text_adapters else conditioning()
        # Only an approximate lookup that can resume at some K is made (a write-only request's prompt is
        # embedded by the writer), and only while this node's lookups pay for themselves or as the gate's
        # probe (workers/approx_gate.py); the engine holds the job at the earliest K until it is answered.
        ks = self.cache.state_steps(request.steps) if admission.use_cache and request.cache.approximate else []
        near = bool(ks) and self.approx_gate.admit()
        if ks and not near:
            self.cache_path.note_gated()
        embed = near or self.approx_gate.is_open
        # An entry stored without a prompt vector is found by exact lookups only, and they need its image, not
        # its states: a request whose write-back will not be embedded captures none (no copies on the device,
        # nothing to convert or store).
        start = DeviceStart(
            request,
            admission.seed,
            admission.width,
            admission.height,
            list(found.capture) if embed else [],
            context,
            resolve_feature_options(request.cache.feature, self.feature_defaults),
        )
        # A feature cache that cannot batch (block caching, diffusers' hooks) runs alone, as a deterministic request does.
        alone = request.deterministic or not batches(start.method)
        entry = EngineRequest(
            start,
            group=("solo", job.job_id)
            if alone
            else (
                "shared",
                admission.width,
                admission.height,
                start.method,
                *batch_key(admission.adapters, self.lora_batching),
            ),
            job_id=job.job_id,
            adapters=admission.adapters,
            priority=request.priority,
            deadline=job.deadline,
            decode_on_device=loop.c.device.type == "cuda",
            is_cancelled=job.is_cancelled,
            on_progress=job.on_progress,
            lookup_pending=near,
            hold_at=min(ks) if near else None,
            hold_limit_s=getattr(getattr(self.cache, "settings", None), "lookup_timeout_ms", 50.0) / 1000,
        )
        self.engine.submit(entry)
        answer = self.lookup_near(found.key, request, start, entry) if near else None
        try:
            out, image, decode_s = self.engine.wait(entry, job.on_progress, job.is_cancelled)
        except StopRequested as exc:
            error = JobCancelled if exc.reason == "cancelled" else JobTimeout
            raise error(f"job {job.job_id}: {exc}", {"step": exc.step, "steps": exc.steps}) from None
        if entry.held_s:
            self.cache_path.note_hold(entry.held_s)
        if answer is not None and answer.hit is not None and entry.resumed:
            self.cache.record_hit(answer.hit.entry_id, answer.hit.k)
            step_s = self.engine.stats()[entry.device.name].request_step_s  # this device's seconds a request step
            self.approx_gate.note_saved(max(0, answer.hit.k - entry.steps_discarded) * step_s)
        return DeviceRun(
            out=out,
            image=image,
            device=entry.device.name,
            loop=entry.device.loop,
            runner=entry.runner,  # made by the device thread (a hit's own, where one was swapped in)
            load_s=max(0.0, (entry.first_step_at or time.time()) - admission.started),
            decode_s=decode_s,
            embed=embed,
            near=answer,
            resumed=entry.resumed,
            steps_discarded=entry.steps_discarded,
        )

    def decode(self, ran: DeviceRun) -> tuple[Any, float]:
        """(The image, seconds to decode it): decoded by the device thread where decoding is device work
        (CUDA: ``ran.image`` is given), here otherwise, on this thread with the VAE of the device that ran
        the job (off the device)."""
        if ran.image is not None:
            return ran.image, ran.decode_s
        t = time.perf_counter()
        image = ran.loop.decode(ran.out.latents)
        return image, time.perf_counter() - t

    @property
    def engine(self) -> NodeEngine:
        """The node engine, started with the first job that needs a device."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = NodeEngine(
                    self.pool.devices, self.max_batch, threads=self.device_threads, **self.engine_options
                )
            return self._engine

    def store(self, admission: Admission, found: ExactLookup, ran: DeviceRun, image, decode_s: float) -> str:
        """After the device: the artifact (its URI returned), the step timer, and the write-back (queued,
        never awaited)."""
        request, out = admission.request, ran.out
        metadata = {
            "request": request.model_dump(mode="json"),
            "seed": admission.seed,
            "model_version": self.components.fingerprint,
            "adapters": adapter_identity(admission.adapters),
            "job_id": admission.job.job_id,
        }
        uri = self.artifacts.write_png(image, request.tenant, admission.job.job_id, metadata)
        # Misses teach the timer what a miss costs end to end (hits are padded to it under isolate_timing).
        other_s = None if ran.resumed else time.time() - admission.started - out.denoise_s - decode_s
        self.timer.observe(out.steps_computed, out.denoise_s, decode_s, other_s)
        # Queued for the writer, never awaited; a request that captured no states on purpose (its entry stored
        # unembedded) still leaves its image for exact lookups.
        if admission.use_cache and request.cache.write and (out.captured or (found.capture and not ran.embed)):
            vector = ran.near.vector if ran.near is not None else None
            self.cache_path.write_back(found.key, vector, out.captured, uri, admission.shareable, embed=ran.embed)
        return uri

    def _report(self, admission: Admission, found: ExactLookup, ran: DeviceRun | None) -> CacheReport:
        """The request's cache report, made once from what its stages found."""
        steps = admission.request.steps
        report = CacheReport(
            hit="off" if self.cache is None else "miss",
            note=admission.note,
            generation=found.generation,
            lookup_ms=found.lookup_ms,
        )
        if admission.stored_uri is not None or found.uri is not None:
            report.hit, report.source_id, report.steps_saved = "exact", found.source_id, steps
            return report
        report.steps_computed = ran.out.steps_computed
        report.steps_saved = steps - ran.out.steps_computed
        if ran.runner is not None and hasattr(ran.runner, "report"):
            report.feature = FeatureReport(**ran.runner.report())
        if ran.near is None:
            return report
        report.lookup_ms = (report.lookup_ms or 0.0) + ran.near.ms
        ahit = ran.near.hit
        if ahit is None:
            return report
        if not ran.resumed:  # a state stored under other settings, before this request's earliest resume step
            report.note = f"approximate hit at K={ahit.k} was found after step {ahit.k} had run: served fresh"
            return report
        report.hit, report.k, report.similarity, report.source_id = (
            "approximate",
            ahit.k,
            float(ahit.similarity),
            ahit.entry_id,
        )
        report.steps_discarded = ran.steps_discarded
        return report

    def _count(self, result: GenerationResult) -> None:
        self.counters["jobs"] += 1
        self.counters[result.cache.hit if result.cache.hit in self.counters else "miss"] += 1
        if self.registry is not None and result.cache.hit != "off":
            try:
                count_outcome(self.registry.r, self.registry.prefix, self.model_name, result.cache.hit, result.cache.k)
            except Exception as exc:  # statistics only
                log.warning("cannot count the cache outcome: %s", exc)

    # --- helpers ------------------------------------------------------------------------------
    def _already_stored(
        self, request: GenerationRequest, seed: int, width: int, height: int, job: JobContext, adapters: tuple = ()
    ) -> str | None:
        """The URI of this job's own image if an earlier delivery of it already stored it (same request)."""
        meta = self.artifacts.read_metadata(request.tenant, job.job_id)
        if (
            meta is not None
            and meta.get("job_id") == job.job_id
            and meta.get("seed") == seed
            and meta.get("model_version") == self.components.fingerprint
            and meta.get("request") == request.model_dump(mode="json")
            and meta.get("adapters", "") == adapter_identity(adapters)  # an adapter replaced since: redo
        ):
            return self.artifacts.uri_for(request.tenant, job.job_id)
        return None

    def _cache_key(self, request: GenerationRequest, seed: int, width: int, height: int, adapters: tuple = ()):
        from cache import CacheKey

        generation = self.registry.generation(self.model_name) if self.registry is not None else 0
        key = CacheKey(
            model=self.model_name,
            model_version=self.components.fingerprint,
            generation=generation,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            seed=seed,
            steps=request.steps,
            guidance=request.guidance_scale,
            width=width,
            height=height,
            scheduler=request.scheduler,
            tenant=request.tenant,
            feature=feature_identity(resolve_feature_options(request.cache.feature, self.feature_defaults)),
            adapters=adapter_identity(adapters),
        )
        return key, generation

    def _pad_for_isolation(self, admission: Admission, hit: str) -> None:
        """A hit answers no sooner than a miss would (off the device: the padding holds no device)."""
        if not admission.request.cache.isolate_timing or hit not in ("exact", "approximate"):
            return
        remaining = self.timer.miss_time(admission.request.steps) - (time.time() - admission.started)
        if remaining > 0:
            time.sleep(remaining)

    def drain_writebacks(self, timeout: float = 30.0) -> None:
        """Wait for pending write-backs (tests, shutdown, the ``drain_writebacks`` cache op)."""
        if self._cache_path is not None:
            self._cache_path.drain(timeout)

    def _result(
        self, admission: Admission, report: CacheReport, uri: str, ran: DeviceRun | None, decode_s: float
    ) -> GenerationResult:
        total = time.time() - admission.started
        return GenerationResult(
            job_id=admission.job.job_id,
            image_uri=uri,
            seed=admission.seed,
            width=admission.width,
            height=admission.height,
            steps=admission.request.steps,
            model=self.model_name,
            model_version=self.components.fingerprint,
            device=ran.device if ran is not None else "",
            worker=self.hostname,
            timings=Timings(
                queue_wait_s=round(admission.queue_wait, 4),
                load_s=round(ran.load_s if ran is not None else total, 4),
                denoise_s=round(ran.out.denoise_s if ran is not None else 0.0, 4),
                decode_s=round(decode_s, 4),
                total_s=round(total + admission.queue_wait, 4),
            ),
            cache=report,
        )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        if self._cache_path is not None:
            self._cache_path.close()
        if self.cache is not None:
            self.cache.close()
