"""Resuming from a request's own stored state, through the real latent cache (embedded Qdrant),
gives the image of the full run bit for bit, at every stored K and for every scheduler."""

from __future__ import annotations

import numpy as np
import pytest
from cache_helpers import resume_cache
from PIL import Image

from cache import CacheSettings, LatentCache
from workers.artifacts import ArtifactStore
from workers.denoise_loop import DenoiseLoop
from workers.model_loading import load_components
from workers.service import Device, DevicePool, GenerationService, JobContext

STEPS = 10
FRACTIONS = [0.1, 0.2, 0.3, 0.4, 0.5]


@pytest.fixture(scope="module")
def components():
    return load_components("tiny")


def _service(components, tmp_path, fraction):
    cache = resume_cache(tmp_path / "q", FRACTIONS, fraction)
    pool = DevicePool([Device("cpu", DenoiseLoop(components))])
    return GenerationService("tiny", pool, ArtifactStore(str(tmp_path / "art")), cache=cache)


def _pixels(uri):
    return np.asarray(Image.open(uri.removeprefix("file://")).convert("RGB"))


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_resume_from_own_state_is_bit_identical_at_every_k(components, tmp_path, scheduler):
    request = {
        "prompt": "a red fox in the snow",
        "seed": 21,
        "steps": STEPS,
        "scheduler": scheduler,
        "guidance_scale": 4.0,
    }
    for i, fraction in enumerate(FRACTIONS):
        service = _service(components, tmp_path / f"{scheduler}-{i}", fraction)
        try:
            full = service.run(request, JobContext(job_id=f"full-{i}"))
            service.drain_writebacks()
            assert full.cache.hit == "miss" and full.cache.steps_computed == STEPS
            resumed = service.run({**request, "cache": {"exact": False}}, JobContext(job_id=f"resumed-{i}"))
            k = round(fraction * STEPS)
            assert resumed.cache.hit == "approximate" and resumed.cache.k == k, resumed.cache
            assert resumed.cache.steps_computed == STEPS - k and resumed.cache.similarity > 0.999
            assert np.array_equal(_pixels(resumed.image_uri), _pixels(full.image_uri)), (scheduler, k)
        finally:
            service.close()


def test_second_identical_request_is_exact_and_runs_no_step(components, tmp_path):
    service = _service(components, tmp_path, 0.5)
    try:
        request = {"prompt": "a tiny house on a hill", "seed": 2, "steps": STEPS}
        first = service.run(request, JobContext(job_id="a"))
        service.drain_writebacks()
        second = service.run(request, JobContext(job_id="b"))
        assert second.cache.hit == "exact" and second.cache.steps_computed == 0 and second.timings.denoise_s == 0
        assert np.array_equal(_pixels(first.image_uri), _pixels(second.image_uri))
    finally:
        service.close()


def test_restart_keeps_embedded_entries(components, tmp_path):
    request = {"prompt": "a windmill at sunrise", "seed": 8, "steps": STEPS}
    service = _service(components, tmp_path, 0.5)
    service.run(request, JobContext(job_id="before"))
    service.drain_writebacks()
    service.close()
    reopened = _service(components, tmp_path, 0.5)
    try:
        assert reopened.run(request, JobContext(job_id="after")).cache.hit == "exact"
    finally:
        reopened.close()


def test_two_devices_generating_the_same_request_leave_one_entry(components, tmp_path):
    import threading

    settings = CacheSettings(backend="edge", path=str(tmp_path / "q2"))
    cache = LatentCache.open(settings)
    pool = DevicePool([Device("cpu0", DenoiseLoop(components)), Device("cpu1", DenoiseLoop(components))])
    service = GenerationService("tiny", pool, ArtifactStore(str(tmp_path / "art2")), cache=cache)
    request = {
        "prompt": "two workers, one entry",
        "seed": 4,
        "steps": STEPS,
        "cache": {"exact": False, "approximate": False},
    }
    try:
        threads = [threading.Thread(target=service.run, args=(request, JobContext(job_id=f"j{i}"))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        service.drain_writebacks()
        assert cache.stats()["entries"] == 1
    finally:
        service.close()
