"""A real two-device node (``reprise worker --devices cpu,cpu``, the stand-in for ``cuda:0,cuda:1``) serving
DeepCache, block-caching and plain requests sent at once, as issue 21 tried it: every request succeeds,
every plain image equals the same request run alone, and a plain request after a DeepCache one with the
same prompt and seed is not served the DeepCache image."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ops.localcluster import LocalCluster
from scheduler.client import submit

pytestmark = pytest.mark.integration

MODEL = "twodevices"
STEPS = 8
NOCACHE = {"exact": False, "approximate": False, "write": False}


@pytest.fixture(scope="module")
def node(redis_server, tmp_path_factory):
    from workers.models import save_builtin

    work = tmp_path_factory.mktemp("twodevices")
    model_dir = save_builtin("tiny", work / MODEL, seed=0)
    c = LocalCluster(workdir=str(work), redis_url=redis_server.url, env={"REDIS_URL": redis_server.url})
    c.ensure_redis()
    c.start_worker(
        str(model_dir),
        "cpu,cpu",
        REPRISE_CACHE_PATH=str(work / "qdrant"),
        REPRISE_BLOCKCACHE_DIR=str(work / "blockcache"),
        REPRISE_MAX_BATCH="4",
    )
    c.model_dir = model_dir
    yield c
    c.stop()


def _pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(uri.removeprefix("file://")).convert("RGB")).astype(np.int16)


def _alone(model_dir, request: dict) -> np.ndarray:
    """The plain request run alone, in this process, by the loop itself."""
    from workers.models import load_components
    from workers.sampler import DenoiseLoop

    loop = DenoiseLoop(load_components(str(model_dir)))
    with torch.inference_mode():
        out = loop.denoise(
            prompt=request["prompt"],
            seed=request["seed"],
            steps=STEPS,
            guidance_scale=request["guidance_scale"],
            width=64,
            height=64,
        )
        return np.asarray(loop.decode(out.latents)).astype(np.int16)


def test_deepcache_block_and_plain_requests_at_once_on_two_devices(node):
    features = {
        "deepcache": {"method": "deepcache", "deepcache_interval": 3},
        "block": {"method": "block"},
        "off": {"method": "off"},
    }
    jobs = [
        {
            "prompt": f"a {method} harbour at dawn {i}",
            "seed": i,
            "steps": STEPS,
            "guidance_scale": 5.0,
            "cache": {**NOCACHE, "feature": feature},
        }
        for i in range(8)
        for method, feature in features.items()
    ]
    submitted = [submit(model=MODEL, **job) for job in jobs]  # all 24 queued before the first finishes
    results: list = [None] * len(jobs)

    def wait(i: int) -> None:
        try:
            results[i] = submitted[i].wait(300)
        except Exception as exc:  # reported below, with the others
            results[i] = exc

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(320)
    failed = [(j["prompt"], r) for j, r in zip(jobs, results) if isinstance(r, Exception) or r is None]
    assert not failed, failed
    for job, result in zip(jobs, results):
        assert result.cache.feature.method == job["cache"]["feature"]["method"]
        if job["cache"]["feature"]["method"] == "off":
            diff = int(np.abs(_pixels(result.image_uri) - _alone(node.model_dir, job)).max())
            assert diff <= 1, (job["prompt"], diff)


def test_a_plain_request_after_a_deepcache_one_is_not_served_its_image(node):
    base = {"prompt": "an owl on a fence post", "seed": 21, "steps": STEPS, "guidance_scale": 5.0}
    lossy_request = {**base, "cache": {"feature": {"method": "deepcache", "deepcache_interval": 5}}}
    lossy = submit(model=MODEL, **lossy_request).wait(120)
    assert lossy.cache.hit == "miss"
    deadline = time.monotonic() + 30
    while True:  # the write-back lands after the result: the same DeepCache request is exact once it has
        again = submit(model=MODEL, **lossy_request).wait(120)
        if again.cache.hit == "exact":
            break
        assert time.monotonic() < deadline, "the DeepCache entry was never written"
        time.sleep(0.5)
    assert again.image_uri == lossy.image_uri
    plain = submit(model=MODEL, **base).wait(120)
    assert plain.cache.hit == "miss" and plain.image_uri != lossy.image_uri, plain.cache  # neither image nor state
    assert np.abs(_pixels(plain.image_uri) - _alone(node.model_dir, base)).max() <= 1
    assert np.abs(_pixels(lossy.image_uri) - _alone(node.model_dir, base)).max() > 1
