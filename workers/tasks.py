"""The Celery side of a worker: thin tasks that validate, call the service, and record the result."""

from __future__ import annotations

import logging
import sys
import time

from celery import bootsteps
from celery.exceptions import Ignore
from celery.worker import state as worker_state

from scheduler.app import GENERATE_TASK, cancel_key, get_app
from scheduler.errors import DeviceFailed, JobCancelled
from scheduler.settings import get_settings
from workers import metrics
from workers.service import GenerationService, JobContext

log = logging.getLogger("reprise.worker")
app = get_app()

_service: GenerationService | None = None
_redis = None
_progress_interval_s = 0.2
_queue_prefix = "reprise"
_device_retries = 3
_consuming = True


def install(
    service: GenerationService, redis_client, progress_interval_s: float, queue_prefix: str, device_retries: int = 3
) -> None:
    global _service, _redis, _progress_interval_s, _queue_prefix, _device_retries
    _service, _redis, _progress_interval_s, _queue_prefix = service, redis_client, progress_interval_s, queue_prefix
    _device_retries = device_retries
    quiet_job_logs()


class _OneInfoLinePerJob(logging.Filter):
    """Celery logs every job twice at INFO: "received", then "succeeded in ...: <the whole result>" (or
    "ignored" for a cancelled one). A node keeps the "received" line only, unless it runs at DEBUG;
    failures still log at ERROR, and the outcome of every job is in its result and the metrics."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        from celery.app import trace

        if record.msg in (trace.LOG_SUCCESS, trace.LOG_IGNORED):
            return self._logger.isEnabledFor(logging.DEBUG)
        return True


def quiet_job_logs() -> None:
    logger = logging.getLogger("celery.app.trace")
    if not any(isinstance(f, _OneInfoLinePerJob) for f in logger.filters):
        logger.addFilter(_OneInfoLinePerJob(logger))


def _cancelled(job_id: str) -> bool:
    if job_id in worker_state.revoked:
        return True
    try:
        return bool(_redis is not None and _redis.exists(cancel_key(_queue_prefix, job_id)))
    except Exception:  # Redis briefly away: keep going, the revoke broadcast is still checked
        return False


@app.task(name=GENERATE_TASK, bind=True)
def generate(self, *args, **kwargs):
    payload = args[0] if args and not kwargs else kwargs
    request = self.request
    job_id = request.id
    headers = self.request.headers or {}
    queued_at = headers.get("reprise_queued_at") or getattr(self.request, "reprise_queued_at", None)
    last = [0.0]

    def on_progress(step: int, total: int) -> None:
        now = time.monotonic()
        if step == total or now - last[0] >= _progress_interval_s:
            last[0] = now
            # The job's own request context: the node engine calls this from its device thread, where
            # Celery's thread-local request is not this job's (the stored state names the job's worker).
            self.backend.store_result(
                job_id, {"step": step, "total": total, "phase": "denoise"}, "PROGRESS", request=request
            )

    # The thread pool enforces no Celery time limit: the loop stops at its next step past this (JobTimeout).
    # A message's own limits (send_task(..., soft_time_limit=, time_limit=)) override the setting.
    per_message = [float(t) for t in (self.request.timelimit or ()) if t]
    soft = min(per_message) if per_message else get_settings().soft_time_limit_s
    job = JobContext(
        job_id=job_id,
        queued_at=float(queued_at) if queued_at else None,
        on_progress=on_progress,
        is_cancelled=lambda: _cancelled(job_id),
        deadline=time.time() + float(soft) if soft else None,
    )
    try:
        result = _service.run(payload, job)
    except JobCancelled as exc:
        metrics.observe_failure(_service.model_name, "cancelled")
        self.backend.mark_as_revoked(job_id, reason=str(exc), request=self.request)
        raise Ignore() from None
    except DeviceFailed as exc:
        # The device failed, not the request: never acknowledged as final while retries are left. The job is
        # sent again (same id, same queue, to any node); an unhealthy node first stops consuming, so that it
        # is another node that takes it.
        _stop_consuming_if_unhealthy(self)
        if self.request.retries >= _device_retries:
            metrics.observe_failure(_service.model_name, exc)
            raise
        log.warning(
            "job %s: %s; sending it again (retry %d of %d)", job_id, exc, self.request.retries + 1, _device_retries
        )
        raise self.retry(exc=exc, countdown=0, max_retries=_device_retries) from None
    except Exception as exc:
        metrics.observe_failure(_service.model_name, exc)
        raise
    metrics.observe_result(result, _service)
    return result.model_dump(mode="json")


def _stop_consuming_if_unhealthy(task) -> None:
    """A node whose engine's watchdog found a stalled device takes no more jobs: it cancels its own consumer of
    the model's queue (a control message to itself; its other work is left to finish)."""
    global _consuming
    engine = getattr(_service, "_engine", None)
    if not _consuming or engine is None or engine.healthy:
        return
    _consuming = False
    queue = task.request.delivery_info.get("routing_key") if task.request.delivery_info else None
    queue = queue or getattr(_service, "queue", None) or f"{_queue_prefix}.{_service.model_name}"
    log.error("node unhealthy (%s): no longer consuming %s", engine.unhealthy_reason, queue)
    try:
        app.control.cancel_consumer(queue.split(":", 1)[0], destination=[task.request.hostname])
    except Exception as exc:  # the broker away: the engine refuses new work anyway (DeviceFailed, retried)
        log.warning("cannot cancel this node's consumer: %s", exc)


class NodeInfo(bootsteps.StartStopStep):
    """Adds the node's model, devices, queue and jobs done to `celery inspect stats` (Flower shows it)."""

    def info(self, worker):
        if _service is None:
            return {}
        return {
            "reprise": {
                "model": _service.model_name,
                "model_version": _service.components.fingerprint,
                "devices": {
                    d.name: {
                        "jobs_done": d.jobs_done,
                        # the device's LoRA cache: loaded adapters, bytes, loads, evictions, mixed calls
                        "loras": d.loop.c.adapters.stats() if d.loop.c.adapters is not None else None,
                    }
                    for d in _service.pool.devices
                },
                "queue": getattr(_service, "queue", None),
                "jobs": dict(_service.counters),
                "approx_gate": _service.approx_gate.snapshot(),  # whether its approximate lookups pay
                "engine": metrics.engine_totals(_service),
                "switch_interval_ms": round(sys.getswitchinterval() * 1000, 3),  # REPRISE_SWITCH_INTERVAL_MS
            }
        }


app.steps["worker"].add(NodeInfo)
