"""A whole cluster on this machine, started for real: Redis, worker processes, Flower.

Used by `reprise demo`, the benchmarks, the fault suite and the integration tests, so that they all
start the system the same way an operator would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_reachable(url: str, timeout: float = 1.0) -> bool:
    """Whether ``url`` (one Redis, or sentinel:// addresses with REPRISE_REDIS_SENTINEL_MASTER) answers now."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from scheduler.redis_conn import redis_client

    try:
        client = redis_client(url, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


@dataclass
class RedisServer:
    """A redis-server of our own on a spare port (optionally with append-only persistence and a password),
    restartable on the same port and folder."""

    port: int = 0
    appendonly: bool = False
    directory: str | None = None
    proc: subprocess.Popen | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        if shutil.which("redis-server") is None:
            raise RuntimeError(
                "redis-server is not installed and REDIS_URL is not set: install Redis or point REDIS_URL at one"
            )
        self.port = self.port or free_port()
        self.directory = self.directory or tempfile.mkdtemp(prefix="reprise-redis-")
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.directory,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
        ]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: redis_reachable(self.url, 0.2), 20, f"redis-server on port {self.port}", self.proc)
        return self

    def stop(self, hard: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            self.proc.wait(10)


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting:\n{tail}")
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout}s\n{tail}")


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    log: Path
    model: str
    hostname: str
    env: dict = field(default_factory=dict)  # what start_worker set beside the cluster's environment

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


_PRODUCER_ENV = ("REDIS_URL", "REPRISE_REDIS_URL")


def _drop_producer_caches() -> None:
    """The cluster settings and the Celery app of this process are made again on their next use."""
    from scheduler import app as app_module
    from scheduler.settings import get_settings

    get_settings.cache_clear()
    app_module._default = None


@dataclass
class LocalCluster:
    """Start with ``with LocalCluster(...) as c:``; everything started is stopped on exit."""

    workdir: str | None = None
    redis_url: str | None = None
    env: dict = field(default_factory=dict)
    verbose: bool = False
    own_redis: RedisServer | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    flower: subprocess.Popen | None = None
    flower_port: int | None = None
    flower_auth: tuple[str, str] = ("reprise", "")
    how_redis: str = ""
    producer_env: dict | None = None  # REDIS_URL and REPRISE_REDIS_URL before the cluster pointed them at itself

    def __post_init__(self) -> None:
        self.workdir = self.workdir or tempfile.mkdtemp(prefix="reprise-cluster-")
        Path(self.workdir).mkdir(parents=True, exist_ok=True)

    # --- Redis --------------------------------------------------------------------------------
    def ensure_redis(self) -> str:
        """The cluster's Redis: ``redis_url``, else REDIS_URL, else a redis-server of its own. Where the
        caller named none, the cluster is this process's cluster: its producer (``scheduler.client``, the
        cache admin, ...) talks to that Redis until ``stop`` (the settings any earlier client read are made
        again), so an embedded command submits where its workers listen."""
        chosen_here = self.redis_url is None
        url = self.redis_url or os.environ.get("REDIS_URL")
        if url and redis_reachable(url):
            self.redis_url, self.how_redis = url, f"using REDIS_URL={url}"
        elif url:
            raise RuntimeError(f"REDIS_URL={url} is set but Redis does not answer there")
        else:
            self.own_redis = RedisServer(directory=str(Path(self.workdir) / "redis")).start()
            self.redis_url = self.own_redis.url
            self.how_redis = f"started redis-server on 127.0.0.1:{self.own_redis.port} (REDIS_URL not set)"
        if chosen_here and self.producer_env is None:
            self.producer_env = {name: os.environ.get(name) for name in _PRODUCER_ENV}
            for name in _PRODUCER_ENV:
                os.environ[name] = self.redis_url
            _drop_producer_caches()
        return self.redis_url

    def process_env(self, **overrides) -> dict:
        env = dict(os.environ)
        env.update(
            REDIS_URL=self.redis_url,
            REPRISE_REDIS_URL=self.redis_url,
            REPRISE_ARTIFACT_URL=str(Path(self.workdir) / "artifacts"),
            REPRISE_CACHE_PATH=str(Path(self.workdir) / "qdrant"),
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        env.update({k: str(v) for k, v in self.env.items()})
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    @property
    def redis(self) -> redis.Redis:
        from scheduler.redis_conn import redis_client

        return redis_client(self.redis_url)

    # --- workers ------------------------------------------------------------------------------
    def start_worker(
        self,
        model: str = "tiny",
        devices: str = "cpu",
        wait: bool = True,
        timeout: float = 120,
        extra_args: tuple[str, ...] = (),
        hooks: bool = False,
        **env,
    ) -> WorkerProcess:
        """A `reprise worker` process; ``hooks``: run under ops.faults' injection hooks (they do nothing unless
        a REPRISE_FAULT_* setting asks)."""
        self._started = getattr(self, "_started", 0) + 1
        n = self._started - 1
        hostname = f"reprise-{model.replace('/', '-')}-w{n}-{os.getpid()}@{socket.gethostname()}"
        log = Path(self.workdir) / f"worker{n}.log"
        cmd = [
            sys.executable,
            "-m",
            *(("ops.faults", "--with-hooks") if hooks else ("ops.cli",)),
            "worker",
            "--model",
            model,
            "--devices",
            devices,
            "--hostname",
            hostname,
            *extra_args,
        ]
        handle = open(log, "wb")  # a fresh log per start: readiness is read from it
        proc = subprocess.Popen(
            cmd, env=self.process_env(**env), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        worker = WorkerProcess(proc, log, model, hostname, env)
        self.workers.append(worker)
        if wait:
            self.wait_worker_ready(worker, timeout)
        return worker

    def wait_worker_ready(self, worker: WorkerProcess, timeout: float = 120) -> None:
        _wait(
            lambda: b" ready." in worker.log.read_bytes(), timeout, f"worker {worker.hostname}", worker.proc, worker.log
        )

    # --- Flower -------------------------------------------------------------------------------
    def start_flower(self, password: str = "reprise-demo", timeout: float = 30) -> str:
        import requests

        self.flower_port = free_port()
        self.flower_auth = ("reprise", password)
        log = Path(self.workdir) / "flower.log"
        env = self.process_env(REPRISE_FLOWER_PASSWORD=password, REPRISE_FLOWER_PORT=self.flower_port)
        self.flower = subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", "flower"],
            env=env,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def up() -> bool:
            try:
                return (
                    requests.get(self.flower_url + "/api/workers", auth=self.flower_auth, timeout=1).status_code == 200
                )
            except requests.RequestException:
                return False

        _wait(up, timeout, "flower", self.flower, log)
        return self.flower_url

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    # --- the HTTP API -----------------------------------------------------------------------------
    def start_api(self, timeout: float = 30, **env) -> str:
        """`reprise api` on a free port of 127.0.0.1; returns its base URL (also `api_url`: the latest one). Each
        call starts one more replica."""
        import requests

        port = free_port()
        self.apis = getattr(self, "apis", [])
        log = Path(self.workdir) / f"api{len(self.apis)}.log"
        self.api = subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
            env=self.process_env(**env),
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.api_url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return requests.get(self.api_url + "/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        self.apis.append(self.api)
        _wait(up, timeout, "reprise api", self.api, log)
        return self.api_url

    # --- lifecycle ----------------------------------------------------------------------------
    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for api in getattr(self, "apis", []):
            if api.poll() is None:
                api.terminate()
                try:
                    api.wait(10)
                except subprocess.TimeoutExpired:
                    api.kill()
        if self.flower and self.flower.poll() is None:
            self.flower.terminate()
            try:
                self.flower.wait(10)
            except subprocess.TimeoutExpired:
                self.flower.kill()
        if self.own_redis:
            self.own_redis.stop()
        if self.producer_env is not None:  # the producer's Redis as it was before the cluster
            for name, value in self.producer_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            self.producer_env = None
            _drop_producer_caches()

    def __enter__(self) -> "LocalCluster":
        self.ensure_redis()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
