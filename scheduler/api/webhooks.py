"""Webhooks by the Standard Webhooks spec: signed with the `standardwebhooks` package, delivered SSRF-safe,
retried with backoff, then kept on a dead-letter list (`reprise webhooks failed`).

SSRF rule: a webhook may reach only public (globally routable) addresses, unless its host is listed in
REPRISE_WEBHOOK_ALLOW_HOSTS. The rule is checked twice: when the job is submitted (a clear 400), and again
on the address the socket really connected to, so a name that resolves to a public address at submit time
and to 10.0.0.1 at delivery time (DNS rebinding) is refused. Redirects are never followed.

Delivery is written on http.client rather than requests/httpx: neither gives a hook on the connected
socket's peer address before the request is sent, which the connect-time check needs.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlsplit

import redis
from standardwebhooks import Webhook

from scheduler.errors import InvalidRequest


class WebhookRefused(InvalidRequest):
    """The webhook URL is malformed or points at an address the SSRF rule forbids."""

    code = "webhook_refused"


def allow_list(text: str) -> frozenset[str]:
    return frozenset(h.strip().lower().strip("[]") for h in text.split(",") if h.strip())


def address_allowed(ip: str) -> bool:
    """Only globally routable unicast addresses: no loopback, private, link-local (169.254.169.254, the cloud
    metadata service, is link-local), shared (100.64/10), multicast, reserved or unspecified ones."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path?query) of a webhook URL, or WebhookRefused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"webhook.url: {exc}", [{"field": "webhook.url", "problem": str(exc)}]) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problem = "must be an http(s) URL with a host"
        raise WebhookRefused(f"webhook.url {problem}", [{"field": "webhook.url", "problem": problem}])
    if parts.username or parts.password:
        problem = "must not carry credentials"
        raise WebhookRefused(f"webhook.url {problem}", [{"field": "webhook.url", "problem": problem}])
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80), path


def _refused(host: str, ip: str) -> WebhookRefused:
    problem = (
        f"{host} resolves to {ip}, a loopback, private, link-local or metadata address "
        "(list the host in REPRISE_WEBHOOK_ALLOW_HOSTS to allow it)"
    )
    return WebhookRefused(f"webhook.url refused: {problem}", [{"field": "webhook.url", "problem": problem}])


def resolve(host: str, port: int) -> list[tuple]:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        problem = f"{host} does not resolve ({exc})"
        raise WebhookRefused(f"webhook.url: {problem}", [{"field": "webhook.url", "problem": problem}]) from None


def check_url(url: str, allow_hosts: frozenset[str]) -> None:
    """Submit-time check: the URL is well formed and every address its host resolves to now is allowed."""
    _, host, port, _ = split_url(url)
    if host in allow_hosts:
        return
    for *_, sockaddr in resolve(host, port):
        if not address_allowed(sockaddr[0]):
            raise _refused(host, sockaddr[0])


def safe_connection(host: str, port: int, timeout: float, allow_hosts: frozenset[str]) -> socket.socket:
    """A TCP connection to ``host``, checked on the peer address it really reached (connect time)."""
    last: Exception | None = None
    for family, type_, proto, _, sockaddr in resolve(host, port):
        if host not in allow_hosts and not address_allowed(sockaddr[0]):
            raise _refused(host, sockaddr[0])
        sock = socket.socket(family, type_, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            peer = sock.getpeername()[0]  # what the socket really reached, whatever resolved
            if host not in allow_hosts and not address_allowed(peer):
                raise _refused(host, peer)
            return sock
        except WebhookRefused:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            last = exc
    raise ConnectionError(f"cannot connect to {host}:{port}: {last}")


class _CheckedHTTP(http.client.HTTPConnection):
    allow_hosts: frozenset[str] = frozenset()

    def connect(self) -> None:
        self.sock = safe_connection(self.host, self.port, self.timeout, self.allow_hosts)


class _CheckedHTTPS(http.client.HTTPSConnection):
    allow_hosts: frozenset[str] = frozenset()

    def connect(self) -> None:
        sock = safe_connection(self.host, self.port, self.timeout, self.allow_hosts)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def sign(secret: str, msg_id: str, timestamp: datetime, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body``."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, timestamp, body),
    }


def new_secret() -> str:
    """A fresh `whsec_` secret (24 random bytes, base64, the spec's format)."""
    import base64
    import secrets

    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def deliver(url: str, secret: str, msg_id: str, body: bytes, timeout: float, allow_hosts: frozenset[str]) -> int:
    """POST one signed event; returns the HTTP status. Raises WebhookRefused or OSError/ConnectionError."""
    scheme, host, port, path = split_url(url)
    cls = _CheckedHTTPS if scheme == "https" else _CheckedHTTP
    kwargs = {"context": ssl.create_default_context()} if scheme == "https" else {}
    conn = cls(host, port, timeout=timeout, **kwargs)
    conn.allow_hosts = allow_hosts
    headers = sign(secret, msg_id, datetime.now(timezone.utc), body)
    headers.update({"content-type": "application/json", "user-agent": "reprise-webhooks/1"})
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(65536)  # drained, never followed: a 3xx is a failed delivery
        return response.status
    finally:
        conn.close()


# --- the outbox in Redis ------------------------------------------------------------------------------

# Claim the first due member of a schedule (score <= now) by pushing its score to now + lease: the replica
# that claims it owns it for the lease; a replica that dies mid-delivery leaves it to be claimed again.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', KEYS[1], ARGV[2], due[1])
return due[1]
"""


@dataclass
class Outbox:
    r: redis.Redis
    prefix: str

    @property
    def watch_key(self) -> str:  # API jobs with a webhook whose end is awaited, scored by next check time
        return f"{self.prefix}:api:webhooks:watch"

    @property
    def due_key(self) -> str:  # deliveries, scored by next attempt time
        return f"{self.prefix}:api:webhooks:due"

    @property
    def failed_key(self) -> str:
        return f"{self.prefix}:api:webhooks:failed"

    def delivery_key(self, msg_id: str) -> str:
        return f"{self.prefix}:api:webhooks:delivery:{msg_id}"

    def watch(self, job_id: str) -> None:
        self.r.zadd(self.watch_key, {job_id: time.time()})

    def claim(self, key: str, lease_s: float) -> str | None:
        now = time.time()
        member = self.r.eval(_CLAIM, 1, key, now, now + lease_s)
        return member.decode() if isinstance(member, bytes) else member

    def enqueue(self, tenant: str, url: str, event: dict, msg_id: str | None = None) -> str:
        """Schedule one event for delivery now. ``msg_id`` (the `webhook-id`, the receiver's idempotency key) is
        stable per job, so an event enqueued twice (a replica died between enqueue and unwatch) goes out once."""
        msg_id = msg_id or "msg_" + uuid.uuid4().hex
        record = {"id": msg_id, "tenant": tenant, "url": url, "event": event, "attempts": 0, "errors": []}
        if self.r.set(self.delivery_key(msg_id), json.dumps(record), nx=True):
            self.r.zadd(self.due_key, {msg_id: time.time()})
        return msg_id

    def failed(self, limit: int = 100) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self.failed_key, 0, limit - 1)]

    def attempt(self, msg_id: str, secret_of, timeout: float, allow_hosts, max_attempts: int, backoff_s: float) -> str:
        """One delivery attempt of a claimed message: "delivered", "retry" or "dead"."""
        raw = self.r.get(self.delivery_key(msg_id))
        if raw is None:
            self.r.zrem(self.due_key, msg_id)
            return "dead"
        record = json.loads(raw)
        body = json.dumps(record["event"], separators=(",", ":")).encode()
        record["attempts"] += 1
        try:
            status = deliver(record["url"], secret_of(record["tenant"]), msg_id, body, timeout, allow_hosts)
            error = None if 200 <= status < 300 else f"HTTP {status}"
        except WebhookRefused as exc:
            error, record["attempts"] = str(exc), max_attempts  # refused now: retrying cannot help
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            self.r.delete(self.delivery_key(msg_id))
            self.r.zrem(self.due_key, msg_id)
            return "delivered"
        record["errors"].append({"at": time.time(), "error": error})
        if record["attempts"] >= max_attempts:
            record["failed_at"] = time.time()
            with self.r.pipeline() as pipe:
                pipe.lpush(self.failed_key, json.dumps(record))
                pipe.ltrim(self.failed_key, 0, 9999)
                pipe.delete(self.delivery_key(msg_id))
                pipe.zrem(self.due_key, msg_id)
                pipe.execute()
            return "dead"
        self.r.set(self.delivery_key(msg_id), json.dumps(record))
        self.r.zadd(self.due_key, {msg_id: time.time() + backoff_s * 2 ** (record["attempts"] - 1)})
        return "retry"
