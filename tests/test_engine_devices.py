"""The node engine on one device and on two (``cpu,cpu``: one pipeline per device, as ``reprise worker
--devices cpu,cpu`` loads them), with DeepCache, block-caching and plain requests in flight at once: every
image equals the same request run alone on one device, and the cache never answers a request with the
image or state of a request whose feature cache changed its pixels."""

from __future__ import annotations

import json
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


_LOADED: dict[str, list] = {}


def _pipelines(model: str) -> list:
    """Two loads of a model: each device its own modules, as the node has them (loaded once per module)."""
    if model not in _LOADED:
        _LOADED[model] = [load_components(model), load_components(model)]
    return _LOADED[model]


@pytest.fixture(scope="module")
def pipelines():
    return _pipelines("tiny")


@pytest.fixture(scope="module")
def blockcache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("blockcache"))  # one calibration per model and step count


def _service(pipelines, tmp_path, devices: int, cache=None, max_batch: int = 4, blockcache=None) -> GenerationService:
    pool = DevicePool([Device(f"cpu{i}", DenoiseLoop(pipelines[i])) for i in range(devices)])
    defaults = {"method": "off", "calibration_dir": blockcache or str(tmp_path / "blockcache")}
    name = pipelines[0].name
    return GenerationService(
        name, pool, ArtifactStore(str(tmp_path / "art")), cache=cache, feature_defaults=defaults, max_batch=max_batch
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


@pytest.mark.parametrize("devices", [1, 2, "2 sharing one pipeline"])
def test_mixed_feature_caches_in_flight_at_once_give_each_request_its_alone_image(
    pipelines, tmp_path, devices, blockcache
):
    """Two device threads sharing one pipeline's modules (as ``sim:N`` devices do) also keep each request's
    feature cache to its own calls."""
    jobs = [_request(method, i) for i in range(4) for method in FEATURES]
    if devices != 1 and devices != 2:
        pipelines, devices = [pipelines[0], pipelines[0]], 2
    service = _service(pipelines, tmp_path, devices, blockcache=blockcache)
    alone_service = _service(pipelines, tmp_path / "alone", 1, blockcache=blockcache)
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


# devices x feature method x start: (model, feature, schedulers a state is resumed with)
MATRIX = {
    "off": ("tiny", {"method": "off"}, ("ddim", "dpmpp_2m")),
    "deepcache": ("tiny", FEATURES["deepcache"], ("ddim", "dpmpp_2m")),
    "block": ("tiny", FEATURES["block"], ("ddim", "dpmpp_2m")),
    "first_block": ("tiny-flux", {"method": "first_block"}, ("flow_euler",)),  # diffusers' hook, a transformer
}


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("case", list(MATRIX))
def test_fresh_and_resumed_requests_equal_their_alone_runs(tmp_path, blockcache, devices, case):
    """Fresh requests and requests resumed from a stored state (each scheduler: ddim, and dpmpp_2m with its
    kept model output), in flight at once on one device or two, each equal to the same request run alone."""
    model, feature, schedulers = MATRIX[case]
    settings = CacheSettings(backend="edge", path=str(tmp_path / "q"), state_fractions=[0.5], skip_table=[(0.0, 0.5)])
    service = _service(_pipelines(model), tmp_path, devices, LatentCache.open(settings), 2, blockcache)
    try:
        base = {"steps": STEPS, "guidance_scale": 5.0}
        jobs = []
        for s in schedulers:
            stored = {
                **base,
                "prompt": "a red fox in the snow",
                "seed": 3,
                "scheduler": s,
                "cache": {"feature": feature},
            }
            service.run(stored, JobContext(job_id=f"stored-{s}"))
            for i in range(2):
                jobs.append(
                    {
                        **stored,
                        "prompt": f"a red fox in deep snow {i}",
                        "cache": {"exact": False, "write": False, "feature": feature},
                    }
                )
                jobs.append(
                    {
                        **base,
                        "prompt": f"a lighthouse {i}",
                        "seed": i,
                        "scheduler": s,
                        "cache": {**NOCACHE, "feature": feature},
                    }
                )
        service.drain_writebacks()
        together = _at_once(service, jobs)
        failed = [(j["prompt"], r) for j, r in zip(jobs, together) if isinstance(r, Exception)]
        assert not failed, failed
        assert len({r.device for r in together}) == devices
        for job, result in zip(jobs, together):
            resumed = job["cache"].get("approximate", True) and not job["cache"].get("exact", True)
            assert result.cache.hit == ("approximate" if resumed else "miss"), (job["prompt"], result.cache)
            assert result.cache.feature.method == feature["method"]
            alone = service.run({**job, "deterministic": True}, JobContext(job_id="alone-" + job["prompt"]))
            assert alone.cache.hit == result.cache.hit and alone.cache.k == result.cache.k
            diff = int(np.abs(_pixels(result) - _pixels(alone)).max())
            assert diff <= 1, (job["prompt"], job["scheduler"], result.device, diff)
    finally:
        service.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_a_request_that_cannot_bind_fails_alone(pipelines, tmp_path, devices):
    """A feature cache that refuses to start (here: a block calibration that names no block of this U-Net)
    fails its request when the device thread binds it; the device goes on with the others."""
    calibrations = tmp_path / "bad-blockcache"
    calibrations.mkdir()
    (calibrations / f"{pipelines[0].fingerprint}.json").write_text(
        json.dumps({"steps": {str(STEPS): {"blocks": {"no.such.block": [0.0] * STEPS}}}})
    )
    service = _service(pipelines, tmp_path, devices, blockcache=str(calibrations))
    try:
        jobs = [_request("block", 0), _request("off", 1), _request("deepcache", 2)]
        block, plain, deepcache = _at_once(service, jobs)
        assert isinstance(block, ValueError) and "recalibrate" in str(block), block
        assert plain.cache.steps_computed == STEPS and deepcache.cache.feature.method == "deepcache"
    finally:
        service.close()
