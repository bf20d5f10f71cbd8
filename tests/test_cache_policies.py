"""Eviction policies as plain objects: examples and hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.policies import EntryStats, LcbfuPolicy, make_policy, plan_eviction

POLICY_NAMES = ["lcbfu", "lru", "lfu", "fifo", "lifo", "random"]


@st.composite
def entry_lists(draw, max_entries=12):
    n = draw(st.integers(0, max_entries))
    entries = []
    for i in range(n):
        ks = sorted(draw(st.sets(st.sampled_from([5, 10, 15, 20, 25]), max_size=5)))
        entries.append(
            EntryStats(
                entry_id=f"e{i:02d}",
                ks=ks,
                hits={k: draw(st.integers(0, 5)) for k in ks or [25]},  # an image-only entry's exact hits at K_max
                created_at=float(draw(st.integers(0, 20))),
                last_hit_at=draw(st.one_of(st.none(), st.integers(0, 40).map(float))),
                bytes_per_state={k: 32768 for k in ks},
                overhead_bytes=2560,
            )
        )
    return entries


def brute_force_lcbfu(entries, n):
    """Reference: enumerate every (entry, K) unit, score K*hits, lowest first, older first on ties."""
    units = []
    for e in entries:
        if not e.ks:
            saved = sum(k * n for k, n in e.hits.items())
            units.append(((saved, e.created_at, e.entry_id, -1), (e.entry_id, None)))
        for k in e.ks:
            units.append(((k * e.hits.get(k, 0), e.created_at, e.entry_id, k), (e.entry_id, k)))
    return [u for _, u in sorted(units)][:n]


@settings(max_examples=60, deadline=None)
@given(entries=entry_lists(), n=st.integers(0, 80), name=st.sampled_from(POLICY_NAMES))
def test_never_evicts_more_than_asked_and_only_what_exists(entries, n, name):
    victims = make_policy(name, seed=3).select_victims(entries, n)
    assert len(victims) <= n
    assert len(set(victims)) == len(victims)
    known = {(e.entry_id, k) for e in entries for k in e.ks} | {(e.entry_id, None) for e in entries}
    assert set(victims) <= known


@settings(max_examples=60, deadline=None)
@given(entries=entry_lists(), n=st.integers(0, 80))
def test_lcbfu_equals_brute_force_reference(entries, n):
    assert LcbfuPolicy().select_victims(entries, n) == brute_force_lcbfu(entries, n)


@settings(max_examples=40, deadline=None)
@given(entries=entry_lists(), n=st.integers(0, 12))
def test_fifo_evicts_oldest_and_lifo_newest(entries, n):
    fifo = [e for e, _ in make_policy("fifo").select_victims(entries, n)]
    lifo = [e for e, _ in make_policy("lifo").select_victims(entries, n)]
    created = {e.entry_id: e.created_at for e in entries}
    kept_fifo = [created[e.entry_id] for e in entries if e.entry_id not in fifo]
    kept_lifo = [created[e.entry_id] for e in entries if e.entry_id not in lifo]
    assert all(created[v] <= k for v in fifo for k in kept_fifo)
    assert all(created[v] >= k for v in lifo for k in kept_lifo)


@settings(max_examples=40, deadline=None)
@given(entries=entry_lists(), n=st.integers(0, 12))
def test_lfu_evicts_least_hit_and_lru_least_recent(entries, n):
    by_id = {e.entry_id: e for e in entries}
    lfu = [e for e, _ in make_policy("lfu").select_victims(entries, n)]
    assert all(by_id[v].total_hits <= by_id[k].total_hits for v in lfu for k in by_id if k not in lfu)
    lru = [e for e, _ in make_policy("lru").select_victims(entries, n)]

    def recency(e):
        return e.last_hit_at if e.last_hit_at is not None else e.created_at

    assert all(recency(by_id[v]) <= recency(by_id[k]) for v in lru for k in by_id if k not in lru)


def test_random_is_seeded():
    entries = [EntryStats(f"e{i}", [5], created_at=i) for i in range(20)]
    a = make_policy("random", seed=1).select_victims(entries, 5)
    assert a == make_policy("random", seed=1).select_victims(list(reversed(entries)), 5)
    assert a != make_policy("random", seed=2).select_victims(entries, 5)


@settings(max_examples=60, deadline=None)
@given(
    entries=entry_lists(),
    cap=st.integers(0, 12),
    name=st.sampled_from(POLICY_NAMES),
    byte_cap=st.one_of(st.none(), st.integers(0, 400_000)),
)
def test_plan_eviction_reaches_capacity_with_consistent_plan(entries, cap, name, byte_cap):
    plan = plan_eviction(make_policy(name, seed=1), entries, cap, byte_cap)
    by_id = {e.entry_id: e for e in entries}
    assert len(set(plan.delete_entries)) == len(plan.delete_entries)
    assert not set(plan.delete_entries) & set(plan.delete_states)
    remaining_bytes = 0
    for e in entries:
        if e.entry_id in plan.delete_entries:
            continue
        dropped = plan.delete_states.get(e.entry_id, [])
        assert not dropped or set(dropped) < set(e.ks)  # a surviving entry keeps at least one state
        remaining_bytes += e.overhead_bytes + sum(e.bytes_per_state[k] for k in e.ks if k not in dropped)
    assert len(entries) - len(plan.delete_entries) <= cap
    if byte_cap is not None:
        assert remaining_bytes <= byte_cap
    if name != "lcbfu":
        assert not plan.delete_states
        # whole-entry policies stop as soon as they fit: one victim fewer would not fit
        assert len(plan.delete_entries) == max(0, len(entries) - cap) or byte_cap is not None
    assert all(e in by_id for e in plan.delete_entries)


def test_lcbfu_example_from_nirvana():
    entries = [
        EntryStats("a", [5, 25], hits={5: 10, 25: 1}, created_at=1),  # scores 50, 25
        EntryStats("b", [10], hits={10: 0}, created_at=2),  # score 0
        EntryStats("c", [20], hits={20: 1}, created_at=0),  # score 20
    ]
    assert LcbfuPolicy().select_victims(entries, 3) == [("b", 10), ("c", 20), ("a", 25)]
    plan = plan_eviction(LcbfuPolicy(), entries, max_entries=1)
    assert plan.delete_entries == ["b", "c"] and not plan.delete_states


def test_lcbfu_keeps_an_image_only_entry_by_what_its_exact_hits_saved():
    """An entry stored without states (its request's write-back was not embedded) is found by exact
    lookups only; each exact hit is credited at the deepest K (``record_hit``), so a popular one outlives
    states nobody resumed from, and one never hit goes first."""
    stats = dict(last_hit_at=None, bytes_per_state={10: 32768}, overhead_bytes=2560)
    popular = EntryStats(entry_id="image-hit", ks=[], hits={15: 3}, created_at=0.0, **stats)
    unhit = EntryStats(entry_id="image-cold", ks=[], hits={}, created_at=5.0, **stats)
    states = EntryStats(entry_id="states", ks=[10], hits={10: 1}, created_at=1.0, **stats)
    assert LcbfuPolicy().select_victims([popular, unhit, states], 3) == [
        ("image-cold", None),
        ("states", 10),
        ("image-hit", None),
    ]


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("mru")
