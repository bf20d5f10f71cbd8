"""`reprise bench lora`: images/s over a stream of requests with 0, 1, 4 or 16 distinct LoRA adapters, at
maximum batch 8, with the two ways a device can serve different adapters (`REPRISE_LORA_BATCHING`):

- ``mixed``: requests with at most one adapter share a denoiser call, each sample through its own adapter
  (PEFT's per-sample ``adapter_names``);
- ``grouped``: a call holds one adapter set only; the sets take turns.

One node in this process (the generation service over its engine, no broker, no cache), driven by a
saturating closed loop (2 x max batch clients per device, request n uses adapter n mod k), as
`reprise bench batching` does. Adapters are random ones written here for the model (ops/lora_weights.py),
resolved by an in-memory registry (the same ``resolve`` as the Redis one, so no Redis is needed).

    reprise bench lora --devices sim --json out.json
    reprise bench lora --devices cpu --model tiny --steps 6 --json out.json
    reprise bench lora --devices cpu --model sd15-small --size 128 --steps 6 --adapters 0,4,16 --json out.json

On `sim` a call costs what its batch costs (the cost model) and adapters cost nothing: the figure shows what
batching across adapters keeps. On the CPU the adapters' own work is real (a mixed call runs each adapter's
low-rank product on its samples).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ops.bench_batching import build_service, closed_loop


class MemoryAdapters:
    """The registry's ``resolve`` over adapter files written here (scheduler.adapters.AdapterRegistry's)."""

    def __init__(self, model: str, files: dict[str, Path]):
        import hashlib

        from scheduler.adapters import Adapter, inspect_weights

        self.entries = {}
        for name, path in files.items():
            data = path.read_bytes()
            self.entries[name] = Adapter(
                name=name,
                model=model,
                version=hashlib.sha256(data).hexdigest()[:16],
                uri=str(path),
                bytes=len(data),
                source=str(path),
                added_at=time.time(),
                **inspect_weights(data),
            )

    def resolve(self, model: str, loras) -> list:
        return [(self.entries[x.name], float(x.scale)) for x in loras]


def adapter_files(model: str, n: int, folder: Path, simulated: bool) -> dict[str, Path]:
    from scheduler.adapters import DIFFUSERS_FILE

    if simulated:  # the sim device loads no weights: any LoRA file names an adapter
        model = "tiny"
    from ops.lora_weights import write_adapter

    return {
        f"style{i}": write_adapter(model, folder / f"style{i}", seed=100 + i, text_encoder=False) / DIFFUSERS_FILE
        for i in range(n)
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="reprise bench lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--devices", default="sim", help="sim (the cost model) or cpu")
    p.add_argument("--model", default="tiny", help="with --devices cpu: the model")
    p.add_argument("--adapters", default="0,1,4,16", help="distinct adapters in the stream")
    p.add_argument("--modes", default="mixed,grouped")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--seconds", type=float, default=10.0, help="measuring window per point")
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    from workers.lora import device_adapters

    counts = [int(x) for x in args.adapters.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="reprise-bench-lora-"))
    files = adapter_files(args.model, max(counts), folder, args.devices == "sim")
    request = {
        "prompt": "a lighthouse on a cliff",
        "steps": args.steps,
        "cache": {"exact": False, "approximate": False, "write": False},
    }
    if args.size:
        request["width"] = request["height"] = args.size
    report: dict = {"devices": args.devices, "max_batch": args.max_batch, "steps": args.steps, "points": []}
    for k in counts:
        for mode in args.modes.split(","):
            service, components = build_service(args.devices, args.model, args.max_batch, 1)
            components.adapters = device_adapters(components, 1 << 30)
            service.adapter_registry = MemoryAdapters(service.model_name, files)
            service.lora_batching = mode
            request["model"] = service.model_name

            def vary(n: int, k=k) -> dict:
                return {"loras": [{"name": f"style{n % k}"}]} if k else {}

            row = closed_loop(service, request, clients=2 * args.max_batch, seconds=args.seconds, vary=vary)
            row.update(adapters=k, mode=mode, **{f"lora_{x}": v for x, v in components.adapters.stats().items()})
            row.pop("lora_loaded", None)
            service.close()
            report["points"].append(row)
            print(
                f"{k:>2} adapters, {mode:<7}: {row['images_per_s']:.3f} images/s, mean batch {row['mean_batch']:.2f}"
                + (f", errors {row['errors']}" if row["errors"] else ""),
                flush=True,
            )
    by = {(r["adapters"], r["mode"]): r["images_per_s"] for r in report["points"]}
    report["mixed_over_grouped"] = {
        str(k): by[(k, "mixed")] / by[(k, "grouped")] for k in counts if (k, "mixed") in by and by.get((k, "grouped"))
    }
    print("mixed / grouped:", {k: round(v, 2) for k, v in report["mixed_over_grouped"].items()})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json_out}")
    return 0 if not any(r["errors"] for r in report["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
