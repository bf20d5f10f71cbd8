"""Time limits and connection loss under the thread pool the workers run: what the README promises."""

from __future__ import annotations

import tempfile
import time

import pytest

from ops.localcluster import LocalCluster
from scheduler.app import GENERATE_TASK, get_app, make_app
from scheduler.client import submit
from scheduler.errors import JobTimeout
from scheduler.registry import ModelRegistry
from scheduler.settings import ClusterSettings

NOCACHE = {"exact": False, "approximate": False, "write": False}


def test_app_carries_no_celery_limit_the_thread_pool_cannot_act_on():
    """`-P threads` cannot stop a running thread: Celery's time limits and its cancel on connection loss
    would only log failures there, so the app leaves them off and the loop enforces the time limit."""
    conf = make_app(ClusterSettings(soft_time_limit_s=5)).conf
    assert conf.task_soft_time_limit is None
    assert conf.task_time_limit is None
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False
    assert "hard_time_limit_s" not in ClusterSettings.model_fields


@pytest.fixture(scope="module")
def slow_sim_worker(redis_server):
    """One `sim` worker (50 ms a step) whose loop stops jobs after 1 s."""
    c = LocalCluster(workdir=tempfile.mkdtemp(prefix="reprise-limits-"), redis_url=redis_server.url)
    worker = c.start_worker(
        "sim",
        "sim:0",
        REPRISE_SIM_STEP_MS=50,
        REPRISE_SOFT_TIME_LIMIT_S=1,
        REPRISE_METRICS_PORT=0,
        REPRISE_CACHE_PATH=f"{c.workdir}/qdrant",
    )
    deadline = time.monotonic() + 30
    while (info := ModelRegistry(c.redis).served("sim")) is None or info.get("pid") != worker.pid:
        assert time.monotonic() < deadline, "the sim worker never announced itself"
        time.sleep(0.2)
    yield c
    c.stop()


@pytest.mark.integration
def test_the_loop_ends_a_job_past_its_time_limit_with_job_timeout(slow_sim_worker):
    job = submit(prompt="a job longer than its limit", model="sim", steps=100, seed=1, cache=NOCACHE)
    with pytest.raises(JobTimeout, match=r"stopped before step \d+ of 100"):
        job.wait(60)
    # the worker is free again and a short job fits in the limit
    assert submit(prompt="a short job", model="sim", steps=4, seed=2, cache=NOCACHE).wait(30).steps == 4


@pytest.mark.integration
def test_a_message_time_limit_overrides_the_setting(slow_sim_worker):
    ar = get_app().send_task(
        GENERATE_TASK,
        kwargs={"prompt": "a job with its own limit", "model": "sim", "steps": 40, "seed": 3, "cache": NOCACHE},
        queue="reprise.sim",
        soft_time_limit=60,
    )
    assert ar.get(timeout=60)["steps"] == 40  # 2 s of steps: past the worker's 1 s, within the message's 60 s
