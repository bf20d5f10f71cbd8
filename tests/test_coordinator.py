"""The coordinator and cache invalidation, with real worker processes, a real Redis and real
coordinator processes (issue: versioned invalidation and one consistent cache across nodes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ops.localcluster import LocalCluster
from scheduler.cache_admin import CacheAdmin
from scheduler.client import submit
from scheduler.registry import ModelRegistry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(redis_server, tmp_path_factory):
    """One worker node serving a model from a directory, two device slots sharing one embedded cache."""
    from workers.model_loading import save_builtin

    work = tmp_path_factory.mktemp("coord")
    model_dir = save_builtin("tiny", work / "coordmodel", seed=0)
    c = LocalCluster(
        workdir=str(work),
        redis_url=redis_server.url,
        env={"REDIS_URL": redis_server.url, "REPRISE_SHARE_TENANTS": "alice"},
    )
    c.ensure_redis()
    c.start_worker(str(model_dir), "cpu,cpu", REPRISE_CACHE_PATH=str(work / "qdrant"))
    c.model_dir = model_dir
    yield c
    c.stop()


def _job(prompt, seed=11, **kw):
    return submit(prompt=prompt, model="coordmodel", steps=10, seed=seed, **kw).wait(60)


def _landed(model: str = "coordmodel"):
    """Wait until the write-backs queued on ``model``'s nodes are stored (they run after the result is
    answered). Only theirs: a worker another test stopped stays registered, silent, for a few seconds."""
    replies = CacheAdmin().broadcast("drain_writebacks", {"timeout_s": 30}, timeout=32)
    mine = [r for name, r in replies.items() if model in name]
    assert mine and all(isinstance(r, dict) and r.get("drained") for r in mine), replies


def _cli(*args):
    out = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", *args], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_identical_request_is_an_exact_hit_with_zero_steps(node):
    first = _job("an owl reading a book by candlelight")
    _landed()  # write-back runs after the result
    second = _job("an owl reading a book by candlelight")
    assert first.cache.hit == "miss" and first.cache.steps_computed == 10
    assert second.cache.hit == "exact" and second.cache.steps_computed == 0 and second.cache.steps_saved == 10


def test_invalidate_model_under_load_never_serves_the_old_generation(node, redis_client):
    registry = ModelRegistry(redis_client)
    _job("a steady stream prompt")
    _landed()
    stop = threading.Event()
    seen = []

    def stream():
        while not stop.is_set():
            t = time.time()
            seen.append((t, _job("a steady stream prompt")))

    thread = threading.Thread(target=stream)
    thread.start()
    time.sleep(1.0)
    out = json.loads(_cli("cache", "invalidate", "--model", "coordmodel", "--json"))
    returned = time.time()
    new_generation = out["generation"]
    assert registry.generation("coordmodel") == new_generation
    time.sleep(2.0)
    stop.set()
    thread.join(60)
    before = [r for t, r in seen if t < returned - 1]
    after = [r for t, r in seen if t > returned]
    assert after, "no job ran after the invalidation"
    assert any(r.cache.hit == "exact" for r in before)
    for r in after:  # every job started after the command returned looked up the new generation only
        assert r.cache.generation >= new_generation, r.cache
    first_in_new = next(r for _, r in seen if r.cache.generation == new_generation)
    assert first_in_new.cache.hit == "miss"  # the new generation starts empty


def test_worker_without_pubsub_still_serves_nothing_stale(node, redis_client):
    _job("a prompt before the cut")
    _landed()
    assert _job("a prompt before the cut").cache.hit == "exact"
    killed = redis_client.client_kill_filter(_type="pubsub")
    assert killed >= 1
    CacheAdmin().invalidate_model("coordmodel", reason="test: pubsub cut")
    assert _job("a prompt before the cut").cache.hit == "miss"


def test_invalidate_tenant_and_prompt_prefix(node):
    _job("tenant scoped prompt", tenant="acme")
    _job("prefix one: a red car", tenant="other")
    _landed()
    assert _job("tenant scoped prompt", tenant="acme").cache.hit == "exact"
    out = json.loads(_cli("cache", "invalidate", "--tenant", "acme", "--json"))
    assert out["seq"] >= 1 and any(v.get("deleted", 0) >= 1 for v in out["nodes"].values())
    assert _job("tenant scoped prompt", tenant="acme").cache.hit == "miss"
    assert _job("prefix one: a red car", tenant="other").cache.hit == "exact"
    CacheAdmin().invalidate(prompt_prefix="prefix one:")  # no broadcast: the node applies it before its next lookup
    assert _job("prefix one: a red car", tenant="other").cache.hit == "miss"


def test_tenants_are_isolated_unless_shared(node):
    _job("a private dragon sketch", tenant="alice", seed=3)
    _landed()
    assert _job("a private dragon sketch", tenant="bob", seed=3).cache.hit == "miss"
    _job("a shared dragon sketch", tenant="alice", seed=3, cache={"share": True})
    _landed()
    shared = _job("a shared dragon sketch", tenant="bob", seed=3)
    assert shared.cache.hit == "exact"
    _job("bob tries to share", tenant="bob", seed=3, cache={"share": True})  # bob holds no grant
    _landed()
    refused = _job("bob tries to share", tenant="carol", seed=3)
    assert refused.cache.hit != "exact"
    assert "/bob/" in shared.image_uri  # bob gets his own copy, never alice's path


def test_drain_writebacks_answers_once_the_nodes_write_backs_landed(node, redis_client):
    """The node answers the drain after its queued write-backs: the next identical request is an exact hit
    with no sleep in between. A live node that does not answer makes the drain raise, naming it."""
    from scheduler.cache_admin import WritebacksNotDrained
    from scheduler.settings import get_settings

    def this_node() -> dict:  # other test nodes may share the Redis: read this module's node's answer
        (reply,) = [r for name, r in CacheAdmin().drain_writebacks(timeout_s=30).items() if "coordmodel" in name]
        return reply

    before = this_node()
    first = _job("a heron standing in a misty river", seed=5)
    after = this_node()
    assert after["drained"] and after["writeback_written"] == before["writeback_written"] + 1, (before, after)
    second = _job("a heron standing in a misty river", seed=5)
    assert first.cache.hit == "miss" and second.cache.hit == "exact"

    ghost = f"{get_settings().queue_prefix}:node:ghost@nowhere"  # registered, but no process answers for it
    redis_client.set(ghost, json.dumps({"model": "coordmodel"}), ex=30)
    try:
        with pytest.raises(WritebacksNotDrained, match="ghost@nowhere"):
            CacheAdmin().drain_writebacks(timeout_s=1)
    finally:
        redis_client.delete(ghost)


def test_stats_json(node):
    out = json.loads(_cli("cache", "stats", "--json"))
    assert out["totals"]["entries"] >= 1 and "coordmodel" in out["generations"]
    assert set(out["hits"]["coordmodel"]["hit_rate"]) == {"exact", "approximate", "miss"}


def test_a_fold_round_folds_the_node_hit_counters(node):
    """The leader's `fold` duty reaches the node's embedded cache and reports what it folded: the entry
    just hit, once (a second round has nothing new), and again after another hit."""
    from scheduler.coordinator import Coordinator, CoordinatorSettings

    prompt = "a lighthouse counting its visitors"
    _job(prompt, seed=21)
    _landed()
    assert _job(prompt, seed=21).cache.hit == "exact"
    coordinator = Coordinator(CoordinatorSettings(lease_s=3, metrics_port=0, broadcast_timeout_s=10))
    deadline = time.monotonic() + 15  # a coordinator process of an earlier test may still hold the lease
    while not coordinator.lease.hold():
        assert time.monotonic() < deadline
        time.sleep(0.2)

    def folded() -> int:
        replies = coordinator.round_of_duties()["fold"]
        mine = [reply for name, reply in replies.items() if "coordmodel" in name]
        assert mine and all("folded" in reply for reply in mine), replies
        return sum(reply["folded"] for reply in mine)

    try:
        assert folded() >= 1
        # Nothing new, nothing folded: within a few rounds (a hit still being counted under load may land in
        # a later one), and never again after that: a fold that kept rewriting the same counts never gets here.
        # Counted in rounds, not seconds: on a loaded machine one broadcast round can take most of its timeout.
        rounds = [folded() for _ in range(6)]
        assert 0 in rounds, f"the fold never settled: it rewrites counts it already folded ({rounds})"
        assert folded() == 0
        assert _job(prompt, seed=21).cache.hit == "exact"
        assert folded() == 1
    finally:
        coordinator.lease.release()


def _coordinator(env_extra):
    env = {
        **os.environ,
        "REPRISE_COORDINATOR_LEASE_S": "1.5",
        "REPRISE_COORDINATOR_SWEEP_INTERVAL_S": "0.5",
        "REPRISE_COORDINATOR_METRICS_PORT": "0",
        **env_extra,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", "coordinator", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _status():
    from scheduler.coordinator import status

    return status()


def test_leader_killed_during_duties_standby_takes_over_and_stale_tokens_are_refused(node):
    for i in range(6):
        _job(f"entry for gc {i}")
    CacheAdmin().invalidate_model("coordmodel", reason="test: gc")  # everything above is now garbage
    a, b = _coordinator({}), _coordinator({})
    try:
        deadline = time.monotonic() + 30
        while not _status()["leader"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        first = _status()
        old_token = first["token"]
        leader_pid = int(first["leader"].split("-")[-2])
        victim = a if a.pid == leader_pid else b
        os.kill(victim.pid, signal.SIGKILL)  # duties run every 0.5 s: this lands during or between rounds
        killed_at = time.monotonic()
        while True:
            s = _status()
            if s["leader"] and s["token"] > old_token:
                break
            assert time.monotonic() - killed_at < 10, s
            time.sleep(0.1)
        takeover_s = time.monotonic() - killed_at
        assert takeover_s < 6
        replies = CacheAdmin().broadcast("gc", token=old_token)
        assert replies and all("refused" in r for r in replies.values()), replies
        deadline = time.monotonic() + 30
        while _status()["sweeps"].get("gc", 0) < 1:  # the new leader's GC round
            assert time.monotonic() < deadline, _status()
            time.sleep(0.2)
        stats = CacheAdmin().broadcast("stats")
        for reply in stats.values():
            assert reply["states"] == sum(reply["per_k"].values())
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.terminate()
                p.wait(10)


def test_replaced_weights_never_hit_the_old_entries(node, redis_client):
    from workers.model_loading import save_builtin

    _job("a prompt cached under old weights", seed=5)
    _landed()
    assert _job("a prompt cached under old weights", seed=5).cache.hit == "exact"
    registry = ModelRegistry(redis_client)
    before = registry.generation("coordmodel")
    worker = node.workers[0]
    worker.stop()
    node.workers.remove(worker)
    save_builtin("tiny", node.model_dir, seed=1)  # different weights, same directory and name
    node.start_worker(str(node.model_dir), "cpu,cpu", REPRISE_CACHE_PATH=str(Path(node.workdir) / "qdrant"))
    assert registry.generation("coordmodel") == before + 1
    again = _job("a prompt cached under old weights", seed=5)
    assert again.cache.hit == "miss" and again.model_version != ""


def test_capacity_enforcement_and_coordinator_metrics(redis_server, tmp_path):
    """A node with room for 4 entries under a stream of 9 distinct prompts: one coordinator round
    brings it back within the bound, keeps the most used entry, and the metrics show it."""
    import requests

    from ops.localcluster import free_port
    from workers.model_loading import save_builtin

    model_dir = save_builtin("tiny", tmp_path / "capmodel", seed=2)
    c = LocalCluster(workdir=str(tmp_path), redis_url=redis_server.url, env={"REDIS_URL": redis_server.url})
    c.ensure_redis()
    c.start_worker(
        str(model_dir),
        "cpu",
        REPRISE_CACHE_PATH=str(tmp_path / "q"),
        REPRISE_CACHE_CAPACITY_ENTRIES="4",
        REPRISE_CACHE_POLICY="lcbfu",
    )
    port = free_port()
    coordinator = None
    try:
        run = lambda p: submit(prompt=p, model="capmodel", steps=10, seed=1).wait(60)  # noqa: E731
        for i in range(9):
            run(f"distinct prompt number {i} about {['cats', 'ships', 'trees'][i % 3]}")
        _landed("capmodel")
        for _ in range(3):  # the most used entry: three exact hits
            assert run("distinct prompt number 0 about cats").cache.hit == "exact"

        def entries() -> int:  # this node only: the session's other workers share the Redis
            replies = CacheAdmin().broadcast("stats")
            return sum(r["entries"] for node, r in replies.items() if "capmodel" in node)

        assert entries() > 4
        coordinator = _coordinator(
            {"REPRISE_COORDINATOR_METRICS_PORT": str(port), "REPRISE_COORDINATOR_SWEEP_INTERVAL_S": "60"}
        )
        deadline = time.monotonic() + 60
        while entries() > 4:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert run("distinct prompt number 0 about cats").cache.hit == "exact"  # highest K x hits survived
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "reprise_coordinator_is_leader 1.0" in text
        assert 'reprise_sweeps_total{kind="evict"}' in text
        assert "reprise_evictions_total" in text
    finally:
        if coordinator is not None and coordinator.poll() is None:
            coordinator.terminate()
            coordinator.wait(15)
        c.stop()


def test_cache_operations_as_celery_tasks(node):
    """Other services trigger cache operations by task name; a worker node runs them."""
    from scheduler.app import get_app

    _job("a prompt for the task api")
    _landed()
    app = get_app()
    stats = app.send_task("reprise.cache.stats").get(timeout=60)
    assert stats["totals"]["entries"] >= 1 and "coordmodel" in stats["generations"]
    before = stats["generations"]["coordmodel"]
    out = app.send_task("reprise.cache.invalidate", kwargs={"model": "coordmodel"}).get(timeout=60)
    assert out["generation"] == before + 1
    assert _job("a prompt for the task api").cache.hit == "miss"


# A node that answers every cache duty only after `delay` seconds (longer than the lease): a real Celery
# worker with nothing but the control command.
SLOW_NODE = """
import sys, time
from celery.worker.control import control_command
from scheduler.app import get_app

delay = float(sys.argv[1])


@control_command(args=[("op", str), ("params", dict), ("token", int)], signature="<op> [params] [token]")
def reprise_cache(state, op, params=None, token=0):
    time.sleep(delay)
    return {"op": op, "slept_s": delay}


get_app().worker_main(
    ["worker", "--pool", "solo", "-Q", "reprise-slow-node", "-n", sys.argv[2], "--loglevel", "INFO",
     "--without-gossip", "--without-mingle", "--without-heartbeat"]
)
"""


@pytest.mark.parametrize(
    "delay_s, timeout_s", [(2.5, 10.0), (4.0, 2.0)], ids=["replies-after-the-lease", "times-out-after-the-lease"]
)
def test_a_slow_node_never_moves_the_leadership(redis_server, tmp_path, delay_s, timeout_s):
    """Two coordinators (lease 1.5 s) and a node that takes longer than the lease to answer each duty:
    the leader renews its lease while it waits, so one leader holds throughout, and every duty of the
    round ends with the node's reply (or, past the broadcast timeout, with none)."""
    import redis

    from ops.localcluster import _wait

    url = redis_server.url.rsplit("/", 1)[0] + "/3"  # a database of its own: no other test's nodes answer
    r = redis.Redis.from_url(url)
    r.flushdb()
    env = {"REDIS_URL": url, "REPRISE_REDIS_URL": url}
    hostname = f"slow-node-{os.getpid()}@test"
    log = tmp_path / "slow-node.log"
    with open(log, "wb") as out:
        slow = subprocess.Popen(
            [sys.executable, "-c", SLOW_NODE, str(delay_s), hostname],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    coordinators = []
    try:
        _wait(lambda: b" ready." in log.read_bytes(), 60, "slow node", slow, log)
        ModelRegistry(r).announce_node(hostname, {}, ttl_s=300)  # the leader waits for one reply
        coordinators = [
            _coordinator({**env, "REPRISE_COORDINATOR_BROADCAST_TIMEOUT_S": str(timeout_s)}) for _ in range(2)
        ]
        deadline = time.monotonic() + 30
        while not r.get("reprise:coordinator:leader") or b"|pending" in r.get("reprise:coordinator:leader"):
            assert time.monotonic() < deadline, "no leader"
            time.sleep(0.1)
        leader = r.get("reprise:coordinator:leader")
        deadline = time.monotonic() + 4 * max(delay_s, timeout_s) + 30
        while not r.exists("reprise:coordinator:last-round"):  # one whole round: four slow duties
            assert r.get("reprise:coordinator:leader") == leader, "the leadership moved during a slow duty"
            assert time.monotonic() < deadline, "no round of duties completed"
            time.sleep(0.1)
        assert r.get("reprise:coordinator:leader") == leader
        assert int(r.get("reprise:coordinator:leader-changes")) == 1
        last = {k.decode(): v.decode() for k, v in r.hgetall("reprise:coordinator:last-round").items()}
        assert last["token"] == leader.decode().rsplit("|", 1)[1]
        results = json.loads(last["results"])
        for op in ("expire", "gc", "evict", "fold"):
            expected = {hostname: {"op": op, "slept_s": delay_s}} if delay_s < timeout_s else {}
            assert results[op] == expected, results
    finally:
        for p in coordinators:
            p.terminate()
        for p in [*coordinators, slow]:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:  # a coordinator stuck in a duty, the node inside a slow reply
                p.kill()
                p.wait(15)
        r.flushdb()
