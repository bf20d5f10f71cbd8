"""Shared fixtures. Integration tests start real processes: a redis-server of their own on a spare
port, real worker processes (`reprise worker`), a real Flower. Nothing is faked."""

from __future__ import annotations

import os
import tempfile

import pytest

from ops.localcluster import LocalCluster, RedisServer, free_port

# The producer in this process reads its settings from the environment on first use: point it at
# the test Redis before anything imports the Celery app.
_PORT = free_port()
_URL = f"redis://127.0.0.1:{_PORT}/0"
TEST_ENV = {
    "REDIS_URL": _URL,
    "REPRISE_REDIS_URL": _URL,
    "HF_HUB_OFFLINE": "1",
    # Short enough that a killed worker's job comes back within a test, longer than any test job.
    "REPRISE_VISIBILITY_TIMEOUT_S": "15",
    "REPRISE_RESTORE_INTERVAL_S": "1",
    "REPRISE_HEARTBEAT_S": "2",
    "REPRISE_TORCH_THREADS": "1",
    # Every step is reported, so a test can read exactly how far a job had got (the cancel test does).
    "REPRISE_PROGRESS_INTERVAL_S": "0",
}
os.environ.update(TEST_ENV)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer(port=_PORT).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_client(redis_server):
    import redis

    return redis.Redis.from_url(redis_server.url)


@pytest.fixture(scope="session")
def cluster(redis_server):
    """Two tiny-model workers sharing the test Redis (each with its own embedded cache folder)."""
    workdir = tempfile.mkdtemp(prefix="reprise-test-")
    c = LocalCluster(workdir=workdir, redis_url=redis_server.url, env=TEST_ENV)
    c.ensure_redis()
    c.start_worker("tiny", "cpu", REPRISE_CACHE_PATH=f"{workdir}/qdrant-w0")
    c.start_worker("tiny", "cpu", REPRISE_CACHE_PATH=f"{workdir}/qdrant-w1")
    yield c
    c.stop()
