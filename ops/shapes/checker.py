"""A learning-free reader of shape scenes, used to score generations against their prompts.

From an image (PIL image or uint8/float array, any square size) it recovers:
  * background colour: median of the 1-pixel border ring -> nearest palette colour;
  * shape colour: median of the pixels far from the background -> nearest palette colour;
  * the shape's mask: pixels closer to the shape colour than to the background colour;
  * position: mask centroid -> 3x3 grid cell;
  * size: mask area (in 32x32 reference pixels) against a threshold between the largest
    small shape (49) and the smallest large shape (~85);
  * shape: fill ratio of the mask's bounding box (square ~1, circle ~0.79, triangle ~0.5).

``python -m ops.shapes.checker`` prints its accuracy on 2,000 fresh renders.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence

import numpy as np

from ops.shapes import scene as sc

_PAL = np.array([sc.PALETTE[c] for c in sc.COLORS], dtype=np.float32)
FAR = 80.0  # RGB distance from the background beyond which a pixel counts as foreground
AREA_THRESHOLD = 66.0  # in 32x32 reference pixels
SQUARE_MIN_FILL = 0.9
CIRCLE_MIN_FILL = 0.64


def _as_array(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:  # CHW
        a = a.transpose(1, 2, 0)
    a = a[..., :3].astype(np.float32)
    if a.max() <= 1.0 + 1e-6 and np.asarray(image).dtype != np.uint8:
        a = a * 255.0
    return a


def _nearest(rgb: np.ndarray) -> int:
    return int(np.argmin(((_PAL - rgb) ** 2).sum(-1)))


def read(image) -> dict[str, str | None]:
    """Attributes read off an image; a value is None when it cannot be read."""
    a = _as_array(image)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    bg_i = _nearest(np.median(border, axis=0))
    out: dict[str, str | None] = {
        "background": sc.COLORS[bg_i],
        "color": None,
        "position": None,
        "size": None,
        "shape": None,
    }
    d_bg = np.sqrt(((a - _PAL[bg_i]) ** 2).sum(-1))
    far = d_bg > FAR
    if far.sum() < 2:
        return out
    fg_i = _nearest(np.median(a[far], axis=0))
    if fg_i == bg_i:
        return out
    out["color"] = sc.COLORS[fg_i]
    d_fg = np.sqrt(((a - _PAL[fg_i]) ** 2).sum(-1))
    mask = d_fg < d_bg
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return out
    sx, sy = sc.REF / w, sc.REF / h
    cx, cy = (xs.mean() + 0.5) * sx, (ys.mean() + 0.5) * sy
    col = 0 if cx < 12 else (2 if cx >= 20 else 1)
    row = 0 if cy < 12 else (2 if cy >= 20 else 1)
    out["position"] = sc.POSITIONS[row * 3 + col]
    area = len(xs) * sx * sy
    out["size"] = "large" if area >= AREA_THRESHOLD else "small"
    bbox = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = len(xs) / bbox
    out["shape"] = "square" if fill >= SQUARE_MIN_FILL else ("circle" if fill >= CIRCLE_MIN_FILL else "triangle")
    return out


def check(image, target) -> dict[str, bool]:
    """attribute -> whether the image shows it; ``target`` is a Scene or a dict of (some) attributes
    (e.g. ``scene.parse_prompt(prompt)``); attributes the target does not name are skipped."""
    want = target.as_dict() if isinstance(target, sc.Scene) else dict(target)
    got = read(image)
    return {k: got[k] == want[k] for k in sc.ATTRIBUTES if k in want}


def attribute_accuracy(images: Iterable, targets: Sequence) -> dict[str, float]:
    """Per-attribute accuracy, plus ``all`` (every named attribute right) and ``mean`` (mean of
    the per-attribute accuracies)."""
    hits: dict[str, list[bool]] = {k: [] for k in sc.ATTRIBUTES}
    every: list[bool] = []
    for img, tgt in zip(images, targets):
        r = check(img, tgt)
        for k, v in r.items():
            hits[k].append(v)
        every.append(all(r.values()))
    acc = {k: float(np.mean(v)) for k, v in hits.items() if v}
    acc["mean"] = float(np.mean([acc[k] for k in sc.ATTRIBUTES if k in acc]))
    acc["all"] = float(np.mean(every)) if every else float("nan")
    return acc


def self_accuracy(n: int = 2000, seed: int = 0, size: int = 32) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    scenes = [sc.random_scene(rng) for _ in range(n)]
    return attribute_accuracy([sc.render_array(s, size) for s in scenes], scenes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="checker accuracy on fresh renders")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    args = ap.parse_args(argv)
    for size in args.sizes:
        acc = self_accuracy(args.n, args.seed, size)
        print(
            f"checker self-accuracy on {args.n} renders at {size}x{size}: "
            + "  ".join(f"{k} {v:.4f}" for k, v in acc.items())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
