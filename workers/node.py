"""One worker node: every device of the machine served from one process.

Why one process: an embedded Qdrant (the default cache) can be opened by one process only, and
CUDA must never be touched before a fork. So the node loads one pipeline per device in this
process, then runs Celery's thread pool with one slot per device; PyTorch releases the GIL inside
its kernels, so the devices run in parallel. With a Qdrant server (QDRANT_URL) a node may instead
run one process per GPU (`reprise worker --devices cuda:1`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

import torch

from scheduler.adapters import AdapterRegistry
from scheduler.registry import ModelRegistry
from scheduler.settings import ClusterSettings
from workers.approx_gate import ApproxGate
from workers.artifacts import ArtifactStore
from workers.broker_guard import guard_broker_consumer, keep_broker_channels_closable, keep_running_jobs_on_reconnect
from workers.denoise_loop import DenoiseLoop
from workers.ledger_sweeper import LedgerSweeper
from workers.lora import device_adapters
from workers.model_loading import load_components
from workers.node_cache import open_cache_or_defer, reopen_later, text_memo_for
from workers.resilient_cache import ResilienceSettings
from workers.service import Device, DevicePool, GenerationService
from workers.settings import WorkerSettings, checked_settings, invalid_setting

log = logging.getLogger("reprise.worker")


def parse_devices(spec: str) -> list[str]:
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"]
    names = [d.strip() for d in spec.split(",") if d.strip()]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    allowed = ["auto", "cpu", "sim", "sim:N", *(f"cuda:{i}" for i in range(count))]
    for name in names:
        if name == "cpu" or name == "sim" or name.startswith("sim:"):
            continue
        if name.startswith("cuda"):
            index = name.split(":")[1] if ":" in name else "0"
            if not index.isdigit() or int(index) >= count:
                raise invalid_setting("devices", spec, f"device {name} is not available here", allowed)
            continue
        raise invalid_setting("devices", spec, f"unknown device {name!r}", allowed)
    if not names:
        raise invalid_setting("devices", spec, "no devices given", allowed)
    return names


def use_switch_interval(worker: WorkerSettings) -> None:
    """REPRISE_SWITCH_INTERVAL_MS for this process: how long a thread running Python keeps the interpreter
    lock while another waits for it. A device thread gives the lock up and takes it back around each of the
    small torch calls of a step's guidance and scheduler step (some hundreds per call of eight); behind a
    thread that runs Python meanwhile (the cache's lookup and writer, Celery's, the publisher) each take
    waited up to Python's default 5 ms, which is what made a full `sim` node's devices idle longer between
    calls with the caches on (docs/measured.md, issue 26's third round)."""
    sys.setswitchinterval(worker.switch_interval_ms / 1000)


def build_service(
    worker: WorkerSettings,
    cluster: ClusterSettings,
    redis_client=None,
    cache=None,
    open_cache: bool = True,
) -> GenerationService:
    """Load one pipeline per device (once), open the node's cache, register the model's fingerprint."""
    guard_broker_consumer()
    use_switch_interval(worker)
    # Settings are checked before anything loads: a wrong value stops the node (only a cache that is away
    # is retried in the background, below).
    from cache import CacheSettings

    if cache is None and open_cache and worker.cache_enabled:
        checked_settings(CacheSettings)
    checked_settings(ResilienceSettings)
    keep_broker_channels_closable()
    keep_running_jobs_on_reconnect()
    names = parse_devices(worker.devices)
    n_cpu = sum(1 for n in names if n == "cpu")
    if n_cpu:  # several CPU "devices" in one process share the cores instead of oversubscribing them
        torch.set_num_threads(worker.torch_threads or max(1, (os.cpu_count() or 1) // n_cpu))
    devices = []
    memo = text_memo_for(worker)
    for name in names:
        t = time.perf_counter()
        if name.startswith("sim"):
            from workers.sim import load_sim_components

            components = load_sim_components(
                worker.model,
                worker.sim_step_ms,
                worker.sim_latent_size,
                worker.sim_call_ms,
                worker.sim_sample_ms,
                oom_above=worker.sim_oom_above,
                poison_prompt=worker.sim_poison_prompt,
            )
        else:
            components = load_components(worker.model, name)
        if not devices:  # the family is known: check the settings that depend on it before loading more
            worker.check_for(components)
        log.info(
            "loaded %s on %s in %.1fs (version %s)",
            components.name,
            name,
            time.perf_counter() - t,
            components.fingerprint,
        )
        components.adapters = device_adapters(components, int(worker.lora_cache_mb * 2**20))
        devices.append(Device(name=name, loop=DenoiseLoop(components, text_memo=memo)))
    model_name = devices[0].loop.c.name
    registry = ModelRegistry(redis_client, cluster.queue_prefix) if redis_client is not None else None
    if registry is not None:
        registry.ensure_fingerprint(model_name, devices[0].loop.c.fingerprint)
    reopen = None
    if cache is None and open_cache and worker.cache_enabled:
        cache, reopen = open_cache_or_defer(redis_client, devices[0].loop.c, cluster, memo, cpu_node=n_cpu > 0)
    defaults = {"method": worker.feature_profile}
    if worker.blockcache_dir:
        defaults["calibration_dir"] = worker.blockcache_dir
    service = GenerationService(
        model_name,
        DevicePool(devices),
        ArtifactStore(cluster.artifact_url),
        cache=cache,
        registry=registry,
        feature_defaults=defaults,
        writeback_queue=worker.writeback_queue,
        max_batch=worker.max_batch,
        job_threads=1,  # the device threads keep every core; see GenerationService
        engine_options={"stall_s": worker.device_stall_s, "oom_recover_s": worker.oom_recover_s},
        adapter_registry=AdapterRegistry(redis_client, cluster.queue_prefix, cluster.artifact_url)
        if redis_client is not None
        else None,
        lora_batching=worker.lora_batching,
        approx_gate=ApproxGate(enabled=worker.approx_gate == "on" or (worker.approx_gate == "auto" and n_cpu > 0)),
    )
    service.text_memo = memo
    if redis_client is not None:
        LedgerSweeper(redis_client, cluster).start()
    resilience = ResilienceSettings()
    service.share_grants = resilience.share_grants()
    if reopen is not None:  # the cache could not open: serve uncached, keep trying in the background
        service.cache_note = f"cache unavailable ({reopen}); retrying every {resilience.cache_reopen_s:g}s"
        reopen_later(service, redis_client, cluster, devices[0].loop.c, resilience.cache_reopen_s, memo, n_cpu > 0)
    if worker.warmup:
        if cache is not None:
            cache.embed("warm-up")  # loads the prompt embedder now, not on the first job
        for device in devices:
            spec = device.loop.c.spec
            device.loop.denoise(
                prompt="warm-up", seed=0, steps=2, guidance_scale=2.0, width=spec.default_size, height=spec.default_size
            )
    return service


def serve_metrics(service: GenerationService, worker: WorkerSettings, redis_client, prefix: str) -> int | None:
    """Serve the node's Prometheus metrics (workers/metrics.py); the port taken ends up in node_info."""
    from workers import metrics

    service.metrics_port = metrics.serve(service, redis_client, prefix, worker.metrics_port, worker.metrics_addr)
    return service.metrics_port


def feature_methods(components) -> list[str]:
    """The feature caches a request may name for this model (cache.feature.method)."""
    from workers.feature_cache import methods_for

    return methods_for(components)


def node_info(service: GenerationService, queue: str) -> dict:
    c = service.components
    return {
        "model": service.model_name,
        "model_version": c.fingerprint,
        "queue": queue,
        "devices": [d.name for d in service.pool.devices],
        "family": c.family.name,
        "default_size": c.spec.default_size,
        "max_size": c.spec.max_size,
        "size_multiple": c.size_multiple,
        "default_steps": c.spec.default_steps,
        "default_guidance_scale": c.spec.default_guidance,
        "default_scheduler": c.spec.default_scheduler,
        "schedulers": list(c.family.schedulers),
        "feature_methods": ["off", *feature_methods(c)],
        "skip_table": [list(row) for row in service.cache.settings.table()]
        if service.cache is not None and hasattr(service.cache, "settings")
        else None,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "metrics_port": getattr(service, "metrics_port", None),
    }
