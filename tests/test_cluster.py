"""The cluster end to end: producer → Celery/Redis → worker processes → artifacts, watched by Flower."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from scheduler.app import GENERATE_TASK, get_app
from scheduler.client import submit
from scheduler.errors import InvalidRequest, JobCancelled, SizeOverLimit, UnknownModel

pytestmark = pytest.mark.integration


def _pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(uri.removeprefix("file://")).convert("RGB"))


def _nocache(**kw):
    return {"cache": {"exact": False, "approximate": False, "write": False}, **kw}


def test_submit_wait_progress_and_png(cluster):
    job = submit(prompt="a cute puppy playing in a garden", steps=30, seed=7)
    seen = []
    result = job.wait(60, on_progress=lambda p: seen.append(p.get("step") or 0), poll_s=0.01)  # 30 steps: ~0.3 s
    assert result.seed == 7 and result.steps == 30 and result.model == "tiny"
    assert max(seen) == 30 and any(0 < s < 30 for s in seen), seen  # per-step progress was visible
    path = Path(result.image_uri.removeprefix("file://"))
    assert path.exists() and path.suffix == ".png"
    meta = json.loads(Image.open(path).info["reprise"])
    assert meta["request"]["prompt"] == "a cute puppy playing in a garden" and meta["seed"] == 7
    assert result.timings.total_s >= result.timings.denoise_s > 0
    assert result.cache.hit in ("miss", "exact", "approximate")
    assert job.result() == result


def test_seed_chosen_and_returned(cluster):
    result = submit(prompt="a red bicycle", steps=4).wait(60)
    assert 0 <= result.seed < 2**32


def _only_on(node: str, nodes: set[str], queue: str = "reprise.tiny") -> None:
    """Make ``node`` the only consumer of ``queue`` (Celery's remote control), or restore every node."""
    app = get_app()
    app.control.add_consumer(queue, destination=sorted(nodes), reply=True, timeout=10)
    if node:
        others = sorted(nodes - {node})
        replies = app.control.cancel_consumer(queue, destination=others, reply=True, timeout=10)
        assert len(replies) == len(others), replies
    time.sleep(3)  # a fetch already waiting on the queue (kombu polls with a 1 s timeout) has returned


def test_same_seed_same_image_across_runs_and_workers(cluster):
    """The same request runs once on each node in turn (the other node stops consuming the model's queue
    meanwhile), then on whichever node: every run names the node that ran it and gives the same image."""
    nodes = {w.hostname for w in cluster.workers if w.alive() and w.model == "tiny"}
    assert len(nodes) == 2
    same = dict(prompt="a lighthouse at dusk", steps=12, seed=1234, **_nocache())
    results = []
    try:
        for node in sorted(nodes):
            _only_on(node, nodes)
            results.append(submit(**same).wait(60))
    finally:
        _only_on("", nodes)
    results.append(submit(**same).wait(60))
    assert [r.worker for r in results[:2]] == sorted(nodes)  # the result names the node that ran it
    images = [_pixels(r.image_uri) for r in results]
    for img in images[1:]:
        assert np.array_equal(img, images[0])


def test_send_task_by_name(cluster):
    app = get_app()
    ar = app.send_task(GENERATE_TASK, kwargs={"prompt": "a bowl of fruit", "steps": 5, "seed": 3}, queue="reprise.tiny")
    value = ar.get(timeout=60)
    assert value["seed"] == 3 and value["image_uri"].endswith(".png")


def test_cli_submit_wait(cluster):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scheduler.cli",
            "submit",
            "a cute puppy playing in a garden",
            "--steps",
            "8",
            "--wait",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["steps"] == 8 and Path(result["image_uri"].removeprefix("file://")).exists()


def test_cli_reports_typed_errors(cluster):
    out = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "submit", "x", "--steps", "0", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert json.loads(out.stderr)["error"] == "invalid_request"


def test_client_refuses_bad_requests_before_queueing(cluster):
    with pytest.raises(InvalidRequest):
        submit(prompt="", steps=5)
    with pytest.raises(UnknownModel):
        submit(prompt="a cat", model="no-such-model")
    with pytest.raises(SizeOverLimit):
        submit(prompt="a cat", width=1024, height=1024)


BAD_RAW = [
    {"prompt": ""},
    {"prompt": "x" * 10_000},
    {"prompt": "a", "steps": 0},
    {"prompt": "a", "steps": 10_000},
    {"prompt": "a", "width": 63, "height": 64},
    {"prompt": "a", "width": 1024, "height": 1024},
    {"prompt": "a", "scheduler": "unknown"},
    {"prompt": "a", "model": "other-model"},
    {"prompt": "a", "guidance_scale": "lots"},
    {"steps": 5},
]


def _worker_pids(cluster):
    return sorted(w.pid for w in cluster.workers if w.alive())


def test_bad_raw_messages_get_typed_errors_and_no_worker_restarts(cluster):
    app = get_app()
    pids = _worker_pids(cluster)
    results = [app.send_task(GENERATE_TASK, kwargs=payload, queue="reprise.tiny") for payload in BAD_RAW]
    results.append(app.send_task(GENERATE_TASK, args=["not an object"], queue="reprise.tiny"))
    for ar in results:
        with pytest.raises(InvalidRequest):
            ar.get(timeout=60)
        assert ar.state == "FAILURE"
    assert _worker_pids(cluster) == pids
    assert submit(prompt="still alive", steps=3).wait(60).steps == 3


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.sampled_from(
            ["prompt", "steps", "width", "height", "seed", "guidance_scale", "scheduler", "tenant", "cache", "junk"]
        ),
        st.one_of(st.none(), st.integers(-10, 100_000), st.floats(allow_nan=True), st.text(max_size=30), st.booleans()),
        min_size=1,
    )
)
def test_random_raw_messages_never_crash_a_worker(cluster, payload):
    app = get_app()
    if isinstance(payload.get("steps"), int) and not isinstance(payload.get("steps"), bool) and payload["steps"] > 20:
        payload["steps"] = 20
    ar = app.send_task(GENERATE_TASK, kwargs=payload, queue="reprise.tiny")
    try:
        ar.get(timeout=60)
    except InvalidRequest:
        pass
    assert all(w.alive() for w in cluster.workers)


def test_cancel_stops_within_one_step_and_frees_the_worker(cluster):
    """Workers here report every step (REPRISE_PROGRESS_INTERVAL_S=0); the node's publisher thread stores
    each step off the device thread. The flag goes up just after a step's report lands (the test watches
    the stored progress change), while the device is inside the next step: the job's thread sees the flag
    at that step's event, when the device has begun the step after, and the device stops before the one
    after that: at most two steps past the stored progress. (Raised at any instant, the flag can meet a
    report still being written, and the stored progress trails the device by one more step.)"""
    job = submit(prompt="a very long job", steps=500, seed=1, width=128, height=128, **_nocache())
    deadline = time.monotonic() + 60
    while (seen := job.progress().get("step") or 0) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    while (job.progress().get("step") or 0) == seen:  # until the next report lands
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    with cluster.redis.pipeline(transaction=True) as tx:  # MULTI/EXEC: read the progress and raise the flag at once
        tx.get(job._ar.backend.get_key_for_task(job.id))
        tx.set(f"reprise:cancel:{job.id}", 1, ex=3600)  # the flag Job.cancel() raises
        meta, _ = tx.execute()
    meta = json.loads(meta)
    assert meta["status"] == "PROGRESS", meta
    done_at_cancel = meta["result"]["step"]
    job.cancel()  # and the revoke broadcast, as a user's cancel does
    with pytest.raises(JobCancelled):
        job.wait(60)
    assert job.status() == "REVOKED"
    reason = str(job._ar.backend.get_task_meta(job.id)["result"])
    done_at_stop = int(reason.split("before step ")[1].split()[0]) - 1  # "...stopped before step N of 500"
    assert done_at_stop - done_at_cancel in (0, 1, 2), (done_at_cancel, done_at_stop)
    assert submit(prompt="next job", steps=3).wait(30).steps == 3


def test_worker_sigkill_mid_job_is_redelivered_and_completes_once(cluster):
    job = submit(prompt="a job that survives a crash", steps=250, seed=99, **_nocache())
    deadline = time.monotonic() + 60
    while (job.progress().get("step") or 0) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    host = job._ar.worker
    victim = next(w for w in cluster.workers if w.hostname == host)
    victim.kill()
    result = job.wait(120)
    assert result.worker and result.steps == 250
    art = Path(result.image_uri.removeprefix("file://"))
    assert art.exists()
    assert sorted(p.name for p in art.parent.glob(f"{job.id}*")) == [f"{job.id}.png"]  # one image, no half-written part
    cluster.workers.remove(victim)
    cluster.start_worker("tiny", "cpu", REPRISE_CACHE_PATH=f"{cluster.workdir}/qdrant-w{len(cluster.workers) + 5}")


def test_flower_sees_workers_and_jobs_and_takes_http_jobs(cluster):
    url = cluster.start_flower(password="test-pass")
    auth = cluster.flower_auth
    assert requests.get(url + "/api/workers", timeout=10).status_code == 401  # basic auth is on
    done = submit(prompt="seen by flower", steps=3).wait(60)
    r = requests.post(
        url + f"/api/task/async-apply/{GENERATE_TASK}",
        auth=auth,
        timeout=10,
        json={"kwargs": {"prompt": "submitted over http", "steps": 4, "seed": 5}, "options": {"queue": "reprise.tiny"}},
    )
    assert r.status_code == 200, r.text
    http_id = r.json()["task-id"]
    from scheduler.client import job as job_handle

    assert job_handle(http_id).wait(60).seed == 5
    deadline = time.monotonic() + 30
    while True:
        workers = requests.get(url + "/api/workers?refresh=1", auth=auth, timeout=20).json()
        tasks = requests.get(url + "/api/tasks", auth=auth, timeout=10).json()
        ours = {w for w in workers if w.startswith("reprise-tiny")}
        if ours and done.job_id in tasks and http_id in tasks and tasks[http_id]["state"] == "SUCCESS":
            break
        assert time.monotonic() < deadline, (list(workers), list(tasks)[:5])
        time.sleep(1)
    stats = next(workers[w]["stats"] for w in ours)
    assert stats["reprise"]["model"] == "tiny" and "cpu" in stats["reprise"]["devices"]
    assert stats["reprise"]["switch_interval_ms"] == 1.0  # the worker applied REPRISE_SWITCH_INTERVAL_MS's default
    assert stats["reprise"]["approx_gate"]["enabled"] is True  # a CPU node gates its lookups (REPRISE_APPROX_GATE=auto)
    # `celery inspect stats` itself, now (Flower's copy may be from before these jobs): the engine's denoiser
    # calls so far on the tiny nodes, these two jobs' 3 + 4 steps among them
    live = get_app().control.inspect(timeout=10).stats() or {}
    engines = [v["reprise"]["engine"] for k, v in live.items() if k.startswith("reprise-tiny")]
    stepped, calls = sum(e["requests_stepped"] for e in engines), sum(e["calls"] for e in engines)
    assert stepped >= 3 + 4 and 0 < calls <= stepped and sum(e["call_s"] for e in engines) > 0


def test_feature_cache_options_reach_the_worker_and_are_reported(cluster):
    plain = submit(prompt="a feature cached job", steps=12, seed=2, **_nocache()).wait(60)
    deep = submit(
        prompt="a feature cached job",
        steps=12,
        seed=2,
        cache={
            "exact": False,
            "approximate": False,
            "write": False,
            "feature": {"method": "deepcache", "deepcache_interval": 3},
        },
    ).wait(60)
    assert plain.cache.feature.method == "off"
    assert deep.cache.feature.method == "deepcache"
    assert deep.cache.feature.full_unet_passes == 4 and deep.cache.feature.partial_unet_passes == 8
    assert not np.array_equal(_pixels(plain.image_uri), _pixels(deep.image_uri))
