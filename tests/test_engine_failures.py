"""The node engine when things fail (issue 21, items 3-5), in process on `sim` devices, with one device and two:
a request that fails alone fails alone and its batch-mates complete once with their own images; an out-of-memory
batch is halved and the device's limit lowered, then raised again; a failure of the device is DeviceFailed (the
task retries it); the device thread waits for no progress sink; a stalled device is found by the watchdog; the
busy ratio and the GPU seconds saved come from the engine's own call times."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from scheduler.errors import DenoiserFailed, DeviceFailed
from workers import metrics
from workers.artifacts import ArtifactStore
from workers.denoise_loop import DenoiseLoop
from workers.engine import EngineRequest
from workers.service import Device, DevicePool, GenerationService, JobContext
from workers.sim import load_sim_components

STEPS = 6
NOCACHE = {"exact": False, "approximate": False, "write": False}
POISON = "a poisoned request"


class Gate:
    """Wraps a device's denoiser: records each call's samples and whether it raised; ``gate`` holds calls."""

    def __init__(self, unet):
        self.unet, self.config = unet, unet.config
        self.gate = threading.Event()
        self.gate.set()
        self.held = 0  # calls waiting at the gate
        self.calls: list[tuple[int, bool]] = []
        self.times: list[float] = []

    def __getattr__(self, name):
        return getattr(self.unet, name)

    def __call__(self, sample, t, encoder_hidden_states=None, **kwargs):
        self.held += 1
        self.gate.wait(60)
        self.held -= 1
        self.times.append(time.monotonic())
        try:
            out = self.unet(sample, t, encoder_hidden_states=encoder_hidden_states, **kwargs)
        except Exception:
            self.calls.append((sample.shape[0], True))
            raise
        self.calls.append((sample.shape[0], False))
        return out


def _service(tmp_path, devices: int, max_batch: int = 8, engine: dict | None = None, **sim):
    pool = []
    for i in range(devices):
        c = load_sim_components(latent_size=8, **{"call_ms": 2.0, "sample_ms": 1.0, **sim})
        c.unet = Gate(c.unet)
        pool.append(Device(f"sim:{i}", DenoiseLoop(c)))
    service = GenerationService(
        "sim",
        DevicePool(pool),
        ArtifactStore(str(tmp_path / "art")),
        max_batch=max_batch,
        engine_options=engine or {},
    )
    return service, [d.loop.c.unet for d in pool]


def _pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result.image_uri.removeprefix("file://")).convert("RGB")).astype(np.int16)


def _one_job_a_device(gates, threads, results, deadline) -> None:
    """Start ``threads`` one at a time, each after the one before holds a device inside a call (its gate
    closed): started together, one device could take them all while another stayed idle."""
    for k, t in enumerate(threads):
        t.start()
        while sum(1 for g in gates if g.held) < k + 1:
            assert time.monotonic() < deadline, "the devices never took the first jobs"
            assert not any(isinstance(r, Exception) for r in results), results
            time.sleep(0.01)


def _together(service, gates, jobs):
    """Hold the devices inside their first calls until every job is on a device or queued behind one, then let
    all go: the jobs queued share the next calls. The first jobs start one at a time, each after the one before
    holds its device, so that every device is inside a call before the rest arrive (started together, one
    device could take them all while the other, idle, took the last one alone)."""
    results: list = [None] * len(jobs)
    for g in gates:
        g.gate.clear()

    def run(i):
        try:
            results[i] = service.run(*jobs[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    try:
        engine, deadline = service.engine, time.monotonic() + 60

        def arrived(n):  # n jobs on a device or queued, and a device held inside a call
            while sum(len(s.active) for s in engine.schedulers) + engine.waiting.qsize() < n or not any(
                g.held for g in gates
            ):
                assert time.monotonic() < deadline, "the jobs never reached the engine"
                assert not any(isinstance(r, Exception) for r in results), results
                time.sleep(0.01)

        first = min(len(gates), len(jobs) - 1)
        _one_job_a_device(gates, threads[:first], results, deadline)
        for t in threads[first:-1]:
            t.start()
        arrived(len(jobs) - 1)
        threads[-1].start()  # the last job queues behind the others, never first on a device
        arrived(len(jobs))
    finally:
        for g in gates:
            g.gate.set()
    for t in threads:
        t.join(120)
    return results


class _Start:
    """A request's start for the engine, bound by the device thread that takes it (as DeviceStart is)."""

    def __init__(self, prompt: str, seed: int):
        self.prompt, self.seed = prompt, seed

    def bind(self, loop):
        trajectory = loop.trajectory(
            prompt=self.prompt, seed=self.seed, steps=STEPS, guidance_scale=1.0, width=64, height=64
        )
        return trajectory, None


def _alone(service, payload, job_id):
    return service.run({**payload, "deterministic": True}, JobContext(job_id=job_id))


@pytest.mark.parametrize("devices", [1, 2])
def test_a_request_that_fails_alone_fails_alone_and_its_batch_mates_complete_once(tmp_path, devices):
    service, gates = _service(tmp_path, devices, poison_prompt=POISON)
    try:
        base = {"steps": STEPS, "cache": NOCACHE}
        payloads = [{**base, "prompt": f"a quiet harbour {i}", "seed": i} for i in range(devices + 2)]
        payloads.append({**base, "prompt": POISON, "seed": 99})  # queued behind the others
        jobs = [(p, JobContext(job_id=f"j{i}")) for i, p in enumerate(payloads)]
        results = _together(service, gates, jobs)
        poisoned = results[-1]
        assert isinstance(poisoned, DenoiserFailed), poisoned
        assert "alone" in str(poisoned) and poisoned.details["error"] == "ValueError"
        calls = [c for g in gates for c in g.calls]
        assert any(raised and rows > 2 for rows, raised in calls), calls  # it failed inside a batch first
        others = results[:-1]
        for i, r in enumerate(others):
            assert not isinstance(r, Exception), r
            assert r.cache.steps_computed == STEPS  # each step once: the failed call advanced nobody
            p = [p for p in payloads if p["prompt"] != POISON][i]
            assert np.abs(_pixels(r) - _pixels(_alone(service, p, f"alone{i}"))).max() <= 1
        assert sum(s.stats.failed_calls for s in service.engine.schedulers) >= 2  # the batch, then it alone
        with pytest.raises(DenoiserFailed):  # alone from the start: the same typed error
            service.run({**base, "prompt": POISON, "seed": 1}, JobContext(job_id="poison-alone"))
    finally:
        service.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_out_of_memory_halves_the_batch_lowers_the_limit_and_raises_it_again(tmp_path, devices):
    # 4 samples fit (2 requests with guidance), 6 do not
    service, gates = _service(tmp_path, devices, oom_above=4, engine={"oom_recover_s": 1.0})
    try:
        payloads = [
            {"steps": STEPS, "cache": NOCACHE, "prompt": f"a red kite {i}", "seed": i} for i in range(devices + 4)
        ]
        results = _together(service, gates, [(p, JobContext(job_id=f"m{i}")) for i, p in enumerate(payloads)])
        assert all(not isinstance(r, Exception) for r in results), results
        stats = [s.stats for s in service.engine.schedulers]
        assert sum(s.oom_events for s in stats) >= 1, stats
        assert min(s.batch_limit for s in stats) <= 2  # lowered to half the failed batch
        calls = [c for g in gates for c in g.calls]
        assert all(rows <= 4 for rows, raised in calls if not raised), calls
        for i, (p, r) in enumerate(zip(payloads, results)):
            assert r.cache.steps_computed == STEPS
            assert np.abs(_pixels(r) - _pixels(_alone(service, p, f"alone{i}"))).max() <= 1
        deadline = time.monotonic() + 30  # idle for oom_recover_s per step: the limits climb back to max_batch
        while any(s.limit < 8 for s in service.engine.schedulers):
            assert time.monotonic() < deadline, [s.limit for s in service.engine.schedulers]
            time.sleep(0.2)
    finally:
        service.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_a_failure_of_the_device_is_device_failed_not_the_requests_own(tmp_path, devices):
    # out of memory on one request alone (2 samples with guidance > 1): the device's failure, to be retried
    service, gates = _service(tmp_path, devices, oom_above=1)
    try:
        with pytest.raises(DeviceFailed) as err:
            service.run({"prompt": "a lone kite", "steps": STEPS, "cache": NOCACHE}, JobContext(job_id="alone"))
        assert err.value.details["error"] == "OutOfMemoryError"
        # every request of a batch failing alone: the device fails everything
        for g in gates:
            g.unet.oom_above = 0
        broken = RuntimeError("device lost")

        def fail(*args, **kwargs):
            raise broken

        for g in gates:
            g.unet.forward = fail
        payloads = [{"prompt": f"a kite {i}", "steps": STEPS, "cache": NOCACHE} for i in range(devices + 2)]
        results = _together(service, gates, [(p, JobContext(job_id=f"b{i}")) for i, p in enumerate(payloads)])
        # a batch that fails whole and in every half, or a second request failing alone in a row: the device's
        # failure; only the first request a device runs alone can look like its own failure
        assert all(isinstance(r, (DeviceFailed, DenoiserFailed)) for r in results), results
        assert sum(isinstance(r, DenoiserFailed) for r in results) <= devices, results
        assert sum(isinstance(r, DeviceFailed) for r in results) >= 2, results
    finally:
        service.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_a_progress_sink_that_blocks_does_not_slow_the_device(tmp_path, devices):
    """Progress is written by the publisher thread: a sink that takes 0.5 s per call (Redis restarting) costs
    the device nothing; the newest step replaces the pending one."""
    service, gates = _service(tmp_path, devices, step_ms=5.0)
    calls = []

    def slow_sink(step, total):
        calls.append(step)
        time.sleep(0.5)

    try:
        steps = 40
        jobs = [
            (
                {"prompt": f"a slow sink {i}", "steps": steps, "cache": NOCACHE},
                JobContext(job_id=f"p{i}", on_progress=slow_sink),
            )
            for i in range(devices)
        ]
        start = time.monotonic()
        results = [None] * devices
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, service.run(*jobs[i]))) for i in range(devices)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - start
        assert all(r is not None and r.cache.steps_computed == steps for r in results), results
        times = [t for g in gates for t in g.times]
        # 40 steps of 5 ms each: under the old in-thread call they would take 40 x 0.5 s = 20 s
        assert max(times) - min(times) < 2.0, max(times) - min(times)
        assert elapsed < 5.0 and len(calls) < steps, (elapsed, len(calls))
        assert service.engine.publisher.replaced > 0  # steps that arrived while the sink was busy coalesced
    finally:
        service.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_a_stalled_device_is_found_and_its_requests_released(tmp_path, devices):
    service, gates = _service(tmp_path, devices, engine={"stall_s": 0.5})
    try:
        for g in gates:  # device 0 hangs inside its first call; the others are held until each device has a job
            g.gate.clear()
        results: list = [None] * (devices + 1)

        def run(i):
            try:
                results[i] = service.run(
                    {"prompt": f"a stall {i}", "steps": STEPS, "cache": NOCACHE}, JobContext(job_id=f"s{i}")
                )
            except Exception as exc:
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(devices + 1)]
        start = time.monotonic()
        _one_job_a_device(gates, threads[:devices], results, start + 10)
        for g in gates[1:]:
            g.gate.set()
        threads[-1].start()
        for t in threads:
            t.join(30)
        assert time.monotonic() - start < 10
        assert not service.engine.healthy and "stalled" in service.engine.unhealthy_reason
        assert any(isinstance(r, DeviceFailed) for r in results), results  # the hung one, at least
        assert all(isinstance(r, DeviceFailed) or r.cache.steps_computed == STEPS for r in results), results
        with pytest.raises(DeviceFailed):  # it takes no more work
            service.run({"prompt": "after", "steps": STEPS, "cache": NOCACHE}, JobContext(job_id="after"))
        scraped = {f.name: f.samples for f in metrics.NodeCollector(service, None).engine_metrics()}
        assert scraped["reprise_node_healthy"][0].value == 0.0
    finally:
        gates[0].gate.set()
        service.close()


def test_wait_has_a_deadline(tmp_path):
    service, gates = _service(tmp_path, 1)
    try:
        gates[0].gate.clear()
        request = EngineRequest(_Start("a wait", 1), group=("shared",), job_id="w")
        service.engine.submit(request)
        start = time.monotonic()
        with pytest.raises(DeviceFailed, match="deadline"):
            service.engine.wait(request, deadline=time.time() + 0.5)
        assert 0.4 < time.monotonic() - start < 3 and request.stop == "deadline"
    finally:
        gates[0].gate.set()
        service.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_a_request_held_for_its_lookup_leaves_its_batch_slot_to_another(tmp_path, devices):
    """At a full node a request held at its resume step (its lookup not answered) would leave a slot of its
    device's calls empty; the device takes another request meanwhile, so its calls stay full (issue 26)."""
    service, gates = _service(tmp_path, devices, max_batch=2, step_ms=10.0)
    try:
        engine = service.engine
        held = [
            EngineRequest(_Start(f"held {i}", i), group=("shared",), job_id=f"h{i}", lookup_pending=True, hold_at=1)
            for i in range(devices)
        ]
        for r in held:
            engine.submit(r)
        deadline = time.monotonic() + 30
        while not all(r.trajectory is not None and r.held for r in held):
            assert time.monotonic() < deadline, "the requests never reached their hold"
            time.sleep(0.01)
        holding = [i for i, s in enumerate(engine.schedulers) if any(r in s.active for r in held)]
        marks = [len(g.calls) for g in gates]
        plain = [
            EngineRequest(_Start(f"plain {i}", 10 + i), group=("shared",), job_id=f"p{i}") for i in range(4 * devices)
        ]
        for r in plain:
            engine.submit(r)
        for r in plain:
            engine.wait(r)
        assert all(r.held for r in held)  # still held: every plain request ran while they waited
        for i in holding:  # a device holding a request made full calls of two meanwhile
            sizes = [n for n, _ in gates[i].calls[marks[i] :]]
            assert sizes and max(sizes) == 2, (i, sizes)
        for r in held:
            engine.resolve(r, None)
            engine.wait(r)
    finally:
        service.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_busy_ratio_is_the_devices_call_time_not_the_jobs_wall_time(tmp_path, devices):
    """A job runs through the whole window while its device idles (held for its lookup): the old formula
    (the job's service interval) read 100 %; the device's own call times read what it did."""
    service, gates = _service(tmp_path, devices, step_ms=10.0)
    try:
        engine = service.engine
        for s in engine.schedulers:
            s.stats.window_s = 1.0
        requests = []
        for i in range(devices):
            start = _Start(f"busy {i}", i)
            requests.append(EngineRequest(start, group=("solo", i), job_id=f"b{i}", lookup_pending=True, hold_at=2))
        for r in requests:
            engine.submit(r)
        time.sleep(1.5)  # 2 steps each, then held: the devices idle while the jobs run
        ratios = metrics.busy_ratios(service)
        assert len(ratios) == devices and all(v < 0.2 for v in ratios.values()), ratios
        for r in requests:
            engine.resolve(r, None)
            engine.wait(r)
        call_s = sum(s.stats.call_s for s in engine.schedulers)
        assert 0.05 < call_s < 0.5, call_s  # STEPS calls of 10 ms per request
        for s in engine.schedulers:
            s.stats.window_s = 60.0
        lives = metrics.busy_ratios(service)  # each device's life so far, mostly idle
        # the calls counted (on two devices one may have taken both requests, so the sum, not sim:0's own)
        assert all(v < 0.5 for v in lives.values()) and sum(lives.values()) > 0, lives
    finally:
        service.close()


@pytest.mark.parametrize("devices", [1, 2])
def test_gpu_seconds_saved_share_each_call_among_its_batch(tmp_path, devices):
    """At batch B a step costs 1/B of a call: the seconds saved are about 1/B of the old figure (steps saved x
    the job's wall-clock seconds per step)."""
    batch = 4
    # every call 200 ms whatever its batch: the first calls also hold while _together gathers the jobs (tens of
    # ms, and more on a busy machine), which the engine times as part of them
    service, gates = _service(tmp_path, devices, step_ms=200.0)
    try:
        payloads = [
            {"prompt": f"a shared call {i}", "steps": STEPS, "cache": NOCACHE, "guidance_scale": 1.0}
            for i in range(devices * batch)
        ]
        for g in gates:  # each device's first call carries one request; the rest follow in batches of 4
            g.gate.clear()
        results = _together(service, gates, [(p, JobContext(job_id=f"g{i}")) for i, p in enumerate(payloads)])
        assert all(not isinstance(r, Exception) for r in results), results
        stats = [s.stats for s in service.engine.schedulers]
        mean_batch = sum(s.requests_stepped for s in stats) / sum(s.calls for s in stats)
        assert mean_batch > 2.5, mean_batch
        per_step = metrics.request_step_s(service)
        assert per_step == pytest.approx(0.200 / mean_batch, rel=0.35), (per_step, mean_batch)
        result = results[-1]
        old_per_step = result.timings.denoise_s / result.cache.steps_computed  # the old formula's price
        saved = result.model_copy(update={"cache": result.cache.model_copy(update={"steps_saved": 5})})
        sample = ("reprise_gpu_seconds_saved_total", {"model": "sim"})
        before = metrics.REGISTRY.get_sample_value(*sample) or 0.0
        metrics.observe_result(saved, service)
        credited = metrics.REGISTRY.get_sample_value(*sample) - before
        assert credited == pytest.approx(5 * per_step)
        assert credited < 0.5 * 5 * old_per_step, (credited, old_per_step)  # ~1/B of the old figure
    finally:
        service.close()


class _BrokenStep(_Start):
    """A start whose trajectory's own scheduler step raises (after the shared call succeeded)."""

    def bind(self, loop):
        trajectory, runner = super().bind(loop)

        def advance(noise):
            raise FloatingPointError("a solver step that fails")

        trajectory.advance = advance
        return trajectory, runner


@pytest.mark.parametrize("devices", [1, 2])
def test_a_failing_scheduler_step_fails_only_its_request(tmp_path, devices):
    service, gates = _service(tmp_path, devices)
    try:
        engine = service.engine
        for g in gates:
            g.gate.clear()
        requests = [EngineRequest(_Start(f"fine {i}", i), group=("shared",), job_id=f"f{i}") for i in range(3)]
        requests.insert(1, EngineRequest(_BrokenStep("broken", 9), group=("shared",), job_id="broken"))
        for r in requests:
            engine.submit(r)
        time.sleep(0.5)
        for g in gates:
            g.gate.set()
        with pytest.raises(DenoiserFailed, match="scheduler step"):
            engine.wait(requests[1])
        for r in requests[:1] + requests[2:]:
            out, _, _ = engine.wait(r)
            assert out.steps_computed == STEPS
    finally:
        for g in gates:
            g.gate.set()
        service.close()
