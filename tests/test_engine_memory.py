"""Bounded memory (issue 21, item 6): nothing of a request stays behind once it ends, and the node's
trackers stay bounded without anyone reading them."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from workers.artifacts import ArtifactStore
from workers.models import load_components
from workers.sampler import DenoiseLoop
from workers.service import Device, DevicePool, GenerationService, JobContext
from workers.text_memo import TextEmbeddingMemo


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("devices", [1, 2])
def test_500_requests_leave_no_tensor_of_theirs_behind(tmp_path, devices):
    pipelines = [load_components("tiny") for _ in range(devices)]
    memo = TextEmbeddingMemo(max_entries=64)
    pool = DevicePool([Device(f"cpu{i}", DenoiseLoop(p, text_memo=memo)) for i, p in enumerate(pipelines)])
    service = GenerationService("tiny", pool, ArtifactStore(str(tmp_path / "art")), max_batch=8)
    features = [{"method": "off"}, {"method": "deepcache", "deepcache_interval": 2}]
    nocache = {"exact": False, "approximate": False, "write": False}

    def request(n: int) -> dict:  # 8 prompts: the memo fills in the warm-up, and stays full
        feature = features[n % 2]
        return {"prompt": f"a small boat {n % 8}", "seed": n, "steps": 2, "cache": {**nocache, "feature": feature}}

    def run(first: int, count: int, clients: int = 8) -> None:
        errors: list = []

        def client(c: int) -> None:
            for n in range(first + c, first + count, clients):
                try:
                    service.run(request(n), JobContext(job_id=f"m{n}"))
                except Exception as exc:  # reported below
                    errors.append(exc)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors[:3]

    try:
        run(0, 40)  # warm-up: the engine's threads, the memo, torch's own caches
        before = live_tensors()
        run(40, 500)
        after = live_tensors()
        # Anything of a request kept after it ends would add at least one tensor per request (500 here; a
        # kept EngineRequest adds ~7 each: 740 -> 4490). A few made once by other threads of the test
        # process (earlier tests' cache threads, torch's lazy state) are not a request's: allow 32.
        assert after <= before + 32, (before, after)
        assert sum(s.requests_stepped for s in service.engine.stats().values()) >= 540 * 2
    finally:
        service.close()


def test_busy_trackers_are_pruned_without_a_scrape():
    from workers.metrics import _BusyTracker

    tracker = _BusyTracker(window_s=10.0)
    for i in range(10_000):
        tracker.observe("cpu0", float(i), i + 0.5)  # one job a second for ~3 hours, never scraped
    assert len(tracker.intervals["cpu0"]) <= 11
    assert tracker.ratio("cpu0", 1, 10_000.0) == pytest.approx(0.5)
