"""Eviction policies: plain objects that order what to drop, given per-entry statistics.

A victim is `(entry_id, k)`: `k` is a stored state (LCBFU evicts single states) or None for the
whole entry. `plan_eviction` walks a policy's order until the cache fits its capacity.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable, Protocol

Victim = tuple[str, "int | None"]


@dataclass
class EntryStats:
    entry_id: str
    ks: list[int]
    hits: dict[int, int] = field(default_factory=dict)  # K -> hit count
    created_at: float = 0.0
    last_hit_at: float | None = None
    bytes_per_state: dict[int, int] = field(default_factory=dict)  # K -> bytes
    overhead_bytes: int = 0  # prompt vector + payload

    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())

    @property
    def bytes(self) -> int:
        return self.overhead_bytes + sum(self.bytes_per_state.get(k, 0) for k in self.ks)


class EvictionPolicy(Protocol):
    name: str

    def order(self, entries: list[EntryStats]) -> list[Victim]: ...
    def select_victims(self, entries: list[EntryStats], n_to_evict: int) -> list[Victim]: ...


class _OrderedPolicy:
    name = "base"

    def order(self, entries: list[EntryStats]) -> list[Victim]:
        raise NotImplementedError

    def select_victims(self, entries: list[EntryStats], n_to_evict: int) -> list[Victim]:
        return self.order(entries)[: max(n_to_evict, 0)]


class LcbfuPolicy(_OrderedPolicy):
    """Least Computationally Beneficial and Frequently Used (NIRVANA): each (entry, K) state
    scores K x hits; the lowest goes first, older first on ties. Victims are single states. An entry
    without states (its image only, for exact lookups) goes whole, and scores what its exact hits
    saved (``record_hit`` credits an exact hit at the deepest K the cache keeps)."""

    name = "lcbfu"

    def order(self, entries: list[EntryStats]) -> list[Victim]:
        units = [(k * e.hits.get(k, 0), e.created_at, e.entry_id, k) for e in entries for k in e.ks]
        units += [(sum(k * n for k, n in e.hits.items()), e.created_at, e.entry_id, None) for e in entries if not e.ks]
        units.sort(key=lambda u: (u[0], u[1], u[2], -1 if u[3] is None else u[3]))
        return [(entry_id, k) for _, _, entry_id, k in units]


class LruPolicy(_OrderedPolicy):
    name = "lru"

    def order(self, entries):
        return [
            (e.entry_id, None)
            for e in sorted(
                entries,
                key=lambda e: (e.last_hit_at if e.last_hit_at is not None else e.created_at, e.created_at, e.entry_id),
            )
        ]


class LfuPolicy(_OrderedPolicy):
    name = "lfu"

    def order(self, entries):
        return [(e.entry_id, None) for e in sorted(entries, key=lambda e: (e.total_hits, e.created_at, e.entry_id))]


class FifoPolicy(_OrderedPolicy):
    name = "fifo"

    def order(self, entries):
        return [(e.entry_id, None) for e in sorted(entries, key=lambda e: (e.created_at, e.entry_id))]


class LifoPolicy(_OrderedPolicy):
    name = "lifo"

    def order(self, entries):
        return [(e.entry_id, None) for e in sorted(entries, key=lambda e: (-e.created_at, e.entry_id))]


class RandomPolicy(_OrderedPolicy):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def order(self, entries):
        ids = sorted(e.entry_id for e in entries)
        random.Random(self.seed).shuffle(ids)
        return [(i, None) for i in ids]


POLICIES = {p.name: p for p in (LcbfuPolicy, LruPolicy, LfuPolicy, FifoPolicy, LifoPolicy, RandomPolicy)}


def make_policy(name: str, seed: int = 0) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose from {sorted(POLICIES)}")
    return RandomPolicy(seed) if name == "random" else POLICIES[name]()


@dataclass
class EvictionPlan:
    delete_entries: list[str] = field(default_factory=list)  # whole points
    delete_states: dict[str, list[int]] = field(default_factory=dict)  # entry -> Ks (entry keeps other Ks)

    @property
    def n_units(self) -> int:
        return len(self.delete_entries) + sum(len(v) for v in self.delete_states.values())


def plan_eviction(
    policy: EvictionPolicy, entries: Iterable[EntryStats], max_entries: int | None, max_bytes: int | None = None
) -> EvictionPlan:
    """Walk the policy's order until at most `max_entries` entries and `max_bytes` bytes remain.

    An entry whose last state goes is deleted whole.
    """
    entries = list(entries)
    by_id = {e.entry_id: e for e in entries}
    remaining_ks = {e.entry_id: set(e.ks) for e in entries}
    n_entries = len(entries)
    total_bytes = sum(e.bytes for e in entries)
    plan = EvictionPlan()

    def fits() -> bool:
        return (max_entries is None or n_entries <= max_entries) and (max_bytes is None or total_bytes <= max_bytes)

    for entry_id, k in policy.order(entries):
        if fits():
            break
        entry = by_id[entry_id]
        if entry_id in plan.delete_entries:
            continue
        if k is None or remaining_ks[entry_id] == {k}:
            plan.delete_entries.append(entry_id)
            plan.delete_states.pop(entry_id, None)
            total_bytes -= entry.overhead_bytes + sum(entry.bytes_per_state.get(x, 0) for x in remaining_ks[entry_id])
            remaining_ks[entry_id] = set()
            n_entries -= 1
        elif k in remaining_ks[entry_id]:
            plan.delete_states.setdefault(entry_id, []).append(k)
            remaining_ks[entry_id].discard(k)
            total_bytes -= entry.bytes_per_state.get(k, 0)
    return plan
