"""The latent cache against real embedded Qdrant backends (Edge and qdrant-client local mode),
and a Qdrant server when QDRANT_URL is set. No network, no model: vectors are made by hand so
that the similarity (and so K) is known exactly."""

from __future__ import annotations

import os
import threading
import time
import uuid

import numpy as np
import pytest

from cache import CacheKey, CacheLockedError, CacheSettings, LatentCache, state_checksum
from cache.store import state_to_rows

BACKENDS = [
    "edge",
    "local",
    pytest.param(
        "server",
        marks=[
            pytest.mark.qdrant_server,
            pytest.mark.skipif(not os.environ.get("QDRANT_URL"), reason="needs a Qdrant server: set QDRANT_URL"),
        ],
    ),
]
DIM = 384


class HashEmbedder:
    """Deterministic unit vectors per prompt (no model)."""

    version = "hash-test"
    dim = DIM

    def embed(self, prompt: str) -> np.ndarray:
        rng = np.random.default_rng(abs(hash(prompt)) % 2**32)
        v = rng.standard_normal(DIM).astype(np.float32)
        return v / np.linalg.norm(v)

    def drop_memos(self) -> None:
        pass


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def at_similarity(v: np.ndarray, s: float, seed: int = 99) -> np.ndarray:
    """A unit vector whose cosine with unit vector v is exactly s."""
    o = np.random.default_rng(seed).standard_normal(DIM)
    o -= o.dot(v) * v
    o /= np.linalg.norm(o)
    return (s * v + np.sqrt(1 - s * s) * o).astype(np.float32)


def key(prompt="a red fox in the snow", tenant="acme", **kw) -> CacheKey:
    fields = dict(
        model="sd15",
        model_version="v1",
        generation=3,
        prompt=prompt,
        negative_prompt="",
        seed=7,
        steps=50,
        guidance=7.5,
        width=512,
        height=512,
        scheduler="ddim",
        tenant=tenant,
    )
    fields.update(kw)
    return CacheKey(**fields)


def latent_states(ks, shape=(4, 64, 64), seed=0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(np.float32) for k in ks}


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def cache_dir(tmp_path):
    """A folder on tmpfs when there is one: Edge fsyncs its WAL on every update."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        import shutil
        import tempfile

        path = tempfile.mkdtemp(prefix="reprise-cache-test-", dir="/dev/shm")
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield str(tmp_path)


@pytest.fixture
def open_cache(backend, cache_dir):
    opened = []
    collection = f"test_{uuid.uuid4().hex[:8]}" if backend == "server" else "reprise_latents"

    def _open(**overrides):
        # a fixed table that the hash embedder's similarities below are chosen for, whatever the shipped default
        fields = dict(
            backend=backend,
            path=os.path.join(cache_dir, "qdrant"),
            collection=collection,
            lookup_timeout_ms=5000,
            skip_table=[(0.97, 0.5), (0.93, 0.4), (0.90, 0.3), (0.85, 0.2), (0.80, 0.1)],
        )
        if backend == "server":
            fields.update(qdrant_url=os.environ["QDRANT_URL"], replication_factor=1)
        clock = overrides.pop("clock", Clock())
        fields.update(overrides)
        cache = LatentCache.open(CacheSettings(**fields), embedder=HashEmbedder(), clock=clock)
        opened.append(cache)
        return cache

    yield _open
    for cache in opened:
        try:
            cache.close()
        except Exception:
            pass
    if backend == "server":
        from qdrant_client import QdrantClient

        QdrantClient(url=os.environ["QDRANT_URL"], api_key=os.environ.get("QDRANT_API_KEY")).delete_collection(
            collection
        )


@pytest.fixture
def cache(open_cache):
    return open_cache()


def test_write_then_exact_hit(cache):
    k = key()
    assert cache.lookup_exact(k) is None
    assert cache.write_back(k, unit(1), latent_states(cache.state_steps(50)), "file:///out/1.png", shareable=False)
    hit = cache.lookup_exact(k)
    assert hit is not None and hit.image_uri == "file:///out/1.png" and hit.tenant == "acme"
    assert hit.entry_id == k.exact_id()
    assert cache.lookup_exact(key(seed=8)) is None  # another seed is another image


def test_approx_hit_picks_k_and_round_trips_float16_exactly(cache):
    v = unit(1)
    states = latent_states(cache.state_steps(50))
    assert sorted(states) == [5, 10, 15, 20, 25]
    cache.write_back(key(), v, states, "file:///out/1.png", shareable=False)
    # MiniLM table: > 0.97 -> 25, > 0.93 -> 20, > 0.90 -> 15, > 0.85 -> 10, > 0.80 -> 5, else miss
    for similarity, expected_k in [(0.99, 25), (0.95, 20), (0.91, 15), (0.87, 10), (0.82, 5), (0.7, None)]:
        hit = cache.lookup_approx(key("another prompt"), at_similarity(v, similarity))
        if expected_k is None:
            assert hit is None
            continue
        assert hit.k == expected_k and hit.similarity == pytest.approx(similarity, abs=1e-3)
        assert hit.state.dtype == np.float32 and hit.state.shape == (4, 64, 64)
        expected = states[expected_k].astype(np.float16)
        assert np.array_equal(hit.state.astype(np.float16).view(np.uint16), expected.view(np.uint16))
        assert hit.source_prompt == "a red fox in the snow"


def test_largest_stored_k_below_the_table_k(cache):
    v = unit(2)
    cache.write_back(key(), v, latent_states([5, 10]), None, shareable=False)  # holes: no 15/20/25
    assert cache.lookup_approx(key("x"), at_similarity(v, 0.99)).k == 10


def test_sdxl_sized_latent_round_trips(cache):
    v = unit(3)
    states = latent_states([15], shape=(4, 128, 128))  # 65,536 floats: one more than a dense vector holds
    cache.write_back(key(steps=30, width=1024, height=1024), v, states, None, shareable=False)
    hit = cache.lookup_approx(key("y", steps=30, width=1024, height=1024), v)
    assert hit.k == 15 and hit.state.shape == (4, 128, 128)
    assert np.array_equal(hit.state.astype(np.float16), states[15].astype(np.float16))


def test_flux_and_sd3_sized_latent_round_trips(cache):
    v = unit(4)
    states = latent_states([14], shape=(16, 128, 128))  # SD3/Flux at 1024²: 262,144 floats per state
    cache.write_back(key(steps=28, width=1024, height=1024), v, states, None, shareable=False)
    hit = cache.lookup_approx(key("z", steps=28, width=1024, height=1024), v)
    assert hit.k == 14 and hit.state.shape == (16, 128, 128)
    assert np.array_equal(hit.state.astype(np.float16), states[14].astype(np.float16))


@pytest.mark.parametrize(
    "change",
    [
        dict(model_version="v2"),
        dict(generation=4),
        dict(steps=30),
        dict(guidance=8.0),
        dict(width=768),
        dict(scheduler="euler"),
        dict(model="sdxl"),
        dict(adapters="ink@1a2b*1"),
    ],
)
def test_filters_keep_other_configurations_apart(cache, change):
    v = unit(4)
    cache.write_back(key(), v, latent_states([5, 10, 15]), "file:///a.png", shareable=True)
    assert cache.lookup_approx(key("other", **change), v) is None
    assert cache.lookup_exact(key(**change)) is None
    assert cache.lookup_approx(key("other"), v) is not None


def test_a_plain_request_never_meets_a_feature_cache_entry(cache):
    """A lossy feature cache's image and states are another generation's: a plain key finds neither."""
    v = unit(4)
    lossy = key(feature='deepcache{"deepcache_interval": 5}')
    cache.write_back(lossy, v, latent_states([5, 10, 15]), "file:///lossy.png", shareable=True)
    assert cache.lookup_exact(key()) is None and cache.lookup_approx(key("other"), v) is None
    assert cache.lookup_exact(lossy).image_uri == "file:///lossy.png"
    assert cache.lookup_approx(key("other", feature=lossy.feature), v) is not None


def test_a_feature_cached_request_resumes_from_plain_states_but_never_from_another_feature_cache(cache):
    """A plain state is exact up to K, so a DeepCache request may resume from it (and then runs its own cache);
    it never resumes from block caching's states, nor is it served a plain image as its exact hit."""
    v = unit(6)
    deepcache = key("other", feature='deepcache{"deepcache_interval": 5}')
    cache.write_back(key(), v, latent_states([5, 10, 15]), "file:///plain.png", shareable=True)
    assert cache.lookup_approx(deepcache, v) is not None
    assert cache.lookup_exact(key(feature=deepcache.feature)) is None
    block = key("block", feature='block{"block_delta": 0.3}')
    cache.write_back(block, v, latent_states([5]), "file:///b.png", shareable=True)
    for _ in range(5):  # both entries lie at similarity 1: the filter alone keeps the block one out
        hit = cache.lookup_approx(deepcache, v)
        assert hit is not None and hit.source_prompt != "block"
    assert cache.lookup_approx(key("other", feature=block.feature), v) is not None


def test_adapters_are_part_of_the_key_and_filter_and_a_rule_deletes_them_by_name(cache):
    """A LoRA's image and states are found only by the same adapters at the same versions and scales; an
    invalidation rule naming the adapter deletes its entries and no others."""
    v = unit(4)
    inked = key(adapters="ink@1a2b*1,oil@3c4d*0.5")
    cache.write_back(inked, v, latent_states([5, 10, 15]), "file:///ink.png", shareable=True)
    cache.write_back(key(), v, latent_states([5, 10, 15]), "file:///plain.png", shareable=True)
    for other in ("", "ink@1a2b*1", "ink@9999*1,oil@3c4d*0.5", "ink@1a2b*0.8,oil@3c4d*0.5"):
        assert cache.lookup_exact(key(adapters=other)) is None or other == ""
        hit = cache.lookup_approx(key("other", adapters=other), v)
        assert hit is None or (other == "" and hit.entry_id == key().exact_id())
    assert cache.lookup_exact(inked).image_uri == "file:///ink.png"
    assert cache.lookup_approx(key("other", adapters=inked.adapters), v).entry_id == inked.exact_id()
    assert cache.delete_by_filter(lora="oil") == 1
    assert cache.lookup_exact(inked) is None and cache.lookup_exact(key()).image_uri == "file:///plain.png"


def test_tenant_isolation(cache):
    v = unit(5)
    private = key("private prompt", tenant="bob")
    shared = key("shared prompt", tenant="bob")
    cache.write_back(private, v, latent_states([5]), "file:///p.png", shareable=False)
    assert cache.lookup_approx(key("probe", tenant="alice"), v) is None
    assert cache.lookup_exact(key("private prompt", tenant="alice")) is None
    assert cache.lookup_approx(key("probe", tenant="bob"), v).entry_id == private.exact_id()

    w = unit(6)
    cache.write_back(shared, w, latent_states([5]), "file:///s.png", shareable=True)
    assert cache.lookup_approx(key("probe", tenant="alice"), w).entry_id == shared.exact_id()
    exact = cache.lookup_exact(key("shared prompt", tenant="alice"))
    assert exact is not None and exact.image_uri == "file:///s.png" and exact.tenant == "bob"
    # a tenant may refuse shared entries
    assert cache.lookup_approx(key("probe", tenant="alice"), w, allow_shared=False) is None
    assert cache.lookup_exact(key("shared prompt", tenant="alice"), allow_shared=False) is None


def test_concurrent_writers_of_one_key_leave_one_entry(cache):
    k = key()
    barrier = threading.Barrier(4)
    results = []

    def write(i):
        barrier.wait()
        results.append(
            cache.write_back(k, unit(7), latent_states([5, 10], seed=i), f"file:///{i}.png", shareable=False)
        )

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert cache.stats()["entries"] == 1
    assert cache.lookup_exact(k) is not None


def _corrupt(cache, entry_id, slot_rows=None, payload=None):
    if slot_rows is not None:
        cache.store.update_states(entry_id, slot_rows)
    if payload is not None:
        cache.store.set_payload([entry_id], payload)


def test_bad_checksum_is_a_miss_and_the_state_is_deleted(cache):
    v = unit(8)
    k = key()
    cache.write_back(k, v, latent_states([5, 10]), None, shareable=False)
    _corrupt(cache, k.exact_id(), payload={"checksums": {"5": state_checksum(np.zeros(1)), "10": "0" * 64}})
    assert cache.lookup_approx(key("z"), v) is None
    assert cache.health["corrupt_state"] == 1
    # the bad K=10 state went; K=5 (also bad) is found and dropped next, then the entry is gone
    assert cache.lookup_approx(key("z"), v) is None
    assert cache.stats()["entries"] == 0


def test_non_finite_state_is_a_miss_and_the_entry_is_deleted(cache, backend):
    v = unit(9)
    k = key()
    cache.write_back(k, v, latent_states([5]), None, shareable=False)
    bad = state_to_rows(latent_states([5])[5])
    # local mode refuses NaN on upload (as the server does); infinity gets through everywhere
    bad[0, 0] = np.inf if backend != "edge" else np.nan
    _corrupt(cache, k.exact_id(), slot_rows={"k1": bad})
    assert cache.lookup_approx(key("z"), v) is None
    assert cache.health["corrupt_state"] == 1
    assert cache.stats()["entries"] == 0


def test_wrong_shape_is_a_miss(cache):
    v = unit(10)
    k = key()
    cache.write_back(k, v, latent_states([5]), None, shareable=False)
    _corrupt(cache, k.exact_id(), payload={"state_shape": [4, 128, 128]})
    assert cache.lookup_approx(key("z"), v) is None
    assert cache.health["corrupt_state"] == 1


def test_restart_keeps_entries(open_cache, backend):
    if backend == "server":
        pytest.skip("restart is about embedded folders")
    first = open_cache()
    first.write_back(key(), unit(11), latent_states([5, 10]), "file:///r.png", shareable=False)
    first.close()
    second = open_cache()
    assert second.lookup_exact(key()).image_uri == "file:///r.png"
    assert second.lookup_approx(key("q"), unit(11)).k == 10


def test_expiry(open_cache):
    clock = Clock()
    cache = open_cache(clock=clock, ttl_seconds=3600)
    cache.write_back(key("old"), unit(12), latent_states([5]), "file:///o.png", shareable=False)
    clock.now += 1800
    cache.write_back(key("new"), unit(13), latent_states([5]), "file:///n.png", shareable=False)
    clock.now += 1801  # "old" is past its TTL, "new" is not
    assert cache.lookup_exact(key("old")) is None  # expired entries never hit, even before the sweep
    assert cache.lookup_approx(key("q"), unit(12)) is None
    assert cache.expire() == 1
    assert cache.stats()["entries"] == 1 and cache.lookup_exact(key("new")) is not None


def test_delete_and_delete_by_filter(cache):
    for i, prompt in enumerate(["a cat", "a cat on a mat", "a dog"]):
        cache.write_back(key(prompt), unit(20 + i), latent_states([5]), None, shareable=False)
    cache.write_back(key("a cat", generation=2), unit(30), latent_states([5]), None, shareable=False)
    assert cache.delete_by_filter(prompt_prefix="a cat", generation=3) == 2
    assert cache.delete_by_filter(generation_below=3) == 1
    assert cache.stats()["entries"] == 1
    cache.delete([key("a dog").exact_id()])
    assert cache.stats()["entries"] == 0


def _fill(cache, clock, n=6):
    ids = []
    for i in range(n):
        k = key(f"prompt {i}")
        cache.write_back(k, unit(40 + i), latent_states([5, 10]), None, shareable=False)
        ids.append(k.exact_id())
        clock.now += 10
    return ids


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "lifo", "random"])
def test_evict_to_whole_entry_policies(open_cache, policy):
    clock = Clock()
    cache = open_cache(clock=clock)
    ids = _fill(cache, clock)
    for entry_id in ids[:3]:  # the three oldest are used, most recently
        cache.record_hit(entry_id, 10)
    clock.now += 100
    assert cache.evict_to(capacity=3, policy=policy) == 3
    left = {r.id for r in cache.store.iter_records(None, [])}
    assert len(left) == 3
    expected = {"lru": ids[:3], "lfu": ids[:3], "fifo": ids[3:], "lifo": ids[:3]}.get(policy)
    if expected is not None:
        assert left == set(expected)


def test_fold_writes_hits_into_payloads_and_eviction_keeps_them_when_the_counters_are_lost(open_cache):
    """The coordinator's `fold` duty: hit counters go into the payloads, so LRU still evicts the least
    recently *hit* entry (not the least recently written) after the counters are gone."""
    clock = Clock()
    cache = open_cache(clock=clock)
    ids = _fill(cache, clock)  # written at t0, t0+10, ..., t0+50
    for entry_id in (ids[0], ids[2], ids[1], ids[0]):  # last hits: ids[2] < ids[1] < ids[0], all after every write
        cache.record_hit(entry_id, 10)
        clock.now += 10
    assert cache.fold_counters() == 3
    payloads = {r.id: r.payload for r in cache.store.iter_records(None, ["hits", "last_hit_at"])}
    assert payloads[ids[0]]["hits"] == {"10": 2} and payloads[ids[1]]["hits"] == {"10": 1}
    assert payloads[ids[0]]["last_hit_at"] > payloads[ids[1]]["last_hit_at"] > payloads[ids[2]]["last_hit_at"]
    assert payloads[ids[5]].get("hits") in ({}, None) and payloads[ids[5]].get("last_hit_at") is None
    assert cache.fold_counters() == 0  # idempotent: nothing new to fold
    cache.hits.forget(ids)  # the counters are lost (Redis restarted without persistence, node restarted)
    clock.now += 100
    assert cache.evict_to(capacity=2, policy="lru") == 4
    assert {r.id for r in cache.store.iter_records(None, [])} == {ids[0], ids[1]}
    assert cache.evict_to(capacity=1, policy="lfu") == 1  # ids[0] has two hits, ids[1] one
    assert {r.id for r in cache.store.iter_records(None, [])} == {ids[0]}


def test_fold_never_lowers_a_count_and_adds_new_hits(open_cache):
    clock = Clock()
    cache = open_cache(clock=clock)
    ids = _fill(cache, clock, n=2)
    for _ in range(3):
        cache.record_hit(ids[0], 10)
    assert cache.fold_counters() == 1
    cache.hits.forget(ids)  # counters restart from zero
    clock.now += 50
    cache.record_hit(ids[0], 5)
    cache.record_hit(ids[1], 10)
    assert cache.fold_counters() == 2
    payloads = {r.id: r.payload for r in cache.store.iter_records(None, ["hits", "last_hit_at"])}
    assert payloads[ids[0]]["hits"] == {"5": 1, "10": 3} and payloads[ids[0]]["last_hit_at"] == clock.now
    assert payloads[ids[1]]["hits"] == {"10": 1}


def test_evict_to_lcbfu_drops_states_then_entries(open_cache):
    clock = Clock()
    cache = open_cache(clock=clock)
    ids = _fill(cache, clock, n=3)
    cache.record_hit(ids[0], 10)
    cache.record_hit(ids[0], 5)
    cache.record_hit(ids[1], 10)
    # scores K*hits: ids[0] K5 5, K10 10; ids[1] K5 0, K10 10; ids[2] K5 0, K10 0 (ties: older first)
    # ids[1] K5, then ids[2] K5 and K10: ids[2] goes whole. Units: 1 entry + 1 single state
    assert cache.evict_to(capacity=2, policy="lcbfu") == 2
    left = {r.id: r.payload["ks_present"] for r in cache.store.iter_records(None, ["ks_present"])}
    assert left == {ids[0]: [5, 10], ids[1]: [10]}
    per_state = 2 * 4 * 64 * 64
    stats = cache.stats()
    # a byte cap removes single states: ids[0] K5 (score 5) goes, the entry stays with K10
    assert cache.evict_to(capacity=10, policy="lcbfu", capacity_bytes=stats["approx_bytes"] - per_state) == 1
    left = {r.id: r.payload["ks_present"] for r in cache.store.iter_records(None, ["ks_present"])}
    assert left == {ids[0]: [10], ids[1]: [10]}
    assert cache.lookup_approx(key("q"), unit(40)).k == 10  # the remaining state still serves
    assert cache.lookup_approx(key("q"), at_similarity(unit(40), 0.82)) is None  # K5 is gone: no K' <= 5


class SlowStore:
    """Delegates to a real store but takes `delay` seconds per search and retrieve."""

    def __init__(self, store, delay):
        self._store, self._delay = store, delay

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if name in ("search", "retrieve", "scroll"):

            def slow(*a, **kw):
                time.sleep(self._delay)
                return attr(*a, **kw)

            return slow
        return attr


class BrokenStore(SlowStore):
    def __getattr__(self, name):
        if name in ("search", "retrieve", "scroll", "insert"):

            def broken(*a, **kw):
                raise ConnectionError("qdrant is down")

            return broken
        return getattr(self._store, name)


def test_lookups_are_time_boxed(open_cache):
    cache = open_cache(lookup_timeout_ms=50)
    cache.write_back(key(), unit(14), latent_states([5]), "file:///t.png", shareable=False)
    real = cache.store
    cache.store = SlowStore(real, delay=0.5)
    start = time.perf_counter()
    assert cache.lookup_exact(key()) is None
    assert cache.lookup_approx(key("q"), unit(14)) is None
    assert time.perf_counter() - start < 0.4
    assert cache.health["exact_timeout"] == 1 and cache.health["approx_timeout"] == 1
    cache.store = BrokenStore(real, delay=0)
    assert cache.lookup_exact(key()) is None and cache.lookup_approx(key("q"), unit(14)) is None
    assert cache.write_back(key("w"), unit(15), latent_states([5]), None, shareable=False) is False
    assert cache.health["exact_error"] == 1 and cache.health["write_error"] == 1
    time.sleep(0.5)  # let the slow calls finish before teardown closes the store
    cache.store = real


def test_locked_folder_error_is_typed_and_clear(open_cache, backend):
    if backend == "server":
        pytest.skip("a server has no folder lock")
    open_cache()
    with pytest.raises(CacheLockedError) as info:
        open_cache()
    message = str(info.value)
    assert "one worker process per node owns the cache" in message and "QDRANT_URL" in message
    if backend == "edge":
        assert f"pid {os.getpid()}" in message


def test_stats_and_state_steps(cache):
    assert cache.state_steps(50) == [5, 10, 15, 20, 25]
    assert cache.state_steps(20) == [2, 4, 6, 8, 10]
    assert cache.state_steps(4) == [1, 2]
    assert cache.state_steps(1) == []
    cache.write_back(key(), unit(16), latent_states([5, 10]), None, shareable=False)
    stats = cache.stats()
    assert stats["entries"] == 1 and stats["per_k"] == {5: 1, 10: 1}
    assert stats["approx_bytes"] >= 2 * 2 * 4 * 64 * 64


def test_write_back_skips_bad_states(cache):
    states = latent_states([5, 10, 60])
    states[10][0, 0, 0] = np.nan
    assert cache.write_back(key(), unit(17), states, None, shareable=False)
    assert cache.stats()["per_k"] == {5: 1}


def test_hit_counters_in_redis(open_cache):
    class FakeRedis:
        def __init__(self):
            self.data = {}

        def pipeline(self, transaction=False):
            return FakePipe(self)

        def delete(self, *keys):
            for k in keys:
                self.data.pop(k, None)

    class FakePipe:
        def __init__(self, redis):
            self.redis, self.ops = redis, []

        def hincrby(self, k, f, n):
            self.ops.append(
                lambda: self.redis.data.setdefault(k, {}).__setitem__(
                    f.encode(), str(int(self.redis.data.get(k, {}).get(f.encode(), b"0")) + n).encode()
                )
            )

        def hset(self, k, f, v):
            self.ops.append(lambda: self.redis.data.setdefault(k, {}).__setitem__(f.encode(), v.encode()))

        def hgetall(self, k):
            self.ops.append(lambda: dict(self.redis.data.get(k, {})))

        def execute(self):
            return [op() for op in self.ops]

    redis = FakeRedis()
    cache = open_cache()
    cache.hits.__init__(redis)
    cache.record_hit("e1", 10)
    cache.record_hit("e1", 10)
    cache.record_hit("e1", 5)
    assert redis.data["reprise:hits:e1"][b"10"] == b"2"
    hits, last = cache.hits.get_many(["e1", "e2"])["e1"]
    assert hits == {10: 2, 5: 1} and last == Clock().now
    assert cache.hits.get_many(["e2"])["e2"] == ({}, None)


def test_image_only_entry_does_not_shadow_one_with_states(cache):
    v = unit(18)
    cache.write_back(key("image only"), v, {}, "file:///i.png", shareable=False)
    cache.write_back(key("with states"), at_similarity(v, 0.99), latent_states([5]), None, shareable=False)
    hit = cache.lookup_approx(key("q"), v)
    assert hit is not None and hit.source_prompt == "with states"
    assert cache.lookup_exact(key("image only")).image_uri == "file:///i.png"


def test_reopening_with_another_schema_is_refused(open_cache, backend):
    if backend == "server":
        pytest.skip("uses one embedded folder")
    from cache import CacheSchemaError

    open_cache().close()
    with pytest.raises(CacheSchemaError):
        open_cache(state_fractions=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # a sixth slot


def test_edge_optimize_keeps_the_process_responsive(open_cache, backend):
    if backend != "edge":
        pytest.skip("Edge only: the other backends optimise inside Qdrant")
    cache = open_cache(lookup_timeout_ms=200)
    for i in range(20):
        cache.write_back(key(f"p{i}"), unit(100 + i), latent_states([5]), f"file:///{i}.png", shareable=False)
    done = threading.Event()
    threading.Thread(target=lambda: (cache.optimize_now(), done.set())).start()
    slowest = 0.0
    while not done.is_set():  # lookups keep answering (a hit, or a miss while the shard is offline)
        start = time.perf_counter()
        cache.lookup_exact(key("p3"))
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.01)
    assert slowest < 1.0
    assert "optimize_error" not in cache.health
    assert cache.lookup_exact(key("p3")).image_uri == "file:///3.png"
    assert cache.stats()["entries"] == 20


def test_a_fold_settles_when_the_store_reads_a_time_back_one_unit_off():
    """A fold writes what merge_hits gives; the store may read the time back one unit in the last place
    lower. The next fold must see nothing new, or it rewrites the same counts every round."""
    from cache.latent_cache import merge_hits

    counted = ({5: 1}, 1796444516.9040165)
    for drift in (-np.inf, np.inf):
        hits, last = merge_hits({}, *counted)
        read_back = {"hits": {str(k): n for k, n in hits.items()}, "last_hit_at": float(np.nextafter(last, drift))}
        assert merge_hits(read_back, *counted) == merge_hits(read_back, {}, None)
