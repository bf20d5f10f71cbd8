"""Caches inside one request (DeepCache, block caching) and the text-encoder memo, on the tiny built-in."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from workers.feature_cache import (
    BlockCacheUNet,
    DeepCacheUNet,
    attention_blocks,
    block_recompute_steps,
    make_unet_runner,
    nonuniform_full_steps,
    resolve_feature_options,
    uniform_full_steps,
)
from workers.models import load_components
from workers.sampler import DenoiseLoop, PlainUNet
from workers.text_memo import TextEmbeddingMemo

STEPS = 10
JOB = dict(
    prompt="a lighthouse at dusk", negative_prompt="", seed=7, steps=STEPS, guidance_scale=7.5, width=64, height=64
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a small shared CPU, torch's intra-op threads spin against other processes (~20x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny")


@pytest.fixture(scope="module")
def loop(tiny):
    return DenoiseLoop(tiny)


@pytest.fixture(scope="module")
def plain(loop):
    return loop.denoise(**JOB).latents


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


def assert_unet_untouched(unet) -> None:
    for module in unet.modules():
        assert "forward" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks


# --- the factory ----------------------------------------------------------------------------------


def test_default_is_the_plain_unet_and_bit_identical(tiny, loop, plain):
    runner = make_unet_runner(tiny, None, None, steps=STEPS)
    assert isinstance(runner, PlainUNet)
    assert torch.equal(loop.denoise(**JOB, unet_runner=runner).latents, plain)
    assert runner.report() == {"method": "off", "full_unet_passes": STEPS, "partial_unet_passes": 0, "params": {}}


def test_options_resolve_request_over_worker_defaults():
    assert resolve_feature_options({"method": None}, {"method": "block"})["method"] == "block"
    assert resolve_feature_options({"method": "off"}, {"method": "deepcache"})["method"] == "off"
    recommended = resolve_feature_options({"method": "recommended", "deepcache_interval": 5}, {"deepcache_interval": 2})
    assert recommended["method"] == "deepcache" and recommended["deepcache_interval"] == 5
    assert resolve_feature_options(None, {"method": "recommended"})["deepcache_interval"] == 3


def test_a_request_model_picks_its_runner(tiny):
    from scheduler.schema import FeatureCacheOptions

    runner = make_unet_runner(tiny, FeatureCacheOptions(method="recommended"), {"method": "off"}, steps=STEPS)
    assert isinstance(runner, DeepCacheUNet) and runner.params == {"interval": 3, "branch": 0, "schedule": "uniform"}
    assert isinstance(make_unet_runner(tiny, FeatureCacheOptions(), {"method": "off"}, steps=STEPS), PlainUNet)


def test_bad_options_are_refused(tiny):
    with pytest.raises(ValueError):
        make_unet_runner(tiny, {"method": "nonsense"}, None, steps=STEPS)
    with pytest.raises(ValueError, match="deepcache_branch"):
        make_unet_runner(tiny, {"method": "deepcache", "deepcache_branch": 12}, None, steps=STEPS)


# --- DeepCache ------------------------------------------------------------------------------------


def test_deepcache_interval_1_is_bit_identical_to_plain(tiny, loop, plain):
    runner = make_unet_runner(tiny, {"method": "deepcache", "deepcache_interval": 1}, None, steps=STEPS)
    assert torch.equal(loop.denoise(**JOB, unet_runner=runner).latents, plain)
    assert runner.report()["full_unet_passes"] == STEPS


def test_deepcache_interval_3_skips_work_and_stays_close(tiny, loop, plain):
    runner = make_unet_runner(tiny, {"method": "deepcache", "deepcache_interval": 3}, None, steps=STEPS)
    latents = loop.denoise(**JOB, unet_runner=runner).latents
    assert runner.report() == {
        "method": "deepcache",
        "full_unet_passes": 4,  # steps 0, 3, 6, 9
        "partial_unet_passes": 6,
        "params": {"interval": 3, "branch": 0, "schedule": "uniform"},
    }
    assert not torch.equal(latents, plain)
    assert relative_error(latents, plain) < 0.15
    assert_unet_untouched(tiny.unet)


@pytest.mark.parametrize("branch", [0, 1, 2, 3])
def test_partial_pass_right_after_a_full_pass_reproduces_it(tiny, loop, branch):
    runner = DeepCacheUNet(tiny.unet, steps=STEPS, interval=STEPS, branch=branch)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(branch))
    context = loop.conditioning("a red cube", "", 7.5)
    with torch.no_grad():
        full = runner(tiny.unet, sample, torch.tensor(501), 0, context)
        partial = runner(tiny.unet, sample, torch.tensor(501), 1, context)
    assert torch.equal(full, partial)
    assert (runner.full_passes, runner.partial_passes) == (1, 1)


def test_deepcache_resumed_at_step_k_starts_with_a_full_pass(tiny, loop):
    first = loop.denoise(**JOB, capture_at=(4,))
    runner = make_unet_runner(tiny, {"method": "deepcache", "deepcache_interval": 3}, None, steps=STEPS, start_step=4)
    seen = []

    def spy(unet, sample, t, step_index, context):
        full_before = runner.full_passes
        noise = runner(unet, sample, t, step_index, context)
        seen.append((step_index, runner.full_passes > full_before))
        return noise

    resumed = loop.denoise(**JOB, start_latents=first.captured[4], start_step=4, unet_runner=spy)
    assert seen == [(4, True), (5, False), (6, False), (7, True), (8, False), (9, False)]
    assert relative_error(resumed.latents, first.latents) < 0.15


def test_uniform_schedule():
    assert uniform_full_steps(10, 3) == [0, 3, 6, 9]
    assert uniform_full_steps(5, 1) == [0, 1, 2, 3, 4]


def test_nonuniform_schedule_is_denser_around_the_centre():
    full = nonuniform_full_steps(50, 5, center=0.3, power=1.4)
    assert full == sorted(set(full)) and full[0] == 0 and full[-1] == 49
    assert len(full) == len(uniform_full_steps(50, 5)) == 10
    gaps = [b - a for a, b in zip(full, full[1:])]
    nearest = min(range(len(full)), key=lambda i: abs(full[i] - 15))
    assert min(gaps) == min(gaps[max(nearest - 1, 0) : nearest + 1])  # the smallest gaps sit at the centre
    assert gaps[-1] > gaps[nearest] and gaps[0] > gaps[nearest]  # and grow towards both ends
    assert nonuniform_full_steps(10, 1) == list(range(10))
    assert nonuniform_full_steps(3, 5) == [0]


# --- block caching --------------------------------------------------------------------------------


def test_block_schedule_recomputes_when_accumulated_change_passes_delta():
    changes = [0.0, 0.2, 0.2, 0.2, 0.5, 0.05]
    assert block_recompute_steps(changes, 0.3) == [0, 2, 4]
    assert block_recompute_steps(changes, 0.3, start_step=3) == [3, 4]
    assert block_recompute_steps(changes, 10.0) == [0]


def test_block_calibration_is_stored_reused_and_redone_for_a_new_model(tiny, tmp_path):
    defaults = {"calibration_dir": str(tmp_path), "calibration_prompts": 1}
    options = {"method": "block", "block_delta": 0.3}
    runner = make_unet_runner(tiny, options, defaults, steps=STEPS)
    assert isinstance(runner, BlockCacheUNet)
    stored = json.loads((tmp_path / f"{tiny.fingerprint}.json").read_text())
    assert set(stored["steps"][str(STEPS)]["blocks"]) == set(attention_blocks(tiny.unet))

    from workers.feature_cache import calibration_store

    store = calibration_store(str(tmp_path), 1)
    assert store.calibrations_run == 1
    make_unet_runner(tiny, options, defaults, steps=STEPS)
    assert store.calibrations_run == 1  # reused
    make_unet_runner(dataclasses.replace(tiny, fingerprint="0000other0000"), options, defaults, steps=STEPS)
    assert store.calibrations_run == 2  # new fingerprint → recalibrated, in its own file
    assert (tmp_path / "0000other0000.json").exists()


def test_block_cache_reuses_attention_outputs_and_stays_close(tiny, loop, plain, tmp_path):
    defaults = {"calibration_dir": str(tmp_path), "calibration_prompts": 1}
    exact = make_unet_runner(tiny, {"method": "block", "block_delta": 1e-9}, defaults, steps=STEPS)
    assert torch.equal(loop.denoise(**JOB, unet_runner=exact).latents, plain)

    runner = make_unet_runner(tiny, {"method": "block", "block_delta": 0.5}, defaults, steps=STEPS, start_step=0)
    latents = loop.denoise(**JOB, unet_runner=runner).latents
    report = runner.report()
    assert report["method"] == "block" and report["params"] == {"delta": 0.5}
    assert report["partial_unet_passes"] > 0 and report["full_unet_passes"] >= 1
    assert report["full_unet_passes"] + report["partial_unet_passes"] == STEPS
    assert 0 < report["attention_reused"] < 1
    assert relative_error(latents, plain) < 0.15
    assert_unet_untouched(tiny.unet)


def test_block_cache_resumed_at_step_k_computes_every_block_first(tiny, loop, tmp_path):
    first = loop.denoise(**JOB, capture_at=(6,))
    defaults = {"calibration_dir": str(tmp_path), "calibration_prompts": 1}
    runner = make_unet_runner(tiny, {"method": "block", "block_delta": 5.0}, defaults, steps=STEPS, start_step=6)
    loop.denoise(**JOB, start_latents=first.captured[6], start_step=6, unet_runner=runner)
    assert runner.report()["full_unet_passes"] == 1 and runner.report()["partial_unet_passes"] == 3


# --- text-encoder memo ----------------------------------------------------------------------------


def test_text_memo_is_a_bounded_lru_with_counters():
    memo = TextEmbeddingMemo(max_entries=2)
    memo.put("m1", "a", torch.ones(2))
    memo.put("m1", "b", torch.full((2,), 2.0))
    assert memo.get("m1", "a") is not None  # "a" is now the most recent
    memo.put("m1", "c", torch.full((2,), 3.0))  # evicts "b"
    assert memo.get("m1", "b") is None
    assert memo.get("m2", "a") is None  # another model version
    assert len(memo) == 2
    assert memo.stats() == {"entries": 2, "max_entries": 2, "bytes": 16, "max_bytes": None, "hits": 1, "misses": 2}
    memo.clear()
    assert len(memo) == 0 and memo.get("m1", "a") is None
    assert (memo.hits, memo.misses) == (0, 1)


def test_text_memo_is_bounded_in_bytes(tiny):
    """A byte bound drops the least recently used entries (Flux's T5 states are ~4 MB each)."""
    memo = TextEmbeddingMemo(max_entries=1024, max_bytes=1000)
    for i in range(5):
        memo.put("m", f"p{i}", torch.zeros(100))  # 400 bytes each
    assert len(memo) == 2 and memo.bytes == 800 and memo.get("m", "p4") is not None
    assert memo.get("m", "p2") is None
    memo.put("m", "huge", torch.zeros(1000))  # larger than the whole memo: not kept, nothing dropped for it
    assert len(memo) == 2 and memo.get("m", "huge") is None
    memo.put("m", "p4", torch.zeros(10))  # a replaced entry gives its bytes back
    assert memo.bytes == 440
    conditioning = DenoiseLoop(tiny).encode_text("a harbour")  # a family's Conditioning counts its tensors
    sized = TextEmbeddingMemo(max_bytes=10**9)
    sized.put("m", "a harbour", conditioning)
    assert sized.bytes == sum(t.nelement() * t.element_size() for t in conditioning.tensors.values()) > 0
    with pytest.raises(ValueError):
        TextEmbeddingMemo(max_bytes=0)


def test_text_memo_hands_out_copies():
    memo = TextEmbeddingMemo()
    original = torch.zeros(3)
    memo.put("m", "p", original)
    original += 1
    got = memo.get("m", "p")
    got += 5
    assert torch.equal(memo.get("m", "p"), torch.zeros(3))


def test_loop_with_memo_encodes_each_prompt_once_and_gives_the_same_image(tiny, plain):
    memo = TextEmbeddingMemo()
    loop = DenoiseLoop(tiny, text_memo=memo)
    assert torch.equal(loop.denoise(**JOB).latents, plain)
    assert (memo.hits, memo.misses) == (0, 2)  # prompt and negative prompt
    assert torch.equal(loop.denoise(**JOB).latents, plain)
    assert (memo.hits, memo.misses) == (2, 2)


def test_request_text_memo_false_bypasses_the_memo(tiny, tmp_path):
    from workers.artifacts import ArtifactStore
    from workers.service import Device, DevicePool, GenerationService, JobContext

    memo = TextEmbeddingMemo()
    service = GenerationService(
        "tiny", DevicePool([Device("cpu", DenoiseLoop(tiny, text_memo=memo))]), ArtifactStore(str(tmp_path))
    )
    request = {"prompt": "a lighthouse at dusk", "seed": 7, "steps": 2, "guidance_scale": 7.5}
    try:
        fresh = service.run({**request, "cache": {"feature": {"text_memo": False}}}, JobContext(job_id="fresh"))
        assert (len(memo), memo.hits, memo.misses) == (0, 0, 0)  # neither read nor filled
        memoised = service.run(request, JobContext(job_id="memoised"))
        assert (len(memo), memo.hits, memo.misses) == (2, 0, 2)  # prompt and negative prompt
        assert memoised.seed == fresh.seed == 7
    finally:
        service.close()
