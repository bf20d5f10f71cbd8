"""Score a shapes text-to-image model against its prompts with the learning-free checker.

    python -m ops.shapes.evaluate --model workers/models/shapes --n 200

Loads every component with ``<Class>.from_pretrained(model/<sub>)`` (no network), runs a
standard classifier-free-guided DDIM loop in pixel space on ``n`` fresh captions (a seed other
than the training one), and prints the per-attribute accuracy measured by
:mod:`ops.shapes.checker` against the attributes ``parse_prompt`` reads from each caption.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ops.shapes import scene as sc
from ops.shapes.checker import attribute_accuracy


def load_pipeline(model_dir: str | os.PathLike):
    """(tokenizer, text_encoder, unet, scheduler, model_index) loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    d = Path(model_dir)
    tok = CLIPTokenizer.from_pretrained(d / "tokenizer")
    te = CLIPTextModel.from_pretrained(d / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(d / "unet").eval()
    sched = DDIMScheduler.from_pretrained(d / "scheduler")
    index = json.loads((d / "model_index.json").read_text())
    return tok, te, unet, sched, index


def make_generate_fn(model_dir, steps: int = 25, guidance: float = 4.0, size: int = 32, batch: int = 50):
    """prompts, seed -> list of uint8 HxWx3 arrays."""
    import torch

    from ops.shapes.train import generate

    tok, te, unet, sched, _ = load_pipeline(model_dir)

    def fn(prompts: Sequence[str], seed: int = 0) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        with torch.no_grad():
            for i in range(0, len(prompts), batch):
                imgs = generate(
                    tok,
                    te,
                    unet,
                    sched,
                    list(prompts[i : i + batch]),
                    steps=steps,
                    guidance=guidance,
                    size=size,
                    seed=seed + i,
                )
                out += list((imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
        return out

    return fn


def evaluate_model(
    generate_fn: Callable[[Sequence[str], int], list], n: int = 200, seed: int = 2024, return_samples: bool = False
):
    """Accuracy per attribute of ``generate_fn`` on ``n`` fresh captions.  The target of each
    caption is what ``parse_prompt`` reads from it (identical to the drawn scene)."""
    rng = np.random.default_rng(seed)
    scenes = [sc.random_scene(rng) for _ in range(n)]
    prompts = [sc.caption(s, rng) for s in scenes]
    targets = [sc.parse_prompt(p) for p in prompts]
    images = generate_fn(prompts, seed)
    acc = attribute_accuracy(images, targets)
    if return_samples:
        return acc, prompts, images
    return acc


def save_grid(images: Sequence[np.ndarray], path: str, cols: int = 10, scale: int = 2) -> None:
    from PIL import Image

    h, w, _ = images[0].shape
    rows = (len(images) + cols - 1) // cols
    grid = np.zeros((rows * (h + 2), cols * (w + 2), 3), dtype=np.uint8) + 128
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = im
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="attribute accuracy of a shapes model")
    ap.add_argument("--model", default="workers/models/shapes")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument(
        "--guidance", type=float, nargs="+", default=None, help="default: the model's default_guidance_scale"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", default="", help="write a PNG grid of the first 50 samples here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    index = json.loads((Path(args.model) / "model_index.json").read_text()).get("reprise", {})
    for g in args.guidance or [float(index.get("default_guidance_scale", 4.0))]:
        t0 = time.time()
        fn = make_generate_fn(args.model, steps=args.steps, guidance=g)
        acc, prompts, images = evaluate_model(fn, args.n, args.seed, return_samples=True)
        print(
            f"model {args.model}  n={args.n} seed={args.seed} ddim {args.steps} guidance {g}  ({time.time() - t0:.0f}s)"
        )
        print("  " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
        if args.grid:
            save_grid(images[:50], args.grid.replace(".png", f"_g{g:g}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
