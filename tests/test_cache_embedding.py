"""Prompt embedding with the real all-MiniLM-L6-v2 (bundled, offline), end to end with Edge."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time

import numpy as np
import pytest

from cache import CacheKey, CacheSettings, LatentCache
from cache.embedding import CallableEmbedder, PromptEmbedder


@pytest.fixture(scope="module")
def minilm():
    embedder = PromptEmbedder(memo_entries=30)
    embedder.embed("warm up")  # loads the model once for the module
    return embedder


def test_minilm_vectors_are_normalised_and_memoised(minilm):
    v = minilm.embed("a red fox in the snow")
    assert v.shape == (384,) and v.dtype == np.float32 and np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    assert minilm.embed("a red fox in the snow") is v  # memo hit: the same array
    with pytest.raises(ValueError):
        v[0] = 1.0  # shared memo arrays are read-only
    minilm.drop_memos()
    again = minilm.embed("a red fox in the snow")
    assert again is not v and np.allclose(again, v, atol=1e-5)


def test_similar_prompts_score_higher_than_different_ones(minilm):
    a, b, c = minilm.embed_many(["a red fox in the snow", "a red fox in the snow, highly detailed", "a bowl of ramen"])
    assert float(a @ b) > 0.8 > float(a @ c)


def test_memo_is_bounded_and_thread_safe(minilm):
    minilm.drop_memos()
    prompts = [f"a house number {i}" for i in range(45)]
    results = {}

    def work(chunk):
        for p in chunk:
            results[p] = minilm.embed(p)

    threads = [threading.Thread(target=work, args=(prompts[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 45 and len(minilm._memo) <= 30
    assert np.allclose(results["a house number 7"], minilm.embed("a house number 7"), atol=1e-5)


def test_callable_embedder_for_clip():
    calls = []

    def pooled(prompt):
        calls.append(prompt)
        return np.arange(1, 9, dtype=np.float64) * len(prompt)

    emb = CallableEmbedder(pooled, version="sd15-clip", dim=8)
    v = emb.embed("abc")
    assert v.dtype == np.float32 and np.linalg.norm(v) == pytest.approx(1.0) and emb.embed("abc") is v
    assert calls == ["abc"]
    with pytest.raises(ValueError):
        CallableEmbedder(pooled, version="bad", dim=4).embed("x")


def test_approximate_reuse_with_real_embeddings(minilm, tmp_path):
    # tmpfs when there is one: Edge fsyncs its WAL on every update
    folder = tempfile.mkdtemp(dir="/dev/shm") if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    # an explicit table: the shipped MiniLM default is empty (approximate reuse is opt-in)
    settings = CacheSettings(
        backend="edge",
        path=folder,
        lookup_timeout_ms=5000,
        skip_table=[(0.97, 0.5), (0.93, 0.4), (0.90, 0.3), (0.85, 0.2), (0.80, 0.1)],
    )
    cache = LatentCache.open(settings, embedder=minilm)
    try:

        def key(prompt):
            return CacheKey("sd15", "v1", 0, prompt, "", 1, 50, 7.5, 512, 512, "ddim", "acme")

        source = "a red fox sitting in fresh snow at dawn"
        states = {k: np.full((4, 64, 64), k, dtype=np.float32) for k in cache.state_steps(50)}
        assert cache.write_back(key(source), cache.embed(source), states, "file:///fox.png", shareable=False)

        near = "a red fox sitting in fresh snow at dawn."
        hit = cache.lookup_approx(key(near), cache.embed(near))
        assert hit is not None and hit.k == 25 and hit.source_prompt == source
        assert np.all(hit.state == 25)

        edited = "a red fox sitting in fresh snow at dawn, oil painting"
        hit = cache.lookup_approx(key(edited), cache.embed(edited))
        assert hit is not None and 5 <= hit.k < 25

        assert (
            cache.lookup_approx(
                key("a bowl of ramen on a wooden table"), cache.embed("a bowl of ramen on a wooden table")
            )
            is None
        )
    finally:
        cache.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_clip_embedder_is_passed_in_by_the_worker(tmp_path):
    settings = CacheSettings(backend="local", path=str(tmp_path), embedder="clip", clip_dim=8)
    with pytest.raises(ValueError, match="embedder=clip"):
        LatentCache.open(settings)
    with LatentCache.open(settings, embedder=lambda prompt: np.ones(8) * len(prompt)) as cache:
        assert cache.embed("abc").shape == (8,) and cache.embedder.version == "clip"
        assert cache._table == settings.table()  # NIRVANA's CLIP thresholds


def test_the_child_process_embedder_gives_the_same_vectors_and_outlives_a_killed_child(minilm):
    """REPRISE_CACHE_EMBED_PROCESS=on (auto on accelerator nodes): MiniLM runs in a child process of its own,
    off the worker's interpreter lock. Its vectors are the in-process ones; a child that dies, or hangs past
    the call's timeout, fails the call in flight with a typed error, and the next call starts a new child."""
    from cache.embedding import ChildEncoder, EmbedderError

    prompts = ["a red fox in the snow", "a lighthouse at dusk, oil painting", "a bowl of ramen"]
    child = ChildEncoder(threads=1)
    try:
        vectors = child(prompts)
        assert np.abs(vectors - minilm.embed_many(prompts)).max() < 1e-5
        first = child._proc.pid
        child._proc.kill()  # dies while idle: the next call starts a new child
        child._proc.wait(10)
        assert np.abs(child(prompts) - vectors).max() < 1e-6 and child._proc.pid != first
        second, out = child._proc, []
        long_call = threading.Thread(target=lambda: out.append(_raised(child, [f"prompt {i}" for i in range(20_000)])))
        long_call.start()
        time.sleep(1.0)
        second.kill()  # dies in the middle of a call
        long_call.join(30)
        assert len(out) == 1 and isinstance(out[0], EmbedderError) and "died" in str(out[0]), out
        again = child(prompts)  # a new child
        assert child._proc.pid not in (first, second.pid) and np.abs(again - vectors).max() < 1e-6
        third, child.timeout_s = child._proc, 1.0
        os.kill(third.pid, signal.SIGSTOP)  # hangs: the call fails after the timeout, the child is killed
        with pytest.raises(EmbedderError, match="did not answer"):
            child(prompts)
        assert third.wait(10) == -signal.SIGKILL
        assert np.abs(child(prompts) - vectors).max() < 1e-6  # and the next call starts a new one
    finally:
        child.close()
    assert child._proc is None


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as exc:
        return exc
    return None


@pytest.mark.parametrize("cpu_node", [False, True])
def test_a_worker_embeds_in_a_child_unless_its_devices_are_the_cpu(tmp_path, monkeypatch, cpu_node):
    """REPRISE_CACHE_EMBED_PROCESS=auto: a node of accelerators (or sim) embeds in the child process, a CPU
    node in its own process; on and off are kept as given; the child gets REPRISE_CACHE_EMBED_TIMEOUT_S, and
    either gets REPRISE_CACHE_EMBED_DTYPE."""
    from cache.embedding import ChildEncoder, encode_minilm
    from workers.model_loading import load_components
    from workers.node_cache import open_cache

    components = load_components("tiny")
    for setting, child in (("auto", not cpu_node), ("on", True), ("off", False)):
        monkeypatch.setenv("REPRISE_CACHE_PATH", str(tmp_path / f"{setting}-{cpu_node}"))
        monkeypatch.setenv("REPRISE_CACHE_EMBED_PROCESS", setting)
        monkeypatch.setenv("REPRISE_CACHE_EMBEDDER", "minilm")
        monkeypatch.setenv("REPRISE_CACHE_EMBED_TIMEOUT_S", "7.5")
        monkeypatch.setenv("REPRISE_CACHE_EMBED_DTYPE", "bfloat16")
        cache = open_cache(None, components, "reprise-test", cpu_node=cpu_node)
        try:
            encode = cache.embedder._encode_fn
            assert isinstance(encode, ChildEncoder) == child, setting
            assert child or (encode.func is encode_minilm and encode.keywords == {"dtype": "bfloat16"}), setting
            assert not child or encode.timeout_s == 7.5  # REPRISE_CACHE_EMBED_TIMEOUT_S reaches the child
            assert not child or encode.dtype == "bfloat16"  # and REPRISE_CACHE_EMBED_DTYPE
        finally:
            cache.close()


def test_minilm_in_bfloat16_agrees_with_float32_in_process_and_in_a_child(minilm, monkeypatch):
    """REPRISE_CACHE_EMBED_DTYPE: auto is bfloat16 exactly where the CPU multiplies it natively; its vectors,
    in this process and in a child, are float32 and within a cosine of 1e-3 of float32's (so the embedder's
    version and every stored vector stay valid)."""
    import torch

    from cache.embedding import ChildEncoder, minilm_dtype

    for avx512_bf16, amx, want in ((True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert minilm_dtype("auto") == want
    assert minilm_dtype("float32") == "float32" and minilm_dtype("bfloat16") == "bfloat16"
    prompts = ["a red fox in the snow", "a lighthouse at dusk, oil painting, trending on artstation", "ramen"]
    full = minilm.embed_many(prompts)
    half = PromptEmbedder(memo_entries=10, dtype="bfloat16").embed_many(prompts)
    child = ChildEncoder(threads=1, dtype="bfloat16")
    try:
        for vectors in (half, child(prompts)):
            assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
            cosines = (vectors * full).sum(axis=1)
            assert cosines.min() > 0.999 and np.abs(vectors - full).max() > 0  # close, yet computed in bfloat16
    finally:
        child.close()
