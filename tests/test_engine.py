"""The node engine (workers/engine.py) through the generation service, in process: requests at different
steps share one denoiser call, lookups never wait for a device, and each request keeps its own progress,
cancel, time limit and result inside a batch."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cache import CacheSettings, LatentCache
from scheduler.errors import JobCancelled, JobTimeout
from workers.artifacts import ArtifactStore
from workers.denoise_loop import DenoiseLoop
from workers.model_loading import load_components
from workers.service import Device, DevicePool, GenerationService, JobContext

STEPS = 10


class SpyUNet:
    """The tiny U-Net, recording each call's batch and timesteps; ``gate`` holds calls back until set."""

    def __init__(self, unet):
        self.unet, self.config = unet, unet.config
        self.calls: list[tuple[int, list[float]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.delay = 0.0  # seconds each call takes at least (a floor under the tiny model's speed)
        self.before_call = None  # () -> None, called inside each call (the call is in flight)

    def __getattr__(self, name):  # the U-Net's blocks, for feature caches
        return getattr(self.unet, name)

    def __call__(self, sample, t, encoder_hidden_states=None):
        self.gate.wait(60)
        if self.delay:
            time.sleep(self.delay)
        if self.before_call is not None:
            self.before_call()
        self.calls.append((sample.shape[0], torch.as_tensor(t).reshape(-1).float().tolist()))
        return self.unet(sample, t, encoder_hidden_states=encoder_hidden_states)


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny")


def _service(tiny, tmp_path, max_batch=8, cache=None, devices=1):
    spy = SpyUNet(tiny.unet)
    components = dataclasses.replace(tiny, unet=spy)
    pool = DevicePool([Device(f"cpu{i}", DenoiseLoop(components)) for i in range(devices)])
    service = GenerationService("tiny", pool, ArtifactStore(str(tmp_path / "art")), cache=cache, max_batch=max_batch)
    return service, spy


def _pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result.image_uri.removeprefix("file://")).convert("RGB")).astype(np.int16)


def _together(service, spy, jobs: list[tuple[dict, JobContext]], ended: list | None = None) -> list:
    """Run jobs so that all but the first join the engine while its first call is held: they then share calls.
    ``ended``, if given, receives the time.time() at which each job returned or raised."""
    results: list = [None] * len(jobs)
    ended = [None] * len(jobs) if ended is None else ended
    ended.extend([None] * (len(jobs) - len(ended)))
    spy.gate.clear()

    def run(i):
        try:
            results[i] = service.run(*jobs[i])
        except Exception as exc:
            results[i] = exc
        ended[i] = time.time()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    threads[0].start()
    deadline = time.monotonic() + 60
    while not service.engine.schedulers[0].active:  # the first job is on the device, its call held
        assert not isinstance(results[0], Exception), results[0]
        assert time.monotonic() < deadline, "the first job never reached the device"
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    while service.engine.waiting.qsize() < len(jobs) - 1:
        assert not any(isinstance(r, Exception) for r in results), results
        assert time.monotonic() < deadline, "the jobs never reached the engine"
        time.sleep(0.01)
    spy.gate.set()
    for t in threads:
        t.join(120)
    return results


NOCACHE = {"exact": False, "approximate": False, "write": False}


def test_fresh_and_resumed_requests_share_a_call_with_their_own_timesteps(tiny, tmp_path):
    settings = CacheSettings(  # a generous lookup time box: the resume must not fall back to fresh
        backend="edge",
        path=str(tmp_path / "q"),
        state_fractions=[0.4],
        skip_table=[(0.0, 0.4)],
        lookup_timeout_ms=30_000,
    )
    service, spy = _service(tiny, tmp_path, cache=LatentCache.open(settings))
    try:
        first = {"prompt": "a red fox in the snow", "seed": 3, "steps": STEPS, "guidance_scale": 4.0}
        full = service.run(first, JobContext(job_id="full"))
        service.drain_writebacks()
        resumed_req = {**first, "cache": {"exact": False}}
        fresh_req = {
            "prompt": "a blue whale",
            "negative_prompt": "blurry",
            "seed": 4,
            "steps": STEPS,
            "guidance_scale": 7.0,
            "scheduler": "euler",
            "cache": {"approximate": False, "write": False},
        }
        spy.calls.clear()
        resumed, fresh = _together(
            service, spy, [(resumed_req, JobContext(job_id="resumed")), (fresh_req, JobContext(job_id="fresh"))]
        )
        assert resumed.cache.hit == "approximate" and resumed.cache.k == 4 and resumed.cache.steps_computed == 6
        assert fresh.cache.hit == "miss" and fresh.cache.steps_computed == STEPS
        shared = [ts for rows, ts in spy.calls if rows == 4]  # 2 requests x 2 rows (guidance)
        assert shared and all(len(set(ts)) == 2 for ts in shared), spy.calls  # one call, two different steps
        assert len(spy.calls) < 6 + STEPS  # fewer calls than the two requests alone
        # Batching only changes the summation order: within one 8-bit level of the request alone.
        assert np.abs(_pixels(resumed) - _pixels(full)).max() <= 1
        alone = service.run({**fresh_req, "deterministic": True}, JobContext(job_id="fresh-alone"))
        assert np.abs(_pixels(fresh) - _pixels(alone)).max() <= 1
    finally:
        service.close()


def test_the_approximate_lookup_overlaps_the_first_steps_and_its_answer_alone_decides_the_image(tiny, tmp_path):
    """A request goes to its device before its embedding and approximate lookup finish; the device runs it
    up to the earliest resume step (K = 4 here) and holds it there until the lookup answers. A hit then
    swaps in the state resumed at K (the 4 steps run meanwhile are discarded and reported), a miss runs on:
    the same images as when the lookup answers before the first step."""
    settings = CacheSettings(  # a time box longer than the slow lookup: this checks the overlap, not the box
        backend="edge",
        path=str(tmp_path / "q"),
        state_fractions=[0.4],
        skip_table=[(0.0, 0.4)],
        lookup_timeout_ms=30_000,
    )
    service, spy = _service(tiny, tmp_path, cache=LatentCache.open(settings))
    try:
        first = {"prompt": "a red fox in the snow", "seed": 3, "steps": STEPS, "guidance_scale": 4.0}
        service.run(first, JobContext(job_id="first"))
        service.drain_writebacks()
        near = {**first, "prompt": "a red fox in deep snow", "deterministic": True, "cache": {"exact": False}}
        # No neighbour among its tenant's entries: a miss (writing nothing, so it stays one).
        alone = {**near, "tenant": "nobody-else", "cache": {"exact": False, "write": False}}
        quick = [service.run(r, JobContext(job_id=f"quick-{i}")) for i, r in enumerate((near, alone))]
        assert quick[0].cache.hit == "approximate" and quick[0].cache.steps_computed == STEPS - 4
        assert quick[1].cache.hit == "miss"

        embed_many = service.cache.embedder.embed_many
        calls_when_answered = []

        def slow_embed(texts):  # the lookup batch's one embedder call
            time.sleep(1.0)  # longer than 4 steps of the tiny model
            calls_when_answered.append(len(spy.calls))
            return embed_many(texts)

        service.cache.embedder.embed_many = slow_embed
        for i, r in enumerate((near, alone)):
            spy.calls.clear()
            slow = service.run({**r, "seed": r["seed"]}, JobContext(job_id=f"slow-{i}"))
            assert calls_when_answered[-1] == 4, calls_when_answered  # ran up to K during the lookup, then held
            assert slow.cache.hit == quick[i].cache.hit and slow.cache.steps_computed == quick[i].cache.steps_computed
            assert np.array_equal(_pixels(slow), _pixels(quick[i])), i  # the lookup's answer decides, not timing
        assert slow.cache.steps_discarded == 0 and len(spy.calls) == STEPS  # the miss wasted nothing
        spy.calls.clear()
        slow_hit = service.run(near, JobContext(job_id="slow-hit-again"))
        assert slow_hit.cache.hit == "approximate" and slow_hit.cache.k == 4
        assert slow_hit.cache.steps_discarded == 4 and slow_hit.cache.steps_computed == STEPS - 4
        assert len(spy.calls) == 4 + STEPS - 4
    finally:
        service.close()


def test_deterministic_request_runs_alone_and_matches_the_plain_loop(tiny, tmp_path):
    service, spy = _service(tiny, tmp_path)
    try:
        request = {"prompt": "a lighthouse", "seed": 5, "steps": STEPS, "guidance_scale": 5.0, "cache": NOCACHE}
        other = {**request, "prompt": "a windmill", "seed": 6}
        spy.calls.clear()
        solo, _ = _together(
            service,
            spy,
            [({**request, "deterministic": True}, JobContext(job_id="d")), (other, JobContext(job_id="o"))],
        )
        assert all(rows == 2 for rows, _ in spy.calls), spy.calls  # never shared a call
        loop = DenoiseLoop(tiny)
        latents = loop.denoise(prompt="a lighthouse", seed=5, steps=STEPS, guidance_scale=5.0, width=64, height=64)
        assert np.array_equal(_pixels(solo), np.asarray(loop.decode(latents.latents)).astype(np.int16))
    finally:
        service.close()


def test_max_batch_and_sizes_make_the_groups(tiny, tmp_path):
    service, spy = _service(tiny, tmp_path, max_batch=2)
    try:
        base = {"steps": STEPS, "guidance_scale": 1.0, "cache": NOCACHE}  # no guidance: one row per request
        jobs = [({**base, "prompt": f"a cat {i}", "seed": i}, JobContext(job_id=f"s{i}")) for i in range(3)]
        jobs.append(
            ({**base, "prompt": "a wide cat", "seed": 9, "width": 128, "height": 64}, JobContext(job_id="wide"))
        )
        results = _together(service, spy, jobs)
        assert all(not isinstance(r, Exception) for r in results), results
        assert max(rows for rows, _ in spy.calls) == 2 and any(rows == 2 for rows, _ in spy.calls)
        assert results[3].width == 128 and results[3].cache.steps_computed == STEPS
    finally:
        service.close()


def test_the_engine_records_which_jobs_share_the_call_in_flight(tiny, tmp_path):
    """DeviceStats.last_call names the jobs of the call being made (the fault suite reads it at a kill)."""
    service, spy = _service(tiny, tmp_path)
    seen: list[tuple[str, ...]] = []
    try:
        spy.before_call = lambda: seen.append(service.engine.stats()["cpu0"].last_call)
        base = {"steps": STEPS, "guidance_scale": 1.0, "cache": NOCACHE}  # one row per request
        jobs = [({**base, "prompt": f"a dog {i}", "seed": i}, JobContext(job_id=f"j{i}")) for i in range(3)]
        results = _together(service, spy, jobs)
        assert all(not isinstance(r, Exception) for r in results), results
        assert [len(jobs) for jobs in seen] == [rows for rows, _ in spy.calls]  # one job id per sample
        assert {"j0", "j1", "j2"} in [set(jobs) for jobs in seen]
    finally:
        service.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_the_engine_is_quiet_only_while_every_device_waits_in_its_call(tiny, tmp_path, devices):
    """NodeEngine.quiet_for (what the cache's writer waits for): inside a call expected to last longer than the
    margin (the last call's length), or idle; never at a call's end, before a first call's length is known,
    or between calls."""
    service, spy = _service(tiny, tmp_path, devices=devices)
    seen: list[tuple[bool, bool]] = []
    try:
        assert service.engine.quiet_for(60.0)  # no request anywhere: idle

        def probe():  # at the start of each call, which then lasts at least 50 ms; a margin of 60 s is never met
            seen.append((service.engine.quiet_for(0.0), service.engine.quiet_for(60.0)))
            time.sleep(0.05)

        spy.before_call = probe
        base = {"steps": STEPS, "guidance_scale": 1.0, "cache": NOCACHE}
        result = service.run({**base, "prompt": "a dog", "seed": 1}, JobContext(job_id="q"))
        assert result.cache.steps_computed == STEPS
        assert len(seen) == STEPS
        assert seen[0] == (False, False)  # the device's first call: how long it lasts is not known yet
        assert all(quiet_now for quiet_now, _ in seen[1:])  # at a call's start: the last call's 50 ms are ahead
        assert not any(quiet_long for _, quiet_long in seen)
        assert service.engine.quiet_for(60.0)  # done: idle again
        assert service.engine.wait_quiet(60.0, 5.0)  # idle: at once

        waited: list = []
        spy.before_call = lambda: time.sleep(0.05)
        job = threading.Thread(
            target=service.run, args=({**base, "prompt": "a cat", "seed": 2}, JobContext(job_id="w"))
        )
        job.start()
        while not service.engine.schedulers[0].active and not service.engine.schedulers[-1].active:
            time.sleep(0.005)
        t0 = time.monotonic()
        waited.append(service.engine.wait_quiet(60.0, 0.2))  # never that long: gives up at its timeout
        waited.append(time.monotonic() - t0)
        waited.append(service.engine.wait_quiet(0.001, 10.0))  # the next call's start
        job.join(60)
        assert waited[0] is False and 0.2 <= waited[1] < 5.0 and waited[2] is True
    finally:
        service.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_the_writer_waits_for_the_devices_only_where_no_device_computes_on_the_host(tiny, tmp_path, devices):
    """The writer's wait (``when_quiet``) is for devices whose calls leave the host's cores and lock free
    (accelerators, ``sim``); a node with a ``cpu`` device, alone or beside a ``sim`` one, stores at once."""
    from workers.sim import load_sim_components

    sim = [Device(f"sim:{i}", DenoiseLoop(load_sim_components(latent_size=8))) for i in range(devices)]
    for pool, host in (
        (sim, False),
        ([Device(f"cpu{i}", DenoiseLoop(tiny)) for i in range(devices)], True),
        (sim[:-1] + [Device("cpu", DenoiseLoop(tiny))], True),
    ):
        service = GenerationService("tiny", DevicePool(pool), ArtifactStore(str(tmp_path / "art")))
        try:
            assert service.host_computes is host
            assert (service.cache_path.when_quiet is None) is host
            if not host:  # the engine's own wait: at once, on a node with nothing to run
                assert service.engine.quiet_for(60.0) and service.cache_path.when_quiet(60.0, 5.0)
        finally:
            service.close()


def test_cancel_and_time_limit_stop_one_request_of_a_batch(tiny, tmp_path):
    """The cancel, raised while the request's 4th call is in flight, stops it before its 5th step; the time
    limit stops its request at the first step after the deadline; their batch-mate finishes whole."""
    service, spy = _service(tiny, tmp_path)
    spy.delay = 0.01  # 200 calls take at least 2 s, so the 1 s time limit falls inside the long request
    try:
        cancel = threading.Event()
        seen = []

        # "c" joins the first call and every call after it until it stops: its step is the number of calls.
        # The 4th call raises the flag and, in flight, waits for c's job thread to see it (that thread wakes
        # at least every 0.1 s): else the device may begin the 5th call first on a fast or busy machine.
        def before_call():
            if len(spy.calls) == 3:
                cancel.set()
                until = time.monotonic() + 5
                while not any(r.job_id == "c" and r.stop for r in service.engine.schedulers[0].active):
                    assert time.monotonic() < until, "the cancel flag was not seen"
                    time.sleep(0.001)

        spy.before_call = before_call
        long = {"steps": 200, "guidance_scale": 1.0, "cache": NOCACHE}
        deadline = time.time() + 1.0
        jobs = [
            (
                {**long, "prompt": "cancel me", "seed": 1},
                JobContext("c", on_progress=lambda step, total: seen.append(step), is_cancelled=cancel.is_set),
            ),
            ({**long, "prompt": "too slow", "seed": 2}, JobContext("t", deadline=deadline)),
            ({"prompt": "finish me", "seed": 3, "steps": STEPS, "cache": NOCACHE}, JobContext("f")),
        ]
        ended: list = []
        cancelled, timed_out, finished = _together(service, spy, jobs, ended)
        assert isinstance(cancelled, JobCancelled) and isinstance(timed_out, JobTimeout), (cancelled, timed_out)
        assert cancelled.details == {"step": 5, "steps": 200}  # 4 steps done; the 5th never ran
        assert seen and max(seen) <= 4  # no step of "c" after the one in flight at the cancel
        # the time limit: not before the deadline, and within a few steps of it (the rest would take >= 1 s)
        assert deadline <= ended[1] < deadline + 0.5, ended[1] - deadline
        assert 5 < timed_out.details["step"] < 200
        assert finished.cache.steps_computed == STEPS
    finally:
        service.close()


def test_an_exact_hit_is_answered_while_the_only_device_is_busy(tiny, tmp_path):
    """Lookups run before a request takes a device: an exact hit never waits for one, nor runs on one."""
    settings = CacheSettings(backend="edge", path=str(tmp_path / "q"))
    service, spy = _service(tiny, tmp_path, cache=LatentCache.open(settings))
    try:
        request = {"prompt": "a tiny house on a hill", "seed": 2, "steps": STEPS}
        service.run(request, JobContext(job_id="a"))
        service.drain_writebacks()
        spy.gate.clear()  # the device is now stuck inside a call of another job
        busy = threading.Thread(
            target=service.run, args=({"prompt": "long", "steps": 50, "cache": NOCACHE}, JobContext(job_id="long"))
        )
        busy.start()
        while not service.engine.schedulers[0].active:
            time.sleep(0.01)
        calls = len(spy.calls)
        hit = service.run(request, JobContext(job_id="b"))
        assert hit.cache.hit == "exact" and hit.device == "" and hit.timings.denoise_s == 0
        assert len(spy.calls) == calls
        spy.gate.set()
        busy.join(60)
    finally:
        spy.gate.set()
        service.close()


def test_deepcache_requests_at_different_steps_batch_and_keep_their_own_features(tiny, tmp_path):
    service, spy = _service(tiny, tmp_path)
    try:
        feature = {"method": "deepcache", "deepcache_interval": 3}
        base = {"steps": STEPS, "guidance_scale": 5.0, "cache": {**NOCACHE, "feature": feature}}
        reqs = [{**base, "prompt": f"a castle {i}", "seed": i} for i in range(3)]
        together = _together(service, spy, [(r, JobContext(job_id=f"dc{i}")) for i, r in enumerate(reqs)])
        stats = service.engine.stats()["cpu0"]
        assert stats.mean_batch > 1.5, stats  # full and partial passes were shared
        for i, (r, batched) in enumerate(zip(reqs, together)):
            assert batched.cache.feature.full_unet_passes == 4 and batched.cache.feature.partial_unet_passes == 6
            alone = service.run({**r, "deterministic": True}, JobContext(job_id=f"dc-alone{i}"))
            assert alone.cache.feature.full_unet_passes == 4
            assert np.abs(_pixels(batched) - _pixels(alone)).max() <= 1, i
    finally:
        service.close()


def test_sim_cost_model_is_fixed_plus_per_sample():
    from workers.sim import SleepingUNet

    unet = SleepingUNet(None, 8)
    assert unet.cost_s(2) == pytest.approx(0.0532) and unet.cost_s(8) == pytest.approx(
        0.1636
    )  # SD v1-4, 1 and 4 images
    assert SleepingUNet(50.0, 8).cost_s(8) == pytest.approx(0.05)  # the flat step time when one is set
    start = time.perf_counter()
    SleepingUNet(None, 8, call_ms=20, sample_ms=30)(torch.zeros(3, 4, 8, 8), 1)
    assert time.perf_counter() - start >= 0.11


def test_clip_embedding_and_conditioning_are_one_text_encoder_pass(tiny):
    from workers.node_cache import clip_embedder
    from workers.text_memo import TextEmbeddingMemo

    memo = TextEmbeddingMemo(8)
    clip_embedder(tiny, memo)("a harbour at night")
    passes = []
    handle = tiny.text_encoder.register_forward_hook(lambda *_: passes.append(1))
    try:
        conditioning = DenoiseLoop(tiny, text_memo=memo).encode_text("a harbour at night")
        assert passes == []  # the lookup's pass already gave the conditioning
        assert conditioning.equal(DenoiseLoop(tiny).encode_text("a harbour at night")) and passes == [1]
    finally:
        handle.remove()
