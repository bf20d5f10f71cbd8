"""The gate that keeps a node's approximate lookups only while they pay (workers/approx_gate.py): the plain
object's arithmetic, then a CPU node in process (one device and two) on a real embedded Qdrant, whose
lookups stop after the warm-up when no hit comes, whose gated requests are stored without a prompt vector
and still served as exact hits, and which looks up again once hits would pay."""

from __future__ import annotations

import dataclasses

import pytest

from cache import CacheSettings, LatentCache
from workers.approx_gate import ApproxGate
from workers.artifacts import ArtifactStore
from workers.denoise_loop import DenoiseLoop
from workers.model_loading import load_components
from workers.service import Device, DevicePool, GenerationService, JobContext


def test_a_disabled_gate_admits_every_lookup_whatever_they_cost():
    gate = ApproxGate(enabled=False, warmup=0)
    gate.note_lookups(100)
    gate.note_cost(10.0)
    assert all(gate.admit() for _ in range(50)) and gate.is_open


def test_the_gate_closes_after_its_warmup_when_lookups_cost_more_than_hits_save_and_probes_one_in_n():
    gate = ApproxGate(enabled=True, warmup=8, probe_every=4)
    for _ in range(8):
        assert gate.admit()
        gate.note_lookups(1)
        gate.note_cost(0.010)  # 10 ms a lookup, no hit
    assert not gate.is_open
    admitted = [gate.admit() for _ in range(40)]
    assert sum(admitted) == 10 and admitted[3] and not any(admitted[:3])  # every fourth: the probes
    assert gate.snapshot()["open"] is False and gate.snapshot()["lookups"] == 8


def test_hits_worth_more_than_the_lookups_open_the_gate_again():
    gate = ApproxGate(enabled=True, warmup=4, probe_every=4)
    gate.note_lookups(4)
    gate.note_cost(0.040)
    assert not gate.is_open
    gate.note_saved(0.030)  # less than the 40 ms spent
    assert not gate.is_open
    gate.note_saved(0.015)
    assert gate.is_open and gate.admit()


def test_probe_hits_count_by_the_share_of_entries_stored_with_a_vector():
    gate = ApproxGate(enabled=True, warmup=0, probe_every=8)
    for i in range(64):  # one write-back in four with a vector
        gate.note_write(with_vector=i % 4 == 0)
    assert gate.coverage == pytest.approx(0.25, abs=0.03)
    gate.note_lookups(4)
    gate.note_cost(0.040)
    gate.note_saved(0.012)  # counted about four times: ~0.048 > 0.040
    assert gate.is_open
    gate.note_cost(0.015)  # 0.055 spent against about 0.048
    assert not gate.is_open


def test_bad_gate_bounds_are_refused():
    with pytest.raises(ValueError, match="probe_every"):
        ApproxGate(enabled=True, probe_every=0)
    with pytest.raises(ValueError, match="warmup"):
        ApproxGate(enabled=True, warmup=-1)


STEPS = 10


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny")


@pytest.mark.parametrize("devices", [1, 2])
def test_a_cpu_node_stops_lookups_that_do_not_pay_stores_its_image_alone_and_still_serves_exact_hits(
    tiny, tmp_path, devices
):
    # A table no pair of these prompts reaches: every lookup costs, none saves. A long time box: each looked-up
    # request waits for its answer, so the gate has counted its lookup before the next request asks.
    settings = CacheSettings(
        backend="edge",
        path=str(tmp_path / "q"),
        state_fractions=[0.4],
        skip_table=[(0.9999, 0.4)],
        lookup_timeout_ms=30_000,
    )
    pool = DevicePool([Device(f"cpu{i}", DenoiseLoop(dataclasses.replace(tiny))) for i in range(devices)])
    gate = ApproxGate(enabled=True, warmup=4, probe_every=4)
    cache = LatentCache.open(settings)
    service = GenerationService("tiny", pool, ArtifactStore(str(tmp_path / "art")), cache=cache, approx_gate=gate)
    words = "fox heron lantern glacier violin teapot comet orchard dune harbor kite maple".split()
    prompts = [f"a {words[i]} beside a {words[(5 * i + 3) % len(words)]}, ink drawing" for i in range(12)]
    request = lambda i: {"prompt": prompts[i], "seed": i, "steps": STEPS}  # noqa: E731
    try:
        for i in range(12):
            service.run(request(i), JobContext(f"j{i}"))
            service.drain_writebacks(30)
        assert not gate.is_open
        # 4 warm-up lookups, then of the 8 others every fourth is a probe: 2 looked up, 6 gated
        assert service.counters["lookup_gated"] == 6
        assert gate.lookups == 6
        gated = prompts[5]  # after the warm-up and not a probe (those are the 8th and the 12th)
        found = {r.payload["prompt"] for r in cache.store.search(cache.embed(gated), None, limit=12)}
        assert gated not in found  # no prompt vector: no search finds it
        assert prompts[0] in found and prompts[7] in found  # a warm-up entry and a probe's have one
        kept = {
            r.payload["prompt"]: r.payload["ks_present"]
            for r in cache.store.iter_records(fields=["prompt", "ks_present"])
        }
        assert kept[gated] == []  # and no states: nothing could resume from them, so none were captured
        assert kept[prompts[0]] == [4] and kept[prompts[7]] == [4]
        again = service.run(request(5), JobContext("j5-again"))
        assert again.cache.hit == "exact"  # found by its exact key all the same
        # hits that would pay (as a probe could find them) open it again: the next request is looked up
        gate.note_saved(10.0)
        before = service.counters["lookups"] + service.counters["lookup_empty"]
        service.run({**request(7), "seed": 99}, JobContext("open"))
        assert service.counters["lookup_gated"] == 6
        assert service.counters["lookups"] + service.counters["lookup_empty"] == before + 1
    finally:
        service.close()
