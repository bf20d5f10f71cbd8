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
import threading
import time

import torch

from scheduler.adapters import AdapterRegistry
from scheduler.registry import ModelRegistry
from scheduler.settings import ClusterSettings
from workers.artifacts import ArtifactStore
from workers.lora import device_adapters
from workers.models import load_components
from workers.resilient_cache import CacheReopener, RedisClock, ResilienceSettings
from workers.sampler import DenoiseLoop
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


def build_service(
    worker: WorkerSettings,
    cluster: ClusterSettings,
    redis_client=None,
    cache=None,
    open_cache: bool = True,
) -> GenerationService:
    """Load one pipeline per device (once), open the node's cache, register the model's fingerprint."""
    guard_broker_consumer()
    # Settings are checked before anything loads: a wrong value stops the node (only a cache that is away
    # is retried in the background, below).
    from cache import CacheSettings

    if cache is None and open_cache and worker.cache_enabled:
        checked_settings(CacheSettings)
    checked_settings(ResilienceSettings)
    names = parse_devices(worker.devices)
    n_cpu = sum(1 for n in names if n == "cpu")
    if n_cpu:  # several CPU "devices" in one process share the cores instead of oversubscribing them
        torch.set_num_threads(worker.torch_threads or max(1, (os.cpu_count() or 1) // n_cpu))
    devices = []
    memo = _text_memo(worker)
    for name in names:
        t = time.perf_counter()
        if name.startswith("sim"):
            from workers.sim import load_sim_components

            components = load_sim_components(
                worker.model, worker.sim_step_ms, worker.sim_latent_size, worker.sim_call_ms, worker.sim_sample_ms
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
        cache, reopen = _open_cache_or_defer(redis_client, devices[0].loop.c, cluster, memo)
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
        adapter_registry=AdapterRegistry(redis_client, cluster.queue_prefix, cluster.artifact_url)
        if redis_client is not None
        else None,
        lora_batching=worker.lora_batching,
    )
    service.text_memo = memo
    if redis_client is not None:
        LedgerSweeper(redis_client, cluster).start()
    resilience = ResilienceSettings()
    service.share_grants = resilience.share_grants()
    if reopen is not None:  # the cache could not open: serve uncached, keep trying in the background
        service.cache_note = f"cache unavailable ({reopen}); retrying every {resilience.cache_reopen_s:g}s"
        _reopen_later(service, redis_client, cluster, devices[0].loop.c, resilience.cache_reopen_s, memo)
    if worker.warmup:
        if cache is not None:
            cache.embed("warm-up")  # loads the prompt embedder now, not on the first job
        for device in devices:
            spec = device.loop.c.spec
            device.loop.denoise(
                prompt="warm-up", seed=0, steps=2, guidance_scale=2.0, width=spec.default_size, height=spec.default_size
            )
    return service


def guard_broker_consumer() -> None:
    """One undecodable item pushed onto a queue list (not JSON, not a kombu envelope) makes kombu's Redis
    consumer raise inside the worker's event loop, which Celery treats as unrecoverable: the node stops
    serving. Drop such an item with an error line instead. (BRPOP has already removed it from Redis.)"""
    from queue import Empty

    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    if getattr(channel, "_reprise_guarded", False):
        return
    read = channel._brpop_read

    def io_errors(errors: tuple) -> tuple:  # kombu counts KeyError as a connection error; from a message it is not
        return tuple(e for e in errors if e is not KeyError)

    def guarded_read(self, **options):
        try:
            return read(self, **options)
        except (Empty, *io_errors(self.connection_errors)):
            raise
        except Exception as exc:
            log.error("dropped an undecodable message from the broker (%s: %s)", type(exc).__name__, str(exc)[:200])
            return True

    channel._brpop_read = guarded_read
    channel._reprise_guarded = True

    # A well-formed envelope around a malformed task body (e.g. not [args, kwargs, embed]) raises inside
    # Celery's task handler: left alone, the message stays reserved and the node stops fetching. Reject
    # it as an invalid task, as Celery does for the malformations it knows.
    from celery.exceptions import InvalidTaskError
    from celery.worker.consumer.consumer import Consumer

    make_handler = Consumer.create_task_handler

    def create_task_handler(self, *args, **kwargs):
        handler = make_handler(self, *args, **kwargs)

        def on_task_received(message):
            try:
                return handler(message)
            except Exception as exc:
                if isinstance(exc, io_errors(self.connection_errors)):
                    raise
                return self.on_invalid_task(None, message, InvalidTaskError(f"{type(exc).__name__}: {exc}"))

        return on_task_received

    Consumer.create_task_handler = create_task_handler


def _text_memo(worker: WorkerSettings):
    if worker.text_memo_entries <= 0:
        return None
    from workers.text_memo import TextEmbeddingMemo

    return TextEmbeddingMemo(max_entries=worker.text_memo_entries, max_bytes=worker.text_memo_bytes)


def _open_cache(redis_client, components, key_prefix: str, text_memo=None):
    from cache import CacheSettings, LatentCache
    from workers.tables import stored_clip_calibration

    settings, embedder = cache_settings_for(
        CacheSettings(), components, text_memo, clip_calibrated=stored_clip_calibration(redis_client)
    )
    # Expiry by the Redis server's clock: nodes with skewed wall clocks agree on every entry's TTL.
    clock = (
        RedisClock(redis_client, ResilienceSettings().redis_clock_refresh_s) if redis_client is not None else time.time
    )
    return LatentCache.open(settings, redis=redis_client, embedder=embedder, clock=clock, key_prefix=key_prefix)


def _open_cache_or_defer(redis_client, components, cluster, text_memo=None):
    """(cache, None), or (None, why) when the cache cannot open now: a node never needs its cache to serve."""
    try:
        return _open_cache(redis_client, components, cluster.queue_prefix, text_memo), None
    except Exception as exc:
        log.error(
            "CACHE UNAVAILABLE at start (%s: %s): serving every job uncached and retrying in the background",
            type(exc).__name__,
            exc,
        )
        return None, type(exc).__name__


def _reopen_later(
    service: GenerationService, redis_client, cluster: ClusterSettings, components, every_s: float, text_memo=None
) -> None:
    def on_open(cache) -> None:
        from workers import control

        service.cache = cache
        service.cache_note = None
        control.start_control(service, redis_client, cluster)

    CacheReopener(
        lambda: _open_cache(redis_client, components, cluster.queue_prefix, text_memo), on_open, every_s
    ).start()


def cache_settings_for(settings, components=None, text_memo=None, clip_calibrated=None):
    """(settings, embedder) of a cache that serves ``components``: with the `clip` embedder, the model's own
    text encoder and, unless a table is set, the table calibrated for it (model_index.json → reprise →
    clip_skip_table), since thresholds belong to one encoder; embedder None means the settings' default.
    `auto` resolves to clip or minilm here (workers.tables.auto_embedder; ``clip_calibrated(fingerprint)``:
    whether a clip table is stored for that model version)."""
    if settings.embedder == "auto":
        from workers.tables import auto_embedder

        chosen = auto_embedder(components, clip_calibrated)
        update = {"embedder": chosen}
        if chosen == "clip":  # its vectors live apart from MiniLM's (other size, other space)
            update["collection"] = f"{settings.collection}-clip"
        settings = settings.model_copy(update=update)
    if settings.embedder != "clip" or components is None:
        return settings, None
    update = {"clip_dim": components.family.pooled_dim(components)}
    if settings.skip_table is None and components.extra.get("clip_skip_table"):
        update["skip_table"] = [tuple(row) for row in components.extra["clip_skip_table"]]
    return settings.model_copy(update=update), clip_embedder(components, text_memo)


def clip_embedder(components, text_memo=None):
    """The pipeline's own text encoders, pooled as its family pools them (SDXL: the second encoder's projection;
    SD3: both CLIPs' projections; Flux: CLIP's pooled output): the `clip` prompt embedder of the cache. The same
    pass gives the prompt's conditioning: it goes into the node's text memo, so the device stage does not
    encode again."""

    @torch.no_grad()
    def embed(prompt: str):
        # No lock: inference only, and torch releases the GIL, so the lookups of several jobs run together.
        with components.text_lock.shared():  # never while a request's LoRA changes the text encoder
            conditioning, pooled = components.family.encode(components, prompt)
        if text_memo is not None:
            text_memo.put(components.fingerprint, prompt, conditioning)
        return pooled[0].float().cpu().numpy()

    return embed


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


class Heartbeat(threading.Thread):
    """Keeps the model's entry in the registry alive while this node serves it."""

    def __init__(self, registry: ModelRegistry, model: str, info: dict, every_s: float):
        super().__init__(name="reprise-heartbeat", daemon=True)
        self.registry, self.model, self.info, self.every_s = registry, model, info, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.registry.announce(self.model, self.info, ttl_s=self.every_s * 3)
                if self.info.get("node"):
                    self.registry.announce_node(self.info["node"], self.info, ttl_s=self.every_s * 3)
            except Exception as exc:  # Redis restarting: try again next beat
                log.warning("heartbeat failed: %s", exc)
            self.stopped.wait(self.every_s)


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
