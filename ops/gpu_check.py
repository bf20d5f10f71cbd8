"""`reprise gpu-check` (also `python -m ops.gpu_check`): what this project claims about a GPU, measured in
about five minutes on any CUDA machine.

    reprise gpu-check --json gpu.json                                      # sd15, 512 px, 50 steps, cuda
    reprise gpu-check --device cpu --model tiny --steps 10 --json cpu.json # the CPU smoke run (seconds)

On the device it loads the built-in ``sd15`` (SD 1.5's full U-Net configuration, random weights; fp16 on
CUDA, the worker's own path) once, then, through the node engine (the generation service without Celery:
admission, device, decode, PNG), measures:

- plain generation at maximum batch 1, 4 and 8: B requests submitted together, images/s and s/image
  (wall time of the round ÷ B), the engine's mean batch, and peak device memory
  (``torch.cuda.max_memory_allocated``);
- DeepCache (interval 3) at batch 1 and at the largest batch: its speed-up against plain at that batch;
- exact resume in the device's dtype: a request resumed from its own stored state (real embedded Qdrant
  cache, float16 states) at K = 40 % of the steps gives the full run's image bit for bit (ddim and
  dpmpp_2m), the promise of ``tests/test_resume_exact.py`` checked on this device's kernels;
- that the latents stay finite in the device's dtype (random fp16 weights can overflow);
- the images of every run it times and of the resume check: each decoded image finite (checked on the
  decoder's output, since a PNG turns a NaN into some byte) and not one flat colour (checked on the stored
  PNG). A speed measured on NaN or blank images is no speed, so any such image fails the check.

It prints one table and writes every figure with ``--json``; it exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ops import bench_feature

NOCACHE = {"exact": False, "approximate": False, "write": False}
PROMPTS = bench_feature.PROMPTS + (
    "an astronaut riding a horse on the moon",
    "a bowl of ramen, studio lighting",
    "a lighthouse on a cliff in a storm",
)


class GpuCheckError(Exception):
    """The check cannot run as asked (no CUDA device, a bad argument)."""


def checked_loop(components):
    """The worker's denoising loop, counting the decoded images that are not finite (whichever thread decodes:
    the device thread on CUDA, the request's thread on the CPU)."""
    from workers.denoise_loop import DenoiseLoop

    class CheckedLoop(DenoiseLoop):
        def __init__(self, c):
            super().__init__(c)
            self.decoded = self.nonfinite = 0
            self._lock = threading.Lock()

        def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
            pixels = super().decode_pixels(latents)
            finite = bool(torch.isfinite(pixels).all())
            with self._lock:
                self.decoded += 1
                self.nonfinite += not finite
            return pixels

    return CheckedLoop(components)


def _service(components, max_batch: int, artifacts: str, cache=None):
    from workers.artifacts import ArtifactStore
    from workers.service import Device, DevicePool, GenerationService

    loop = checked_loop(components)
    pool = DevicePool([Device(str(components.device), loop)])
    service = GenerationService(components.name, pool, ArtifactStore(artifacts), cache=cache, max_batch=max_batch)
    return service, loop


def _flat(uri: str) -> bool:
    """One colour over the whole stored image (what a NaN or an overflow decodes to)."""
    pixels = _pixels(uri)
    return bool((pixels == pixels.reshape(-1, 3)[0]).all())


def image_problems(loop, before: tuple[int, int], uris: list[str]) -> dict:
    """What the images decoded since ``before`` (the loop's (decoded, nonfinite)) and stored at ``uris`` show."""
    return {
        "images_checked": loop.decoded - before[0],
        "images_nonfinite": loop.nonfinite - before[1],
        "images_flat": sum(_flat(u) for u in uris),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_round(service, loop, request: dict, batch: int, tag: str) -> dict:
    """``batch`` requests submitted together to a node whose maximum batch is ``batch``; one round, its images
    checked after the clock stopped."""
    from workers.service import JobContext

    device = service.components.device
    results: list = [None] * batch
    barrier = threading.Barrier(batch + 1)

    def run(i: int) -> None:
        barrier.wait()
        payload = {**request, "prompt": PROMPTS[i % len(PROMPTS)], "seed": 100 + i}
        try:
            results[i] = service.run(payload, JobContext(job_id=f"{tag}-{i}"))
        except Exception as exc:  # reported, never hidden
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(batch)]
    for t in threads:
        t.start()
    before = next(iter(service.engine.stats().values()))
    calls, stepped = before.calls, before.requests_stepped
    decoded = (loop.decoded, loop.nonfinite)
    _sync(device)
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    _sync(device)
    wall = time.perf_counter() - t0
    after = next(iter(service.engine.stats().values()))
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, Exception)]
    calls = after.calls - calls
    done = [r for r in results if not isinstance(r, Exception)]
    uris = [r.image_uri for r in done]
    passes = {  # (full, partial) U-Net passes per request: a feature cache shows its partial ones
        (r.cache.feature.full_unet_passes, r.cache.feature.partial_unet_passes)
        if r.cache.feature and r.cache.feature.method != "off"
        else (r.cache.steps_computed, 0)
        for r in done
    }
    return {
        "unet_passes": sorted(passes),
        "wall_s": wall,
        "mean_batch": (after.requests_stepped - stepped) / calls if calls else 0.0,
        "errors": errors,
        **image_problems(loop, decoded, uris),
    }


def measure(components, request: dict, batch: int, rounds: int, label: str, artifacts: str) -> dict:
    """Median over ``rounds`` of one batch round (after one untimed round that warms the shapes up)."""
    cuda = components.device.type == "cuda"
    service, loop = _service(components, batch, artifacts)
    try:
        batch_round(service, loop, request, batch, f"{label}-b{batch}-warm")
        if cuda:
            torch.cuda.reset_peak_memory_stats(components.device)
        runs = [batch_round(service, loop, request, batch, f"{label}-b{batch}-r{r}") for r in range(rounds)]
    finally:
        service.close()
    wall = statistics.median(r["wall_s"] for r in runs)
    return {
        "run": label,
        "batch": batch,
        "images_per_s": batch / wall,
        "s_per_image": wall / batch,
        "mean_batch": statistics.median(r["mean_batch"] for r in runs),
        "peak_gib": torch.cuda.max_memory_allocated(components.device) / 2**30 if cuda else None,
        "rounds_s": [round(r["wall_s"], 4) for r in runs],
        "errors": sorted({e for r in runs for e in r["errors"]}),
        "unet_passes": sorted({tuple(p) for r in runs for p in r["unet_passes"]}),
        **{k: sum(r[k] for r in runs) for k in ("images_checked", "images_nonfinite", "images_flat")},
    }


def images_ok(row: dict) -> bool:
    return row["images_checked"] > 0 and row["images_nonfinite"] == 0 and row["images_flat"] == 0


def _pixels(uri: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(uri.removeprefix("file://")).convert("RGB")).astype(np.int16)


def resume_exact(components, request: dict, scheduler: str, fraction: float, workdir: Path) -> dict:
    """A full run that stores its states (real embedded cache), then the same request resumed from its own
    state at K = fraction × steps: the two images must be identical."""
    from cache import CacheSettings, LatentCache
    from workers.service import JobContext

    folder = workdir / f"resume-{scheduler}"
    settings = CacheSettings(  # a generous time box: this checks the resume, not the lookup's latency
        backend="edge",
        path=str(folder / "qdrant"),
        state_fractions=[fraction],
        skip_table=[(0.0, fraction)],
        lookup_timeout_ms=10_000,
        embedder="clip",
        clip_dim=components.family.pooled_dim(components),
    )
    # The model's own pooled text encoding as the lookup vector: this checks the resume, not the embedder, and
    # a GPU host need not carry MiniLM's weights.
    embed = lambda prompt: components.family.encode(components, prompt)[1][0].float().cpu().numpy()  # noqa: E731
    service, loop = _service(components, 1, str(folder / "artifacts"), cache=LatentCache.open(settings, embedder=embed))
    payload = {**request, "cache": {}, "scheduler": scheduler, "prompt": PROMPTS[0], "seed": 7, "deterministic": True}
    try:
        full = service.run(payload, JobContext(job_id=f"resume-{scheduler}-full"))
        service.drain_writebacks()
        resumed = service.run({**payload, "cache": {"exact": False}}, JobContext(job_id=f"resume-{scheduler}-k"))
    finally:
        service.close()
    diff = np.abs(_pixels(full.image_uri) - _pixels(resumed.image_uri))
    images = image_problems(loop, (0, 0), [full.image_uri, resumed.image_uri])
    return {
        "run": f"exact resume, {scheduler}",
        "scheduler": scheduler,
        "hit": resumed.cache.hit,
        "k": resumed.cache.k,
        "steps": request["steps"],
        "bit_identical": resumed.cache.hit == "approximate" and int(diff.max()) == 0,
        "max_abs_diff": int(diff.max()),
        "pixels_differing": float((diff > 0).mean()),
        "s_full": full.timings.denoise_s + full.timings.decode_s,
        "s_resumed": resumed.timings.denoise_s + resumed.timings.decode_s,
        **images,
    }


def finite_check(components, request: dict) -> dict:
    """The plain loop for a few steps at the measured size: are the latents finite in this dtype?"""
    from workers.denoise_loop import DenoiseLoop

    out = DenoiseLoop(components).denoise(
        prompt=PROMPTS[0],
        seed=1,
        steps=request["steps"],
        guidance_scale=request["guidance_scale"],
        width=request["width"],
        height=request["height"],
    )
    return {"finite": bool(torch.isfinite(out.latents).all()), "latent_abs_max": float(out.latents.abs().max())}


def run(args) -> dict:
    from workers.model_loading import load_components

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GpuCheckError(
            f"--device {args.device}: torch {torch.__version__} sees no CUDA device (torch.version.cuda = "
            f"{torch.version.cuda}); install the CUDA wheel (make TORCH_SPEC=torch==2.13.0 install on the GPU host) "
            "or run the CPU smoke form: --device cpu --model tiny --steps 10"
        )
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        raise GpuCheckError(f"--batches must list sizes >= 1, got {args.batches!r}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="reprise-gpu-check-"))
    t0 = time.perf_counter()
    components = load_components(args.model, device)
    load_s = time.perf_counter() - t0
    size = args.size or components.spec.default_size
    request = {
        "model": components.name,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "width": size,
        "height": size,
        "cache": NOCACHE,
    }
    env = {
        "model": components.name,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(components.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "size": size,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": "ddim",
        "load_s": round(load_s, 2),
    }
    print(
        f"gpu-check: {env['model']} on {env['device']} ({env['device_name']}, {env['dtype']}, torch {env['torch']}), "
        f"{size}x{size} px, {args.steps} DDIM steps, guidance {args.guidance}; loaded in {load_s:.1f} s",
        flush=True,
    )
    finite = finite_check(components, {**request, "steps": min(args.steps, 3)})
    print(f"  latents finite in {env['dtype']}: {finite['finite']}", flush=True)
    rows = []
    for b in batches:
        rows.append(measure(components, request, b, args.rounds, "plain", str(workdir / "art")))
        print(f"  plain, batch {b}: {rows[-1]['s_per_image']:.3f} s/image", flush=True)
    deepcache = {
        **request,
        "cache": {**NOCACHE, "feature": {"method": "deepcache", "deepcache_interval": args.interval}},
    }
    label = f"deepcache interval {args.interval}"
    for b in sorted({batches[0], batches[-1]}):
        row = measure(components, deepcache, b, args.rounds, label, str(workdir / "art"))
        plain = next(r for r in rows if r["run"] == "plain" and r["batch"] == b)
        row["speedup_vs_plain"] = plain["s_per_image"] / row["s_per_image"]
        rows.append(row)
        print(f"  {label}, batch {b}: {row['s_per_image']:.3f} s/image, {row['speedup_vs_plain']:.2f}x", flush=True)
    resumes = [resume_exact(components, request, s, 0.4, workdir) for s in ("ddim", "dpmpp_2m")]
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    ok = (
        finite["finite"]
        and all(r["bit_identical"] and images_ok(r) for r in resumes)
        and all(not r["errors"] and images_ok(r) for r in rows)
    )
    return {
        "environment": env,
        "finite": finite,
        "rows": rows,
        "resume": resumes,
        "process_peak_rss_gib": round(peak_rss_gib, 2),
        "ok": ok,
    }


def print_table(report: dict) -> None:
    env = report["environment"]
    print(
        f"\nreprise gpu-check — {env['model']}, {env['size']}x{env['size']} px, {env['steps']} steps, "
        f"{env['device']} ({env['device_name']}), {env['dtype']}"
    )
    header = f"{'run':<26}{'batch':>6}{'images/s':>10}{'s/image':>9}{'mean batch':>11}{'peak GiB':>10}  result"
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        result = f"{r['speedup_vs_plain']:.2f}x plain" if "speedup_vs_plain" in r else ""
        if not images_ok(r):
            result = _image_note(r)
        if r["errors"]:
            result = "ERRORS: " + "; ".join(r["errors"])[:80]
        print(
            f"{r['run']:<26}{r['batch']:>6}{r['images_per_s']:>10.3f}{r['s_per_image']:>9.3f}{r['mean_batch']:>11.2f}"
            f"{peak:>10}  {result}".rstrip()
        )
    for r in report["resume"]:
        result = (
            f"bit-identical at K={r['k']}/{r['steps']}"
            if r["bit_identical"]
            else f"DIFFERS (hit {r['hit']}, K={r['k']}, max |diff| {r['max_abs_diff']}, {r['pixels_differing']:.2%} of pixels)"
        )
        if not images_ok(r):
            result = _image_note(r)
        print(f"{r['run']:<26}{1:>6}{'':>10}{r['s_resumed']:>9.3f}{'':>11}{'':>10}  {result}")
    finite = report["finite"]
    print(
        f"{'latents finite':<26}{'':>6}{'':>10}{'':>9}{'':>11}{'':>10}  {finite['finite']} (|max| {finite['latent_abs_max']:.2f})"
    )
    print(
        f"process peak RSS {report['process_peak_rss_gib']:.2f} GiB; {'all checks passed' if report['ok'] else 'A CHECK FAILED'}"
    )


def _image_note(r: dict) -> str:
    return f"BAD IMAGES: {r['images_nonfinite']} not finite, {r['images_flat']} flat of {r['images_checked']} decoded"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="reprise gpu-check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--model", default="sd15", help="built-in name or diffusers directory (default sd15)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's, 512 for sd15)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batches", default="1,4,8", help="maximum batches to measure (default 1,4,8)")
    p.add_argument("--interval", type=int, default=3, help="DeepCache interval (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per row, after one warm-up round")
    p.add_argument("--workdir", help="artifacts and the resume check's cache (default: a temporary folder)")
    p.add_argument("--json", dest="json_out", help="write every figure here")
    args = p.parse_args(argv)
    try:
        report = run(args)
    except GpuCheckError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    print_table(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json_out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
