"""`reprise api`, end to end: the official `openai` client against a real `reprise api` process, a real tiny-model
worker and the test Redis; webhooks received on 127.0.0.1 and verified with `standardwebhooks`.

One worker, the tiny model, two denoising steps: each generation takes a fraction of a second."""

from __future__ import annotations

import base64
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import httpx
import openai
import pytest
import requests
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from ops.localcluster import LocalCluster

pytestmark = pytest.mark.integration
PNG = b"\x89PNG\r\n\x1a\n"
FAST = {"steps": 2}


@pytest.fixture(scope="module", params=["cpu", "cpu,cpu"])
def api(redis_server, request):
    """One worker (one device, then two) and one `reprise api` on the test Redis."""
    workdir = tempfile.mkdtemp(prefix="reprise-api-test-")
    c = LocalCluster(workdir=workdir, redis_url=redis_server.url)  # the environment holds conftest.TEST_ENV
    c.ensure_redis()
    c.start_worker("tiny", request.param, REPRISE_CACHE_PATH=f"{workdir}/qdrant")
    c.start_api(
        REPRISE_WEBHOOK_ALLOW_HOSTS="127.0.0.1",
        REPRISE_WEBHOOK_BACKOFF_S="0.2",
        REPRISE_WEBHOOK_MAX_ATTEMPTS="3",
        REPRISE_API_MAX_BODY_BYTES="65536",
    )
    yield c
    c.stop()


def keys_create(cluster, name: str, *extra: str) -> dict:
    """`reprise keys create --tenant <name>-<suffix> --json`: a tenant of this test alone (the Redis, with its rate
    counters, is shared by both device configurations)."""
    tenant = f"{name}-{uuid.uuid4().hex[:6]}"
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "keys", "create", "--tenant", tenant, "--json", *extra],
        env=cluster.process_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return {**json.loads(out.stdout), "tenant": tenant}


def reprise(cluster, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], env=cluster.process_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def client(cluster, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=cluster.api_url + "/v1", max_retries=0, timeout=60)


def sse(cluster, key: str, job_id: str) -> list[tuple[str, dict]]:
    """Every (event, data) of GET /v1/jobs/{id}/events, until the server ends the stream."""
    events, name = [], None
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.stream("GET", f"{cluster.api_url}/v1/jobs/{job_id}/events", headers=auth, timeout=60) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


class Receiver:
    """A webhook receiver on 127.0.0.1: records every request; answers ``status``."""

    def __init__(self, status: int = 204):
        self.requests: list[tuple[dict, bytes]] = []
        self.got = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                outer.got.set()
                self.send_response(status)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self):
        self.server.shutdown()


def test_openai_client_images_keys_and_errors(api):
    creds = keys_create(api, "acme")
    assert creds["key"].startswith("rk_") and creds["webhook_secret"].startswith("whsec_")
    oa = client(api, creds["key"])

    two = oa.images.generate(
        model="tiny", prompt="a red circle", n=2, size="64x64", response_format="b64_json", extra_body=FAST
    )
    assert len(two.data) == 2
    pngs = [base64.b64decode(d.b64_json) for d in two.data]
    assert all(p.startswith(PNG) for p in pngs) and pngs[0] != pngs[1]  # two seeds, two images

    one = oa.images.generate(model="tiny", prompt="a blue square", size="64x64", response_format="url", extra_body=FAST)
    url = one.data[0].url
    with_key = requests.get(url.split("?")[0], headers={"Authorization": f"Bearer {creds['key']}"}, timeout=10)
    assert with_key.status_code == 200 and with_key.headers["content-type"] == "image/png"
    assert with_key.content.startswith(PNG)
    assert requests.get(url, timeout=10).content == with_key.content  # the signed URL needs no key
    tampered = requests.get(url[:-4] + "0000", timeout=10)
    assert tampered.status_code == 403 and tampered.json()["error"]["code"] == "bad_signature"
    assert requests.get(url.split("?")[0], timeout=10).status_code == 401

    with pytest.raises(openai.AuthenticationError):
        client(api, "rk_wrong").images.generate(model="tiny", prompt="x", extra_body=FAST)
    with pytest.raises(openai.BadRequestError) as bad:
        oa.images.generate(model="tiny", prompt="x", size="64-by-64", extra_body=FAST)
    assert bad.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as bad:
        oa.images.generate(model="tiny", prompt="x", size="60x60", extra_body=FAST)  # no multiple of 8
    assert bad.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as bad:
        oa.images.generate(model="tiny", prompt="x", size="1024x1024", extra_body=FAST)  # over tiny's 512
    assert bad.value.body["param"] == "size" and bad.value.body["code"] == "size_over_limit"
    with pytest.raises(openai.BadRequestError):
        oa.images.generate(model="tiny", prompt="x", n=11, extra_body=FAST)
    with pytest.raises(openai.InternalServerError) as unserved:
        oa.images.generate(model="not-served", prompt="x", extra_body=FAST)
    assert unserved.value.status_code == 503 and unserved.value.body["code"] == "unknown_model"

    listed = json.loads(reprise(api, "keys", "list", "--tenant", creds["tenant"], "--json"))
    assert [k["id"] for k in listed] == [creds["id"]] and creds["key"] not in json.dumps(listed)
    assert creds["key"] not in api.redis.keys("*").__repr__()  # stored hashed
    reprise(api, "keys", "revoke", creds["id"])
    with pytest.raises(openai.AuthenticationError):
        oa.images.generate(model="tiny", prompt="x", extra_body=FAST)


def test_async_job_webhook_and_events(api):
    creds = keys_create(api, "hooks")
    receiver = Receiver()
    try:
        auth = {"Authorization": f"Bearer {creds['key']}"}
        # 60 steps: long enough that the event stream, opened right after the post, sees steps on the way
        # (at 20 a fast machine finished both images before the stream was open)
        body = {"prompt": "a green triangle", "model": "tiny", "size": "64x64", "n": 2, "steps": 60}
        posted = requests.post(
            api.api_url + "/v1/jobs", json={**body, "webhook": {"url": receiver.url}}, headers=auth, timeout=30
        )
        assert posted.status_code == 202, posted.text
        job_id = posted.json()["id"]
        assert posted.json()["status"] in ("queued", "running")

        events = sse(api, creds["key"], job_id)
        assert events[-1][0] == "succeeded" and events[-1][1]["id"] == job_id
        progress = [data for name, data in events if name == "progress"]
        assert progress and progress[-1]["images_done"] == 2
        steps = [p["step"] for p in progress]
        assert steps == sorted(steps) and any(0 < p["step"] < p["total"] for p in progress), progress  # on the way

        assert receiver.got.wait(30), "no webhook arrived"
        headers, payload = receiver.requests[0]
        event = Webhook(creds["webhook_secret"]).verify(payload, headers)
        assert event["type"] == "job.succeeded" and event["data"]["id"] == job_id
        assert headers["webhook-id"] == f"msg_{job_id}" and len(event["data"]["data"]) == 2
        with pytest.raises(WebhookVerificationError):
            Webhook(keys_create(api, "other")["webhook_secret"]).verify(payload, headers)  # another tenant's secret

        job = requests.get(f"{api.api_url}/v1/jobs/{job_id}", headers=auth, timeout=10).json()
        assert job["status"] == "succeeded" and job["progress"]["images_done"] == 2
        conflict = requests.delete(f"{api.api_url}/v1/jobs/{job_id}", headers=auth, timeout=10)
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "job_ended"
    finally:
        receiver.close()


def test_webhook_ssrf_refusal_and_dead_letter(api):
    creds = keys_create(api, "ssrf")
    oa = client(api, creds["key"])
    for url in ("http://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]:9/x", "ftp://x/y"):
        with pytest.raises(openai.BadRequestError) as refused:
            oa.post("/jobs", body={"prompt": "x", "webhook": {"url": url}}, cast_to=object)
        assert refused.value.body["code"] == "webhook_refused", url
        assert refused.value.body["param"] == "webhook.url"

    failing = Receiver(status=500)
    try:
        job = oa.post(
            "/jobs", body={"prompt": "x", "size": "64x64", **FAST, "webhook": {"url": failing.url}}, cast_to=object
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            failed = json.loads(reprise(api, "webhooks", "failed", "--json"))
            mine = [f for f in failed if f["id"] == "msg_" + job["id"]]
            if mine:
                break
            time.sleep(0.5)
        assert mine, "the delivery never reached the dead-letter list"
        assert mine[0]["attempts"] == 3 and len(failing.requests) == 3
        assert mine[0]["errors"][-1]["error"] == "HTTP 500"
    finally:
        failing.close()


def test_rate_limit_concurrency_cancel_and_body_limit(api):
    limited = client(api, keys_create(api, "slow", "--rate-per-min", "2")["key"])
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):  # refused for its size, but counted
            limited.images.generate(model="tiny", prompt="x", size="1x1")
    with pytest.raises(openai.RateLimitError) as too_many:
        limited.images.generate(model="tiny", prompt="x", size="64x64", extra_body=FAST)
    assert 1 <= int(too_many.value.response.headers["retry-after"]) <= 60

    creds = keys_create(api, "single", "--max-concurrent", "1")
    oa = client(api, creds["key"])
    long = oa.post("/jobs", body={"prompt": "a long one", "size": "64x64", "steps": 400}, cast_to=object)
    with pytest.raises(openai.RateLimitError) as capped:
        oa.post("/jobs", body={"prompt": "another", "size": "64x64", **FAST}, cast_to=object)
    assert capped.value.body["code"] == "concurrency_limit_exceeded"
    assert capped.value.response.headers["retry-after"] == "1"
    cancelled = oa.delete(f"/jobs/{long['id']}", cast_to=object)
    assert cancelled["status"] == "cancelled"
    events = sse(api, creds["key"], long["id"])
    assert events[-1][0] == "cancelled" and events[-1][1]["status"] == "cancelled"
    again = oa.post("/jobs", body={"prompt": "now it fits", "size": "64x64", **FAST}, cast_to=object)
    assert again["status"] in ("queued", "running", "succeeded")

    with pytest.raises(openai.APIStatusError) as too_big:
        oa.images.generate(model="tiny", prompt="x" * 70000)
    assert too_big.value.status_code == 413 and too_big.value.body["type"] == "request_too_large"


def test_a_caller_that_disconnects_cancels_its_images(api):
    creds = keys_create(api, "impatient")
    impatient = openai.OpenAI(api_key=creds["key"], base_url=api.api_url + "/v1", max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.images.generate(model="tiny", prompt="too slow to wait for", size="64x64", extra_body={"steps": 500})
    oa = client(api, creds["key"])
    deadline = time.monotonic() + 20
    while (jobs := oa.get("/jobs", cast_to=object)["data"])[0]["status"] != "cancelled":
        assert time.monotonic() < deadline, jobs
        time.sleep(0.2)
    assert len(jobs) == 1 and jobs[0]["progress"]["images_done"] == 0


def test_tenant_isolation(api):
    a = keys_create(api, "tenant-a")
    b = client(api, keys_create(api, "tenant-b")["key"])
    job = client(api, a["key"]).post("/jobs", body={"prompt": "mine", "size": "64x64", **FAST}, cast_to=object)
    with pytest.raises(openai.NotFoundError):
        b.get(f"/jobs/{job['id']}", cast_to=object)
    with pytest.raises(openai.NotFoundError):
        b.delete(f"/jobs/{job['id']}", cast_to=object)
    auth_a = {"Authorization": f"Bearer {a['key']}"}
    deadline = time.monotonic() + 60
    while (state := requests.get(f"{api.api_url}/v1/jobs/{job['id']}", headers=auth_a, timeout=10).json())[
        "status"
    ] != "succeeded":
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    file_id = state["data"][0]["file_id"]
    assert requests.get(f"{api.api_url}/v1/files/{file_id}", headers=auth_a, timeout=10).status_code == 200
    with pytest.raises(openai.NotFoundError):
        b.get(f"/files/{file_id}", cast_to=object)
    assert b.get("/jobs", cast_to=object)["data"] == []  # B's list shows none of A's jobs
    with pytest.raises(openai.PermissionDeniedError):
        b.images.generate(model="tiny", prompt="x", extra_body={"tenant": a["tenant"], **FAST})


def test_sync_timeout_names_the_job_and_any_replica_answers_for_it(api):
    """A second replica with a short wait: the 504 names the job, and the first replica (stateless: all state in
    Redis) follows it to the end."""
    first = api.api_url
    creds = keys_create(api, "patient")
    second = api.start_api(REPRISE_API_SYNC_TIMEOUT_S="0.3")
    api.api_url = first
    short = openai.OpenAI(api_key=creds["key"], base_url=second + "/v1", max_retries=2, timeout=60)
    with pytest.raises(openai.InternalServerError) as late:
        # 500 steps (the most a request may ask): at 60 a fast machine finished within the 0.3 s wait
        short.images.generate(model="tiny", prompt="a slow one", size="64x64", extra_body={"steps": 500})
    assert late.value.status_code == 504 and late.value.body["code"] == "timeout"
    assert late.value.body["param"] == "job_id"
    job_id = re.search(r"\bjob_[0-9a-f]{32}\b", late.value.body["message"]).group()
    assert late.value.response.headers["x-should-retry"] == "false"  # the client did not generate it again
    auth = {"Authorization": f"Bearer {creds['key']}"}
    deadline = time.monotonic() + 60
    while (state := requests.get(f"{first}/v1/jobs/{job_id}", headers=auth, timeout=10).json())["status"] != (
        "succeeded"
    ):
        assert time.monotonic() < deadline and state["status"] in ("queued", "running"), state
        time.sleep(0.2)
    assert state["results"][0]["steps"] == 500


def test_openapi_and_docs_in_headless_chromium(api, tmp_path):
    spec = requests.get(api.api_url + "/openapi.json", timeout=10).json()
    assert {"/v1/images/generations", "/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/files/{file_id}"} <= set(
        spec["paths"]
    )
    request_schema = spec["components"]["schemas"]["ImagesRequest"]["properties"]
    assert {"n", "size", "response_format", "negative_prompt", "seed", "cache", "priority"} <= set(request_schema)
    page = requests.get(api.api_url + "/docs", timeout=10).text
    assert "/static/swagger/swagger-ui-bundle.js" in page
    assert requests.get(api.api_url + "/static/swagger/swagger-ui-bundle.js", timeout=10).status_code == 200
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000", "--dump-dom"]
        + [api.api_url + "/docs"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    # Swagger UI drew the operations from /openapi.json: its JavaScript ran and the spec parsed
    assert "opblock-summary-path" in out.stdout and "/v1/images/generations" in out.stdout, out.stderr[-2000:]


def test_task_sent_without_a_queue_is_served(api):
    """A producer with a Celery app of its own and no `queue=`: Celery's default queue, served by the default
    model's workers (item 9)."""
    from celery import Celery

    bare = Celery("someone-else", broker=api.redis_url, backend=api.redis_url)
    result = bare.send_task(
        "reprise.generate", kwargs={"prompt": "a plain send_task", "steps": 2, "width": 64, "height": 64}
    )
    value = result.get(timeout=60)
    assert value["model"] == "tiny" and value["image_uri"]


def test_loadtest_over_http(api, tmp_path):
    key = keys_create(api, "load")["key"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    out = tmp_path / "load.json"
    run = subprocess.run(
        [sys.executable, "-m", "ops.cli", "loadtest", "--http", api.api_url, "--key", key, "--prompts", str(prompts)]
        + ["--concurrency", "2", "--n", "4", "--steps", "2", "--no-file-params", "--quiet", "--json", str(out)],
        env=api.process_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["sent"] == 4 and report["succeeded"] == 4
    assert report["latency_s"]["end_to_end"]["n"] == 4 and report["http"]["locust"]["num_requests"] == 4
    assert report["latency_s"]["service"]["p50"] > 0

    run = subprocess.run(
        [sys.executable, "-m", "ops.cli", "loadtest", "--http", api.api_url, "--key", key, "--prompts", str(prompts)]
        + ["--rate", "4", "--n", "4", "--steps", "2", "--no-file-params", "--quiet", "--json", str(out)],
        env=api.process_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())  # open loop: the same report
    assert report["load"]["mode"] == "open" and report["sent"] == 4 and report["succeeded"] == 4
    assert report["http"]["locust"]["num_requests"] == 4
