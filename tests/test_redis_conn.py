"""The Redis connection factory (scheduler/redis_conn.py): URL parsing with typed errors, the Celery options
it derives for Sentinel, and replicated writes against a real master and replica."""

from __future__ import annotations

import time

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from scheduler.errors import RedisURLError, RepriseError
from scheduler.redis_conn import (
    NotReplicated,
    celery_transport_options,
    client_for,
    parse_redis_url,
    replicated_write,
)
from scheduler.settings import ClusterSettings

SENTINELS = "sentinel://:s3cret@h1:26379/2;sentinel://h2:26380;sentinel://h3"


def test_a_plain_url_is_one_redis():
    t = parse_redis_url("redis://:pw@127.0.0.1:6379/0")
    assert not t.is_sentinel and t.sentinels == () and t.url == "redis://:pw@127.0.0.1:6379/0"
    assert not parse_redis_url("rediss://example.org:6380/1").is_sentinel
    assert not parse_redis_url("unix:///var/run/redis.sock").is_sentinel


def test_sentinel_addresses_with_the_master_name():
    t = parse_redis_url(SENTINELS, master="reprise", sentinel_password="sp")
    assert t.is_sentinel
    assert t.sentinels == (("h1", 26379), ("h2", 26380), ("h3", 26379))  # no port: 26379
    assert (t.master, t.db, t.password, t.username, t.sentinel_password) == ("reprise", 2, "s3cret", None, "sp")


@pytest.mark.parametrize(
    "url, says",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("localhost:6379", "not a URL"),
        ("http://h:6379/0", "unknown scheme"),
        ("redis://h:99999/0", "bad port"),
        ("redis://h:port/0", "bad port"),
        ("redis://h:6379/zero", "must be a number"),
        ("redis:///0", "names no host"),
        ("redis://a:6379;redis://b:6379", "several addresses"),
        ("sentinel://a:26379;redis://b:6379", "mixes"),
        ("sentinel://a:26379;;sentinel://b:26379", "empty address"),
        ("sentinel://a:70000", "bad port"),
        ("sentinel://:26379", "no sentinel host"),
        ("sentinel://a:26379/x", "must be a number"),
    ],
)
def test_a_bad_url_is_a_typed_error(url, says):
    with pytest.raises(RedisURLError, match=says) as info:
        parse_redis_url(url, master="reprise")
    assert isinstance(info.value, ValueError) and isinstance(info.value, RepriseError)
    assert info.value.code == "bad_redis_url"


def test_sentinels_without_a_master_name_are_refused():
    with pytest.raises(RedisURLError, match="REPRISE_REDIS_SENTINEL_MASTER"):
        parse_redis_url(SENTINELS)


def test_errors_never_show_the_password():
    with pytest.raises(RedisURLError) as info:
        parse_redis_url("redis://:hunter2hunter2@h:notaport/0")
    assert "hunter2hunter2" not in str(info.value) and ":**@" in str(info.value)


def test_celery_gets_the_master_name_and_the_sentinels_settings():
    assert celery_transport_options(parse_redis_url("redis://h:6379/0")) == {}
    options = celery_transport_options(parse_redis_url(SENTINELS, master="reprise", sentinel_password="sp"))
    assert options["master_name"] == "reprise" and options["sentinel_kwargs"]["password"] == "sp"


def test_the_app_uses_kombus_sentinel_transport_and_celerys_sentinel_backend():
    from celery.backends.redis import SentinelBackend

    from scheduler.app import make_app

    app = make_app(ClusterSettings(redis_url=SENTINELS, redis_sentinel_master="reprise"))
    assert app.conf.broker_transport_options["master_name"] == "reprise"
    assert app.conf.result_backend_transport_options["master_name"] == "reprise"
    assert isinstance(app.backend, SentinelBackend)  # made without connecting
    assert app.connection_for_write().transport_cls == "sentinel"
    with pytest.raises(RedisURLError):
        make_app(ClusterSettings(redis_url=SENTINELS))  # no master name: refused before any connection


def test_a_sentinel_client_asks_the_sentinels_for_its_master():
    client = client_for(parse_redis_url(SENTINELS, master="reprise"))
    assert isinstance(client.connection_pool, SentinelConnectionPool)
    assert client.connection_pool.service_name == "reprise"
    sentinels = client.connection_pool.sentinel_manager.sentinels
    kwargs = [s.connection_pool.connection_kwargs for s in sentinels]
    assert [(k["host"], k["port"]) for k in kwargs] == [("h1", 26379), ("h2", 26380), ("h3", 26379)]
    assert all(k.get("password") is None for k in kwargs)  # the master's password is not the sentinels'
    assert client.connection_pool.connection_kwargs["password"] == "s3cret"
    assert client.connection_pool.connection_kwargs["db"] == 2


@pytest.fixture
def master_and_replica(tmp_path):
    from ops.localcluster import RedisServer, _wait

    master = RedisServer(directory=str(tmp_path / "m")).start()
    replica = RedisServer(directory=str(tmp_path / "r")).start()
    r = redis.Redis.from_url(replica.url)
    r.replicaof("127.0.0.1", master.port)
    _wait(lambda: r.info("replication").get("master_link_status") == "up", 20, "replica in sync")
    yield master, replica
    replica.stop()
    master.stop()


@pytest.mark.integration
def test_a_replicated_write_waits_for_the_replica_and_refuses_without_one(master_and_replica):
    master, replica = master_and_replica
    m = redis.Redis.from_url(master.url)
    assert replicated_write(m, lambda p: p.incr("token"), replicas=1) == [1]
    assert redis.Redis.from_url(replica.url).get("token") == b"1"  # already there when the call returned
    assert replicated_write(m, lambda p: p.incr("token")) == [2]  # one Redis (not Sentinel): no wait
    replica.stop(hard=True)
    t = time.monotonic()
    with pytest.raises(NotReplicated):
        replicated_write(m, lambda p: p.incr("token"), replicas=1, timeout_ms=300)
    assert 0.25 < time.monotonic() - t < 5


def test_a_password_given_apart_goes_into_the_first_address():
    t = parse_redis_url("redis://redis:6379/0", password="p@ss/word")
    assert t.full_url == "redis://:p%40ss%2Fword@redis:6379/0" and t.password == "p@ss/word"
    t = parse_redis_url("sentinel://s1:26379;sentinel://s2:26379", master="m", password="pw")
    assert t.full_url == "sentinel://:pw@s1:26379;sentinel://s2:26379" and t.password == "pw"
    assert parse_redis_url("redis://:own@redis:6379/0", password="other").full_url == "redis://:own@redis:6379/0"
    client = client_for(parse_redis_url("redis://redis:6379/0", password="pw"))
    assert client.connection_pool.connection_kwargs["password"] == "pw"


def test_every_address_is_masked_in_what_is_printed():
    from scheduler.redis_conn import safe_url

    shown = safe_url("sentinel://:pw1@h1:26379/0;sentinel://:pw2@h2:26379;sentinel://h3")
    assert shown == "sentinel://:**@h1:26379/0;sentinel://:**@h2:26379;sentinel://h3"
