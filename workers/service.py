"""One node's generation service: validate → exact lookup → approximate lookup → denoise → decode →
store → write back. A plain object (no Celery in here), so it is tested without a broker.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from scheduler.errors import JobCancelled, JobTimeout, SizeOverLimit, UnknownModel
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
from workers.artifacts import ArtifactStore
from workers.models import Components
from workers.sampler import DenoiseLoop, StopRequested

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
    """Each device runs one job at a time; a job borrows a free device for its whole run."""

    def __init__(self, devices: list[Device]):
        self.devices = devices
        self._free: queue.Queue[Device] = queue.Queue()
        for d in devices:
            self._free.put(d)

    def acquire(self) -> Device:
        return self._free.get()

    def release(self, device: Device) -> None:
        self._free.put(device)


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
    ):
        self.model_name = model_name
        self.pool = pool
        self.artifacts = artifacts
        self.cache = cache
        self.registry = registry
        self.feature_defaults = feature_defaults or {"method": "off"}
        self.hostname = hostname or socket.gethostname()
        self.timer = StepTimer()
        self._writeback = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reprise-writeback")
        self._writeback_slots = threading.BoundedSemaphore(writeback_queue)
        self.before_lookup: Callable[[], object] | None = None  # e.g. apply pending invalidation rules
        self.share_grants: frozenset[str] | None = None  # tenants that may set cache.share; None = all
        self.cache_note: str | None = None  # why there is no cache right now (it is being reopened)
        self.counters: dict[str, int] = {
            "jobs": 0,
            "exact": 0,
            "approximate": 0,
            "miss": 0,
            "writeback_failed": 0,
            "writeback_dropped": 0,
        }

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
        width = request.width or spec.default_size
        height = request.height or spec.default_size
        factor = self.components.vae_scale_factor
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
        if problems:
            raise SizeOverLimit("; ".join(p["field"] + ": " + p["problem"] for p in problems), problems)
        return request, width, height

    # --- one job ------------------------------------------------------------------------------
    def run(self, payload: Any, job: JobContext) -> GenerationResult:
        started = time.time()
        request, width, height = self.validate(payload)
        # A redelivered job (worker died, visibility timeout) must redo the same image: no seed, one per job id.
        seed = request.seed if request.seed is not None else seed_for_job(job.job_id)
        queue_wait = max(0.0, started - job.queued_at) if job.queued_at else 0.0
        device = self.pool.acquire()
        try:
            result = self._run_on(device, request, seed, width, height, job, started, queue_wait)
        finally:
            self.pool.release(device)
        self.counters["jobs"] += 1
        self.counters[result.cache.hit if result.cache.hit in self.counters else "miss"] += 1
        if self.registry is not None and result.cache.hit != "off":
            try:
                count_outcome(self.registry.r, self.registry.prefix, self.model_name, result.cache.hit, result.cache.k)
            except Exception as exc:  # statistics only
                log.warning("cannot count the cache outcome: %s", exc)
        return result

    def _run_on(
        self, device: Device, request, seed, width, height, job: JobContext, started, queue_wait
    ) -> GenerationResult:
        loop = device.loop
        c = loop.c
        steps = request.steps
        report = CacheReport(
            hit="off" if self.cache is None else "miss", note=self.cache_note if self.cache is None else None
        )
        done = self._already_stored(request, seed, width, height, job)
        if done is not None:  # a redelivery of a job whose image was fully written: reuse it, never redo it
            report.hit, report.steps_saved = "exact", steps
            report.note = "redelivered job: its image was already stored"
            return self._result(
                job,
                request,
                seed,
                width,
                height,
                done,
                device,
                report,
                started,
                queue_wait,
                0.0,
                0.0,
                time.time() - started,
            )
        shareable = request.cache.share
        if shareable and self.share_grants is not None and request.tenant not in self.share_grants:
            shareable = False
            report.note = f"share ignored: tenant {request.tenant!r} is not granted sharing (REPRISE_SHARE_TENANTS)"
        use_cache = self.cache is not None and (request.cache.exact or request.cache.approximate or request.cache.write)
        key = vector = None
        start_latents, start_step = None, 0

        if use_cache:
            if self.before_lookup is not None:
                self.before_lookup()
            key, report.generation = self._cache_key(request, seed, width, height)
            t = time.perf_counter()
            if request.cache.exact:
                hit = self.cache.lookup_exact(key, allow_shared=request.cache.use_shared)
                if hit is not None and self.artifacts.exists(hit.image_uri):
                    uri = hit.image_uri
                    if hit.tenant != request.tenant:
                        uri = self.artifacts.copy_for(hit.image_uri, request.tenant, job.job_id)
                    # An exact hit saves all N steps; LCBFU scores states, so credit the deepest one
                    # (K_max x hits keeps the entry, and with it the image, among the most beneficial).
                    ks = self.cache.state_steps(steps)
                    self.cache.record_hit(hit.entry_id, ks[-1] if ks else steps)
                    report.hit, report.source_id, report.steps_saved = "exact", hit.entry_id, steps
                    report.lookup_ms = (time.perf_counter() - t) * 1000
                    self._pad_for_isolation(request, started)
                    return self._result(
                        job,
                        request,
                        seed,
                        width,
                        height,
                        uri,
                        device,
                        report,
                        started,
                        queue_wait,
                        0.0,
                        0.0,
                        time.time() - started,
                    )
            if request.cache.approximate or request.cache.write:
                vector = self.cache.embed(request.prompt)
            if request.cache.approximate and vector is not None:
                ahit = self.cache.lookup_approx(key, vector, allow_shared=request.cache.use_shared)
                if ahit is not None and 0 < ahit.k < steps:
                    start_latents = torch.from_numpy(np.ascontiguousarray(ahit.state, dtype=np.float32))
                    start_step = ahit.k
                    self.cache.record_hit(ahit.entry_id, ahit.k)
                    report.hit, report.k, report.similarity, report.source_id = (
                        "approximate",
                        ahit.k,
                        float(ahit.similarity),
                        ahit.entry_id,
                    )
            report.lookup_ms = (time.perf_counter() - t) * 1000

        prep_s = time.time() - started  # device, lookups and state fetch: the job's "load" time
        capture = self.cache.state_steps(steps) if use_cache and request.cache.write else []
        capture = [k for k in capture if k > start_step]
        runner = self._unet_runner(c, request, steps, start_step)

        def should_stop() -> str | None:
            if job.is_cancelled is not None and job.is_cancelled():
                return "cancelled"
            if job.deadline is not None and time.time() > job.deadline:
                return "time limit"
            return None

        try:
            out = loop.denoise(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                seed=seed,
                steps=steps,
                guidance_scale=request.guidance_scale,
                width=width,
                height=height,
                scheduler=request.scheduler,
                start_latents=start_latents,
                start_step=start_step,
                capture_at=capture,
                unet_runner=runner,
                on_step=job.on_progress,
                should_stop=should_stop,
                snap_dtype=torch.float16 if capture else None,  # the cache stores float16 states
                use_text_memo=request.cache.feature.text_memo,
            )
        except StopRequested as exc:
            error = JobCancelled if exc.reason == "cancelled" else JobTimeout
            raise error(f"job {job.job_id}: {exc}", {"step": exc.step, "steps": exc.steps}) from None
        t = time.perf_counter()
        image = loop.decode(out.latents)
        decode_s = time.perf_counter() - t
        report.steps_computed = out.steps_computed
        report.steps_saved = steps - out.steps_computed
        if runner is not None and hasattr(runner, "report"):
            report.feature = FeatureReport(**runner.report())
        metadata = {
            "request": request.model_dump(mode="json"),
            "seed": seed,
            "model_version": c.fingerprint,
            "job_id": job.job_id,
        }
        uri = self.artifacts.write_png(image, request.tenant, job.job_id, metadata)
        device.jobs_done += 1
        # Misses teach the timer what a miss costs end to end (hits are padded to it under isolate_timing).
        other_s = time.time() - started - out.denoise_s - decode_s if report.hit == "miss" else None
        self.timer.observe(out.steps_computed, out.denoise_s, decode_s, other_s)
        if use_cache and request.cache.write and out.captured and vector is not None:
            self._schedule_writeback(key, vector, out.captured, uri, shareable)
        if report.hit == "approximate":
            self._pad_for_isolation(request, started)
        return self._result(
            job, request, seed, width, height, uri, device, report, started, queue_wait, out.denoise_s, decode_s, prep_s
        )

    # --- helpers ------------------------------------------------------------------------------
    def _already_stored(
        self, request: GenerationRequest, seed: int, width: int, height: int, job: JobContext
    ) -> str | None:
        """The URI of this job's own image if an earlier delivery of it already stored it (same request)."""
        meta = self.artifacts.read_metadata(request.tenant, job.job_id)
        if (
            meta is not None
            and meta.get("job_id") == job.job_id
            and meta.get("seed") == seed
            and meta.get("model_version") == self.components.fingerprint
            and meta.get("request") == request.model_dump(mode="json")
        ):
            return self.artifacts.uri_for(request.tenant, job.job_id)
        return None

    def _cache_key(self, request: GenerationRequest, seed: int, width: int, height: int):
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
        )
        return key, generation

    def _unet_runner(self, components, request: GenerationRequest, steps: int, start_step: int):
        options = request.cache.feature.model_dump()
        method = options.get("method") or self.feature_defaults.get("method", "off")
        if method == "off":
            return None
        from workers.feature_cache import make_unet_runner

        return make_unet_runner(components, options, self.feature_defaults, steps=steps, start_step=start_step)

    def _pad_for_isolation(self, request: GenerationRequest, started: float) -> None:
        if not request.cache.isolate_timing:
            return
        remaining = self.timer.miss_time(request.steps) - (time.time() - started)
        if remaining > 0:
            time.sleep(remaining)

    def _schedule_writeback(self, key, vector, captured: dict, uri: str, shareable: bool) -> None:
        if not self._writeback_slots.acquire(blocking=False):
            self.counters["writeback_dropped"] += 1
            log.warning("write-back queue full: dropping the states of %s", key.prompt[:40])
            return
        states = {k: v[0].float().cpu().numpy() for k, v in captured.items()}

        def write() -> None:
            try:
                if not self.cache.write_back(key, vector, states, uri, shareable):
                    self.counters["writeback_failed"] += 1
            except Exception:  # a failed write-back never fails a job
                self.counters["writeback_failed"] += 1
                log.exception("cache write-back failed")
            finally:
                self._writeback_slots.release()

        self._writeback.submit(write)

    def drain_writebacks(self, timeout: float = 30.0) -> None:
        """Wait for pending write-backs (tests, shutdown)."""
        self._writeback.submit(lambda: None).result(timeout=timeout)

    def _result(
        self, job, request, seed, width, height, uri, device, report, started, queue_wait, denoise_s, decode_s, load_s
    ):
        total = time.time() - started
        return GenerationResult(
            job_id=job.job_id,
            image_uri=uri,
            seed=seed,
            width=width,
            height=height,
            steps=request.steps,
            model=self.model_name,
            model_version=self.components.fingerprint,
            device=device.name,
            worker=self.hostname,
            timings=Timings(
                queue_wait_s=round(queue_wait, 4),
                load_s=round(load_s, 4),
                denoise_s=round(denoise_s, 4),
                decode_s=round(decode_s, 4),
                total_s=round(total + queue_wait, 4),
            ),
            cache=report,
        )

    def close(self) -> None:
        self._writeback.shutdown(wait=True)
        if self.cache is not None:
            self.cache.close()
