"""Prometheus metrics of a worker node, served over HTTP on ``metrics_port``.

The names are fixed (the dashboards use them):

- ``reprise_jobs_total{model,outcome}``: outcome is success, invalid, cancelled, timeout or failed.
- ``reprise_job_queue_wait_seconds{model}``, ``reprise_job_service_seconds{model}``,
  ``reprise_job_end_to_end_seconds{model}``: histograms (queue wait needs the producer's
  ``reprise_queued_at`` header, which ``scheduler.client.submit`` sets).
- ``reprise_cache_hits_total{model,type,k}``: type exact / approximate / miss; k is the step an
  approximate hit resumed from ("-" for exact hits and misses).
- ``reprise_steps_saved_total{model}``, ``reprise_gpu_seconds_saved_total{model}`` (steps saved × the
  device seconds one request's step costs on this node, from the engine's own call times: each call's
  time shared by the requests it stepped, so at batch B a step costs about 1/B of a call),
  ``reprise_cache_lookup_seconds{model}``.
- ``reprise_cache_writeback_failures_total{model}``: write-backs that failed or were dropped
  because the write-back queue was full; ``reprise_cache_writeback_dropped_total{model}`` the dropped
  ones alone, and ``reprise_cache_lookups_skipped_total{model}`` approximate lookups not made because
  the request had reached its earliest resume step before its lookup batch (workers/cache_path.py);
  ``reprise_cache_lookups_unmatched_total{model}`` lookups answered at once because no stored entry
  matched their filter (their prompts were not embedded for them).
- ``reprise_queue_depth{queue}``: messages waiting in each ``<prefix>.*`` queue, read from Redis at
  scrape time; the priority sub-queues (``reprise.tiny:3``) are summed into their queue. Flower has
  no queue-length metric, so this fills that gap.
- ``reprise_device_busy_ratio{device}``: share of the last ``BUSY_WINDOW_S`` seconds the device
  spent inside denoiser calls, from the engine's own call times (devices with the same name are
  averaged); a device that idles between calls reads below 1 even while jobs run.
- ``reprise_devices{model}``: devices this node serves.
- ``reprise_denoiser_calls_total{device}``, ``reprise_batched_requests_total{device}``: the engine's
  batched calls and the requests they stepped (their ratio is the mean batch);
  ``reprise_device_busy_seconds_total{device}``: time inside denoiser calls;
  ``reprise_denoiser_failures_total{device}``: calls that raised (run again in halves);
  ``reprise_device_oom_total{device}``: out-of-memory errors; ``reprise_device_batch_limit{device}``:
  the requests a device steps at once now (lowered after an out-of-memory error, raised again later);
  ``reprise_node_healthy``: 0 once the engine's watchdog found a stalled device.

The task records each job with one call (``observe_result`` / ``observe_failure``); everything
read from the service or Redis is read when Prometheus scrapes.
"""

from __future__ import annotations

import collections
import logging

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from scheduler.errors import InvalidRequest, JobCancelled, JobTimeout
from workers.engine import BUSY_WINDOW_S

log = logging.getLogger("reprise.metrics")

disable_created_metrics()  # the *_created series only double the scrape size
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes etc.: memory per worker process

OUTCOMES = ("success", "invalid", "cancelled", "timeout", "failed")
JOB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600, 1800)
LOOKUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

JOBS = Counter("reprise_jobs", "Jobs finished, by outcome.", ["model", "outcome"], registry=REGISTRY)
QUEUE_WAIT = Histogram(
    "reprise_job_queue_wait_seconds",
    "Time from submit to a worker starting the job.",
    ["model"],
    buckets=JOB_BUCKETS,
    registry=REGISTRY,
)
SERVICE = Histogram(
    "reprise_job_service_seconds",
    "Time a worker spent on the job (lookups, denoise, decode, store).",
    ["model"],
    buckets=JOB_BUCKETS,
    registry=REGISTRY,
)
END_TO_END = Histogram(
    "reprise_job_end_to_end_seconds", "Queue wait plus service time.", ["model"], buckets=JOB_BUCKETS, registry=REGISTRY
)
CACHE_HITS = Counter(
    "reprise_cache_hits", "Cache outcomes of finished jobs.", ["model", "type", "k"], registry=REGISTRY
)
STEPS_SAVED = Counter(
    "reprise_steps_saved", "Denoising steps skipped thanks to the caches.", ["model"], registry=REGISTRY
)
GPU_SECONDS_SAVED = Counter(
    "reprise_gpu_seconds_saved", "Steps saved times the measured seconds per step.", ["model"], registry=REGISTRY
)
LOOKUP = Histogram(
    "reprise_cache_lookup_seconds",
    "Exact plus approximate cache lookup time of a job.",
    ["model"],
    buckets=LOOKUP_BUCKETS,
    registry=REGISTRY,
)


def outcome_of(exc: BaseException) -> str:
    """The ``outcome`` label of a job that raised ``exc``."""
    if isinstance(exc, InvalidRequest):
        return "invalid"
    if isinstance(exc, JobCancelled):
        return "cancelled"
    if isinstance(exc, JobTimeout):
        return "timeout"
    return "failed"


def _engine_stats(service) -> list:
    """Every device's DeviceStats (a list: several devices may share a name, e.g. `--devices cpu,cpu`)."""
    engine = getattr(service, "_engine", None) if service is not None else None
    return [(s.device.name, s.stats) for s in engine.schedulers] if engine is not None else []


def engine_totals(service) -> dict[str, float]:
    """The engine's denoiser calls so far, summed over the node's devices (`celery inspect stats` carries
    them: mean batch = requests_stepped ÷ calls, busy time = call_s)."""
    stats = [s for _, s in _engine_stats(service)]
    return {
        "calls": sum(s.calls for s in stats),
        "requests_stepped": sum(s.requests_stepped for s in stats),
        "call_s": sum(s.call_s for s in stats),
    }


def request_step_s(service) -> float:
    """Device seconds one request's denoising step costs on this node: the engine's time inside denoiser
    calls over the request-steps those calls made (a call of B requests: each step costs 1/B of it)."""
    totals = engine_totals(service)
    return totals["call_s"] / totals["requests_stepped"] if totals["requests_stepped"] else 0.0


def busy_ratios(service) -> dict[str, float]:
    """Per device name, the share of the last window spent inside denoiser calls (same names averaged)."""
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, stats in _engine_stats(service):
        by_name[name].append(stats.busy_ratio())
    names = [d.name for d in service.pool.devices] if service is not None else []
    return {name: (sum(by_name[name]) / len(by_name[name]) if by_name[name] else 0.0) for name in names or by_name}


def observe_result(result, service=None) -> None:
    """Record one successful job (a ``GenerationResult``); ``service`` (its engine's call times) prices the
    steps it saved."""
    model = result.model
    t, cache = result.timings, result.cache
    service_s = max(0.0, t.total_s - t.queue_wait_s)
    JOBS.labels(model, "success").inc()
    QUEUE_WAIT.labels(model).observe(t.queue_wait_s)
    SERVICE.labels(model).observe(service_s)
    END_TO_END.labels(model).observe(t.total_s)
    if cache.hit != "off":
        CACHE_HITS.labels(model, cache.hit, str(cache.k) if cache.hit == "approximate" and cache.k else "-").inc()
    if cache.steps_saved:
        STEPS_SAVED.labels(model).inc(cache.steps_saved)
        GPU_SECONDS_SAVED.labels(model).inc(cache.steps_saved * request_step_s(service))
    if cache.lookup_ms is not None:
        LOOKUP.labels(model).observe(cache.lookup_ms / 1000.0)


def observe_failure(model: str, exc_or_outcome: BaseException | str) -> None:
    """Record one job that ended without a result."""
    outcome = exc_or_outcome if isinstance(exc_or_outcome, str) else outcome_of(exc_or_outcome)
    JOBS.labels(model, outcome if outcome in OUTCOMES else "failed").inc()


class NodeCollector:
    """What is read at scrape time: queue depths from Redis, the service's devices and write-back counters."""

    def __init__(self, service, redis_client, prefix: str = "reprise") -> None:
        self.service, self.redis, self.prefix = service, redis_client, prefix

    def queue_depths(self) -> dict[str, int]:
        depths: dict[str, int] = {}
        keys = [
            k.decode() if isinstance(k, bytes) else k
            for k in self.redis.scan_iter(f"{self.prefix}.*", count=500, _type="list")
        ]
        if keys:
            with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                lengths = pipe.execute()
            for key, n in zip(keys, lengths):
                depths[key.split(":", 1)[0]] = depths.get(key.split(":", 1)[0], 0) + int(n)
        # Served queues that are empty have no key in Redis: still report them.
        depths.setdefault(f"{self.prefix}.{self.service.model_name}", 0)
        return depths

    def collect(self):
        model = self.service.model_name
        depth = GaugeMetricFamily(
            "reprise_queue_depth", "Jobs waiting in each queue (priority sub-queues summed).", labels=["queue"]
        )
        try:
            for queue, n in sorted(self.queue_depths().items()):
                depth.add_metric([queue], n)
        except Exception as exc:  # Redis away: the other metrics still scrape
            log.warning("queue depth unavailable: %s", exc)
        yield depth
        busy = GaugeMetricFamily(
            "reprise_device_busy_ratio",
            f"Share of the last {BUSY_WINDOW_S:.0f}s each device spent inside denoiser calls.",
            labels=["device"],
        )
        for name, ratio in sorted(busy_ratios(self.service).items()):
            busy.add_metric([name], ratio)
        yield busy
        devices = GaugeMetricFamily("reprise_devices", "Devices this node serves.", labels=["model"])
        devices.add_metric([model], len(self.service.pool.devices))
        yield devices
        yield from self.engine_metrics()
        failures = CounterMetricFamily(
            "reprise_cache_writeback_failures", "Cache write-backs that failed or were dropped.", labels=["model"]
        )
        counters = self.service.counters
        failures.add_metric([model], counters.get("writeback_failed", 0) + counters.get("writeback_dropped", 0))
        yield failures
        # The bounds of the batched cache path (workers/cache_path.py), each on its own
        for name, what, help_text in (
            ("reprise_cache_writeback_dropped", "writeback_dropped", "Write-backs dropped: the writer was behind."),
            (
                "reprise_cache_writeback_raced",
                "writeback_raced",
                "Write-backs not stored because the same entry was stored first (first writer wins; no error).",
            ),
            (
                "reprise_cache_lookups_skipped",
                "lookup_skipped",
                "Approximate lookups skipped: the request had reached its earliest resume step first.",
            ),
            (
                "reprise_cache_writeback_retried",
                "writeback_retried",
                "Write-backs tried again because the store was offline (its optimiser running) at the time.",
            ),
            (
                "reprise_cache_lookups_unmatched",
                "lookup_empty",
                "Approximate lookups answered at once, unembedded: no stored entry matched their filter.",
            ),
            (
                "reprise_cache_lookups_gated",
                "lookup_gated",
                "Approximate lookups not made: on this node they cost more device time than their hits saved.",
            ),
        ):
            family = CounterMetricFamily(name, help_text, labels=["model"])
            family.add_metric([model], counters.get(what, 0))
            yield family

    def engine_metrics(self):
        """The engine's batching and failures, per device: mean batch = rate(requests) ÷ rate(calls)."""
        families = {
            "calls": CounterMetricFamily("reprise_denoiser_calls", "Batched denoiser calls.", labels=["device"]),
            "requests": CounterMetricFamily(
                "reprise_batched_requests", "Requests stepped, summed over calls (the batch sizes).", labels=["device"]
            ),
            "busy": CounterMetricFamily(
                "reprise_device_busy_seconds", "Time each device spent inside denoiser calls.", labels=["device"]
            ),
            "failed": CounterMetricFamily(
                "reprise_denoiser_failures", "Denoiser calls that raised (run again in halves).", labels=["device"]
            ),
            "oom": CounterMetricFamily("reprise_device_oom", "Out-of-memory errors of a device.", labels=["device"]),
            "limit": GaugeMetricFamily(
                "reprise_device_batch_limit", "Requests a device steps at once now.", labels=["device"]
            ),
        }
        totals: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        for name, stats in _engine_stats(self.service):
            t = totals[name]
            t["calls"] += stats.calls
            t["requests"] += stats.requests_stepped
            t["busy"] += stats.call_s
            t["failed"] += stats.failed_calls
            t["oom"] += stats.oom_events
            t["limit"] += stats.batch_limit
        for name, t in sorted(totals.items()):
            for key, family in families.items():
                family.add_metric([name], t[key])
        yield from families.values()
        engine = getattr(self.service, "_engine", None)
        healthy = GaugeMetricFamily("reprise_node_healthy", "0 once a device thread stalled (no new work taken).")
        healthy.add_metric([], 0.0 if engine is not None and not engine.healthy else 1.0)
        yield healthy


_collector: NodeCollector | None = None


def serve(service, redis_client, prefix: str, port: int, addr: str = "127.0.0.1", tries: int = 50) -> int | None:
    """Serve the metrics on ``port``, or the next free port after it; returns the port taken (None when 0)."""
    global _collector
    if not port:
        return None
    if _collector is None:
        _collector = NodeCollector(service, redis_client, prefix)
        REGISTRY.register(_collector)
    for candidate in range(port, port + tries):
        try:
            start_http_server(candidate, addr=addr, registry=REGISTRY)
        except OSError:
            continue
        if candidate != port:
            log.warning("metrics port %d is taken: serving metrics on %d instead", port, candidate)
        log.info("metrics on http://%s:%d/metrics", addr, candidate)
        return candidate
    log.error("no free metrics port in %d..%d: metrics are not served", port, port + tries - 1)
    return None
