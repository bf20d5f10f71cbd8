"""`reprise loadtest`: drive a workload against a running cluster (REDIS_URL) or an embedded one.

    reprise loadtest --prompts ../shared/prompts/PartiPrompts.tsv --rate 2 --duration 60 --embedded \\
        --json load.json --plots plots/

Arrivals: open loop (``--rate R`` Poisson, or ``--ramp R0:R1`` linearly over ``--duration``) or closed
loop (``--concurrency N`` users, each submitting its next job when the last one ends). It stops by
itself after ``--n`` jobs or ``--duration`` seconds (whichever comes first), then waits for the jobs in
flight (each at most ``--timeout`` seconds after it was sent). Requests come from ops/workload.py's
repeat/refinement model (``--as-is`` replays the file once, in order).

Measured per job: queue wait and service time (from the worker's result), end to end (from just before
the submit to the time the result was stored, ``date_done``), the cache outcome. The report: a table,
``--json OUT`` (throughput; p50/p95/p99 of queue wait, service and end-to-end; errors by type; hit
rates by type and by K; steps saved; the workload parameters; how many jobs were sent and succeeded,
and what Flower counted for the same job ids when a Flower is known), ``--plots DIR`` (latency CDF,
throughput and queue depth over time, hit rate over time). ``--compare`` runs the workload twice, caches
off (request cache options all false) then on, and prints the ratios.

``--http URL`` drives a running `reprise api` instead of the broker (the key from ``--key`` or
REPRISE_API_KEY): each job is one ``POST /v1/images/generations``, measured from the response; closed
loop with Locust's ``HttpUser`` (``--concurrency N`` users), open loop (``--rate``, ``--ramp``) with the same
arrivals as a broker run, each posted through a Locust ``HttpSession``. The same report and plots; the
queue depth is left out, the API does not expose it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

CACHE_OFF = {"exact": False, "approximate": False, "write": False}
READY = ("SUCCESS", "FAILURE", "REVOKED")
INVALID_TYPES = {"InvalidRequest", "UnknownModel", "SizeOverLimit"}


@dataclass
class JobRecord:
    id: str
    kind: str
    tenant: str
    priority: int
    steps: int
    sent_at: float
    done_at: float | None = None
    status: str | None = None  # success, or the error type
    queue_wait_s: float | None = None
    service_s: float | None = None
    end_to_end_s: float | None = None
    hit: str | None = None
    k: int | None = None
    steps_saved: int = 0
    lookup_ms: float | None = None
    worker: str | None = None
    event: threading.Event | None = None

    def succeeded(self, result: dict) -> None:
        """Fill in what a GenerationResult (as JSON) says about this job."""
        t, cache = result.get("timings", {}), result.get("cache", {})
        self.status = "success"
        self.queue_wait_s = t.get("queue_wait_s")
        self.service_s = max(0.0, (t.get("total_s") or 0.0) - (t.get("queue_wait_s") or 0.0))
        self.hit, self.k = cache.get("hit"), cache.get("k")
        self.steps_saved = cache.get("steps_saved") or 0
        self.lookup_ms = cache.get("lookup_ms")
        self.worker = result.get("worker")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    v = sorted(values)

    def q(p: float) -> float:  # nearest-rank
        return v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))]

    return {"n": len(v), "p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "mean": sum(v) / len(v), "max": v[-1]}


def _timestamp(value) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def error_type(exc) -> str:
    name = type(exc).__name__ if isinstance(exc, BaseException) else str(exc)
    return name


class ResultCollector(threading.Thread):
    """Polls the result backend for every job in flight (one MGET per round): no thread per job."""

    def __init__(self, app, poll_s: float = 0.05):
        super().__init__(name="loadtest-collector", daemon=True)
        self.app, self.poll_s = app, poll_s
        from scheduler.redis_conn import redis_client

        self.redis = redis_client(app.conf.result_backend or app.conf.broker_url)
        self.pending: dict[str, JobRecord] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.on_done = None

    def add(self, rec: JobRecord) -> None:
        with self.lock:
            self.pending[rec.id] = rec

    def in_flight(self) -> int:
        with self.lock:
            return len(self.pending)

    def run(self) -> None:
        backend = self.app.backend
        while not self.stopped.is_set():
            with self.lock:
                ids = list(self.pending)
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                try:
                    values = self.redis.mget([backend.get_key_for_task(i) for i in chunk])
                except Exception:  # Redis busy or restarting: next round
                    break
                now = time.time()
                for job_id, raw in zip(chunk, values):
                    if raw is None:
                        continue
                    meta = backend.decode_result(raw)
                    if meta.get("status") not in READY:
                        continue
                    with self.lock:
                        rec = self.pending.pop(job_id, None)
                    if rec is not None:
                        self._finish(rec, meta, now)
            self.stopped.wait(self.poll_s)

    def _finish(self, rec: JobRecord, meta: dict, seen_at: float) -> None:
        done = _timestamp(meta.get("date_done")) or seen_at
        rec.done_at = done
        rec.end_to_end_s = max(0.0, done - rec.sent_at)
        status, result = meta.get("status"), meta.get("result")
        if status == "SUCCESS" and isinstance(result, dict):
            rec.succeeded(result)
        elif status == "REVOKED":
            rec.status = "JobCancelled"
        else:
            rec.status = error_type(result)
        self.finish(rec)

    def finish(self, rec: JobRecord) -> None:
        if self.on_done is not None:
            self.on_done(rec)
        if rec.event is not None:
            rec.event.set()

    def expire(self, now: float, timeout_s: float) -> None:
        """Jobs past their timeout end as client-side timeouts."""
        with self.lock:
            late = [r for r in self.pending.values() if now - r.sent_at > timeout_s]
            for r in late:
                self.pending.pop(r.id, None)
        for r in late:
            r.status, r.done_at = "client_timeout", now
            self.finish(r)


class QueueSampler(threading.Thread):
    """Samples the model's queue length (priority sub-queues included) every ``every_s``."""

    def __init__(self, redis_url: str, queue: str, every_s: float = 0.5):
        super().__init__(name="loadtest-queue", daemon=True)
        from scheduler.redis_conn import redis_client

        self.redis, self.queue, self.every_s = redis_client(redis_url), queue, every_s
        self.samples: list[tuple[float, int]] = []
        self.redis_ops: list[tuple[float, int]] = []
        self.stopped = threading.Event()

    def depth(self) -> int:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.queue)
            for p in range(1, 10):
                pipe.llen(f"{self.queue}:{p}")
            return sum(pipe.execute())

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                now = time.time()
                self.samples.append((now, self.depth()))
                self.redis_ops.append((now, int(self.redis.info("stats")["total_commands_processed"])))
            except Exception:
                pass
            self.stopped.wait(self.every_s)


class LoadRun:
    """One run of a workload: arrivals, collection, the report."""

    def __init__(
        self,
        app,
        workload,
        *,
        rate=None,
        ramp=None,
        concurrency=None,
        n=None,
        duration=None,
        timeout_s=120.0,
        progress=True,
        label="run",
    ):
        if sum(x is not None for x in (rate, ramp, concurrency)) != 1:
            raise ValueError("give exactly one of rate, ramp, concurrency")
        if n is None and duration is None and not workload.p.as_is:
            raise ValueError("give --n or --duration so the run ends")
        if ramp is not None and duration is None:
            raise ValueError("--ramp needs --duration")
        self.app, self.workload = app, workload
        self.rate, self.ramp, self.concurrency = rate, ramp, concurrency
        self.n, self.duration, self.timeout_s = n, duration, timeout_s
        self.progress, self.label = progress, label
        self.records: list[JobRecord] = []
        self.submit_errors: Counter = Counter()
        self.lock = threading.Lock()
        self.stop_sending = threading.Event()
        self.issued = 0
        self.send_s = 0.0  # producer time inside submit()
        self.lag_s = 0.0  # how far the open-loop producer fell behind its schedule, at most

    # --- sending ----------------------------------------------------------------------------------
    def _next_request(self):
        with self.lock:
            if self.stop_sending.is_set():
                return None
            if self.n is not None and self.issued >= self.n:
                self.stop_sending.set()
                return None
            if self.duration is not None and time.time() - self.started >= self.duration:
                self.stop_sending.set()
                return None
            item = self.workload.next()
            if item is None:
                self.stop_sending.set()
            else:
                self.issued += 1  # counted here, under the lock: concurrent users never overshoot --n
            return item

    def _send(self, req: dict, kind: str, closed: bool) -> JobRecord | None:
        from scheduler.client import submit

        t = time.perf_counter()
        sent_at = time.time()
        try:
            job = submit(req, app=self.app, check_model=False)
        except Exception as exc:  # refused before queueing (invalid request, broker away)
            with self.lock:
                self.submit_errors[f"submit:{error_type(exc)}"] += 1
            return None
        finally:
            self.send_s += time.perf_counter() - t
        rec = JobRecord(
            job.id,
            kind,
            req.get("tenant", "public"),
            req.get("priority", 5),
            req["steps"],
            sent_at,
            event=threading.Event() if closed else None,
        )
        with self.lock:
            self.records.append(rec)
        self.collector.add(rec)
        return rec

    def _open_loop(self) -> None:
        rng = random.Random(self.workload.p.seed + 1)
        next_at = self.started
        while True:
            elapsed = next_at - self.started
            rate = (
                self.rate
                if self.rate is not None
                else self.ramp[0] + (self.ramp[1] - self.ramp[0]) * min(1.0, elapsed / self.duration)
            )
            next_at += rng.expovariate(max(rate, 1e-6))
            delay = next_at - time.time()
            if delay > 0:
                if self.stop_sending.wait(delay):
                    return
            else:
                self.lag_s = max(self.lag_s, -delay)
            item = self._next_request()
            if item is None:
                return
            self._send(*item, closed=False)

    def _user(self) -> None:
        while True:
            item = self._next_request()
            if item is None:
                return
            rec = self._send(*item, closed=True)
            if rec is not None:
                rec.event.wait(self.timeout_s + 5)

    # --- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        from scheduler.schema import queue_for
        from scheduler.settings import get_settings

        settings = get_settings()
        self.collector = ResultCollector(self.app)
        self.sampler = QueueSampler(settings.redis_url, queue_for(self.workload.p.model, settings.queue_prefix))
        self.collector.start()
        self.sampler.start()
        self.started = time.time()
        cpu0 = time.process_time()
        if self.concurrency is not None:
            senders = [threading.Thread(target=self._user, daemon=True) for _ in range(self.concurrency)]
        else:
            senders = [threading.Thread(target=self._open_loop, daemon=True)]
        for s in senders:
            s.start()
        live = _Progress(self) if self.progress else None
        try:
            while any(s.is_alive() for s in senders) or self.collector.in_flight():
                self.collector.expire(time.time(), self.timeout_s)
                if live:
                    live.update()
                time.sleep(0.25)
        except KeyboardInterrupt:
            self.stop_sending.set()
            self.collector.expire(time.time() + self.timeout_s + 1, self.timeout_s)
        finally:
            self.sending_ended = max([r.sent_at for r in self.records], default=self.started)
            self.ended = time.time()
            self.producer_cpu_s = time.process_time() - cpu0
            self.collector.stopped.set()
            self.sampler.stopped.set()
            if live:
                live.close()
        return self.report()

    # --- the report -------------------------------------------------------------------------------
    def report(self) -> dict:
        recs = self.records
        ok = [r for r in recs if r.status == "success"]
        errors = Counter(r.status for r in recs if r.status != "success")
        errors.update(self.submit_errors)
        last_done = max([r.done_at for r in ok], default=self.ended)
        span = max(1e-9, last_done - self.started)
        send_span = max(1e-9, self.sending_ended - self.started)
        hits = Counter(r.hit for r in ok)
        by_k = Counter(str(r.k) for r in ok if r.hit == "approximate")
        steps_req = sum(r.steps for r in ok)
        steps_saved = sum(r.steps_saved for r in ok)
        ops = self.sampler.redis_ops
        redis_ops_s = (
            (ops[-1][1] - ops[0][1]) / (ops[-1][0] - ops[0][0]) if len(ops) > 1 and ops[-1][0] > ops[0][0] else None
        )
        return {
            "label": self.label,
            "workload": self.workload.describe(),
            "load": {
                "mode": "closed" if self.concurrency else "open",
                "rate": self.rate,
                "ramp": self.ramp,
                "concurrency": self.concurrency,
                "n": self.n,
                "duration_s": self.duration,
                "timeout_s": self.timeout_s,
            },
            "sent": len(recs),
            "succeeded": len(ok),
            "failed": sum(errors.values()),
            "errors": dict(errors),
            "invalid": sum(v for k, v in errors.items() if k.split(":")[-1] in INVALID_TYPES),
            "wall_s": round(self.ended - self.started, 3),
            "offered_rate_jobs_s": len(recs) / send_span,
            "throughput_jobs_s": len(ok) / span,
            "producer": {
                "send_ms_mean": 1000 * self.send_s / max(1, len(recs)),
                "max_lag_s": self.lag_s,
                "cpu_s": self.producer_cpu_s,
                "send_rate_jobs_s": len(recs) / send_span,
            },
            "redis_ops_s": redis_ops_s,
            "latency_s": {
                "queue_wait": percentiles([r.queue_wait_s for r in ok if r.queue_wait_s is not None]),
                "service": percentiles([r.service_s for r in ok if r.service_s is not None]),
                "end_to_end": percentiles([r.end_to_end_s for r in ok if r.end_to_end_s is not None]),
            },
            "cache": {
                "hits": dict(hits),
                "hit_rate": {h: hits.get(h, 0) / max(1, len(ok)) for h in ("exact", "approximate", "miss", "off")},
                "approximate_by_k": dict(sorted(by_k.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1)),
                "steps_requested": steps_req,
                "steps_saved": steps_saved,
                "steps_saved_fraction": steps_saved / max(1, steps_req),
                "lookup_ms": percentiles([r.lookup_ms for r in ok if r.lookup_ms is not None]),
            },
            "workers": dict(Counter(r.worker for r in ok)),
            "series": self.series(),
            "job_ids": [r.id for r in recs],
        }

    def series(self, bins: int = 60) -> dict:
        end = max([r.done_at or self.ended for r in self.records], default=self.ended)
        width = max(1.0, math.ceil((end - self.started) / bins))
        n = max(1, math.ceil((end - self.started) / width))
        done, hit = [0] * n, [0] * n
        for r in self.records:
            if r.status == "success" and r.done_at:
                i = min(n - 1, int((r.done_at - self.started) / width))
                done[i] += 1
                hit[i] += r.hit in ("exact", "approximate")
        return {
            "bin_s": width,
            "t": [round(i * width, 3) for i in range(n)],
            "throughput_jobs_s": [d / width for d in done],
            "hit_rate": [h / d if d else None for h, d in zip(hit, done)],
            "queue_depth": [(round(t - self.started, 3), d) for t, d in self.sampler.samples],
            "end_to_end_s": sorted(r.end_to_end_s for r in self.records if r.status == "success"),
            "queue_wait_s": sorted(
                r.queue_wait_s for r in self.records if r.status == "success" and r.queue_wait_s is not None
            ),
            "service_s": sorted(r.service_s for r in self.records if r.status == "success" and r.service_s is not None),
        }


class _InFlight:
    """Requests sent over HTTP and not answered yet (what the collector counts for broker runs)."""

    def __init__(self):
        self.n, self.lock = 0, threading.Lock()

    def add(self, delta: int) -> None:
        with self.lock:
            self.n += delta

    def in_flight(self) -> int:
        return self.n


class HttpLoadRun(LoadRun):
    """The same run over `reprise api`, each job one POST timed on its answer: closed loop, Locust HttpUsers;
    open loop, the broker run's arrivals, each posted by a greenlet through a Locust HttpSession."""

    def __init__(self, url: str, key: str, workload, **kw):
        super().__init__(None, workload, **kw)
        self.url, self.key = url.rstrip("/"), key

    def _post(self, client, req: dict, kind: str) -> None:
        body = {k: v for k, v in req.items() if k != "tenant"}  # the tenant is the key's
        sent_at = time.time()
        rec = JobRecord("", kind, req.get("tenant", "public"), req.get("priority", 5), req["steps"], sent_at)
        self.collector.add(1)
        try:
            with client.post(
                "/v1/images/generations",
                json=body,
                headers={"Authorization": f"Bearer {self.key}"},
                name=f"{req['model']} generate",
                catch_response=True,
                timeout=self.timeout_s,
            ) as resp:
                rec.done_at = time.time()
                rec.end_to_end_s = rec.done_at - sent_at
                try:
                    answer = resp.json()
                except ValueError:
                    answer = {}
                if resp.status_code == 200 and answer.get("results"):
                    rec.id = answer["id"]
                    rec.succeeded(answer["results"][0])
                    resp.success()
                else:
                    error = (answer.get("error") or {}) if isinstance(answer, dict) else {}
                    rec.status = f"http:{resp.status_code}:{error.get('code') or 'error'}"
                    resp.failure(error.get("message") or f"HTTP {resp.status_code}")
        finally:
            self.collector.add(-1)
        with self.lock:
            self.records.append(rec)

    def _send(self, req: dict, kind: str, closed: bool) -> None:
        """Open loop: each arrival is posted by a greenlet of its own, so a slow answer delays no other arrival."""
        self.posting.spawn(self._post, self.session, req, kind)

    def run(self) -> dict:
        from gevent.pool import Group
        from locust import HttpUser, constant, task
        from locust.clients import HttpSession
        from locust.env import Environment
        from locust.exception import StopUser

        outer = self

        class ReprisePoster(HttpUser):
            host = self.url
            wait_time = constant(0)

            @task
            def generate(self) -> None:
                item = outer._next_request()
                if item is None:
                    raise StopUser()
                outer._post(self.client, *item)

        self.collector = _InFlight()
        # the API does not expose the queue: no samples (the report's queue series stays empty)
        self.sampler = type("NoQueue", (), {"samples": [], "redis_ops": []})()
        env = Environment(user_classes=[ReprisePoster])
        self.started = time.time()
        cpu0 = time.process_time()
        live = _Progress(self) if self.progress else None
        runner = env.create_local_runner()  # also what records each request in Locust's statistics
        try:
            if self.concurrency is not None:  # closed loop: N Locust users
                runner.start(self.concurrency, spawn_rate=self.concurrency)
                while not self.stop_sending.is_set() or runner.user_count > 0:
                    if live:
                        live.update()
                    time.sleep(0.25)
            else:  # open loop: the broker run's arrival process, each arrival posted at its time
                self.session = HttpSession(base_url=self.url, request_event=env.events.request, user=None)
                self.posting = Group()
                sender = self.posting.spawn(self._open_loop)
                while not sender.dead or len(self.posting) > 0:
                    if live:
                        live.update()
                    time.sleep(0.25)
        except KeyboardInterrupt:
            self.stop_sending.set()
        finally:
            runner.quit()
            self.sending_ended = max([r.sent_at for r in self.records], default=self.started)
            self.ended = time.time()
            self.producer_cpu_s = time.process_time() - cpu0
            if live:
                live.close()
        report = self.report()
        report["producer"]["send_ms_mean"] = None  # one HTTP call sends and waits: end_to_end is its time
        report["http"] = {"url": self.url, "locust": env.stats.total.serialize()}
        return report


class _Progress:
    """One live line: sent, done, errors, in flight, queue depth, throughput, p50, hit rate."""

    def __init__(self, run: LoadRun):
        from rich.console import Console
        from rich.live import Live

        self.run = run
        self.live = Live(console=Console(stderr=True), refresh_per_second=4, transient=False)
        self.live.start()

    def update(self) -> None:
        from rich.text import Text

        run = self.run
        recs = list(run.records)
        ok = [r for r in recs if r.status == "success"]
        done = [r for r in recs if r.status is not None]
        elapsed = time.time() - run.started
        e2e = sorted(r.end_to_end_s for r in ok)
        hits = sum(r.hit in ("exact", "approximate") for r in ok)
        depth = run.sampler.samples[-1][1] if run.sampler.samples else 0
        self.live.update(
            Text(
                f"[{run.label}] {elapsed:6.1f}s  sent {len(recs)}  done {len(done)}  ok {len(ok)}  err {len(done) - len(ok) + sum(run.submit_errors.values())}"
                f"  in flight {run.collector.in_flight()}  queue {depth}  thr {len(ok) / max(elapsed, 1e-9):.2f}/s"
                f"  p50 e2e {e2e[len(e2e) // 2] if e2e else 0:.2f}s  hits {hits / max(1, len(ok)):.0%}"
            )
        )

    def close(self) -> None:
        self.update()
        self.live.stop()


# --- output -------------------------------------------------------------------------------------


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"loadtest {report['label']}: {report['sent']} sent, {report['succeeded']} succeeded, "
        f"{report['throughput_jobs_s']:.2f} jobs/s"
    )
    table.add_column("latency (s)")
    for c in ("p50", "p95", "p99", "mean"):
        table.add_column(c, justify="right")
    for name, p in report["latency_s"].items():
        table.add_row(name, *(f"{p[c]:.3f}" if p[c] is not None else "-" for c in ("p50", "p95", "p99", "mean")))
    console = Console()
    console.print(table)
    cache = report["cache"]
    console.print(
        "hit rate: "
        + ", ".join(f"{k} {v:.1%}" for k, v in cache["hit_rate"].items() if v)
        + f"; approximate by K: {cache['approximate_by_k'] or '-'}; steps saved {cache['steps_saved']} of "
        f"{cache['steps_requested']} ({cache['steps_saved_fraction']:.1%})"
    )
    console.print(f"errors: {report['errors'] or 'none'}; workload: {report['workload']['generated']}")
    if report.get("flower"):
        console.print(f"flower: {report['flower']}")


def write_plots(reports: list[dict], directory: str | Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rep in reports:
        s = rep["series"]
        for key, style in (("end_to_end_s", "-"), ("queue_wait_s", "--"), ("service_s", ":")):
            v = s[key]
            if v:
                ax.plot(
                    v,
                    [(i + 1) / len(v) for i in range(len(v))],
                    style,
                    label=f"{rep['label']} {key[:-2].replace('_', ' ')}",
                )
    _label(ax, "Latency CDF", "seconds", "fraction of jobs")
    paths.append(_save(fig, directory / "latency_cdf.png"))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for rep in reports:
        s = rep["series"]
        if s["t"]:  # one more edge so the last bin shows as a step too
            top.step(
                s["t"] + [s["t"][-1] + s["bin_s"]],
                s["throughput_jobs_s"] + s["throughput_jobs_s"][-1:],
                where="post",
                label=rep["label"],
            )
        if s["queue_depth"]:
            bottom.plot([t for t, _ in s["queue_depth"]], [d for _, d in s["queue_depth"]], label=rep["label"])
    _label(top, "Throughput and queue depth over time", None, "jobs/s completed")
    _label(bottom, None, "seconds since start", "jobs queued")
    paths.append(_save(fig, directory / "throughput_queue.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for rep in reports:
        s = rep["series"]
        pts = [(t, h) for t, h in zip(s["t"], s["hit_rate"]) if h is not None]
        (line,) = ax.plot(
            [t for t, _ in pts],
            [h for _, h in pts],
            marker=".",
            alpha=0.5,
            label=f"{rep['label']} per {s['bin_s']:.0f}s",
        )
        hits = done = 0
        cumulative = []
        for h, d in zip(s["hit_rate"], s["throughput_jobs_s"]):
            n = d * s["bin_s"]
            done, hits = done + n, hits + (h or 0) * n
            cumulative.append(hits / done if done else None)
        ax.plot(s["t"], cumulative, color=line.get_color(), linewidth=2, label=f"{rep['label']} cumulative")
    ax.set_ylim(-0.02, 1.02)
    _label(ax, "Hit rate over time", "seconds since start", "cache hit rate (exact + approximate)")
    paths.append(_save(fig, directory / "hit_rate.png"))
    return paths


def _label(ax, title: str | None, xlabel: str | None, ylabel: str) -> None:
    if title:
        ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def flower_counts(url: str, auth: tuple[str, str] | None, job_ids: list[str], wait_s: float = 15.0) -> dict:
    """What Flower recorded for these job ids: how many it saw and how many it shows as SUCCESS."""
    import requests

    wanted = set(job_ids)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            tasks = requests.get(url.rstrip("/") + "/api/tasks", auth=auth, timeout=10, params={"limit": 100000}).json()
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        ours = {i: t for i, t in tasks.items() if i in wanted}
        states = Counter(t.get("state") for t in ours.values())
        settled = all(t.get("state") in READY for t in ours.values())
        if (len(ours) == len(wanted) and settled) or time.monotonic() > deadline:
            return {"seen": len(ours), "succeeded": states.get("SUCCESS", 0), "states": dict(states)}
        time.sleep(1.0)


# --- the command --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reprise loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt file: .tsv/.csv with a Prompt column, Krea CSV, .jsonl, or one per line",
    )
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals at R jobs/s")
    load.add_argument("--ramp", help="open loop: R0:R1, the rate going linearly from R0 to R1 over --duration")
    load.add_argument("--concurrency", type=int, help="closed loop: N users, each waiting for its job before the next")
    p.add_argument("--n", type=int, help="stop after sending this many jobs")
    p.add_argument("--duration", type=float, help="stop sending after this many seconds")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="a job not done this long after it was sent is a client timeout"
    )
    p.add_argument("--model", default=None, help="model to load (default: sim with --embedded, else tiny)")
    w = p.add_argument_group("workload model (ops/workload.py)")
    w.add_argument("--zipf", type=float, default=1.0, help="popularity exponent of fresh draws (0 = uniform)")
    w.add_argument("--session-p", type=float, default=0.5, help="probability a request continues its tenant's session")
    w.add_argument(
        "--edit-p",
        type=float,
        default=0.6,
        help="within a session: probability of an edit (else a re-roll with a new seed)",
    )
    w.add_argument("--tenants", type=int, default=1)
    w.add_argument("--priorities", default="5", help="priority mix, e.g. 5:0.8,0:0.1,9:0.1")
    w.add_argument(
        "--steps", type=int, help="force this many steps (default: the file's where it has them, else --default-steps)"
    )
    w.add_argument("--default-steps", type=int, default=20)
    w.add_argument("--no-file-params", action="store_true", help="ignore the file's seeds, steps, sizes and guidance")
    w.add_argument("--pool", type=int, help="use only the first N prompts of the file")
    w.add_argument("--seed", type=int, default=0, help="seed of the workload and of the arrivals")
    w.add_argument("--as-is", action="store_true", help="replay the file once in order, no synthetic repeats")
    p.add_argument("--compare", action="store_true", help="run twice, caches off then on, and print the ratios")
    p.add_argument("--json", dest="json_out", help="write the report here")
    p.add_argument("--plots", help="write PNG plots into this folder")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    p.add_argument("--flower", help="Flower URL to compare task counts with (embedded: the one started)")
    p.add_argument("--flower-auth", help="user:password of that Flower")
    h = p.add_argument_group("over HTTP (--http)")
    h.add_argument(
        "--http", metavar="URL", help="drive a running `reprise api` at URL (Locust HttpUser; --concurrency)"
    )
    h.add_argument("--key", default=os.environ.get("REPRISE_API_KEY"), help="API key (default: REPRISE_API_KEY)")
    e = p.add_argument_group("embedded cluster (--embedded)")
    e.add_argument(
        "--embedded",
        action="store_true",
        help="start Redis, workers and Flower here (ops/localcluster.py), stop them after",
    )
    e.add_argument("--workers", type=int, default=1, help="worker processes (each owns its own embedded cache)")
    e.add_argument("--devices", default=None, help="devices per worker (default: sim:0..sim:3 for sim, cpu otherwise)")
    e.add_argument("--step-ms", type=float, default=50.0, help="sim: time of one denoising step")
    e.add_argument("--no-flower", action="store_true", help="do not start Flower")
    return p


def _reset_producer(redis_url: str) -> None:
    """Point this process's producer at ``redis_url`` (settings and app are made on first use)."""
    os.environ["REDIS_URL"] = os.environ["REPRISE_REDIS_URL"] = redis_url
    from scheduler import app as app_module
    from scheduler.settings import get_settings

    get_settings.cache_clear()
    app_module._default = None


def start_embedded(args, model: str):
    from ops.localcluster import LocalCluster

    workdir = tempfile.mkdtemp(prefix="reprise-loadtest-")
    Path(workdir, "redis").mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(workdir=workdir, env={"REPRISE_SIM_STEP_MS": args.step_ms})
    cluster.ensure_redis()
    _reset_producer(cluster.redis_url)
    devices = args.devices or ("sim:0,sim:1,sim:2,sim:3" if model == "sim" else "cpu")
    for i in range(args.workers):
        cluster.start_worker(model, devices, wait=False, REPRISE_CACHE_PATH=f"{workdir}/qdrant-w{i}")
    for w in cluster.workers:
        cluster.wait_worker_ready(w, timeout=300)
    if not args.no_flower:
        cluster.start_flower(password="reprise-loadtest")
    print(
        f"embedded cluster: {cluster.how_redis}; {args.workers} worker(s) of {model} on {devices}; "
        f"flower {cluster.flower_url if cluster.flower else 'off'}; logs in {workdir}",
        file=sys.stderr,
    )
    return cluster


def workload_params(args, info: dict, cache: dict | None):
    """The workload of the command line, for the model ``info`` describes (its maximum size)."""
    from ops.workload import WorkloadParams, parse_priorities

    return WorkloadParams(
        zipf=args.zipf,
        session_p=args.session_p,
        edit_p=args.edit_p,
        tenants=args.tenants,
        priorities=parse_priorities(args.priorities),
        steps=args.steps,
        default_steps=args.default_steps,
        file_params=not args.no_file_params,
        pool=args.pool,
        seed=args.seed,
        as_is=args.as_is,
        model=args.model,
        max_size=info.get("max_size"),
        cache=cache,
    )


def run_options(args, label: str) -> dict:
    """How the command line asks a run to send and stop."""
    return dict(
        rate=args.rate,
        ramp=tuple(float(x) for x in args.ramp.split(":")) if args.ramp else None,
        concurrency=args.concurrency,
        n=args.n,
        duration=args.duration,
        timeout_s=args.timeout,
        progress=not args.quiet,
        label=label,
    )


def run_load(args, label: str, cache: dict | None, app) -> dict:
    from ops.workload import Workload, read_prompts
    from scheduler.redis_conn import redis_client
    from scheduler.registry import ModelRegistry
    from scheduler.settings import get_settings

    settings = get_settings()
    info = ModelRegistry(redis_client(settings.redis_url), settings.queue_prefix).served(args.model)
    if info is None:
        raise SystemExit(f"no live worker serves {args.model!r} at {settings.redis_url}")
    params = workload_params(args, info, cache)
    run = LoadRun(app, Workload(read_prompts(args.prompts), params), **run_options(args, label))
    report = run.run()
    report["cluster"] = {"redis_url": settings.redis_url, "model": info}
    return report


def run_http_load(args, label: str, cache: dict | None) -> dict:
    import requests

    from ops.workload import Workload, read_prompts

    models = requests.get(
        args.http.rstrip("/") + "/v1/models", headers={"Authorization": f"Bearer {args.key}"}, timeout=10
    )
    if models.status_code != 200:
        raise SystemExit(f"{args.http}/v1/models answered {models.status_code}: {models.text[:300]}")
    info = next((m for m in models.json()["data"] if m["id"] == args.model), None)
    if info is None:
        raise SystemExit(f"no live worker serves {args.model!r} behind {args.http}")
    params = workload_params(args, info, cache)
    run = HttpLoadRun(args.http, args.key, Workload(read_prompts(args.prompts), params), **run_options(args, label))
    report = run.run()
    report["cluster"] = {"api_url": args.http, "model": info}
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.http and (args.embedded or not args.key):
        raise SystemExit("--http needs --key (or REPRISE_API_KEY), and no --embedded")
    if args.http:
        import locust  # noqa: F401  (gevent patches the standard library: before anything opens a socket)
    args.model = args.model or ("sim" if args.embedded else "tiny")
    cluster = start_embedded(args, args.model) if args.embedded else None
    try:
        runs = [("cache-off", CACHE_OFF), ("cache-on", None)] if args.compare else [("run", None)]
        reports = []
        for label, cache in runs:
            if args.http:
                report = run_http_load(args, label, cache)
            else:
                from scheduler.app import get_app

                report = run_load(args, label, cache, get_app())
            flower = args.flower or (cluster.flower_url if cluster is not None and cluster.flower else None)
            if flower:
                auth = (
                    tuple(args.flower_auth.split(":", 1))
                    if args.flower_auth
                    else (cluster.flower_auth if cluster else None)
                )
                report["flower"] = flower_counts(flower, auth, report["job_ids"])
                report["flower"]["agrees"] = report["flower"].get("succeeded") == report["succeeded"]
            print_table(report)
            reports.append(report)
        out = (
            reports[0]
            if len(reports) == 1
            else {"off": reports[0], "on": reports[1], "ratios": compare(reports[0], reports[1])}
        )
        if args.compare:
            print(
                "cache on ÷ cache off: " + ", ".join(f"{k} {v:.3f}" for k, v in out["ratios"].items() if v is not None)
            )
        if args.plots:
            out_plots = write_plots(reports, args.plots)
            out["plots"] = out_plots
            print("plots: " + ", ".join(out_plots))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(out, indent=2, default=str))
            print(f"report: {args.json_out}")
        return 0 if all(r["succeeded"] for r in reports) else 1
    finally:
        if cluster is not None:
            cluster.stop()


def compare(off: dict, on: dict) -> dict:
    def ratio(a, b):
        return a / b if a is not None and b else None

    lat_on, lat_off = on["latency_s"], off["latency_s"]
    return {
        "throughput": ratio(on["throughput_jobs_s"], off["throughput_jobs_s"]),
        "end_to_end_p50": ratio(lat_on["end_to_end"]["p50"], lat_off["end_to_end"]["p50"]),
        "end_to_end_p95": ratio(lat_on["end_to_end"]["p95"], lat_off["end_to_end"]["p95"]),
        "service_mean": ratio(lat_on["service"]["mean"], lat_off["service"]["mean"]),
        "steps_saved_fraction_on": on["cache"]["steps_saved_fraction"],
    }


if __name__ == "__main__":
    sys.exit(main())
