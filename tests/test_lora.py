"""LoRA adapters per request, with adapters built offline here (random weights on the tiny models) and saved
the ways people publish them: diffusers' folder (`save_lora_weights`) and a kohya/A1111 file.

- on one device, in this process: the adapter cache loads both formats to the same weights, mixes adapters
  in one call exactly as alone, evicts by bytes, and serves SD 1.5, SDXL and Flux;
- the registry (a real Redis): versions are content hashes, a replaced adapter files an invalidation, and
  unknown or foreign adapters are typed errors;
- through real worker processes (one device, and two): `reprise lora add`, then an adapter changes the
  picture, a repeat is an exact hit, a plain request is never served the adapter's picture, and two adapters
  and none sent at once each match their alone-run within 2 levels.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ops.lora_weights import write_adapter
from scheduler.adapters import DIFFUSERS_FILE, AdapterRegistry
from scheduler.errors import AdapterModelMismatch, AdapterSourceError, InvalidRequest, UnknownAdapter
from scheduler.schema import parse_request
from workers.denoise_loop import DenoiseLoop
from workers.families import Conditioning
from workers.lora import ActiveLora, DeviceAdapters, adapter_identity, batch_key, compatible
from workers.model_loading import load_components


@pytest.fixture(scope="module")
def folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="reprise-lora-"))


def _lora(name: str, path: Path, scale: float = 1.0, text_encoder: bool = True) -> ActiveLora:
    file = path / DIFFUSERS_FILE if path.is_dir() else path
    version = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    return ActiveLora(name, version, scale, str(file), text_encoder)


def _noise(loop: DenoiseLoop, sets: list[tuple]) -> list[torch.Tensor]:
    """One denoiser call with each request's adapters (its conditioning under its text-encoder weights)."""
    adapters = loop.c.adapters
    trajectories = []
    for s in sets:

        def conditioning():
            return loop.conditioning("a red cube on grass", "", 3.0, False, 64, 64)

        context = adapters.encode(s, conditioning) if s else conditioning()
        trajectories.append(
            loop.trajectory(prompt="", seed=3, steps=4, guidance_scale=3.0, width=64, height=64, context=context)
        )
    inputs = [t.model_input() for t in trajectories]
    rows = [t.rows for t in trajectories]
    for s in sets:
        adapters.prepare(s, set())
    adapters.activate(list(sets), rows)
    with torch.inference_mode():
        out = Conditioning.cat([t.context for t in trajectories]).call(
            loop.c.unet,
            torch.cat([x for x, _ in inputs]),
            torch.cat([t.reshape(1).float().expand(n) for n, (_, t) in zip(rows, inputs)]),
        )
    adapters.release()
    return list(out.split(rows))


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-flux"])
def test_adapters_on_a_device_both_formats_mixed_calls_and_families(folder, model):
    a = _lora("a", write_adapter(model, folder / f"{model}-a", seed=1))
    b = _lora("b", write_adapter(model, folder / f"{model}-b", seed=2, text_encoder=False), 0.7, False)
    c = load_components(model)
    c.adapters = DeviceAdapters(c, 1 << 30)
    loop = DenoiseLoop(c)
    (plain,) = _noise(loop, [()])
    (with_a,) = _noise(loop, [(a,)])
    (with_b,) = _noise(loop, [(b,)])
    assert (with_a - plain).abs().max() > 0.01 and (with_b - with_a).abs().max() > 0.01  # adapters change it
    if model != "tiny-flux":  # the same weights as kohya/A1111 publish them load to the same adapter
        kohya = _lora("k", write_adapter(model, folder / f"{model}-k.safetensors", seed=1, fmt="kohya"))
        (with_k,) = _noise(loop, [(kohya,)])
        assert torch.allclose(with_k, with_a, atol=1e-5)
        assert c.adapters.text_loaded  # the file's text-encoder weights were loaded and used
    mixed = _noise(loop, [(a,), (), (b,)])  # three requests, one call, each sample its own adapter
    assert c.adapters.mixed_calls == 1
    for got, alone in zip(mixed, [with_a, plain, with_b]):
        assert torch.allclose(got, alone, atol=1e-4)
    (both,) = _noise(loop, [(a, b)])  # one request with two adapters: its own set
    assert (both - with_a).abs().max() > 0.005
    (again,) = _noise(loop, [()])
    assert torch.equal(again, plain)  # LoRA off for a plain request: the base model, never reloaded


def test_adapter_cache_is_bounded_in_bytes_and_keeps_what_is_in_use(folder):
    paths = [write_adapter("tiny", folder / f"lru-{i}", seed=10 + i, text_encoder=False) for i in range(3)]
    loras = [_lora(f"l{i}", p, text_encoder=False) for i, p in enumerate(paths)]
    c = load_components("tiny")
    c.adapters = adapters = DeviceAdapters(c, 1 << 30)
    adapters.prepare((loras[0],), set())
    one = adapters.bytes_loaded
    adapters.budget_bytes = 2 * one  # room for two
    adapters.prepare((loras[1],), set())
    adapters.prepare((loras[0],), set())  # l0 is now the most recently used
    adapters.prepare((loras[2],), set())
    assert list(adapters.loaded) == [loras[0].key, loras[2].key] and adapters.evictions == 1
    assert loras[1].key not in c.unet.peft_config  # deleted from the model, not only forgotten
    adapters.prepare((loras[1],), {loras[0].key, loras[2].key})  # both in use: over budget rather than evict
    assert set(adapters.loaded) == {x.key for x in loras} and adapters.loads == 4


def test_batching_rules_and_identity():
    a, b = ActiveLora("a", "1", 1.0, "x"), ActiveLora("b", "2", 0.5, "y")
    assert batch_key((a,), "mixed") == batch_key((), "mixed") == batch_key((b,), "mixed")
    assert batch_key((a, b), "mixed") != batch_key((a,), "mixed")
    assert batch_key((a,), "grouped") != batch_key((b,), "grouped") != batch_key((), "grouped")
    assert compatible([(a,), (ActiveLora("a", "1", 0.3, "x"),), (b,), ()]) == [0, 2, 3]  # one scale per adapter
    assert adapter_identity((b, a)) == adapter_identity((a, b)) == "a@1*1,b@2*0.5" and adapter_identity(()) == ""


def test_request_schema_bounds_loras():
    ok = parse_request({"prompt": "x", "loras": [{"name": "ink", "scale": 0.8}, {"name": "oil"}]})
    assert [(x.name, x.scale) for x in ok.loras] == [("ink", 0.8), ("oil", 1.0)]
    for bad in (
        [{"name": f"l{i}"} for i in range(5)],  # more than 4
        [{"name": "ink", "scale": 2.5}],  # scale out of bounds
        [{"name": "ink"}, {"name": "ink"}],  # named twice
        [{"name": "bad name"}],
        [{"name": "ink", "weight": 1}],  # unknown field
    ):
        with pytest.raises(InvalidRequest):
            parse_request({"prompt": "x", "loras": bad})


def test_registry_versions_formats_errors_and_invalidation(redis_client, folder):
    store = folder / "store"
    registry = AdapterRegistry(redis_client, "lora-test", str(store))
    diffusers_dir = write_adapter("tiny", folder / "reg-a", seed=5)
    kohya_file = write_adapter("tiny", folder / "reg-k.safetensors", seed=5, fmt="kohya")
    added, old = registry.add("ink", str(diffusers_dir), "tiny")
    data = (diffusers_dir / DIFFUSERS_FILE).read_bytes()
    assert old is None and added.version == hashlib.sha256(data).hexdigest()[:16]
    assert (added.format, added.text_encoder, added.denoiser) == ("diffusers", True, "unet")
    assert Path(added.uri.removeprefix("file://")).read_bytes() == data  # the weights are in the store
    kohya, _ = registry.add("oil", str(kohya_file), "tiny")
    assert kohya.format == "kohya" and kohya.text_encoder
    again, old = registry.add("ink", str(kohya_file), "tiny")  # same name, new content: a new version
    assert old.version == added.version and again.version == kohya.version != added.version
    assert [a.name for a in registry.list("tiny")] == ["ink", "oil"]
    assert registry.resolve("tiny", parse_request({"prompt": "x", "loras": [{"name": "oil"}]}).loras)[0][1] == 1.0
    with pytest.raises(UnknownAdapter):
        registry.resolve("tiny", parse_request({"prompt": "x", "loras": [{"name": "nope"}]}).loras)
    with pytest.raises(AdapterModelMismatch, match="made for tiny"):
        registry.resolve("tiny-sdxl", parse_request({"prompt": "x", "loras": [{"name": "oil"}]}).loras)
    (folder / "not-lora.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    for source in (str(folder / "not-lora.safetensors"), str(folder / "missing"), "someone/some-lora"):
        with pytest.raises(AdapterSourceError):  # the hub id: HF_HUB_OFFLINE=1 here
            registry.add("x", source, "tiny")
    assert registry.remove("tiny", "oil").name == "oil" and registry.get("tiny", "oil") is None


# --- through the node engine, in this process --------------------------------------------------------------


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("mode", ["mixed", "grouped"])
def test_engine_serves_adapter_sets_together_as_alone(folder, mode, devices):
    """None, one adapter, another at another scale and two together, eight requests at once on one device
    and on two: each image within 1 level of the same request alone; mixed mode shares calls across
    adapters, grouped mode never does."""
    from ops.bench_lora import MemoryAdapters
    from workers.artifacts import ArtifactStore
    from workers.lora import device_adapters
    from workers.service import Device, DevicePool, GenerationService, JobContext

    files = {
        "ink": write_adapter("tiny", folder / "eng-ink", seed=31) / DIFFUSERS_FILE,
        "oil": write_adapter("tiny", folder / "eng-oil.safetensors", seed=32, fmt="kohya"),
    }
    pool = []
    for i in range(devices):
        c = load_components("tiny")
        c.adapters = device_adapters(c, 1 << 30)
        pool.append(Device(f"cpu{i}", DenoiseLoop(c)))
    store = ArtifactStore(str(folder / f"eng-{mode}-{devices}"))
    service = GenerationService(
        "tiny", DevicePool(pool), store, adapter_registry=MemoryAdapters("tiny", files), lora_batching=mode
    )
    off = {"exact": False, "approximate": False, "write": False}
    base = dict(prompt="a garden", seed=7, steps=6, cache=off)
    requests = [
        base,
        {**base, "loras": [{"name": "ink"}]},
        {**base, "loras": [{"name": "oil", "scale": 0.8}]},
        {**base, "loras": [{"name": "ink"}, {"name": "oil"}]},
    ]
    try:
        alone = [
            service.run({**r, "deterministic": True}, JobContext(job_id=f"alone{i}")) for i, r in enumerate(requests)
        ]
        with ThreadPoolExecutor(8) as threads:
            together = list(threads.map(lambda i: service.run(requests[i % 4], JobContext(job_id=f"t{i}")), range(8)))
        for i, result in enumerate(together):
            assert np.abs(_pixels(result) - _pixels(alone[i % 4])).max() <= 1, i
        assert np.abs(_pixels(alone[1]) - _pixels(alone[0])).max() > 10  # the adapters do change the picture
        mixed_calls = sum(d.loop.c.adapters.mixed_calls for d in pool)
        assert (mixed_calls > 0) if mode == "mixed" else (mixed_calls == 0)
    finally:
        service.close()


# --- through real worker processes ---------------------------------------------------------------------------

STEPS = 6


@pytest.fixture(scope="module")
def lora_cluster(redis_server, folder):
    """Two workers serving the tiny model from diffusers directories: one with one device, one with two."""
    from ops.localcluster import LocalCluster
    from workers.model_loading import save_builtin

    env = {k: v for k, v in os.environ.items() if k.startswith(("REPRISE_", "REDIS_", "HF_"))}
    c = LocalCluster(workdir=str(folder / "cluster"), redis_url=redis_server.url, env=env)
    c.ensure_redis()
    workers = []
    for model, devices in (("lora-tiny-1", "cpu"), ("lora-tiny-2", "cpu,cpu")):
        directory = save_builtin("tiny", folder / model)
        workers.append(
            c.start_worker(str(directory), devices, wait=False, REPRISE_CACHE_PATH=str(folder / f"qdrant-{model}"))
        )
    for worker in workers:
        c.wait_worker_ready(worker, timeout=180)
    yield c
    c.stop()


def _cli(cluster, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=120, env=cluster.process_env()
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result.image_uri.removeprefix("file://")).convert("RGB"), dtype=np.int16)


@pytest.mark.integration
@pytest.mark.parametrize("model", ["lora-tiny-1", "lora-tiny-2"])
def test_adapters_through_workers_one_and_two_devices(lora_cluster, folder, model):
    from scheduler.client import submit

    ink = write_adapter(str(folder / model), folder / f"{model}-ink", seed=21)
    oil = write_adapter(str(folder / model), folder / f"{model}-oil.safetensors", seed=22, fmt="kohya")
    assert _cli(lora_cluster, "lora", "add", "ink", str(ink), "--model", model)["added"]["format"] == "diffusers"
    assert _cli(lora_cluster, "lora", "add", "oil", str(oil), "--model", model)["added"]["format"] == "kohya"
    models = _cli(lora_cluster, "models")
    assert sorted(x["name"] for x in models[model]["loras"]) == ["ink", "oil"]
    with pytest.raises(UnknownAdapter):  # refused before queueing
        submit(prompt="a cat", model=model, loras=[{"name": "nope"}])
    with pytest.raises(UnknownAdapter):  # and by the worker, for a producer that did not check
        submit(prompt="a cat", model=model, loras=[{"name": "nope"}], check_model=False).wait(60)
    _cli(lora_cluster, "lora", "add", "elsewhere", str(ink), "--model", "some-other-model")
    with pytest.raises(AdapterModelMismatch):
        submit(prompt="a cat", model=model, loras=[{"name": "elsewhere"}], check_model=False).wait(60)

    base = dict(prompt="a blue house by a lake", seed=7, steps=STEPS, model=model)
    ink_req = {**base, "loras": [{"name": "ink", "scale": 0.9}]}
    plain = submit(**base).wait(120)
    inked = submit(**ink_req).wait(120)
    assert inked.cache.hit == "miss" and np.abs(_pixels(inked) - _pixels(plain)).max() > 10  # changes the picture
    deadline = time.monotonic() + 30
    while True:  # the write-back lands after the answer
        repeat = submit(**ink_req, cache={"write": False}).wait(120)
        if repeat.cache.hit == "exact" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert repeat.cache.hit == "exact" and repeat.image_uri == inked.image_uri
    plain_again = submit(**base, cache={"write": False}).wait(120)  # never the adapter's picture
    assert plain_again.image_uri != inked.image_uri
    assert np.abs(_pixels(plain_again) - _pixels(plain)).max() <= 2
    other_scale = submit(**{**base, "loras": [{"name": "ink", "scale": 0.4}]}, cache={"write": False}).wait(120)
    assert other_scale.cache.hit != "exact"

    # two adapters and none, sent at once, each as its alone-run (cache off: every one is computed)
    off = {"exact": False, "approximate": False, "write": False}
    requests = [
        {**base, "prompt": "a garden", "cache": off},
        {**base, "prompt": "a garden", "loras": [{"name": "ink"}], "cache": off},
        {**base, "prompt": "a garden", "loras": [{"name": "oil", "scale": 0.8}], "cache": off},
        {**base, "prompt": "a garden", "loras": [{"name": "ink"}, {"name": "oil"}], "cache": off},
    ]
    alone = [submit(**r).wait(120) for r in requests]
    jobs = [submit(**r) for r in requests * 2]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: j.wait(180), jobs))
    for i, result in enumerate(together):
        assert np.abs(_pixels(result) - _pixels(alone[i % len(requests)])).max() <= 2, i
    assert np.abs(_pixels(alone[1]) - _pixels(alone[2])).max() > 10  # and they are different pictures

    # re-adding a name with new content: a new version, and the old entries go (an invalidation rule)
    readded = _cli(lora_cluster, "lora", "add", "ink", str(oil), "--model", model)
    assert readded["replaced"] and readded["invalidation"]["lora"] == "ink"
    fresh = submit(**ink_req, cache={"write": False}).wait(120)
    assert fresh.cache.hit != "exact" and fresh.image_uri != inked.image_uri
    removed = _cli(lora_cluster, "lora", "remove", "oil", "--model", model)
    assert removed["removed"]["name"] == "oil"
    with pytest.raises(UnknownAdapter):
        submit(**{**base, "loras": [{"name": "oil"}]})
