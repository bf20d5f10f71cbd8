"""How `reprise calibrate` scores a resumed image against the fresh one: points, higher is better.

A scorer gets the target prompt, the target generated fresh and the target resumed from a neighbour's
state at each K, and returns a score in points for each; the loss of a hit is ``fresh - resumed``.

- ``pixel``: 100 x SSIM of the resumed image to the fresh one (the fresh image scores 100); PSNR (dB) is
  reported beside it. Needs nothing but the images. (No perceptual distance: the packages that offer
  one, such as lpips, fetch their backbone's weights at first use, which an offline cluster cannot.)
- ``clip``: 100 x the cosine between a CLIP model's image and text embeddings (the CLIP score) of
  each image with the prompt, from a CLIP model directory (``CLIPModel`` + tokenizer + image
  processor, as ``save_pretrained`` writes them): how well the resumed image follows its prompt
  relative to the fresh one.
- more by ``register_scorer`` (the operators' tools add ``checker``, the shapes model's ground truth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from scheduler.errors import InvalidRequest


class ScorerError(InvalidRequest):
    """A scorer that cannot be made or cannot score this prompt (unknown name, missing model directory)."""

    code = "invalid_scorer"


@dataclass
class Scores:
    fresh: float
    resumed: list[float]
    details: dict = field(default_factory=dict)  # extra per-image figures (e.g. PSNR), reported as they are


class Scorer(Protocol):
    name: str

    def __call__(self, prompt: str, fresh: np.ndarray, resumed: Sequence[np.ndarray]) -> Scores: ...


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two uint8 HxWx3 images (Gaussian window, sigma 1.5, per channel)."""
    from scipy.ndimage import gaussian_filter

    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(x.shape[2] if x.ndim == 3 else 1):
        xs = x[..., ch] if x.ndim == 3 else x
        ys = y[..., ch] if y.ndim == 3 else y

        def blur(v):
            return gaussian_filter(v, 1.5, truncate=3.5, mode="reflect")

        mx, my = blur(xs), blur(ys)
        vx, vy, cov = blur(xs * xs) - mx * mx, blur(ys * ys) - my * my, blur(xs * ys) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        values.append(float(s.mean()))
    return float(np.mean(values))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class PixelScorer:
    name = "pixel"

    def __call__(self, prompt: str, fresh: np.ndarray, resumed: Sequence[np.ndarray]) -> Scores:
        return Scores(
            fresh=100.0,
            resumed=[100.0 * ssim(r, fresh) for r in resumed],
            details={"psnr": [round(min(psnr(r, fresh), 99.0), 2) for r in resumed]},
        )


class ClipScorer:
    """CLIP score of each image with its prompt, from a CLIP model directory (loaded once, on the CPU)."""

    name = "clip"

    def __init__(self, model_dir: str) -> None:
        from pathlib import Path

        if not model_dir or not (Path(model_dir) / "config.json").exists():
            raise ScorerError(
                f"--scorer clip needs --clip-model: a CLIP model directory (config.json), got {model_dir!r}"
            )
        import torch
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.torch = torch
        self.model = CLIPModel.from_pretrained(model_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.processor = CLIPImageProcessor.from_pretrained(model_dir)

    def _embed_text(self, prompt: str):
        tok = self.tokenizer(
            [prompt],
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        )
        out = self.model.get_text_features(input_ids=tok.input_ids)
        out = getattr(out, "pooler_output", out)
        return out / out.norm(dim=-1, keepdim=True)

    def _embed_images(self, images: Sequence[np.ndarray]):
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        out = self.model.get_image_features(pixel_values=pixels)
        out = getattr(out, "pooler_output", out)
        return out / out.norm(dim=-1, keepdim=True)

    def __call__(self, prompt: str, fresh: np.ndarray, resumed: Sequence[np.ndarray]) -> Scores:
        with self.torch.no_grad():
            text = self._embed_text(prompt)
            sims = (self._embed_images([fresh, *resumed]) @ text.T)[:, 0]
        values = [100.0 * float(v) for v in sims]
        return Scores(fresh=values[0], resumed=values[1:])


SCORERS: dict[str, Callable[..., Scorer]] = {
    "pixel": lambda **_: PixelScorer(),
    "clip": lambda clip_model=None, **_: ClipScorer(clip_model),
}


def register_scorer(name: str, factory: Callable[..., Scorer]) -> None:
    """Make ``--scorer name`` available; ``factory(**options)`` builds it (options: clip_model, model)."""
    SCORERS[name] = factory


def make_scorer(name: str, **options) -> Scorer:
    if name not in SCORERS:
        raise ScorerError(f"unknown scorer {name!r}: one of {', '.join(sorted(SCORERS))}")
    return SCORERS[name](**options)
