"""Each model family served through the cluster: a real Redis, one real worker process per family
(`reprise worker --model DIR`, DIR written by the family's own diffusers pipeline `save_pretrained`), the
producer's client. A repeated request is an exact hit, a similar prompt resumes at K, the feature caches
run, and the image is decoded and stored."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from ops.localcluster import LocalCluster
from scheduler.client import submit
from workers.families import FAMILIES
from workers.model_loading import save_builtin

pytestmark = pytest.mark.integration

BUILTINS = {"sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}
STEPS = 8
# settings under which the tiny models' caches reuse work within 8 steps
FEATURE_PARAMS = {"first_block": {"first_block_threshold": 0.5}, "taylorseer": {"taylorseer_interval": 3}}


@pytest.fixture(scope="module")
def family_cluster(redis_server):
    env = {k: v for k, v in os.environ.items() if k.startswith(("REPRISE_", "REDIS_", "HF_"))}  # conftest's
    workdir = Path(tempfile.mkdtemp(prefix="reprise-fam-"))
    c = LocalCluster(workdir=str(workdir), redis_url=redis_server.url, env=env)
    c.ensure_redis()
    workers = []
    for family, builtin in BUILTINS.items():
        directory = save_builtin(builtin, workdir / f"fam-{family}")
        workers.append(
            c.start_worker(
                str(directory),
                "cpu",
                wait=False,
                REPRISE_CACHE_PATH=str(workdir / f"qdrant-{family}"),
                REPRISE_CACHE_EMBEDDER="clip",  # the family's own pooled text output
                REPRISE_CACHE_SKIP_TABLE="-1.0:0.5",  # any neighbour resumes at half the steps
                REPRISE_CACHE_LOOKUP_TIMEOUT_MS="10000",  # a generous time box: the resume must not fall back
            )
        )
    for worker in workers:  # started together, so their loading overlaps
        c.wait_worker_ready(worker, timeout=180)
    yield c
    c.stop()


def _stored(result) -> dict:
    path = Path(result.image_uri.removeprefix("file://"))
    assert path.exists() and path.suffix == ".png"
    image = Image.open(path)
    assert image.size == (result.width, result.height)
    return json.loads(image.info["reprise"])


@pytest.mark.parametrize("family", list(BUILTINS))
def test_family_directory_serves_exact_approximate_and_feature_caches(family_cluster, family):
    model = f"fam-{family}"
    request = dict(prompt="a red fox in the snow", seed=11, steps=STEPS, model=model)
    first = submit(**request).wait(120)
    assert first.model == model and first.cache.hit == "miss" and first.cache.steps_computed == STEPS
    assert first.width == 64  # the model's default size
    meta = _stored(first)
    assert meta["request"]["scheduler"] == FAMILIES[family].default_scheduler  # the model's default, filled in

    deadline = time.monotonic() + 30
    while True:  # the write-back runs after the answer: ask until it has landed
        again = submit(**request, cache={"write": False}).wait(120)
        if again.cache.hit == "exact" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert again.cache.hit == "exact" and again.cache.steps_computed == 0 and again.image_uri == first.image_uri

    similar = submit(**{**request, "prompt": "a red fox in the snow at dawn"}).wait(120)
    assert similar.cache.hit == "approximate" and similar.cache.k == STEPS // 2, similar.cache
    assert similar.cache.steps_computed == STEPS // 2
    _stored(similar)

    method = FAMILIES[family].feature_methods[0]  # SDXL: deepcache; SD3: taylorseer; Flux: first_block
    feature = {"method": method, **FEATURE_PARAMS.get(method, {})}
    featured = submit(**{**request, "prompt": "a lighthouse", "cache": {"exact": False, "feature": feature}}).wait(120)
    report = featured.cache.feature
    assert report.method == method and report.partial_unet_passes > 0
    # the runner that made the image reports it (a resumed request's, when the lookup swapped one in)
    assert report.full_unet_passes + report.partial_unet_passes == featured.cache.steps_computed
    _stored(featured)


def test_models_lists_family_defaults_limits_and_methods_and_the_client_checks_them(family_cluster):
    import subprocess
    import sys

    from scheduler.errors import InvalidRequest

    out = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "models"], capture_output=True, text=True, timeout=60, check=True
    )
    served = json.loads(out.stdout)
    flux = served["fam-flux"]
    assert flux["family"] == "flux" and flux["default_size"] == 64 and flux["size_multiple"] == 16
    assert (flux["default_steps"], flux["default_guidance_scale"], flux["default_scheduler"]) == (28, 3.5, "flow_euler")
    assert flux["feature_methods"] == ["off", "first_block", "taylorseer"] and served["fam-sdxl"]["family"] == "sdxl"
    with pytest.raises(InvalidRequest, match="scheduler"):
        submit(prompt="a cat", model="fam-flux", scheduler="ddim")  # refused before queueing
    with pytest.raises(InvalidRequest, match="cache.feature.method"):
        submit(prompt="a cat", model="fam-sd3", cache={"feature": {"method": "first_block"}})
