"""Knobs that must do what they say: the default model, the key prefix, and a worker log that carries one
INFO line per job. Real processes: the test Redis, a `shapes` worker, Flower, producers in subprocesses
whose environment names the default model, as the compose file does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import requests
from celery.result import AsyncResult

from ops.localcluster import LocalCluster
from scheduler.app import GENERATE_TASK, get_app
from scheduler.client import Job
from scheduler.schema import GenerationRequest

DEFAULT_ENV = {"REPRISE_DEFAULT_MODEL": "shapes"}


@pytest.fixture(scope="module")
def shapes_cluster(redis_server, tmp_path_factory):
    """One worker serving the shipped `shapes` model in a cluster whose default model is `shapes`."""
    work = tmp_path_factory.mktemp("knobs")
    c = LocalCluster(workdir=str(work), redis_url=redis_server.url, env=DEFAULT_ENV)
    c.ensure_redis()
    c.start_worker("shapes", "cpu", timeout=300, REPRISE_CACHE_PATH=str(work / "qdrant"))
    yield c
    c.stop()


def _producer_env() -> dict:
    return {**os.environ, **DEFAULT_ENV}


def _log_lines_since(worker, offset: int) -> list[str]:
    return worker.log.read_bytes()[offset:].decode(errors="replace").splitlines()


# --- item 13: one INFO line per job, no progress bars ------------------------------------------------


@pytest.mark.integration
def test_worker_log_has_one_info_line_per_job_and_no_progress_bar(shapes_cluster):
    worker = shapes_cluster.workers[0]
    offset = worker.log.stat().st_size
    app = get_app()
    ids = []
    for i in range(3):  # fresh prompts: each is embedded for the approximate lookup
        prompt = f"a red circle above a blue square {uuid.uuid4().hex[:6]} {i}"
        ar = app.send_task(
            GENERATE_TASK, kwargs={"prompt": prompt, "steps": 3, "seed": i, "model": "shapes"}, queue="reprise.shapes"
        )
        assert ar.get(timeout=120)["model"] == "shapes"
        ids.append(ar.id)
    time.sleep(1.0)  # the worker's last log lines
    assert "Batches" not in worker.log.read_text(errors="replace"), "the embedder's progress bar reached the log"
    window = _log_lines_since(worker, offset)
    assert not [line for line in window if "it/s]" in line], window  # no progress bar of any kind per job
    logged = [line for line in window if re.search(r" (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line)]
    assert not [line for line in logged if re.search(r" (WARNING|ERROR|CRITICAL) ", line)], window
    for job_id in ids:
        assert sum(job_id in line for line in logged if " INFO " in line) <= 1, window
    assert len([line for line in logged if " INFO " in line]) <= len(ids), window


# --- item 1: a request without `model` is served by the default model --------------------------------


@pytest.mark.integration
def test_send_task_and_client_without_model_are_served_by_the_default_model(shapes_cluster):
    script = """
import json
from scheduler.app import GENERATE_TASK, get_app
from scheduler.client import submit

raw = get_app().send_task(GENERATE_TASK, kwargs={"prompt": "a green triangle", "steps": 3, "seed": 4})
sent = raw.get(timeout=120)
job = submit(prompt="a yellow star", steps=3, seed=5)
print(json.dumps({"send_task": sent["model"], "client": job.wait(120).model, "client_request": job.request.model}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=_producer_env()
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "send_task": "shapes",
        "client": "shapes",
        "client_request": "shapes",
    }


@pytest.mark.integration
def test_a_worker_serves_a_request_without_model_that_reached_its_queue(shapes_cluster):
    # This producer's own default is tiny: only the worker decides here, and it serves as itself.
    ar = get_app().send_task(GENERATE_TASK, kwargs={"prompt": "a purple square", "steps": 3}, queue="reprise.shapes")
    result = ar.get(timeout=120)
    assert result["model"] == "shapes" and result["model_version"]


@pytest.mark.integration
def test_cli_submit_without_model_is_served_by_the_default_model(shapes_cluster):
    out = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "submit", "a blue circle", "--steps", "3", "--wait", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        env=_producer_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["model"] == "shapes"


@pytest.mark.integration
def test_flower_http_without_model_or_queue_is_served_by_the_default_model(shapes_cluster):
    url = shapes_cluster.start_flower(password="knobs-pass")
    r = requests.post(
        url + f"/api/task/async-apply/{GENERATE_TASK}",
        auth=shapes_cluster.flower_auth,
        timeout=10,
        json={"kwargs": {"prompt": "a red square over http", "steps": 3, "seed": 6}},
    )
    assert r.status_code == 200, r.text
    from scheduler.client import job as job_handle

    result = job_handle(r.json()["task-id"]).wait(120)
    assert result.model == "shapes" and result.seed == 6


# --- item 5: every Redis key starts with the queue prefix ---------------------------------------------


def test_hit_counts_of_two_prefixes_on_one_redis_stay_apart(redis_client):
    from cache import HitCounter

    a, b = HitCounter(redis_client, "knobs-a"), HitCounter(redis_client, "knobs-b")
    entry = f"e-{uuid.uuid4().hex}"
    a.incr(entry, 10, 1000.0)
    a.incr(entry, 10, 1001.0)
    assert b.get_many([entry]) == {entry: ({}, None)}
    b.incr(entry, 5, 1002.0)
    b.forget([entry])
    assert a.get_many([entry]) == {entry: ({10: 2}, 1001.0)}
    assert redis_client.exists(f"knobs-a:hits:{entry}") and not redis_client.exists(f"knobs-b:hits:{entry}")
    assert not list(redis_client.scan_iter(f"reprise:hits:{entry}"))


def test_a_cancel_under_one_prefix_is_not_seen_by_another(redis_server, redis_client):
    from scheduler.app import cancel_key
    from workers import tasks

    job_id = str(uuid.uuid4())
    Job(AsyncResult(job_id, app=get_app()), GenerationRequest(prompt="x"), redis_client, "knobs-a").cancel()
    assert redis_client.exists(cancel_key("knobs-a", job_id)) and not redis_client.exists(f"reprise:cancel:{job_id}")
    try:
        tasks.install(None, redis_client, 0.2, "knobs-b")
        assert not tasks._cancelled(job_id)
        tasks.install(None, redis_client, 0.2, "knobs-a")
        assert tasks._cancelled(job_id)
    finally:
        tasks.install(None, None, 0.2, "reprise")
