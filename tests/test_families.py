"""Model families (workers/families.py): each family's tiny built-in, and a `save_pretrained` directory of it,
serves through the one denoising loop — resume from its own stored state is exact for every scheduler it
runs, requests batch, the clip embedder pools as the family does — and other pipeline classes are refused."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from cache_helpers import resume_cache
from PIL import Image

from scheduler.errors import InvalidRequest, UnsupportedModelFamily
from workers.artifacts import ArtifactStore
from workers.denoise_loop import DenoiseLoop
from workers.families import FAMILIES
from workers.model_loading import load_components, save_builtin
from workers.node_cache import clip_embedder
from workers.service import Device, DevicePool, GenerationService, JobContext

STEPS = 6
FRACTIONS = [0.5]
# each family's tiny built-in and the schedulers it runs
CASES = [
    ("tiny-sdxl", "ddim"),
    ("tiny-sdxl", "euler"),
    ("tiny-sdxl", "dpmpp_2m"),
    ("tiny-sd3", "flow_euler"),
    ("tiny-flux", "flow_euler"),
]
_LOADED: dict[str, object] = {}


def _components(name):
    if name not in _LOADED:
        _LOADED[name] = load_components(name)
    return _LOADED[name]


class SpyDenoiser:
    """A family's denoiser, recording each call's batch size; ``gate`` holds calls back until set."""

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.gate.wait(60)
        sample = args[0] if args else kwargs["hidden_states"]
        self.calls.append(sample.shape[0])
        return self.model(*args, **kwargs)


def _service(components, tmp_path, cache=None, name="m"):
    pool = DevicePool([Device("cpu", DenoiseLoop(components))])
    return GenerationService(name, pool, ArtifactStore(str(tmp_path / "art")), cache=cache)


def _cache(tmp_path, fraction=0.5):
    return resume_cache(tmp_path / "q", FRACTIONS, fraction)


def _pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result.image_uri.removeprefix("file://")).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("model,scheduler", CASES)
def test_resume_from_own_state_is_bit_identical_per_family_and_scheduler(tmp_path, model, scheduler):
    service = _service(_components(model), tmp_path, _cache(tmp_path))
    request = {"prompt": "a red fox in the snow", "seed": 21, "steps": STEPS, "scheduler": scheduler, "model": "m"}
    try:
        full = service.run({**request, "guidance_scale": 4.0}, JobContext(job_id="full"))
        service.drain_writebacks()
        assert full.cache.hit == "miss" and full.cache.steps_computed == STEPS
        again = service.run({**request, "guidance_scale": 4.0}, JobContext(job_id="again"))
        assert again.cache.hit == "exact" and again.cache.steps_computed == 0
        resumed = service.run(
            {**request, "guidance_scale": 4.0, "cache": {"exact": False}}, JobContext(job_id="resumed")
        )
        assert resumed.cache.hit == "approximate" and resumed.cache.k == STEPS // 2, resumed.cache
        assert np.array_equal(_pixels(resumed), _pixels(full)), (model, scheduler)
    finally:
        service.close()


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_requests_at_different_steps_share_one_denoiser_call(tmp_path, model):
    import dataclasses

    components = _components(model)
    spy = SpyDenoiser(components.unet)
    service = _service(dataclasses.replace(components, unet=spy), tmp_path)
    scheduler = components.family.default_scheduler
    nocache = {"exact": False, "approximate": False, "write": False}
    jobs = [
        {"prompt": "a lighthouse", "seed": 1, "steps": STEPS, "scheduler": scheduler, "cache": nocache},
        {"prompt": "a windmill", "seed": 2, "steps": STEPS + 2, "scheduler": scheduler, "cache": nocache},
    ]
    results: list = [None, None]

    def run(i):
        results[i] = service.run(jobs[i], JobContext(job_id=f"j{i}"))

    try:
        spy.gate.clear()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        threads[0].start()
        deadline = time.monotonic() + 60
        while not service.engine.schedulers[0].active:  # the first job holds the device, its first call held
            assert time.monotonic() < deadline
            time.sleep(0.01)
        threads[1].start()
        while service.engine.waiting.qsize() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        spy.gate.set()
        for t in threads:
            t.join(120)
        rows = 2 if components.family.uses_cfg(5.0) else 1  # Flux: guidance embedded, one row per request
        assert max(spy.calls) == 2 * rows, spy.calls  # the two requests shared calls
        alone = service.run({**jobs[1], "deterministic": True}, JobContext(job_id="alone"))
        assert np.abs(_pixels(results[1]) - _pixels(alone)).max() <= 1  # batching reorders sums only
    finally:
        service.close()


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_clip_embedder_gives_the_family_pooled_vector_and_fills_the_memo(model):
    from workers.text_memo import TextEmbeddingMemo

    components = _components(model)
    memo = TextEmbeddingMemo(4)
    vector = clip_embedder(components, memo)("a harbour at night")
    assert vector.shape == (components.family.pooled_dim(components),)
    cached = DenoiseLoop(components, text_memo=memo).encode_text("a harbour at night")
    assert memo.hits == 1 and cached.equal(DenoiseLoop(components).encode_text("a harbour at night"))


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_save_pretrained_directory_loads_as_its_family(tmp_path, model):
    directory = save_builtin(model, tmp_path / model)
    index = json.loads((directory / "model_index.json").read_text())
    components = load_components(str(directory))
    assert components.family is FAMILIES[_components(model).family.name]
    assert index["_class_name"] == components.family.pipeline
    assert components.spec.default_size == 64 and components.spec.family == components.family.name
    loop = DenoiseLoop(components)
    out = loop.denoise(
        prompt="a kite",
        seed=3,
        steps=2,
        guidance_scale=3.0,
        width=64,
        height=64,
        scheduler=components.family.default_scheduler,
    )
    assert loop.decode(out.latents).size == (64, 64)


def test_sd3_serves_without_its_third_text_encoder(tmp_path):
    directory = save_builtin("tiny-sd3", tmp_path / "sd3", without=("tokenizer_3", "text_encoder_3"))
    components = load_components(str(directory))
    assert components.text_encoder_3 is None and components.tokenizer_3 is None
    cond, _ = components.family.encode(components, "a boat")
    assert cond["encoder_hidden_states"].shape[1] == 77 + components.family.t5_max_length
    out = DenoiseLoop(components).denoise(
        prompt="a boat", seed=1, steps=2, guidance_scale=4.0, width=64, height=64, scheduler="flow_euler"
    )
    assert torch.isfinite(out.latents).all()


def test_unsupported_pipeline_class_is_refused_naming_it_and_the_families(tmp_path):
    (tmp_path / "kandinsky").mkdir()
    (tmp_path / "kandinsky" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(UnsupportedModelFamily) as err:
        load_components(str(tmp_path / "kandinsky"))
    message = str(err.value)
    assert "KandinskyV22Pipeline" in message
    assert all(f.pipeline in message and f.name in message for f in FAMILIES.values())


def test_worker_refuses_to_start_on_an_unsupported_pipeline_class(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "wan").mkdir()
    (tmp_path / "wan" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REPRISE_REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "worker", "--model", str(tmp_path / "wan"), "--devices", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error (unsupported_model_family)" in proc.stderr and "WanPipeline" in proc.stderr
    assert "sdxl (StableDiffusionXLPipeline)" in proc.stderr and "flux (FluxPipeline)" in proc.stderr


def test_family_refuses_a_scheduler_or_feature_cache_it_does_not_run(tmp_path):
    service = _service(_components("tiny-flux"), tmp_path)
    try:
        with pytest.raises(InvalidRequest, match="flow_euler"):
            service.validate({"prompt": "x", "scheduler": "ddim"})
        with pytest.raises(InvalidRequest, match="U-Nets"):
            service.validate({"prompt": "x", "scheduler": "flow_euler", "cache": {"feature": {"method": "deepcache"}}})
        request, width, height = service.validate({"prompt": "x"})  # the model's defaults fill what is absent
        assert (request.scheduler, request.steps, request.guidance_scale, width) == ("flow_euler", 28, 3.5, 64)
        with pytest.raises(InvalidRequest, match="multiple of 16"):
            service.validate({"prompt": "x", "scheduler": "flow_euler", "width": 72, "height": 64})
    finally:
        service.close()


def test_deepcache_and_block_caching_run_on_the_sdxl_unet(tmp_path):
    service = _service(_components("tiny-sdxl"), tmp_path)
    request = {"prompt": "a castle", "seed": 5, "steps": STEPS, "cache": {"exact": False, "approximate": False}}
    try:
        plain = service.run(request, JobContext(job_id="plain"))
        deep = service.run(
            {**request, "cache": {**request["cache"], "feature": {"method": "deepcache", "deepcache_interval": 3}}},
            JobContext(job_id="deep"),
        )
        assert deep.cache.feature.method == "deepcache" and deep.cache.feature.partial_unet_passes == STEPS - 2
        service.feature_defaults = {
            "method": "off",
            "calibration_dir": str(tmp_path / "blocks"),
            "calibration_prompts": 1,
        }
        block = service.run(
            {**request, "cache": {**request["cache"], "feature": {"method": "block", "block_delta": 1e-9}}},
            JobContext(job_id="block"),
        )
        assert block.cache.feature.method == "block"
        assert np.array_equal(_pixels(block), _pixels(plain))  # δ ≈ 0 recomputes every block: the plain image
    finally:
        service.close()


@pytest.mark.parametrize(
    "model,feature",
    [
        ("tiny-flux", {"method": "first_block", "first_block_threshold": 0.5}),
        ("tiny-flux", {"method": "taylorseer", "taylorseer_interval": 3}),
        ("tiny-flux", {"method": "taylorseer", "taylorseer_interval": 3, "taylorseer_lite": True}),
        ("tiny-sd3", {"method": "taylorseer", "taylorseer_interval": 3}),
    ],
)
def test_diffusers_transformer_caches_run_and_leave_the_model_plain(tmp_path, model, feature):
    service = _service(_components(model), tmp_path)
    request = {"prompt": "a castle", "seed": 5, "steps": 8, "cache": {"exact": False, "approximate": False}}
    try:
        before = service.run(request, JobContext(job_id="before"))
        cached = service.run({**request, "cache": {**request["cache"], "feature": feature}}, JobContext(job_id="c"))
        report = cached.cache.feature
        assert report.method == feature["method"] and report.partial_unet_passes > 0, report
        assert report.full_unet_passes + report.partial_unet_passes == 8
        after = service.run(request, JobContext(job_id="after"))  # the hooks came off with the request
        assert np.array_equal(_pixels(after), _pixels(before))
        assert not any(
            hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in service.components.unet.modules()
        )
    finally:
        service.close()


def test_sd3_refuses_first_block_cache_and_taylorseer_lite(tmp_path):
    service = _service(_components("tiny-sd3"), tmp_path)
    try:
        with pytest.raises(InvalidRequest, match="first_block"):
            service.validate({"prompt": "x", "cache": {"feature": {"method": "first_block"}}})
        with pytest.raises(InvalidRequest, match="lite mode"):
            service.validate({"prompt": "x", "cache": {"feature": {"method": "taylorseer", "taylorseer_lite": True}}})
    finally:
        service.close()


def test_flux_without_a_guidance_embedding_ignores_guidance():
    import dataclasses

    from diffusers import FluxTransformer2DModel

    from workers.model_loading import BUILTINS

    components = _components("tiny-flux")
    torch.manual_seed(0)
    schnell = FluxTransformer2DModel(**{**BUILTINS["tiny-flux"]["transformer"], "guidance_embeds": False}).eval()
    loop = DenoiseLoop(dataclasses.replace(components, unet=schnell))
    kwargs = dict(prompt="a kite", seed=3, steps=3, width=64, height=64, scheduler="flow_euler")
    low, high = (loop.denoise(guidance_scale=g, **kwargs).latents for g in (1.0, 7.0))
    assert torch.equal(low, high)  # schnell-like: no embedding, and no classifier-free guidance either
    dev = DenoiseLoop(components)
    assert not torch.equal(
        dev.denoise(guidance_scale=1.0, **kwargs).latents, dev.denoise(guidance_scale=7.0, **kwargs).latents
    )


def test_sdxl_builtin_has_sdxl_real_unet_and_takes_its_conditioning():
    """Built on the meta device (shapes only, no memory): the 2.57B-parameter U-Net takes 2,048-wide text states,
    the 1,280-wide pooled projection and six time ids at 128×128 latents, as SDXL does."""
    from workers.families import SDXL, Conditioning
    from workers.model_loading import _build_builtin

    with torch.device("meta"):
        parts = _build_builtin("sdxl")
        rows = {"encoder_hidden_states": (2, 77, 2048), "text_embeds": (2, 1280), "time_ids": (2, 6)}
        cond = Conditioning(SDXL, {k: torch.zeros(shape) for k, shape in rows.items()})
        out = cond.call(parts["unet"], torch.zeros(2, 4, 128, 128), torch.zeros(2))
    assert out.shape == (2, 4, 128, 128)
    assert round(sum(p.numel() for p in parts["unet"].parameters()) / 1e9, 2) == 2.57
    assert parts["text_encoder_2"].config.projection_dim == 1280 and parts["spec"].default_size == 1024
