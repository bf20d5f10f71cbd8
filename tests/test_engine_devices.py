"""The node engine on one device and on two (``cpu,cpu``: one pipeline per device, as ``reprise worker
--devices cpu,cpu`` loads them), with DeepCache, block-caching and plain requests in flight at once: every
image equals the same request run alone on one device, and the cache never answers a request with the
image or state of a request whose feature cache changed its pixels."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from cache import CacheSettings, LatentCache
from workers.artifacts import ArtifactStore
from workers.models import load_components
from workers.sampler import DenoiseLoop
from workers.service import Device, DevicePool, GenerationService, JobContext

STEPS = 8
NOCACHE = {"exact": False, "approximate": False, "write": False}
FEATURES = {
    "off": {"method": "off"},
    "deepcache": {"method": "deepcache", "deepcache_interval": 3},
    "block": {"method": "block", "block_delta": 0.3},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a small shared CPU: spinning intra-op threads slow every device thread
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipelines():
    """Two loads of the tiny model: each device its own modules, as the node has them."""
    return [load_components("tiny"), load_components("tiny")]


def _service(pipelines, tmp_path, devices: int, cache=None, max_batch: int = 4) -> GenerationService:
    pool = DevicePool([Device(f"cpu{i}", DenoiseLoop(pipelines[i])) for i in range(devices)])
    defaults = {"method": "off", "calibration_dir": str(tmp_path / "blockcache")}
    return GenerationService(
        "tiny", pool, ArtifactStore(str(tmp_path / "art")), cache=cache, feature_defaults=defaults, max_batch=max_batch
    )


def _pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result.image_uri.removeprefix("file://")).convert("RGB")).astype(np.int16)


def _at_once(service, jobs: list[dict]) -> list:
    results: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(i):
        start.wait()
        try:
            results[i] = service.run(jobs[i], JobContext(job_id=f"j{i}-{jobs[i]['prompt']}"))
        except Exception as exc:  # reported by the test, with the others' results
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def _request(method: str, i: int, **extra) -> dict:
    return {
        "prompt": f"a {method} lighthouse {i}",
        "seed": i,
        "steps": STEPS,
        "guidance_scale": 5.0,
        "cache": {**NOCACHE, "feature": FEATURES[method]},
        **extra,
    }


@pytest.mark.parametrize("devices", [1, 2])
def test_mixed_feature_caches_in_flight_at_once_give_each_request_its_alone_image(pipelines, tmp_path, devices):
    jobs = [_request(method, i) for i in range(4) for method in FEATURES]
    service = _service(pipelines, tmp_path, devices)
    alone_service = _service(pipelines, tmp_path / "alone", 1)
    try:
        together = _at_once(service, jobs)
        failed = [(j["prompt"], r) for j, r in zip(jobs, together) if isinstance(r, Exception)]
        assert not failed, failed
        if devices == 2:
            assert {r.device for r in together} == {"cpu0", "cpu1"}  # both devices served
        for job, result in zip(jobs, together):
            alone = alone_service.run({**job, "deterministic": True}, JobContext(job_id="alone-" + job["prompt"]))
            diff = int(np.abs(_pixels(result) - _pixels(alone)).max())
            assert diff <= 1, (job["prompt"], result.device, diff)
    finally:
        service.close()
        alone_service.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_a_plain_request_is_never_served_nor_resumed_from_a_deepcache_result(pipelines, tmp_path, devices):
    settings = CacheSettings(backend="edge", path=str(tmp_path / "q"), state_fractions=[0.5], skip_table=[(0.0, 0.5)])
    service = _service(pipelines, tmp_path, devices, cache=LatentCache.open(settings))
    try:
        base = {"prompt": "a red fox in the snow", "seed": 3, "steps": STEPS, "guidance_scale": 5.0}
        lossy = {**base, "cache": {"feature": {"method": "deepcache", "deepcache_interval": 5}}}
        first = service.run(lossy, JobContext(job_id="deepcache"))
        service.drain_writebacks()
        plain = service.run(base, JobContext(job_id="plain"))
        assert plain.cache.hit == "miss", plain.cache  # neither the exact image nor a resumed state
        assert plain.image_uri != first.image_uri
        alone = service.run({**base, "cache": NOCACHE, "deterministic": True}, JobContext(job_id="plain-alone"))
        assert np.abs(_pixels(plain) - _pixels(alone)).max() <= 1
        assert np.abs(_pixels(first) - _pixels(alone)).max() > 1  # the lossy image differs: the check can fail
        service.drain_writebacks()
        # The same feature cache with the same parameters is the same generation: served exactly.
        again = service.run(lossy, JobContext(job_id="deepcache-again"))
        assert again.cache.hit == "exact" and again.image_uri == first.image_uri
        # Other parameters are another generation.
        other = {**base, "cache": {"feature": {"method": "deepcache", "deepcache_interval": 2}}}
        assert service.run(other, JobContext(job_id="deepcache-2")).cache.hit == "miss"
    finally:
        service.close()
