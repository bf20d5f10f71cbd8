"""The API's plain parts: the SSRF rule (submit time and connect time), Standard Webhooks signing, the outbox's
retries and dead-letter list, the request model, keys and limits. Local sockets and the test Redis only."""

from __future__ import annotations

import http.server
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from scheduler.api import webhooks
from scheduler.api.server import ImagesRequest, JobRequest
from scheduler.api.tenants import KeyStore, Limits, key_hash
from scheduler.api.webhooks import Outbox, WebhookRefused, address_allowed, allow_list, check_url, deliver, sign
from scheduler.errors import InvalidRequest


def _prefix() -> str:
    """Keys of one test under a prefix of their own: the session's Redis is shared with the cluster tests."""
    return "unit-" + uuid.uuid4().hex[:8]


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",  # the cloud metadata service
        "100.64.0.1",  # shared address space (carrier NAT)
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fd00:ec2::254",  # AWS's IPv6 metadata address (unique local)
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "::ffff:169.254.169.254",
    ],
)
def test_private_addresses_are_refused(ip):
    assert not address_allowed(ip)


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(ip):
    assert address_allowed(ip)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://10.0.0.7/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://2130706433/hook",  # 127.0.0.1 written as one number
        "ftp://example.com/hook",
        "http://user:pass@example.com/hook",
        "not a url",
    ],
)
def test_check_url_refuses(url):
    with pytest.raises(WebhookRefused) as refused:
        check_url(url, frozenset())
    assert refused.value.details[0]["field"] == "webhook.url"
    assert isinstance(refused.value, InvalidRequest)  # a 400 to the caller


def test_allow_list_admits_a_listed_host_only():
    allowed = allow_list(" 127.0.0.1, Hooks.Internal ,")
    assert allowed == {"127.0.0.1", "hooks.internal"}
    check_url("http://127.0.0.1:9/hook", allowed)
    with pytest.raises(WebhookRefused):
        check_url("http://localhost:9/hook", allowed)  # another name for the same address is not listed


class _Sink:
    def __init__(self, status=200):
        self.bodies = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.bodies.append((dict(self.headers), self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(status)
                if status in (301, 302, 307):
                    self.send_header("location", "http://127.0.0.1:1/elsewhere")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]

    def close(self):
        self.server.shutdown()


def test_connect_time_check_defeats_dns_rebinding(monkeypatch):
    """A name that passed at submit time but resolves to loopback at delivery is refused then (on the address
    resolved at delivery, and on the connected socket's peer), before a byte of the request is sent."""
    sink = _Sink()
    try:
        monkeypatch.setattr(
            webhooks,
            "resolve",
            lambda host, port: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", sink.port))],
        )
        with pytest.raises(WebhookRefused, match="127.0.0.1"):
            deliver(f"http://rebound.example:{sink.port}/hook", "whsec_" + "A" * 32, "msg_1", b"{}", 2, frozenset())
        assert sink.bodies == []
        # the same delivery with the name allowed goes through
        status = deliver(
            f"http://rebound.example:{sink.port}/hook", "whsec_" + "A" * 32, "msg_1", b"{}", 2, {"rebound.example"}
        )
        assert status == 200 and len(sink.bodies) == 1
    finally:
        sink.close()


def test_redirects_are_not_followed():
    sink = _Sink(status=302)
    try:
        status = deliver(f"http://127.0.0.1:{sink.port}/hook", "whsec_" + "A" * 32, "m", b"{}", 2, {"127.0.0.1"})
        assert status == 302 and len(sink.bodies) == 1
    finally:
        sink.close()


def test_signature_verifies_with_standardwebhooks():
    secret = webhooks.new_secret()
    body = b'{"type":"job.succeeded","data":{"id":"job_1"}}'
    headers = sign(secret, "msg_1", datetime.now(timezone.utc), body)
    assert Webhook(secret).verify(body, headers)["data"]["id"] == "job_1"
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"job_1", b"job_2"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.new_secret()).verify(body, headers)
    old = sign(secret, "msg_1", datetime.fromtimestamp(time.time() - 3600, timezone.utc), body)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, old)  # replayed an hour later


def test_outbox_retries_with_backoff_then_dead_letters(redis_client):
    outbox = Outbox(redis_client, _prefix())
    sink = _Sink(status=503)
    secret = webhooks.new_secret()
    try:
        msg = outbox.enqueue("t1", f"http://127.0.0.1:{sink.port}/h", {"type": "job.failed"}, msg_id="msg_job_1")
        assert outbox.enqueue("t1", "http://x/", {}, msg_id="msg_job_1") == msg  # enqueued twice, kept once
        outcomes, due = [], []
        for _ in range(3):
            assert outbox.claim(outbox.due_key, lease_s=30) == msg
            assert outbox.claim(outbox.due_key, lease_s=30) is None  # leased: no second replica takes it
            outcomes.append(outbox.attempt(msg, lambda t: secret, 2, {"127.0.0.1"}, 3, 0.5))
            if outcomes[-1] == "retry":
                due.append(redis_client.zscore(outbox.due_key, msg) - time.time())
                redis_client.zadd(outbox.due_key, {msg: 0})  # do not wait out the backoff
        assert outcomes == ["retry", "retry", "dead"]
        assert 0.3 < due[0] <= 0.5 and 0.8 < due[1] <= 1.0  # backoff 0.5 s, doubled
        failed = outbox.failed()
        assert [f["id"] for f in failed] == [msg] and failed[0]["attempts"] == 3
        assert [e["error"] for e in failed[0]["errors"]] == ["HTTP 503"] * 3
        assert len(sink.bodies) == 3 and all(Webhook(secret).verify(b, h) for h, b in sink.bodies)
        assert redis_client.zcard(outbox.due_key) == 0
    finally:
        sink.close()


def test_refused_delivery_is_dead_at_once(redis_client):
    outbox = Outbox(redis_client, _prefix())
    msg = outbox.enqueue("t1", "http://127.0.0.1:9/h", {"type": "job.succeeded"})
    assert outbox.attempt(msg, lambda t: webhooks.new_secret(), 1, frozenset(), 5, 1) == "dead"
    assert "REPRISE_WEBHOOK_ALLOW_HOSTS" in outbox.failed()[0]["errors"][0]["error"]


def test_keys_are_stored_hashed_and_revocable(redis_client):
    store = KeyStore(redis_client, _prefix())
    first = store.create("acme")
    second = store.create("acme", rate_per_min=5)
    assert first["webhook_secret"] == second["webhook_secret"]  # one secret per tenant
    assert store.tenant("acme").rate_per_min == 5
    names = redis_client.keys(f"{store.prefix}:*")
    stored = b"".join(names) + b"".join(redis_client.dump(k) or b"" for k in names)
    assert first["key"].encode() not in stored and key_hash(first["key"]).encode() in stored
    assert store.authenticate(first["key"])["tenant"] == "acme"
    assert store.authenticate(first["key"] + "x") is None
    assert store.revoke(first["id"]) and store.authenticate(first["key"]) is None
    assert [k["id"] for k in store.list()] == [second["id"]]
    assert not store.revoke(first["id"])


def test_limits(redis_client):
    prefix = _prefix()
    limits = Limits(redis_client, prefix)
    assert [limits.take("a", 2) for _ in range(2)] == [None, None]
    wait = limits.take("a", 2)
    assert wait is not None and 1 <= wait <= 60
    assert limits.take("b", 2) is None  # per tenant
    done = set()
    assert limits.admit("a", ["t1", "t2"], 2, lambda t: t in done)
    assert not limits.admit("a", ["t3"], 2, lambda t: t in done)
    assert redis_client.zcard(f"{prefix}:api:inflight:a") == 2  # the refused one was taken back
    done.add("t1")
    assert limits.admit("a", ["t3"], 2, lambda t: t in done)  # t1 ended: pruned
    redis_client.zadd(f"{prefix}:api:inflight:a", {"t2": time.time() - 100})  # its result expired long ago
    assert limits.admit("a", ["t4"], 2, lambda t: False, max_age_s=50)
    assert {m.decode() for m in redis_client.zrange(f"{prefix}:api:inflight:a", 0, -1)} == {"t3", "t4"}


def test_images_request_maps_onto_the_generation_request():
    req = ImagesRequest(prompt="a cat", n=3, size="128x64", response_format="b64_json", seed=7, steps=4, user="u1")
    gen = req.generation("acme")
    assert (gen.width, gen.height, gen.seed, gen.steps, gen.tenant) == (128, 64, 7, 4, "acme")
    assert ImagesRequest(prompt="a cat", size="auto").generation("t").width is None
    with pytest.raises(InvalidRequest) as bad:
        ImagesRequest(prompt="a cat", size="100x100").generation("t")
    assert {d["field"] for d in bad.value.details} == {"size"}
    for wrong in ({"size": "big"}, {"n": 0}, {"n": 11}, {"size": "64x64", "width": 64, "height": 64}, {"x": 1}):
        with pytest.raises(ValueError):
            ImagesRequest(prompt="a cat", **wrong)


def test_job_request_takes_the_webhook_as_an_object_or_a_url():
    assert JobRequest(prompt="x", webhook={"url": "https://h.example/a"}).webhook.url == "https://h.example/a"
    assert JobRequest(prompt="x", webhook="https://h.example/b").webhook.url == "https://h.example/b"
    with pytest.raises(ValueError):
        JobRequest(prompt="x", webhook={"url": "https://h.example/a", "secret": "s"})


def test_error_shapes_of_the_app(redis_server, redis_client):
    """Every refusal in OpenAI's shape, whatever raised it: validation, auth, body size (declared or streamed),
    an unexpected exception."""
    from fastapi.testclient import TestClient

    from scheduler.api.server import create_app
    from scheduler.settings import ClusterSettings

    prefix = _prefix()
    app = create_app(ClusterSettings(redis_url=redis_server.url, queue_prefix=prefix, api_max_body_bytes=2048))

    @app.get("/boom")
    def boom():
        raise RuntimeError("kaput")

    web = TestClient(app, raise_server_exceptions=False)  # no lifespan: no webhook loop needed here
    auth = {"Authorization": "Bearer " + KeyStore(redis_client, prefix).create("shapes")["key"]}

    def shape(response, status, code=None):
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if code:
            assert error["code"] == code
        return error

    shape(web.post("/v1/images/generations", json={"prompt": "x"}), 401, "missing_api_key")
    shape(web.post("/v1/images/generations", json={"prompt": "x"}, headers={"Authorization": "Bearer no"}), 401)
    bad = shape(web.post("/v1/images/generations", json={"prompt": "x", "n": 0}, headers=auth), 400)
    assert bad["param"] == "n" and bad["type"] == "invalid_request_error"
    assert (
        shape(web.post("/v1/images/generations", json={"prompt": "x", "quality": "hd"}, headers=auth), 400)["param"]
        == "quality"
    )  # an OpenAI field Reprise does not honour is refused, not ignored
    assert shape(web.get("/v1/jobs/job_nope", headers=auth), 404)["param"] == "job_id"
    shape(web.post("/v1/jobs", content=b"x" * 4096, headers={"content-type": "application/json", **auth}), 413)

    def chunks():
        for _ in range(8):
            yield b" " * 512

    shape(web.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json", **auth}), 413)
    assert shape(web.get("/boom"), 500, "internal_error")["message"].endswith("kaput")


def test_a_slow_receiver_does_not_hold_up_the_others(redis_client):
    from scheduler.api.server import Dispatcher, Store
    from scheduler.settings import ClusterSettings

    prefix = _prefix()
    settings = ClusterSettings(queue_prefix=prefix, webhook_allow_hosts="127.0.0.1", webhook_timeout_s=5)
    keys, outbox = KeyStore(redis_client, prefix), Outbox(redis_client, prefix)
    keys.create("t1")
    release = threading.Event()
    arrived = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/slow":
                release.wait(10)
            arrived.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    dispatcher = Dispatcher(Store(redis_client, settings), keys, outbox, base)
    try:
        outbox.enqueue("t1", base + "/slow", {"type": "job.succeeded"})
        dispatcher.step()  # the slow one is claimed and in flight
        outbox.enqueue("t1", base + "/fast", {"type": "job.succeeded"})
        dispatcher.step()
        deadline = time.monotonic() + 5
        while "/fast" not in arrived and time.monotonic() < deadline:
            time.sleep(0.05)
        assert arrived == ["/fast"]  # delivered while /slow still waits
        release.set()
        while len(arrived) < 2 and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        assert arrived == ["/fast", "/slow"]
        while redis_client.zcard(outbox.due_key) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        assert redis_client.zcard(outbox.due_key) == 0 and outbox.failed() == []
    finally:
        release.set()
        server.shutdown()
        dispatcher.pool.shutdown(wait=True)
