"""The one place every Redis client of Reprise comes from: a plain Redis URL or Redis Sentinel.

    REDIS_URL=redis://:PASSWORD@host:6379/0                                   # one Redis
    REDIS_URL='sentinel://:PASSWORD@h1:26379/0;sentinel://h2:26379;sentinel://h3:26379'
    REPRISE_REDIS_SENTINEL_MASTER=reprise                                     # the name the sentinels monitor

With sentinels, each client asks them for the current master (``redis.sentinel.Sentinel.master_for``)
and asks again after a failover; the URL's password and database (the first that names one) are the
master's, ``REPRISE_REDIS_SENTINEL_PASSWORD`` the sentinels' own if they require one. A URL without a
password takes ``REPRISE_REDIS_PASSWORD`` (docker-compose passes the password apart from the addresses). Celery's broker
(kombu's ``sentinel://`` transport) and result backend (Celery's ``SentinelBackend``) and Flower read
the same addresses with the transport options from :func:`celery_transport_options`.

Writes that must survive a failover (the ledger entry of an accepted job, fencing tokens, cache
generations) go through :func:`replicated_write`: Redis replicates asynchronously, so a write the master
answered can vanish with it; ``WAIT`` blocks until a replica has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from scheduler.errors import RedisURLError

SENTINEL_PORT = 26379
REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed REDIS_URL: one Redis (``sentinels`` empty) or a set of sentinels and a master name."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    @property
    def full_url(self) -> str:
        """``url`` with the password (given apart, REPRISE_REDIS_PASSWORD) in its first address if it names
        none: what Celery's broker and result backend are given."""
        first, *rest = self.url.split(";")
        parts = urlsplit(first.strip())
        if not self.password or parts.password or parts.scheme == "unix":
            return self.url
        user = quote(self.username, safe="") if self.username else ""
        netloc = f"{user}:{quote(self.password, safe='')}@{parts.netloc}"
        return ";".join([urlunsplit(parts._replace(netloc=netloc)), *rest])


def _db(path: str, url: str) -> int | None:
    path = path.strip("/")
    if not path:
        return None
    if not path.isdigit():
        raise RedisURLError(f"the database in {_safe(url)!r} must be a number, not {path!r}")
    return int(path)


def _safe(url: str) -> str:
    """One address without its password (for error messages)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return url
    return url.replace(f":{password}@", ":**@", 1) if password else url


def safe_url(url: str) -> str:
    """``url`` with the password of every address masked (kombu's maybe_sanitize_url masks the first only)."""
    return ";".join(_safe(piece) for piece in url.split(";"))


def parse_redis_url(
    url: str, master: str | None = None, sentinel_password: str | None = None, password: str | None = None
) -> RedisTarget:
    """Check ``url`` (``redis://``, ``rediss://``, ``unix://``, or ``;``-separated ``sentinel://`` addresses)
    and return what it names; a malformed URL raises :class:`RedisURLError` saying what is wrong.
    ``password``: the Redis password when the URL names none."""
    if not isinstance(url, str) or not url.strip():
        raise RedisURLError("REDIS_URL is empty")
    pieces = [p.strip() for p in url.strip().split(";")]
    if any(not p for p in pieces):
        raise RedisURLError(f"REDIS_URL {_safe(url)!r} has an empty address between ';'")
    schemes = set()
    for p in pieces:
        if "://" not in p:
            raise RedisURLError(f"{_safe(p)!r} is not a URL (expected redis://, rediss://, unix:// or sentinel://)")
        schemes.add(p.split("://", 1)[0].lower())
    if schemes - {"sentinel", *REDIS_SCHEMES}:
        raise RedisURLError(
            f"unknown scheme {sorted(schemes - {'sentinel', *REDIS_SCHEMES})} in {_safe(url)!r}: "
            "use redis://, rediss://, unix:// or sentinel://"
        )
    if "sentinel" not in schemes:
        if len(pieces) > 1:
            raise RedisURLError(f"{_safe(url)!r}: several addresses are only for sentinel:// URLs")
        parts = urlsplit(pieces[0])
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number or out of range
        except ValueError as exc:
            raise RedisURLError(f"bad port in {_safe(url)!r}: {exc}") from None
        if parts.scheme != "unix" and not parts.hostname:
            raise RedisURLError(f"{_safe(url)!r} names no host")
        if parts.scheme != "unix":
            _db(parts.path, url)
        if parts.password:
            username, password = (unquote(parts.username) if parts.username else None), unquote(parts.password)
        return RedisTarget(url=url, password=password or None, username=username if parts.password else None)
    if schemes != {"sentinel"}:
        raise RedisURLError(f"{_safe(url)!r} mixes sentinel:// with other schemes")
    if not master:
        raise RedisURLError(
            "REDIS_URL names sentinels: set REPRISE_REDIS_SENTINEL_MASTER to the master name they monitor"
        )
    sentinels, db, username, given = [], None, None, None
    for p in pieces:
        parts = urlsplit(p)
        try:
            port = parts.port or SENTINEL_PORT
        except ValueError as exc:
            raise RedisURLError(f"bad port in {_safe(p)!r}: {exc}") from None
        if not parts.hostname:
            raise RedisURLError(f"{_safe(p)!r} names no sentinel host")
        sentinels.append((parts.hostname, port))
        piece_db = _db(parts.path, p)
        if db is None and piece_db is not None:
            db = piece_db
        if given is None and parts.password:
            username, given = (unquote(parts.username) if parts.username else None), unquote(parts.password)
    password = given if given is not None else (password or None)
    return RedisTarget(
        url=url,
        sentinels=tuple(sentinels),
        master=master,
        db=db or 0,
        username=username,
        password=password,
        sentinel_password=sentinel_password,
    )


def target(url: str | None = None) -> RedisTarget:
    """The target of ``url`` (default: the cluster's REDIS_URL) with the cluster's sentinel settings."""
    from scheduler.settings import get_settings

    s = get_settings()
    return parse_redis_url(url or s.redis_url, s.redis_sentinel_master, s.redis_sentinel_password, s.redis_password)


def redis_client(url: str | None = None, **kwargs) -> redis.Redis:
    """A redis-py client of ``url`` (default: the cluster's REDIS_URL); with sentinels, a client of the
    current master that follows a failover. ``kwargs`` go to every connection (socket_timeout, ...)."""
    t = target(url)
    return client_for(t, **kwargs)


# Every client rides out a failover or a restart: a command that meets a connection error, a timeout or no
# master (MasterNotFoundError is a ConnectionError) is tried again for about 10 s (0.1 s doubling to 1 s, 12
# tries) before the caller sees the error; under Sentinel each try asks the sentinels for the master anew.
RIDE_OUT = dict(base=0.1, cap=1.0, retries=12)


def _ride_out() -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=RIDE_OUT["base"], cap=RIDE_OUT["cap"]), RIDE_OUT["retries"])


def client_for(t: RedisTarget, **kwargs) -> redis.Redis:
    kwargs.setdefault("retry", _ride_out())
    if not t.is_sentinel:
        return redis.Redis.from_url(t.full_url, **kwargs)
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    sentinel_kwargs.setdefault("socket_timeout", 2)
    sentinel_kwargs.setdefault("socket_connect_timeout", 2)
    if t.sentinel_password:
        sentinel_kwargs["password"] = t.sentinel_password
    sentinel = Sentinel(list(t.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(t.master, db=t.db, username=t.username, password=t.password, **kwargs)


def async_redis_client(url: str | None = None, **kwargs):
    """The asyncio form of :func:`redis_client` (the HTTP API's waits): one Redis, or the master its
    sentinels name, followed through a failover."""
    import redis.asyncio
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    t = target(url)
    kwargs.setdefault(
        "retry",
        AsyncRetry(ExponentialWithJitterBackoff(base=RIDE_OUT["base"], cap=RIDE_OUT["cap"]), RIDE_OUT["retries"]),
    )
    if not t.is_sentinel:
        return redis.asyncio.Redis.from_url(t.full_url, **kwargs)
    sentinel_kwargs = {"socket_timeout": 2, "socket_connect_timeout": 2}
    if t.sentinel_password:
        sentinel_kwargs["password"] = t.sentinel_password
    sentinel = AsyncSentinel(list(t.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(t.master, db=t.db, username=t.username, password=t.password, **kwargs)


def celery_transport_options(t: RedisTarget) -> dict:
    """What kombu's sentinel transport and Celery's SentinelBackend need beside the URL (empty for one Redis)."""
    if not t.is_sentinel:
        return {}
    options: dict = {"master_name": t.master}
    sentinel_kwargs = {"socket_timeout": 2, "socket_connect_timeout": 2}
    if t.sentinel_password:
        sentinel_kwargs["password"] = t.sentinel_password
    options["sentinel_kwargs"] = sentinel_kwargs
    return options


class NotReplicated(redis.ConnectionError):
    """A write the master holds but no replica confirmed within the timeout: it may not survive a failover."""


def is_sentinel_client(client: redis.Redis) -> bool:
    """Whether ``client`` talks to a master found through sentinels (made by :func:`client_for`)."""
    return isinstance(getattr(client, "connection_pool", None), SentinelConnectionPool)


def replicated_write(client: redis.Redis, build, replicas: int | None = None, timeout_ms: int = 1000) -> list:
    """Run the commands ``build(pipe)`` queues on one connection, then Redis ``WAIT`` on that same connection
    until ``replicas`` replicas hold them (default: REPRISE_REDIS_MIN_REPLICAS for a Sentinel master client,
    0 — no wait — for one Redis); returns the commands' replies. Fewer confirmations within ``timeout_ms``
    raise :class:`NotReplicated`: the write may be on the master, but a failover could lose it, so the caller
    must not count on it.

    Replication keeps the order of writes, so a confirmed write also confirms every write the master had
    received before it, from any client (e.g. the message kombu pushed just before the ledger entry)."""
    if replicas is None:
        if not is_sentinel_client(client):
            replicas = 0
        else:
            from scheduler.settings import get_settings

            replicas = get_settings().redis_min_replicas
    pipe = client.pipeline(transaction=False)
    build(pipe)
    if replicas > 0:
        pipe.execute_command("WAIT", replicas, timeout_ms)
    replies = pipe.execute()
    if replicas > 0:
        if int(replies[-1]) < replicas:
            raise NotReplicated(f"{replies[-1]} of {replicas} replicas confirmed the write within {timeout_ms} ms")
        replies = replies[:-1]
    return replies
