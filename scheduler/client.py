"""The producer: submit a generation and follow it.

from scheduler.client import submit
job = submit(prompt="a cute puppy playing in a garden", steps=20)
job.progress()          # {"state": "PROGRESS", "step": 7, "total": 20}
result = job.wait(60)   # GenerationResult, or a typed error (InvalidRequest, JobCancelled, ...)
"""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import Celery
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from scheduler import errors  # noqa: F401  (imported so Celery can rebuild our typed errors)
from scheduler.adapters import AdapterRegistry
from scheduler.app import GENERATE_TASK, cancel_key, get_app
from scheduler.errors import (
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobTimeout,
    RepriseError,
    SizeOverLimit,
    UnknownModel,
)
from scheduler.redis_conn import redis_client
from scheduler.registry import ModelRegistry
from scheduler.schema import GenerationRequest, GenerationResult, parse_request, queue_for, with_model
from scheduler.settings import get_settings

# What a Redis restart looks like to a waiting client (redis-py, kombu, the socket itself).
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError)


class Job:
    """A handle on one submitted generation."""

    def __init__(
        self,
        async_result: AsyncResult,
        request: GenerationRequest,
        redis_client: redis.Redis | None = None,
        queue_prefix: str | None = None,
    ):
        self._ar = async_result
        self.request = request
        self._redis = redis_client
        self._prefix = queue_prefix or get_settings().queue_prefix

    @property
    def id(self) -> str:
        return self._ar.id

    def status(self) -> str:
        return self._ar.state

    def progress(self) -> dict:
        """State and, while running, the step reached: {"state", "step", "total"}."""
        state = self._ar.state
        info = self._ar.info if state == "PROGRESS" else None
        out: dict[str, Any] = {"state": state}
        if isinstance(info, dict):
            out.update(step=info.get("step"), total=info.get("total"))
        elif state == "SUCCESS":
            result = self._ar.result
            steps = result.get("steps") if isinstance(result, dict) else self.request.steps  # the model's default
            out.update(step=steps, total=steps)
        return out

    def cancel(self) -> None:
        """Stop the job: before it starts, or within one denoising step once it runs."""
        if self._redis is not None:
            self._redis.set(cancel_key(self._prefix, self.id), 1, ex=24 * 3600)
        self._ar.revoke()

    def ready(self) -> bool:
        return self._ar.ready()

    def result(self) -> GenerationResult | None:
        """The result if the job finished, None while it runs; a typed error if it failed."""
        if not self._ar.ready():
            return None
        return self.wait(timeout=1)

    def wait(self, timeout: float | None = None, on_progress=None, poll_s: float = 0.1) -> GenerationResult:
        """Block until the job ends; ``on_progress(progress_dict)`` is called while waiting."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while on_progress is not None and not self._ar.ready():
            on_progress(self.progress())
            if deadline is not None and time.monotonic() > deadline:
                raise JobTimeout(f"job {self.id} did not finish within {timeout}s")
            time.sleep(poll_s)
        while True:
            remaining = None if deadline is None else max(0.01, deadline - time.monotonic())
            try:
                value = self._ar.get(timeout=remaining, propagate=True, interval=poll_s)
                break
            except CONNECTION_ERRORS as exc:  # Redis restarting: the job and its result survive it; ask again
                if deadline is not None and time.monotonic() > deadline:
                    raise JobTimeout(
                        f"job {self.id} did not finish within {timeout}s (Redis unreachable: {exc})"
                    ) from None
                time.sleep(0.5)
            except CeleryTimeout:
                raise JobTimeout(f"job {self.id} did not finish within {timeout}s") from None
            except TaskRevokedError:
                raise JobCancelled(f"job {self.id} was cancelled") from None
            except RepriseError:
                raise
            except Exception as exc:  # anything else a worker raised, rebuilt by Celery
                raise JobFailed(f"job {self.id} failed: {type(exc).__name__}: {exc}") from exc
        if on_progress is not None:
            on_progress(self.progress())
        return GenerationResult.model_validate(value)


def _redis_client() -> redis.Redis:
    return redis_client(get_settings().redis_url)


def check_served(request: GenerationRequest, registry: ModelRegistry) -> None:
    """Refuse, before queueing, a model no live worker serves or a size over its limit."""
    info = registry.served(request.model)
    if info is None:
        known = ", ".join(sorted(registry.all_served())) or "none"
        raise UnknownModel(
            f"no live worker serves model {request.model!r} (served now: {known})",
            [{"field": "model", "problem": "not served"}],
        )
    problems = []
    for side in ("width", "height"):
        value = getattr(request, side)
        if value is not None and value > info["max_size"]:
            problems.append(
                {"field": side, "problem": f"{value} is over {request.model}'s limit of {info['max_size']}"}
            )
        elif value is not None and value % info.get("size_multiple", 8):
            problems.append({"field": side, "problem": f"{value} is not a multiple of {info['size_multiple']}"})
    if problems:
        raise SizeOverLimit("; ".join(p["field"] + ": " + p["problem"] for p in problems), problems)
    # the model's family runs these (workers publish them; older workers do not, and their worker still checks)
    schedulers, methods = info.get("schedulers"), info.get("feature_methods")
    if schedulers and request.scheduler is not None and request.scheduler not in schedulers:
        problems.append({"field": "scheduler", "problem": f"{request.model} runs {', '.join(schedulers)}"})
    method = request.cache.feature.method
    if methods and method is not None and method not in methods:
        problems.append({"field": "cache.feature.method", "problem": f"{request.model} runs {', '.join(methods)}"})
    if problems:
        raise InvalidRequest("; ".join(p["field"] + ": " + p["problem"] for p in problems), problems)


def submit(
    request: GenerationRequest | dict | str | None = None,
    *,
    app: Celery | None = None,
    check_model: bool = True,
    task_id: str | None = None,
    **fields,
) -> Job:
    """Validate and enqueue one request (a model, a dict, JSON text, or keyword fields); ``task_id`` names the
    job (default: a fresh uuid), so a caller can record it before the job can end."""
    if request is None:
        request = fields
    elif fields:
        raise TypeError("give a request or keyword fields, not both")
    settings = get_settings()
    req = with_model(parse_request(request), settings.default_model)  # no model: the cluster's default
    app = app or get_app()
    client = redis_client(app.conf.broker_url)
    if check_model:
        check_served(req, ModelRegistry(client, settings.queue_prefix))
        if req.loras:  # an unknown adapter, or one made for another model, never reaches a queue
            AdapterRegistry(client, settings.queue_prefix).resolve(req.model, req.loras)
    ar = app.send_task(
        GENERATE_TASK,
        kwargs=req.model_dump(mode="json", exclude_none=True),
        queue=queue_for(req.model, settings.queue_prefix),
        priority=req.priority,
        headers={"reprise_queued_at": time.time()},
        task_id=task_id,
    )
    return Job(ar, req, client, settings.queue_prefix)


def job(job_id: str, app: Celery | None = None) -> Job:
    """A handle on a job submitted earlier (by id)."""
    app = app or get_app()
    ar = AsyncResult(job_id, app=app)
    return Job(ar, GenerationRequest(prompt="(unknown)"), redis_client(app.conf.broker_url))
