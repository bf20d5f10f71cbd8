"""`reprise bench batching`: what the node engine's batching gives, at maximum batch 1, 2, 4, 8.

One node in this process (the generation service over its engine, no broker, no cache), driven by a
saturating closed loop: 2 × max batch clients per device, each submitting unique prompts and waiting.
For each maximum batch it reports, over a window after the first completion:

- ``images_per_s``: request-steps the devices ran ÷ steps per request ÷ window (image-equivalents; smooth,
  unlike completions, which arrive in bursts of a batch);
- ``mean_batch``: requests per denoiser call; ``busy_fraction``: time inside denoiser calls ÷ window;
- on `sim`, ``ideal_fraction``: images_per_s ÷ what the cost model allows at that batch
  (devices × B ÷ (steps × (call + sample × 2B)) with guidance on).

On a real model it also measures how far a batched image is from the same request run alone
(``deterministic``), per batch size: max and mean absolute pixel difference (0–255).

    reprise bench batching --devices sim --json out.json
    reprise bench batching --devices cpu --model sd15-small --size 128 --steps 10 --threads 1 --json out.json

On a CPU shared with other work the wall-clock figures move with the load; with ``--threads 1`` it also
reports ``images_per_device_cpu_s``: images per CPU-second of the device threads, which hold every U-Net
call (the load-free figure to compare batch sizes with).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def build_service(devices: str, model: str, max_batch: int, sim_devices: int):
    from workers.artifacts import ArtifactStore
    from workers.denoise_loop import DenoiseLoop
    from workers.service import Device, DevicePool, GenerationService
    from workers.settings import WorkerSettings

    settings = WorkerSettings()
    if devices == "sim":
        from workers.sim import load_sim_components

        components = load_sim_components(
            "sim", settings.sim_step_ms, settings.sim_latent_size, settings.sim_call_ms, settings.sim_sample_ms
        )
        names = [f"sim:{i}" for i in range(sim_devices)]
    else:
        from workers.model_loading import load_components

        components = load_components(model, devices)
        names = [devices]
    pool = DevicePool([Device(name, DenoiseLoop(components)) for name in names])
    store = ArtifactStore(tempfile.mkdtemp(prefix="reprise-bench-batching-"))
    return GenerationService(components.name, pool, store, max_batch=max_batch), components


def closed_loop(service, request: dict, clients: int, seconds: float, vary=None) -> dict:
    """Clients submit and wait until ``seconds`` have passed; stats over [first completion, end].
    ``vary(n)``: fields that request number ``n`` adds (e.g. its adapters)."""
    from workers.service import JobContext

    stop = threading.Event()
    counter = iter(range(10**9))
    lock = threading.Lock()
    first_done = threading.Event()
    errors: list[str] = []

    def client() -> None:
        while not stop.is_set():
            with lock:
                n = next(counter)
            try:
                own = {**request, "prompt": f"{request['prompt']} #{n}", "seed": n, **(vary(n) if vary else {})}
                service.run(own, JobContext(job_id=f"b{n}"))
            except Exception as exc:  # counted, never hidden
                errors.append(f"{type(exc).__name__}: {exc}")
            first_done.set()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    first_done.wait()
    schedulers = service.engine.schedulers
    before = {k: (v.requests_stepped, v.calls, v.call_s) for k, v in service.engine.stats().items()}
    cpu0 = sum(_thread_cpu_s(s) for s in schedulers)
    t0 = time.perf_counter()
    time.sleep(seconds)
    after = {k: (v.requests_stepped, v.calls, v.call_s) for k, v in service.engine.stats().items()}
    cpu = sum(_thread_cpu_s(s) for s in schedulers) - cpu0
    window = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join()
    stepped = sum(after[k][0] - before[k][0] for k in after)
    calls = sum(after[k][1] - before[k][1] for k in after)
    busy = sum(after[k][2] - before[k][2] for k in after)
    images = stepped / request["steps"]
    return {
        "images_per_s": images / window,
        # CPU devices with one torch thread: every U-Net call runs in the device thread, so its CPU time is
        # the device's work whatever else loads the machine; images per CPU-second is then load-free.
        "device_cpu_s": cpu,
        "images_per_device_cpu_s": images / cpu if cpu > 0 else None,
        "mean_batch": stepped / calls if calls else 0.0,
        "busy_fraction": busy / (window * len(after)),
        "calls": calls,
        "window_s": window,
        "errors": errors[:5],
    }


def _thread_cpu_s(thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def pixel_difference(service, request: dict, batch: int) -> dict:
    """``batch`` requests run together, then each alone (deterministic): max/mean |difference| of the PNGs."""
    from PIL import Image

    from workers.service import JobContext

    def pixels(result):
        return np.asarray(Image.open(result.image_uri.removeprefix("file://")).convert("RGB")).astype(np.int16)

    reqs = [{**request, "prompt": f"{request['prompt']} variant {i}", "seed": 1000 + i} for i in range(batch)]
    together: list = [None] * batch
    barrier = threading.Barrier(batch)

    def run(i: int) -> None:
        barrier.wait()
        together[i] = service.run(reqs[i], JobContext(job_id=f"together-{batch}-{i}"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(batch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    diffs = []
    for i, r in enumerate(reqs):
        alone = service.run({**r, "deterministic": True}, JobContext(job_id=f"alone-{batch}-{i}"))
        diffs.append(np.abs(pixels(together[i]) - pixels(alone)))
    d = np.stack(diffs)
    return {"max": int(d.max()), "mean": float(d.mean()), "pixels_differing": float((d > 0).mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="reprise bench batching", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--devices", default="sim", help="sim (simulated GPUs, the cost model) or cpu")
    p.add_argument("--sim-devices", type=int, default=1, help="with --devices sim: how many")
    p.add_argument("--model", default="tiny", help="with --devices cpu: the model")
    p.add_argument("--batches", default="1,2,4,8", help="maximum batches to measure")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=20.0, help="measuring window per maximum batch")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="with --devices cpu: torch threads (0: torch's default; 1 makes images per device CPU-second load-free)",
    )
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    request = {"prompt": "a lighthouse on a cliff", "steps": args.steps, "guidance_scale": args.guidance}
    request["cache"] = {"exact": False, "approximate": False, "write": False}
    if args.size:
        request["width"] = request["height"] = args.size

    report: dict = {
        "devices": args.devices,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "threads": args.threads or None,
        "batches": {},
    }
    for batch in batches:
        service, components = build_service(args.devices, args.model, batch, args.sim_devices)
        n_devices = len(service.pool.devices)
        request["model"] = service.model_name
        row = closed_loop(service, request, clients=2 * batch * n_devices, seconds=args.seconds)
        if args.devices == "sim":
            unet = components.unet
            rows = 2 if args.guidance > 1 else 1
            ideal = n_devices * batch / (args.steps * unet.cost_s(rows * batch))
            row["ideal_images_per_s"] = ideal
            row["ideal_fraction"] = row["images_per_s"] / ideal
        else:
            row["pixel_difference"] = pixel_difference(service, request, batch) if batch > 1 else None
        service.close()
        report["batches"][str(batch)] = row
        report.setdefault("model", service.model_name)
        print(
            f"max batch {batch}: {row['images_per_s']:.3f} images/s, mean batch {row['mean_batch']:.2f}, "
            f"busy {row['busy_fraction']:.1%}"
            + (f", {row['ideal_fraction']:.1%} of ideal" if "ideal_fraction" in row else "")
            + (
                f", {row['images_per_device_cpu_s']:.3f} images per device CPU-second"
                if args.devices == "cpu" and args.threads == 1
                else ""
            )
            + (f", batched vs alone {row['pixel_difference']}" if row.get("pixel_difference") else ""),
            flush=True,
        )
    one = report["batches"].get("1", {}).get("images_per_s")
    if one:
        for row in report["batches"].values():
            row["speedup_vs_batch_1"] = row["images_per_s"] / one
    one_cpu = report["batches"].get("1", {}).get("images_per_device_cpu_s")
    if one_cpu:
        for row in report["batches"].values():
            row["cpu_speedup_vs_batch_1"] = (row["images_per_device_cpu_s"] or 0) / one_cpu
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json_out}")
    return 0 if not any(row["errors"] for row in report["batches"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
