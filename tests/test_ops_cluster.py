"""Operating the cluster: a `sim` worker's metrics endpoint and a short load test, against real processes."""

from __future__ import annotations

import csv as csv_module
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ops.localcluster import free_port
from scheduler.app import GENERATE_TASK, get_app
from scheduler.client import submit
from scheduler.errors import InvalidRequest
from scheduler.registry import ModelRegistry

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = Path(__file__).resolve().parents[1].parent / "shared" / "prompts"


@pytest.fixture(scope="module")
def sim_worker(cluster):
    """One worker process serving two simulated devices (10 ms per step), its metrics on a spare port."""
    worker = cluster.start_worker(
        "sim",
        "sim:0,sim:1",
        REPRISE_SIM_STEP_MS=10,
        REPRISE_METRICS_PORT=free_port(),
        REPRISE_CACHE_PATH=f"{cluster.workdir}/qdrant-sim",
    )
    deadline = time.monotonic() + 30
    while (info := ModelRegistry(cluster.redis).served("sim")) is None or info.get("pid") != worker.pid:
        assert time.monotonic() < deadline, "the sim worker never announced itself"
        time.sleep(0.2)
    yield info
    worker.stop()


def _scrape(port: int) -> dict:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint_moves_as_jobs_complete(sim_worker):
    port = sim_worker["metrics_port"]
    assert isinstance(port, int) and port > 0  # published in the registry (node_info)
    before = _scrape(port)
    results = [submit(prompt=f"a metrics probe {i}", model="sim", steps=4, seed=i).wait(60) for i in range(3)]
    with pytest.raises(InvalidRequest):
        get_app().send_task(GENERATE_TASK, kwargs={"prompt": "", "model": "sim"}, queue="reprise.sim").get(timeout=60)
    after = _scrape(port)
    ok = ("reprise_jobs_total", {"model": "sim", "outcome": "success"})
    assert _value(after, ok[0], **ok[1]) - _value(before, ok[0], **ok[1]) == 3
    assert (
        _value(after, "reprise_jobs_total", model="sim", outcome="invalid")
        - _value(before, "reprise_jobs_total", model="sim", outcome="invalid")
        == 1
    )
    assert (
        _value(after, "reprise_job_end_to_end_seconds_count", model="sim")
        - _value(before, "reprise_job_end_to_end_seconds_count", model="sim")
        == 3
    )
    assert ("reprise_queue_depth", (("queue", "reprise.sim"),)) in after  # read from Redis at scrape time
    assert _value(after, "reprise_devices", model="sim") == 2
    hits = sum(v for (name, labels), v in after.items() if name == "reprise_cache_hits_total")
    hits_before = sum(v for (name, labels), v in before.items() if name == "reprise_cache_hits_total")
    assert hits - hits_before == 3 and all(r.cache.hit in ("miss", "approximate", "exact") for r in results)
    busy = [v for (name, _), v in after.items() if name == "reprise_device_busy_ratio"]
    assert len(busy) == 2 and all(0 <= b <= 1 for b in busy) and sum(busy) > 0


@pytest.mark.skipif(not PROMPTS.exists(), reason="../shared/prompts not present")
def test_short_loadtest_writes_report_plots_and_agrees_with_flower(sim_worker, cluster, tmp_path):
    from ops import loadtest

    flower = (
        cluster.flower_url
        if cluster.flower and cluster.flower.poll() is None
        else cluster.start_flower(password="test-pass")
    )
    out = tmp_path / "load.json"
    argv = [
        "--prompts",
        str(PROMPTS / "PartiPrompts.tsv"),
        "--concurrency",
        "3",
        "--n",
        "10",
        "--model",
        "sim",
        "--steps",
        "5",
        "--session-p",
        "0.5",
        "--json",
        str(out),
        "--plots",
        str(tmp_path / "plots"),
        "--quiet",
        "--flower",
        flower,
        "--flower-auth",
        ":".join(cluster.flower_auth),
    ]
    assert loadtest.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["sent"] == 10 and report["succeeded"] == 10 and report["failed"] == 0
    assert report["throughput_jobs_s"] > 0
    for name in ("queue_wait", "service", "end_to_end"):
        p = report["latency_s"][name]
        assert p["n"] == 10 and p["p50"] <= p["p95"] <= p["p99"]
    assert set(report["cache"]["hit_rate"]) >= {"exact", "approximate", "miss"}
    assert "approximate_by_k" in report["cache"] and report["cache"]["steps_requested"] == 50
    assert report["workload"]["params"]["session_p"] == 0.5 and sum(report["workload"]["generated"].values()) == 10
    assert report["flower"]["seen"] == 10 and report["flower"]["succeeded"] == report["succeeded"]
    assert len(report["plots"]) == 3
    for path in report["plots"]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_locust_run_reports_each_job_as_a_request(sim_worker, cluster, tmp_path):
    """Real Locust (the `load` extra, installed with `dev`): a headless run of ops/locustfile.py for a few
    seconds against the test cluster, in its own process (Locust monkey-patches the process with gevent).
    No web UI, no master port: standalone headless, only the test Redis on loopback."""
    csv = tmp_path / "locust"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "ops" / "locustfile.py"),
            "--headless",
            "--users",
            "2",
            "--spawn-rate",
            "2",
            "--run-time",
            "4s",
            "--stop-timeout",
            "30",  # users finish the job they wait for
            "--csv",
            str(csv),
            "--only-summary",
            "--exit-code-on-error",
            "1",
        ],
        env=cluster.process_env(REPRISE_LOCUST_MODEL="sim", REPRISE_LOCUST_STEPS="3", REPRISE_LOCUST_TIMEOUT_S="30"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(f"{csv}_stats.csv") as f:
        rows = list(csv_module.DictReader(f))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    ours = [r for r in rows if r["Type"] == "generate"]
    assert ours and {r["Name"].split()[0] for r in ours} == {"sim"}, rows
    assert {r["Name"].split()[1] for r in ours} <= {"miss", "exact", "approximate"}, rows
    assert int(total["Request Count"]) >= 2 and int(total["Failure Count"]) == 0, total
    assert float(total["Average Response Time"]) > 0


def test_an_embedded_cluster_points_this_process_producer_at_its_own_redis_until_it_stops(tmp_path):
    """`reprise demo`, `bench cache --embedded`, `loadtest --embedded`: with no REDIS_URL the cluster starts a
    redis-server of its own, and this process's producer (settings read earlier included) submits there
    while the cluster runs; afterwards the producer's environment is as it was."""
    import os

    from ops.localcluster import LocalCluster
    from scheduler.settings import get_settings

    saved = {name: os.environ.pop(name) for name in ("REDIS_URL", "REPRISE_REDIS_URL") if name in os.environ}
    try:
        get_settings.cache_clear()
        before = get_settings().redis_url  # read (and cached) before the cluster starts: the default
        with LocalCluster(workdir=str(tmp_path)) as c:
            assert c.own_redis is not None and c.redis_url != before
            assert get_settings().redis_url == c.redis_url == os.environ["REDIS_URL"]
            assert get_app().conf.broker_url.startswith(c.redis_url.rsplit("/", 1)[0])
        assert "REDIS_URL" not in os.environ and get_settings().redis_url == before
    finally:
        os.environ.update(saved)
        get_settings.cache_clear()
        from scheduler import app as app_module

        app_module._default = None
