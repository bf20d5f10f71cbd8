"""One load run: jobs sent by open- or closed-loop arrivals through the broker (LoadRun) or the HTTP API (HttpLoadRun, Locust), their results collected, the queue sampled, the report computed."""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

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
