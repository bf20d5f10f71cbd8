"""The node's batched cache path (workers/cache_path.py), in process on a real embedded Qdrant (qdrant-edge)
and the tiny model: waiting lookups share one embedder call and one batched search, write-backs share one
upsert, a writer that falls behind drops (counted), and a lookup that would come after its request reached
its earliest resume step is skipped (counted) while the request runs on, unharmed, on one device and two."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cache import CacheSettings, LatentCache
from cache.keys import CacheKey
from workers.artifacts import ArtifactStore
from workers.cache_path import CachePath
from workers.denoise_loop import DenoiseLoop
from workers.model_loading import load_components
from workers.service import Device, DevicePool, GenerationService, JobContext

STEPS = 10


def _key(prompt: str, seed: int = 1) -> CacheKey:
    return CacheKey("tiny", "v1", 0, prompt, "", seed, STEPS, 5.0, 64, 64, "ddim", tenant="t")


def _states(seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((4, 8, 8)).astype(np.float32) for k in (2, 4)}


def _captured(seed: int) -> dict:
    import torch

    return {k: torch.from_numpy(v)[None] for k, v in _states(seed).items()}  # as the trajectory captures: (1, ...)


@pytest.fixture
def cache(tmp_path):
    c = LatentCache.open(
        CacheSettings(backend="edge", path=str(tmp_path / "q"), state_fractions=[0.2, 0.4], skip_table=[(0.5, 0.4)])
    )
    yield c
    c.close()


class Gate:
    """Wraps a callable: its first call waits on ``release`` (and says it started); every call is recorded."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, items, *args, **kwargs):
        self.calls.append(list(items))
        if len(self.calls) == 1:
            self.started.set()
            assert self.release.wait(30)
        return self.fn(items, *args, **kwargs)


def test_waiting_lookups_share_one_embedder_call_and_one_batched_search(cache):
    prompts = [f"a red fox number {i} in the snow" for i in range(6)]
    cache.write_back_many([(_key(p), cache.embed(p), _states(i), None, False) for i, p in enumerate(prompts[:3])])
    expected = [cache.lookup_approx(_key(p, seed=9), cache.embed(p)) for p in prompts]
    cache.embedder.drop_memos()  # the batch embeds them again
    embed, search = Gate(cache.embedder.embed_many), Gate(cache.store.search_many)
    search.release.set()  # recorded only
    cache.embedder.embed_many, cache.store.search_many = embed, search
    path = CachePath(lambda: cache, {})
    try:
        results: dict = {}

        def look(i):
            results[i] = path.lookup(_key(prompts[i], seed=9), prompts[i], allow_shared=True)

        first = threading.Thread(target=look, args=(0,))
        first.start()
        assert embed.started.wait(10)  # the first lookup's batch is in its embedder call
        rest = [threading.Thread(target=look, args=(i,)) for i in range(1, 6)]
        for t in rest:
            t.start()
        while path._lookups.qsize() < 5:  # the five others wait for the next batch
            time.sleep(0.01)
        embed.release.set()
        for t in [first, *rest]:
            t.join(30)
        assert embed.calls == [prompts[:1], prompts[1:]]  # one embedder call for the five that waited
        assert [len(q) for q in search.calls] == [1, 5]  # and one batched search
        assert path.counters["lookup_batches"] == 2 and path.counters["lookup_skipped"] == 0
        for i, want in enumerate(expected):
            vector, hit = results[i]
            assert np.allclose(vector, cache.embed(prompts[i]), atol=1e-6)
            assert (hit is None) == (want is None), i
            if want is not None:  # the same entry, K and state as one lookup at a time finds
                assert (hit.entry_id, hit.k) == (want.entry_id, want.k) and np.array_equal(hit.state, want.state)
        assert any(r[1] is not None for r in results.values())
    finally:
        path.close()


def test_the_writer_takes_queued_write_backs_together_and_drops_them_when_behind(cache):
    write, embed = Gate(cache.write_back_outcomes), Gate(cache.embedder.embed_many)
    embed.release.set()  # recorded only
    cache.write_back_outcomes, cache.embedder.embed_many = write, embed
    path = CachePath(lambda: cache, {}, writeback_queue=2)
    try:
        keys = [_key(f"a lighthouse number {i}") for i in range(5)]
        assert path.write_back(keys[0], None, _captured(0), "file:///x0.png", False)
        assert write.started.wait(10)  # the writer is inside its upsert of the first
        queued = [path.write_back(k, None, _captured(i), f"file:///x{i}.png", False) for i, k in enumerate(keys[1:], 1)]
        assert queued == [True, True, False, False]  # a queue of 2: the writer is behind, the rest dropped
        assert path.counters["writeback_dropped"] == 2
        write.release.set()
        path.drain(10)
        assert [len(batch) for batch in embed.calls] == [1, 2]  # the two that waited: one embedder call
        assert [len(batch) for batch in write.calls] == [1, 1, 1]  # stored entry by entry (_when_quiet)
        assert path.counters["writeback_written"] == 3 and path.counters["writeback_failed"] == 0
        for i, k in enumerate(keys):  # the written ones are found (their prompts embedded by the writer)
            hit = cache.lookup_exact(k)
            assert (hit is not None) == (i < 3), i
    finally:
        path.close()


def test_the_writer_stores_each_entry_only_once_the_devices_compute(cache):
    """Before each entry the writer waits on ``when_quiet`` (NodeEngine.wait_quiet: until no device thread wants
    the interpreter lock for about one entry's write, QUIET_WAIT_S at most); nothing is stored meanwhile, and
    the wait is counted."""
    from workers import cache_path

    asked: list[tuple[float, float]] = []
    devices_compute = threading.Event()

    def when_quiet(margin_s: float, timeout_s: float) -> bool:
        asked.append((margin_s, timeout_s))
        return devices_compute.wait(30)

    path = CachePath(lambda: cache, {}, when_quiet=when_quiet)
    try:
        keys = [_key("a lighthouse"), _key("a harbour")]
        for i, k in enumerate(keys):
            assert path.write_back(k, None, _captured(i), f"file:///{i}.png", False)
        deadline = time.monotonic() + 10
        while not asked:
            assert time.monotonic() < deadline, "the writer never asked"
            time.sleep(0.01)
        time.sleep(0.2)
        assert cache.lookup_exact(keys[0]) is None and len(asked) == 1  # held while the devices want the lock
        devices_compute.set()
        path.drain(10)
        assert len(asked) == 2  # one wait per entry
        assert all(m >= cache_path.QUIET_MARGIN_MIN_S and t == cache_path.QUIET_WAIT_S for m, t in asked)
        assert all(cache.lookup_exact(k) is not None for k in keys)
        assert path.counters["writeback_written"] == 2 and path.counters["writeback_wait_ms"] >= 200
    finally:
        path.close()


def test_a_write_back_that_meets_the_store_optimising_is_stored_once_it_is_back(cache, monkeypatch):
    """The Edge shard is closed while its optimiser runs: a write-back then is tried again until the store
    is back (counted in writeback_retried), and counted failed only past OFFLINE_RETRY_S."""
    import workers.cache_path as cache_path
    from cache.store import CacheUnavailableError

    real_insert, offline = cache.store.insert_many, {"calls": 2}

    def insert_many(points):
        if offline["calls"]:
            offline["calls"] -= 1
            raise CacheUnavailableError("cache shard is being optimised")
        return real_insert(points)

    monkeypatch.setattr(cache.store, "insert_many", insert_many)
    path = CachePath(lambda: cache, {})
    try:
        key = _key("a lighthouse at dusk")
        assert path.write_back(key, None, _captured(0), "file:///first.png", False)
        path.drain(10)
        assert (path.counters["writeback_written"], path.counters["writeback_retried"]) == (1, 2)
        assert path.counters["writeback_failed"] == 0 and cache.lookup_exact(key).image_uri == "file:///first.png"
        monkeypatch.setattr(cache_path, "OFFLINE_RETRY_S", 0.6)
        offline["calls"] = 1000  # offline past the bound: failed, counted
        assert path.write_back(_key("a harbour at noon"), None, _captured(1), "file:///second.png", False)
        path.drain(10)
        assert path.counters["writeback_failed"] == 1 and path.counters["writeback_written"] == 1
        assert 2 < path.counters["writeback_retried"] < 10
    finally:
        path.close()


def test_a_write_back_that_lost_the_race_is_counted_apart_from_a_failed_one(cache):
    path = CachePath(lambda: cache, {})
    try:
        key = _key("a lighthouse at dusk")
        assert path.write_back(key, None, _captured(0), "file:///first.png", False)
        path.drain(10)
        assert path.write_back(key, None, _captured(1), "file:///second.png", False)  # same entry: first writer wins
        path.drain(10)
        assert (path.counters["writeback_written"], path.counters["writeback_raced"]) == (1, 1)
        assert path.counters["writeback_failed"] == 0
        assert cache.lookup_exact(key).image_uri == "file:///first.png"
        real = cache.store
        cache.store = None  # the store away: every entry of the batch fails
        try:
            assert path.write_back(_key("a harbour at noon"), None, _captured(2), "file:///third.png", False)
            path.drain(10)
        finally:
            cache.store = real
        assert path.counters["writeback_failed"] == 1 and path.counters["writeback_raced"] == 1
    finally:
        path.close()


def test_lookups_that_nothing_stored_could_match_are_answered_at_once_and_embedded_ahead(cache):
    encoded: list[list[str]] = []  # what MiniLM itself encodes (the memo's misses)
    real_encode = cache.embedder._encode_fn
    cache.embedder._encode_fn = lambda prompts: encoded.append(list(prompts)) or real_encode(prompts)
    path = CachePath(lambda: cache, {})
    try:
        assert path.lookup(_key("a red fox"), "a red fox", True) == (None, None)  # a cold cache: answered at once
        assert path.counters["lookups"] == 0
        deadline = time.monotonic() + 10
        memo = cache.embedder._memo
        while memo.get((cache.embedder.version, "a red fox")) is None:  # then embedded ahead, no lookup waiting
            assert time.monotonic() < deadline, encoded
            time.sleep(0.01)
        assert encoded == [["a red fox"]]
        wide = dataclasses.replace(_key("a red fox"), width=128)
        path.write_back(wide, None, _captured(0), "file:///x0.png", False)
        path.drain(10)
        assert encoded == [["a red fox"]]  # the writer found the vector embedded ahead
        assert path.lookup(_key("a lynx"), "a lynx", True) == (None, None)  # only a 128-wide entry is stored
        assert (path.counters["lookup_empty"], path.counters["lookups"]) == (2, 0)
        vector, hit = path.lookup(dataclasses.replace(wide, seed=5), "a red fox", True)  # one could match now
        assert hit is not None and hit.k > 0 and np.allclose(vector, cache.embed("a red fox"))
        assert (path.counters["lookup_empty"], path.counters["lookups"]) == (2, 1)
        assert cache.could_resume_many([(wide, True), (_key("b"), True)]) == [True, False]
    finally:
        path.close()


def test_lookups_that_trickle_in_never_wait_behind_prompts_embedded_ahead(cache, monkeypatch):
    """Prompts answered unembedded are embedded ahead only once no lookup has come for AHEAD_IDLE_S, AHEAD_PIECE
    at a time: the lookups of a wave, which arrive one admission after another, are each answered at once
    instead of behind the embedding of the ones before them."""
    from workers import cache_path

    monkeypatch.setattr(cache_path, "AHEAD_IDLE_S", 1.0)
    encoded: list[list[str]] = []
    real_encode = cache.embedder._encode_fn

    def slow_encode(prompts):  # a MiniLM forward that a lookup would notice waiting behind
        encoded.append(list(prompts))
        time.sleep(0.5)
        return real_encode(prompts)

    cache.embedder._encode_fn = slow_encode
    path = CachePath(lambda: cache, {})
    try:
        prompts = [f"a harbour at dawn, boat {i}" for i in range(6)]
        for p in prompts:
            t0 = time.monotonic()
            assert path.lookup(_key(p), p, True) == (None, None)  # a cold cache: nothing could match
            assert time.monotonic() - t0 < 0.45, p  # not behind a 0.5 s embedding
            time.sleep(0.05)
        assert encoded == []  # nothing embedded while lookups kept coming
        memo, deadline = cache.embedder._memo, time.monotonic() + 30
        while any(memo.get((cache.embedder.version, p)) is None for p in prompts):  # then all, in pieces
            assert time.monotonic() < deadline, encoded
            time.sleep(0.05)
        assert sorted(p for piece in encoded for p in piece) == sorted(prompts)
        assert all(len(piece) <= cache_path.AHEAD_PIECE for piece in encoded) and len(encoded) >= 2
    finally:
        path.close()


def test_a_lookup_is_skipped_once_its_request_passed_its_step_and_counted(cache):
    cache.write_back_many([(_key("x"), cache.embed("x"), _states(0), None, False)])  # "a" and "b" could match it
    cache.embedder.drop_memos()
    embed = Gate(cache.embedder.embed_many)
    cache.embedder.embed_many = embed
    path = CachePath(lambda: cache, {})
    try:
        first = threading.Thread(target=path.lookup, args=(_key("a"), "a", True))
        first.start()
        assert embed.started.wait(10)
        passed = threading.Event()
        out: list = []
        late = threading.Thread(target=lambda: out.append(path.lookup(_key("b"), "b", True, passed.is_set)))
        late.start()
        while path._lookups.qsize() < 1:
            time.sleep(0.01)
        passed.set()  # its request was held past the lookup's time box and ran on fresh before the batch took it
        embed.release.set()
        first.join(30)
        late.join(30)
        assert out == [(None, None)] and path.counters["lookup_skipped"] == 1
        assert embed.calls == [["a"]]  # never embedded nor searched
    finally:
        path.close()


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny")


@pytest.mark.parametrize("devices", [1, 2])
def test_a_request_held_behind_a_slow_lookup_batch_runs_on_fresh_and_is_still_written(tiny, tmp_path, devices):
    """Request A's lookup batch is slow (its embedder call waits); B's lookup queues behind it while B's
    device runs B to its earliest resume step and holds it there, for the lookup's time box at most; then B
    runs on, and when the batch thread comes to B it skips B's lookup (counted): a miss whose image is B's
    fresh image, whose states the writer still stores (embedding its prompt), so the same request again is
    an exact hit."""
    settings = CacheSettings(  # a time box the test can watch B held in
        backend="edge", path=str(tmp_path / "q"), state_fractions=[0.4], skip_table=[(0.0, 0.4)], lookup_timeout_ms=1500
    )
    pool = DevicePool([Device(f"cpu{i}", DenoiseLoop(dataclasses.replace(tiny))) for i in range(devices)])
    service = GenerationService("tiny", pool, ArtifactStore(str(tmp_path / "art")), cache=LatentCache.open(settings))
    try:
        b = {"prompt": "a blue heron in a pond", "seed": 4, "steps": STEPS, "cache": {"exact": False}}
        fresh = service.run({**b, "cache": {"exact": False, "approximate": False, "write": False}}, JobContext("b0"))
        # an entry A's and B's lookups could match (else they are answered at once, unembedded)
        service.run({**b, "prompt": "a cat", "cache": {"exact": False, "approximate": False}}, JobContext("c"))
        service.drain_writebacks(30)
        service.cache.embedder.drop_memos()
        embed = Gate(service.cache.embedder.embed_many)
        service.cache.embedder.embed_many = embed
        a = threading.Thread(target=service.run, args=({**b, "prompt": "a red fox", "seed": 1}, JobContext("a")))
        a.start()
        assert embed.started.wait(30)
        result: list = []
        run_b = threading.Thread(target=lambda: result.append(service.run(b, JobContext("b1"))))
        run_b.start()
        deadline = time.monotonic() + 30
        while not any(r.job_id == "b1" and r.held for s in service.engine.schedulers for r in s.active):
            assert time.monotonic() < deadline, "B never reached its resume step"  # K = 4, behind A's batch
            time.sleep(0.01)
        assert not result and service.counters["lookup_batches"] == 0
        time.sleep(2 * settings.lookup_timeout_ms / 1000)  # B's lookup is now late, beyond the time box
        embed.release.set()
        run_b.join(60)
        a.join(60)
        (late,) = result
        counts = lambda: {k: v for k, v in service.counters.items() if k.startswith("lookup")}  # noqa: E731
        deadline = time.monotonic() + 20  # neither job waits for the lookup thread any more: let it finish
        while counts().get("lookup_batches") != 1 or counts().get("lookup_skipped") != 1:
            assert time.monotonic() < deadline, counts()  # A's batch counted, B's lookup skipped
            time.sleep(0.05)
        assert late.cache.hit == "miss" and late.cache.steps_computed == STEPS and late.cache.steps_discarded == 0
        pixels = [np.asarray(Image.open(r.image_uri.removeprefix("file://"))).astype(int) for r in (fresh, late)]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1
        service.drain_writebacks(30)
        again = service.run({**b, "cache": {}}, JobContext("b2"))
        assert again.cache.hit == "exact"
    finally:
        service.close()
