"""Locust users for Reprise (the ``load`` extra; ``dev`` installs it too, for the tests).

    REDIS_URL=redis://127.0.0.1:6379/0 REPRISE_LOCUST_PROMPTS=../shared/prompts/PartiPrompts.tsv \\
        locust -f ops/locustfile.py --headless -u 8 -r 2 -t 2m

Each user submits through ``scheduler.client.submit`` (the same producer as everything else), waits
for the job, and reports it to Locust as one request: type ``generate``, name ``<model> <cache hit>``,
response time = end-to-end milliseconds, failures with the typed error. The requests follow
ops/workload.py's model; its knobs come from the environment (``REPRISE_LOCUST_*`` below). For
Reprise's own numbers (queue wait, service time, hit rates by K, plots) use ``reprise loadtest``.
"""

from __future__ import annotations

import os
import threading
import time

from locust import User, between, events, task

from ops.workload import PromptRow, Workload, WorkloadParams, parse_priorities, read_prompts

_lock = threading.RLock()
_workload: Workload | None = None


def shared_workload() -> Workload:
    """One workload for all users of this Locust process (sessions are per tenant, not per user)."""
    global _workload
    with _lock:
        if _workload is None:
            path = os.environ.get("REPRISE_LOCUST_PROMPTS")
            rows = read_prompts(path) if path else [PromptRow("a cute puppy playing in a garden")]
            _workload = Workload(
                rows,
                WorkloadParams(
                    model=os.environ.get("REPRISE_LOCUST_MODEL", "tiny"),
                    zipf=float(os.environ.get("REPRISE_LOCUST_ZIPF", "1.0")),
                    session_p=float(os.environ.get("REPRISE_LOCUST_SESSION_P", "0.5")),
                    edit_p=float(os.environ.get("REPRISE_LOCUST_EDIT_P", "0.6")),
                    tenants=int(os.environ.get("REPRISE_LOCUST_TENANTS", "1")),
                    priorities=parse_priorities(os.environ.get("REPRISE_LOCUST_PRIORITIES", "5")),
                    default_steps=int(os.environ.get("REPRISE_LOCUST_STEPS", "20")),
                ),
            )
        return _workload


class GenerationUser(User):
    """Submits one generation, waits for it, repeats after a short think time."""

    wait_time = between(0.0, 1.0)
    timeout_s = float(os.environ.get("REPRISE_LOCUST_TIMEOUT_S", "300"))

    @task
    def generate(self) -> None:
        from scheduler.client import submit

        with _lock:
            request, kind = shared_workload().next()
        started = time.perf_counter()
        name, response, exception = f"{request['model']} submit", None, None
        try:
            result = submit(request).wait(self.timeout_s)
            name, response = f"{result.model} {result.cache.hit}", result
        except Exception as exc:  # a typed Reprise error or a broker problem: a failed request
            exception = exc
        events.request.fire(
            request_type="generate",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            response=response,
            context={"kind": kind, "tenant": request.get("tenant")},
            exception=exception,
        )
