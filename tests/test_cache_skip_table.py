"""Similarity -> K, the state schedule, the key and the settings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cache import CacheKey, CacheSettings
from cache.skip_table import (
    CLIP_SKIP_TABLE,
    MINILM_SKIP_TABLE,
    choose_k,
    choose_skip_fraction,
    state_steps,
    validate_table,
)


@pytest.mark.parametrize(
    "s,k", [(0.96, 25), (0.951, 25), (0.95, 20), (0.91, 20), (0.86, 15), (0.8, 10), (0.7, 5), (0.6, None)]
)
def test_nirvana_clip_table(s, k):
    assert choose_k(s, 50, CLIP_SKIP_TABLE, [5, 10, 15, 20, 25]) == k


def test_largest_stored_k_at_most_the_table_k():
    assert choose_k(0.99, 50, CLIP_SKIP_TABLE, [5, 15]) == 15
    assert choose_k(0.7, 50, CLIP_SKIP_TABLE, [10, 15]) is None
    assert choose_k(0.99, 20, CLIP_SKIP_TABLE, [2, 4, 6, 8, 10]) == 10  # same fractions for N=20
    assert choose_k(float("nan"), 50, CLIP_SKIP_TABLE, [5]) is None


def test_minilm_table_resumes_late_only_for_near_identical_text():
    # calibrated (ops/calibrate.py): MiniLM puts one-word edits that move the shape as high as 0.9988, so
    # half the steps are skipped only for the same text (a re-roll with another seed), and nothing below 0.8
    assert choose_skip_fraction(1.0, MINILM_SKIP_TABLE) == 0.5
    assert choose_skip_fraction(0.9988, MINILM_SKIP_TABLE) <= 0.4
    assert choose_skip_fraction(0.98, MINILM_SKIP_TABLE) <= 0.2
    assert choose_skip_fraction(0.8, MINILM_SKIP_TABLE) == 0
    assert validate_table(MINILM_SKIP_TABLE) == MINILM_SKIP_TABLE


@given(s=st.floats(-1, 1), t=st.floats(-1, 1))
def test_more_similar_never_skips_less(s, t):
    lo, hi = sorted((s, t))
    for table in (CLIP_SKIP_TABLE, MINILM_SKIP_TABLE):
        assert choose_skip_fraction(lo, table) <= choose_skip_fraction(hi, table)


@given(n=st.integers(1, 1000))
def test_state_steps_within_range(n):
    ks = state_steps(n, [0.1, 0.2, 0.3, 0.4, 0.5])
    assert ks == sorted(set(ks)) and all(1 <= k <= n - 1 for k in ks)


def test_state_steps_examples():
    assert state_steps(50, [0.1, 0.2, 0.3, 0.4, 0.5]) == [5, 10, 15, 20, 25]
    assert state_steps(30, [0.1, 0.2, 0.3, 0.4, 0.5]) == [3, 6, 9, 12, 15]
    assert state_steps(2, [0.1, 0.5]) == [1]


def test_bad_tables_are_refused():
    with pytest.raises(ValueError):
        validate_table([(0.9, 0.1), (0.8, 0.4)])  # more similar would skip less
    with pytest.raises(ValueError):
        validate_table([(0.9, 1.0)])


def test_exact_id_is_deterministic_and_tenant_scoped():
    a = CacheKey("sd15", "v1", 0, "a cat", "", 1, 50, 7.5, 512, 512, "ddim", "t1")
    assert a.exact_id() == CacheKey(**a.as_dict()).exact_id()
    b = CacheKey(**{**a.as_dict(), "tenant": "t2"})
    assert a.exact_id() != b.exact_id() and a.content_key() == b.content_key()
    assert a.exact_id(isolate_by_tenant=False) == b.exact_id(isolate_by_tenant=False)
    for field, value in [
        ("seed", 2),
        ("prompt", "a dog"),
        ("guidance", 7.0),
        ("generation", 1),
        ("negative_prompt", "x"),
        ("feature", "block{}"),
    ]:
        assert CacheKey(**{**a.as_dict(), field: value}).exact_id() != a.exact_id()


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("REPRISE_CACHE_STATE_FRACTIONS", "0.25,0.5")
    monkeypatch.setenv("REPRISE_CACHE_SKIP_TABLE", "0.9:0.5,0.8:0.25")
    monkeypatch.setenv("REPRISE_CACHE_POLICY", "lru")
    monkeypatch.delenv("QDRANT_URL", raising=False)
    s = CacheSettings()
    assert s.backend == "edge" and s.state_fractions == [0.25, 0.5] and s.policy == "lru"
    assert s.table() == ((0.9, 0.5), (0.8, 0.25))
    monkeypatch.setenv("QDRANT_URL", "http://qdrant:6333")
    assert CacheSettings().backend == "server"
    monkeypatch.delenv("REPRISE_CACHE_SKIP_TABLE")
    assert CacheSettings(embedder="clip").table() == CLIP_SKIP_TABLE
    assert CacheSettings().table() == MINILM_SKIP_TABLE


def test_clip_embedder_takes_the_table_calibrated_for_the_model():
    from types import SimpleNamespace

    from workers.families import SD15
    from workers.node import cache_settings_for

    def components(extra):  # the pooled width comes from the family: SD 1.5's is the encoder's hidden size
        encoder = SimpleNamespace(config=SimpleNamespace(hidden_size=64))
        return SimpleNamespace(extra=extra, family=SD15, text_encoder=encoder)

    model = components({"clip_skip_table": [[0.99, 0.5], [0.9, 0.1]]})
    settings, embed = cache_settings_for(CacheSettings(embedder="clip"), model)
    assert settings.table() == ((0.99, 0.5), (0.9, 0.1)) and settings.clip_dim == 64 and callable(embed)
    # an operator's table wins; a model without a calibrated table gets NIRVANA's; MiniLM ignores the model's
    assert cache_settings_for(CacheSettings(embedder="clip", skip_table="0.8:0.2"), model)[0].table() == ((0.8, 0.2),)
    assert cache_settings_for(CacheSettings(embedder="clip"), components({}))[0].table() == CLIP_SKIP_TABLE
    settings, embed = cache_settings_for(CacheSettings(embedder="minilm"), model)
    assert settings.table() == MINILM_SKIP_TABLE and embed is None
    # the default (auto) takes the model's own encoder when the model ships a table for it
    settings, embed = cache_settings_for(CacheSettings(), model)
    assert settings.embedder == "clip" and settings.table() == ((0.99, 0.5), (0.9, 0.1)) and callable(embed)
