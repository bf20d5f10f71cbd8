"""The Celery app, configured for long GPU jobs (README: "Celery for long GPU jobs").

Producers and workers share this module; it holds no model code. Workers register the task
``reprise.generate`` from ``workers.tasks``; producers send it by name.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from celery import Celery
from celery.signals import after_task_publish, task_postrun
from kombu import Queue

from scheduler.errors import JobNotAccepted
from scheduler.redis_conn import celery_transport_options, parse_redis_url, redis_client, replicated_write, target
from scheduler.settings import ClusterSettings, get_settings

GENERATE_TASK = "reprise.generate"
# Where a producer with a Celery app of its own sends a task it names no queue for. The default model's
# workers consume it too (workers/cli.py), so `send_task("reprise.generate", kwargs=...)` is served.
CELERY_DEFAULT_QUEUE = "celery"

log = logging.getLogger("reprise.ledger")
_ledger_clients: dict = {}


def ledger_key(prefix: str) -> str:
    """Hash of every accepted generation until it ends: job id -> how to send it again.

    Redis' BRPOP removes a message when it replies, so a worker killed after that reply and before
    kombu records the message as unacknowledged loses it (measured: about 1 job in 200 under repeated
    SIGKILLs). Workers sweep this ledger (workers/node.py, LedgerSweeper) and send such a job again."""
    return f"{prefix}:ledger"


def cancel_key(prefix: str, job_id: str) -> str:
    """Set by `Job.cancel()`; a running job stops at its next step once it sees it (workers/tasks.py)."""
    return f"{prefix}:cancel:{job_id}"


def _ledger_redis():
    url = get_settings().redis_url
    if url not in _ledger_clients:
        _ledger_clients[url] = redis_client(url, socket_timeout=2, socket_connect_timeout=2)
    return _ledger_clients[url]


# Set by _record_accepted when a send under Sentinel could not be made durable; RepriseCelery.send_task
# raises it in the caller's hands (a signal receiver's exceptions never reach the caller).
_unconfirmed = threading.local()


@after_task_publish.connect
def _record_accepted(sender=None, headers=None, body=None, routing_key=None, **kwargs):
    if sender != GENERATE_TASK or not headers or not headers.get("id"):
        return
    sentinel = target().is_sentinel
    try:
        args, task_kwargs = (body[0], body[1]) if isinstance(body, (list, tuple)) and len(body) >= 2 else ([], {})
        entry = {
            "args": args,
            "kwargs": task_kwargs,
            "queue": routing_key,
            "at": time.time(),
            "queued_at": headers.get("reprise_queued_at"),
        }
        key = ledger_key(get_settings().queue_prefix)
        # Under Sentinel the entry must reach a replica before the send counts as accepted: replication is
        # in order, so that also confirms the message kombu pushed just before (scheduler/redis_conn.py).
        replicated_write(_ledger_redis(), lambda pipe: pipe.hset(key, headers["id"], json.dumps(entry)))
    except Exception as exc:
        if sentinel:  # the message may die with the master: the caller is told, and sends it again
            _unconfirmed.error = exc
        else:  # one Redis (AOF): the job is queued all the same; only its insurance is missing
            log.warning("cannot record job %s in the ledger: %s", headers.get("id"), exc)


class RepriseCelery(Celery):
    """Celery whose generation sends raise JobNotAccepted when the job could not be made durable (Sentinel)."""

    def send_task(self, name, *args, **kwargs):
        _unconfirmed.error = None
        result = super().send_task(name, *args, **kwargs)
        error, _unconfirmed.error = getattr(_unconfirmed, "error", None), None
        if error is not None:
            raise JobNotAccepted(f"job {result.id} not accepted: {type(error).__name__}: {error}; send it again")
        return result


@task_postrun.connect
def _record_ended(sender=None, task_id=None, state=None, **kwargs):
    if getattr(sender, "name", None) != GENERATE_TASK or state == "RETRY":
        return
    try:
        _ledger_redis().hdel(ledger_key(get_settings().queue_prefix), task_id)
    except Exception as exc:  # the sweeper sees the stored result and forgets it later
        log.warning("cannot clear job %s from the ledger: %s", task_id, exc)


def route_generation(name, args, kwargs, options, task=None, **kw):
    """Send each generation to its model's queue, so `send_task` callers need not name a queue."""
    if name.startswith("reprise.cache."):
        return {"queue": f"{get_settings().queue_prefix}.control"}
    if name != GENERATE_TASK:
        return None
    payload = kwargs or (args[0] if args and isinstance(args[0], dict) else {})
    model = payload.get("model") if isinstance(payload, dict) else None
    s = get_settings()
    if not isinstance(model, str) or not model:
        model = s.default_model
    route = {"queue": f"{s.queue_prefix}.{model}"}
    priority = payload.get("priority") if isinstance(payload, dict) else None
    if isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 9:
        route["priority"] = priority
    return route


def make_app(settings: ClusterSettings | None = None) -> Celery:
    s = settings or get_settings()
    sentinel = (s.redis_sentinel_master, s.redis_sentinel_password, s.redis_password)
    broker = parse_redis_url(s.redis_url, *sentinel)  # a malformed URL: RedisURLError, before any connection
    backend = parse_redis_url(s.backend_url, *sentinel)
    app = RepriseCelery("reprise", broker=broker.full_url, backend=backend.full_url)
    transport = {
        **celery_transport_options(broker),  # master_name, sentinel_kwargs (kombu's sentinel transport, Flower)
        "visibility_timeout": s.visibility_timeout_s,  # must exceed the longest job, or it runs twice
        "queue_order_strategy": "priority",  # Redis honours message priorities only with this
        "priority_steps": list(range(10)),
        "sep": ":",
        "unacked_restore_interval": s.restore_interval_s,
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_extended=True,
        result_expires=s.result_expires_s,
        task_acks_late=True,  # a job whose worker dies is redelivered, not lost
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # a typed failure (bad request) is final: never retried
        worker_prefetch_multiplier=1,  # each device slot reserves one job at a time
        # Workers run Celery's thread pool (`-P threads`), which cannot stop a running thread: Celery's
        # cancel-on-connection-loss, soft and hard time limits need prefork and are left off. The job's
        # time limit is the loop's own (JobContext.deadline, checked at every step: JobTimeout).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_default_priority=5,
        task_inherit_parent_priority=True,
        broker_transport_options=transport,
        result_backend_transport_options={
            "visibility_timeout": s.visibility_timeout_s,
            **celery_transport_options(backend),  # Celery's SentinelBackend
        },
        # A result finished during a Redis restart is retried until Redis is back (about 2 min at most),
        # rather than failing the store and waiting a whole visibility timeout for a redelivery.
        result_backend_always_retry=True,
        result_backend_max_retries=60,
        result_backend_max_sleep_between_retries_ms=2000,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_default_queue=f"{s.queue_prefix}.{s.default_model}",
        task_queues=[Queue(f"{s.queue_prefix}.{s.default_model}")],
        worker_hijack_root_logger=False,
        task_routes=(route_generation,),
    )
    return app


_default: Celery | None = None


def get_app() -> Celery:
    """The process's app, made on first use so that settings read the environment as it is then."""
    global _default
    if _default is None:
        _default = make_app()
    return _default


def __getattr__(name: str):
    if name == "app":  # `celery -A scheduler.app` finds the app here
        return get_app()
    raise AttributeError(name)
