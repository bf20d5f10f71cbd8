"""Feature caches inside one request: denoiser speed-up and image deviation against the plain loop.

Each family gets its own caches: DeepCache and block caching on U-Nets (SD 1.5, SDXL), diffusers' own hooks on
transformers (FirstBlockCache on Flux, TaylorSeer on SD3 and Flux). ``unet`` below is the denoiser either way.

``reprise bench feature`` runs, for each prompt and repeat, every setting back to back (same process,
prompts and seeds, so a shared CPU's load hits them alike). ``unet_speedup`` is the median, over
those interleaved runs, of plain U-Net time / the setting's U-Net time, where U-Net time is the time
spent inside the runner's calls: this thread's CPU time on the CPU (other processes' load does not
count), elapsed time on a GPU (synchronised). ``wall_speedup`` is the same ratio of the elapsed time of
the whole denoising loop (decode excluded). ``psnr``/``ssim`` compare the decoded image with the plain
one (mean over prompts).

``reprise bench feature --engine`` asks whether a feature cache keeps its speed-up when requests share
denoiser calls: ``--concurrent`` requests (4), each submitted once the previous one has made ``--stagger``
steps (2, so they are at different steps and DeepCache's full and partial passes fall at different
iterations), go through a node engine (the generation service without Celery) plain and with DeepCache
(``--interval``, 3), batched and each alone. The device's work is the CPU time of the engine's device
thread (one torch thread: every U-Net call runs in it, whatever else loads the machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from workers.denoise_loop import DenoiseLoop
from workers.feature_cache import calibration_store, make_unet_runner
from workers.model_loading import load_components

PROMPTS = (
    "a red fox in a snowy forest, morning light",
    "a watercolor painting of a harbor with sailboats",
    "a futuristic city skyline at dusk, neon lights",
    "a close-up photo of a ceramic teapot on a wooden table",
    "a mountain lake reflecting pine trees",
)

UNET_SETTINGS: tuple[dict, ...] = (
    {"method": "off"},
    {"method": "deepcache", "deepcache_interval": 1},
    {"method": "deepcache", "deepcache_interval": 3},
    {"method": "deepcache", "deepcache_interval": 5},
    {"method": "deepcache", "deepcache_interval": 3, "deepcache_schedule": "nonuniform"},
    {"method": "deepcache", "deepcache_interval": 5, "deepcache_schedule": "nonuniform"},
    {"method": "block", "block_delta": 0.1},
    {"method": "block", "block_delta": 0.3},
    {"method": "block", "block_delta": 0.5},
    {"method": "block", "block_delta": 1.0},
)
TRANSFORMER_SETTINGS: tuple[dict, ...] = (
    {"method": "off"},
    {"method": "first_block", "first_block_threshold": 0.05},
    {"method": "first_block", "first_block_threshold": 0.1},
    {"method": "first_block", "first_block_threshold": 0.2},
    {"method": "first_block", "first_block_threshold": 0.5},
    {"method": "taylorseer", "taylorseer_interval": 3},
    {"method": "taylorseer", "taylorseer_interval": 5},
    {"method": "taylorseer", "taylorseer_interval": 5, "taylorseer_order": 2},
    {"method": "taylorseer", "taylorseer_interval": 3, "taylorseer_lite": True},
    {"method": "taylorseer", "taylorseer_interval": 5, "taylorseer_lite": True},
)


def settings_for(components) -> list[dict]:
    """The settings of the caches the model's family runs."""
    methods = set(components.family.feature_methods)
    every = UNET_SETTINGS if "deepcache" in methods else TRANSFORMER_SETTINGS
    lite = components.family.taylorseer_lite
    return [
        s for s in every if (s["method"] == "off" or s["method"] in methods) and (lite or not s.get("taylorseer_lite"))
    ]


class TimedRunner:
    """Adds up the time spent inside a runner's U-Net calls."""

    def __init__(self, runner, device: torch.device) -> None:
        self.runner = runner
        self.cuda = device.type == "cuda"
        # With one intra-op thread all CPU work runs in this thread: its CPU time is the work, whatever the load.
        self.clock = time.thread_time if not self.cuda and torch.get_num_threads() == 1 else time.perf_counter
        self.seconds = 0.0

    def __call__(self, unet, sample, t, step_index, encoder_hidden_states):
        started = self.clock()
        noise = self.runner(unet, sample, t, step_index, encoder_hidden_states)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += self.clock() - started
        return noise

    def report(self) -> dict:
        return self.runner.report()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _gaussian_blur(x: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    half = size // 2
    k = np.exp(-(np.arange(-half, half + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()
    x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, x)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, x)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: 11×11 Gaussian window, σ 1.5) over the RGB channels of two uint8 images.

    A few lines of numpy instead of adding scikit-image (not installed) for one function.
    """
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = _gaussian_blur(x), _gaussian_blur(y)
        vx = _gaussian_blur(x * x) - mx * mx
        vy = _gaussian_blur(y * y) - my * my
        cov = _gaussian_blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        scores.append(s.mean())
    return float(np.mean(scores))


def _label(setting: dict) -> str:
    params = {k.removeprefix(setting["method"] + "_"): v for k, v in setting.items() if k != "method"}
    return setting["method"] + ("" if not params else " " + " ".join(f"{k}={v}" for k, v in params.items()))


def run(
    model: str,
    steps: int,
    prompts: int,
    repeats: int,
    size: int | None,
    calibration_dir: str | None,
    calibration_prompts: int = 2,
    log=print,
) -> dict:
    components = load_components(model)
    loop = DenoiseLoop(components)
    size = size or components.spec.default_size
    defaults = {
        "calibration_dir": calibration_dir,
        "calibration_prompts": calibration_prompts,
        "calibration_size": size,
    }

    grid = settings_for(components)
    started = time.perf_counter()
    if any(s["method"] == "block" for s in grid):
        store = calibration_store(calibration_dir, calibration_prompts, size)
        store.changes(components, steps)  # calibrate once up front (stored), so no timed run pays for it
    calibration_s = time.perf_counter() - started
    log(
        f"{model} ({components.family.name}) {size}x{size}px, {steps} steps, {prompts} prompts x {repeats} repeats; "
        f"block calibration {calibration_s:.1f}s"
    )

    unet_s = {i: [] for i in range(len(grid))}
    wall_s = {i: [] for i in range(len(grid))}
    images: dict[tuple[int, int], np.ndarray] = {}
    reports: dict[int, dict] = {}
    for r in range(repeats):
        for p in range(prompts):
            for i, setting in enumerate(grid):
                runner = TimedRunner(make_unet_runner(components, setting, defaults, steps=steps), components.device)
                out = loop.denoise(
                    prompt=PROMPTS[p % len(PROMPTS)],
                    seed=1000 + p,
                    steps=steps,
                    guidance_scale=7.5,
                    width=size,
                    height=size,
                    unet_runner=runner,
                )
                unet_s[i].append(runner.seconds)
                wall_s[i].append(out.denoise_s)
                reports[i] = runner.report()
                if r == 0:
                    images[i, p] = np.asarray(loop.decode(out.latents))
                log(f"  repeat {r} prompt {p} {_label(setting):40s} unet {runner.seconds:6.2f}s")

    results = []
    for i, setting in enumerate(grid):
        report = reports[i]
        psnrs = [psnr(images[0, p], images[i, p]) for p in range(prompts)]
        mean_psnr = float(np.mean(psnrs))
        result = {
            "method": setting["method"],
            "params": report["params"],
            "unet_speedup": round(statistics.median(a / b for a, b in zip(unet_s[0], unet_s[i])), 3),
            "wall_speedup": round(statistics.median(a / b for a, b in zip(wall_s[0], wall_s[i])), 3),
            "psnr": None if mean_psnr == float("inf") else round(mean_psnr, 2),  # None: identical to plain
            "ssim": round(float(np.mean([ssim(images[0, p], images[i, p]) for p in range(prompts)])), 4),
            "full_unet_passes": report["full_unet_passes"],
            "partial_unet_passes": report["partial_unet_passes"],
            "unet_s_median": round(statistics.median(unet_s[i]), 3),
        }
        if "attention_reused" in report:
            result["attention_reused"] = report["attention_reused"]
        results.append(result)
    return {
        "model": model,
        "family": components.family.name,
        "steps": steps,
        "size": size,
        "prompts": prompts,
        "repeats": repeats,
        "device": f"{components.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "block_calibration_s": round(calibration_s, 2),
        "timing": "unet: CPU time (thread) or GPU-synchronised time inside runner calls; wall: loop elapsed; medians of per-run plain/setting ratios",
        "results": results,
    }


# --- through the node engine: feature caches with requests batched -------------------------------------


def _device_cpu_s(scheduler) -> float:
    """CPU time of an engine's device thread: with one torch thread, the device's work whatever the load."""
    return time.clock_gettime(time.pthread_getcpuclockid(scheduler.ident))


def engine_round(components, setting: dict, requests: list[dict], stagger: int, alone: bool, workdir: str) -> dict:
    """``requests`` through a node engine of maximum batch len(requests): request i is submitted once request
    i-1 has made ``stagger`` steps, so they share calls at different steps (``alone``: one after another,
    each ``deterministic``, never batched). Device CPU time, wall time, mean batch, the results."""
    from workers.artifacts import ArtifactStore
    from workers.service import Device, DevicePool, GenerationService, JobContext

    pool = DevicePool([Device(str(components.device), DenoiseLoop(components))])
    service = GenerationService(components.name, pool, ArtifactStore(workdir), max_batch=len(requests))
    feature = {"exact": False, "approximate": False, "write": False, "feature": setting}
    payloads = [{**r, "cache": feature, "deterministic": alone} for r in requests]
    results: list = [None] * len(requests)
    reached = [threading.Event() for _ in requests]

    def run(i: int) -> None:
        def on_progress(step: int, total: int) -> None:
            if step >= stagger:
                reached[i].set()

        try:
            results[i] = service.run(payloads[i], JobContext(job_id=f"r{i}", on_progress=on_progress))
        except Exception as exc:
            results[i] = exc
        reached[i].set()

    try:
        scheduler = service.engine.schedulers[0]
        cpu0, wall0 = _device_cpu_s(scheduler), time.perf_counter()
        threads = []
        for i in range(len(requests)):
            if alone and threads:
                threads[-1].join()
            elif threads:
                reached[i - 1].wait(600)
            threads.append(threading.Thread(target=run, args=(i,)))
            threads[-1].start()
        for t in threads:
            t.join()
        stats = scheduler.stats
        row = {
            "device_cpu_s": _device_cpu_s(scheduler) - cpu0,
            "wall_s": time.perf_counter() - wall0,
            "mean_batch": stats.mean_batch,
            "calls": stats.calls,
        }
    finally:
        service.close()
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, Exception)]
    if errors:
        raise RuntimeError(f"requests failed in the engine: {errors[:3]}")
    row["results"] = results
    return row


def run_engine(
    model: str, steps: int, size: int | None, concurrent: int, stagger: int, interval: int, repeats: int, log=print
) -> dict:
    """DeepCache against plain, each with ``concurrent`` requests batched in the node engine and each alone:
    does DeepCache keep its speed-up when the requests share denoiser calls?"""
    from PIL import Image

    components = load_components(model)
    size = size or components.spec.default_size
    requests = [
        {"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i, "steps": steps, "guidance_scale": 7.5}
        for i in range(concurrent)
    ]
    for r in requests:
        r["width"] = r["height"] = size
    settings = {"off": {"method": "off"}, "deepcache": {"method": "deepcache", "deepcache_interval": interval}}
    cells = [(name, alone) for alone in (False, True) for name in settings]
    cpu: dict = {c: [] for c in cells}
    wall: dict = {c: [] for c in cells}
    batch: dict = {c: [] for c in cells}
    images: dict = {}
    passes: dict = {}
    log(
        f"{model} {size}x{size}px, {steps} steps, {concurrent} requests {stagger} steps apart, "
        f"DeepCache interval {interval}, {repeats} repeats, {torch.get_num_threads()} torch threads"
    )
    with tempfile.TemporaryDirectory(prefix="reprise-bench-feature-") as workdir:
        for r in range(repeats):
            for name, alone in cells:  # interleaved: the machine's load hits every cell alike
                row = engine_round(components, settings[name], requests, stagger, alone, f"{workdir}/{r}")
                cpu[name, alone].append(row["device_cpu_s"])
                wall[name, alone].append(row["wall_s"])
                batch[name, alone].append(row["mean_batch"])
                if r == 0:
                    images[name, alone] = [
                        np.asarray(Image.open(x.image_uri.removeprefix("file://")).convert("RGB"))
                        for x in row["results"]
                    ]
                    passes[name, alone] = [
                        (x.cache.feature.full_unet_passes, x.cache.feature.partial_unet_passes)
                        if x.cache.feature and x.cache.feature.method != "off"
                        else (x.cache.steps_computed, 0)
                        for x in row["results"]
                    ]
                log(
                    f"  repeat {r} {name:9s} {'alone' if alone else 'batched':7s} device {row['device_cpu_s']:6.2f}s "
                    f"wall {row['wall_s']:6.2f}s mean batch {row['mean_batch']:.2f}"
                )

    def speedup(num, den) -> float:
        return round(statistics.median(a / b for a, b in zip(cpu[num], cpu[den])), 3)

    rows = []
    for name, alone in cells:
        mode = "alone" if alone else "batched"
        ref = ("off", alone)
        rows.append(
            {
                "setting": "off" if name == "off" else f"deepcache interval {interval}",
                "mode": mode,
                "mean_batch": round(statistics.median(batch[name, alone]), 2),
                "device_cpu_s": round(statistics.median(cpu[name, alone]), 3),
                "wall_s": round(statistics.median(wall[name, alone]), 3),
                "speedup_vs_plain_same_mode": speedup(ref, (name, alone)),
                "speedup_vs_plain_alone": speedup(("off", True), (name, alone)),
                "psnr_vs_plain_same_mode": _mean_psnr(images[ref], images[name, alone]),
                "psnr_vs_plain_alone": _mean_psnr(images["off", True], images[name, alone]),
                "max_abs_diff_vs_plain_alone": max(
                    int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
                    for a, b in zip(images["off", True], images[name, alone])
                ),
                "full_partial_passes": passes[name, alone][0],
            }
        )
    return {
        "model": model,
        "steps": steps,
        "size": size,
        "concurrent": concurrent,
        "stagger_steps": stagger,
        "interval": interval,
        "repeats": repeats,
        "timing": "device_cpu_s: CPU time of the engine's device thread (one torch thread) for all requests; "
        "speed-ups: medians of per-repeat ratios",
        "rows": rows,
    }


def _mean_psnr(ref: list, other: list) -> float | None:
    """Mean PSNR over the requests' images; None when every pair is identical (an identical pair counts 99 dB)."""
    values = [psnr(a, b) for a, b in zip(ref, other)]
    return None if all(v == float("inf") for v in values) else round(float(np.mean([min(v, 99.0) for v in values])), 2)


def print_engine_table(report: dict) -> None:
    print(
        f"\nthrough the node engine: {report['model']} · {report['steps']} steps · {report['size']}px · "
        f"{report['concurrent']} requests, {report['stagger_steps']} steps apart"
    )
    header = (
        f"{'setting':22s} {'mode':8s} {'batch':>6s} {'device s':>9s} {'×plain same':>12s} {'×plain alone':>13s} "
        f"{'psnr same':>10s} {'psnr alone':>11s} {'max|Δ| alone':>13s}"
    )
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        same = "inf" if r["psnr_vs_plain_same_mode"] is None else f"{r['psnr_vs_plain_same_mode']:.1f}"
        alone = "inf" if r["psnr_vs_plain_alone"] is None else f"{r['psnr_vs_plain_alone']:.1f}"
        print(
            f"{r['setting']:22s} {r['mode']:8s} {r['mean_batch']:6.2f} {r['device_cpu_s']:9.2f} "
            f"{r['speedup_vs_plain_same_mode']:12.2f} {r['speedup_vs_plain_alone']:13.2f} {same:>10s} {alone:>11s} "
            f"{r['max_abs_diff_vs_plain_alone']:13d}"
        )


def print_table(report: dict) -> None:
    print(
        f"\n{report['model']} ({report['family']}) · {report['steps']} steps · {report['size']}px · {report['device']}"
    )
    header = (
        f"{'method':12s} {'params':60s} {'unet×':>6s} {'wall×':>6s} {'psnr':>6s} {'ssim':>6s} {'full':>5s} {'part':>5s}"
    )
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        params = " ".join(f"{k}={v}" for k, v in r["params"].items())
        psnr_text = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
        print(
            f"{r['method']:12s} {params:60s} {r['unet_speedup']:6.2f} {r['wall_speedup']:6.2f} {psnr_text:>6s} "
            f"{r['ssim']:6.4f} {r['full_unet_passes']:5d} {r['partial_unet_passes']:5d}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="reprise bench feature", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-small", help="model to load (default: sd15-small)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128: 16x16 latents)")
    parser.add_argument(
        "--calibration-dir", default=None, help="block-cache calibrations (default ~/.cache/reprise/blockcache)"
    )
    parser.add_argument(
        "--calibration-prompts", type=int, default=2, help="prompts for a block-cache calibration (stored, one-off)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared CPU more threads spin against other processes, 20x slower here)",
    )
    parser.add_argument(
        "--engine",
        action="store_true",
        help="instead: plain and DeepCache with --concurrent requests batched in the node engine, and each alone",
    )
    parser.add_argument("--concurrent", type=int, default=4, help="--engine: requests in flight together")
    parser.add_argument("--stagger", type=int, default=2, help="--engine: steps between two requests' starts")
    parser.add_argument("--interval", type=int, default=3, help="--engine: DeepCache interval")
    parser.add_argument("--json", dest="json_out", default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.engine:
        report = run_engine(
            args.model, args.steps, args.size, args.concurrent, args.stagger, args.interval, args.repeats
        )
        print_engine_table(report)
    else:
        report = run(
            args.model,
            args.steps,
            args.prompts,
            args.repeats,
            args.size,
            args.calibration_dir,
            args.calibration_prompts,
        )
        print_table(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
