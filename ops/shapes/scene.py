"""Procedural one-shape scenes, their renderings and their natural-language captions.

A scene is one shape (circle, square, triangle) of one palette colour, small or large, at one
cell of a 3x3 grid, on a background of another palette colour.  ``render`` draws it with hard
edges (no anti-aliasing) so that :mod:`ops.shapes.checker` can read it back exactly;
``caption`` writes one of many phrasings; ``parse_prompt`` maps a caption (or any prompt using
the same words) back to the attributes it names.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

# ---------------------------------------------------------------------------- vocabulary
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (135, 40, 185),
    "orange": (250, 140, 15),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLORS = list(PALETTE)
COLOR_SYNONYMS: dict[str, list[str]] = {
    "red": ["red", "crimson", "scarlet"],
    "green": ["green", "emerald", "grass-green"],
    "blue": ["blue", "cobalt", "azure"],
    "yellow": ["yellow", "lemon", "golden"],
    "purple": ["purple", "violet", "lilac"],
    "orange": ["orange", "tangerine", "amber"],
    "white": ["white", "ivory", "snow-white"],
    "black": ["black", "jet-black", "ebony"],
}
SHAPES = ["circle", "square", "triangle"]
SHAPE_SYNONYMS: dict[str, list[str]] = {
    "circle": ["circle", "disk", "disc", "dot", "round shape"],
    "square": ["square", "box", "block", "square tile"],
    "triangle": ["triangle", "wedge", "triangular shape", "pyramid"],
}
SIZES = ["small", "large"]
SIZE_SYNONYMS: dict[str, list[str]] = {
    "small": ["small", "little", "tiny"],
    "large": ["large", "big", "huge"],
}
# grid positions (row, col) with row 0 at the top
POSITIONS = [
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
]
POSITION_CELLS = {p: (i // 3, i % 3) for i, p in enumerate(POSITIONS)}
# phrases that follow the noun ("a red circle ___")
POSITION_PHRASES: dict[str, list[str]] = {
    "top left": ["in the top left", "in the upper left", "near the top-left corner", "at the upper-left"],
    "top": ["at the top", "at the top center", "in the upper middle", "near the top edge"],
    "top right": ["in the top right", "in the upper right", "near the top-right corner", "at the upper-right"],
    "left": ["on the left", "at the middle left", "near the left edge", "in the center left"],
    "center": ["in the center", "in the middle", "at the centre", "right in the middle"],
    "right": ["on the right", "at the middle right", "near the right edge", "in the center right"],
    "bottom left": ["in the bottom left", "in the lower left", "near the bottom-left corner", "at the lower-left"],
    "bottom": ["at the bottom", "at the bottom center", "in the lower middle", "near the bottom edge"],
    "bottom right": ["in the bottom right", "in the lower right", "near the bottom-right corner", "at the lower-right"],
}
BACKGROUND_NOUNS = ["background", "backdrop", "canvas", "field"]

# geometry on the 32-pixel reference canvas (continuous coordinates, pixel i spans [i, i+1])
REF = 32
CELL_CENTERS = (8.0, 16.0, 24.0)
HALF_SIZE = {"small": 3.5, "large": 6.5}


@dataclass(frozen=True)
class Scene:
    background: str  # palette colour name
    shape: str  # circle | square | triangle
    color: str  # palette colour name of the shape (differs from background)
    size: str  # small | large
    position: str  # one of POSITIONS

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


ATTRIBUTES = ("background", "color", "position", "size", "shape")


def random_scene(rng: np.random.Generator) -> Scene:
    bg, fg = rng.choice(len(COLORS), size=2, replace=False)
    return Scene(
        background=COLORS[int(bg)],
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        color=COLORS[int(fg)],
        size=SIZES[int(rng.integers(2))],
        position=POSITIONS[int(rng.integers(len(POSITIONS)))],
    )


# ---------------------------------------------------------------------------- rendering
_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRID_CACHE:
        c = (np.arange(size, dtype=np.float32) + 0.5) * (REF / size)  # pixel centres, ref units
        _GRID_CACHE[size] = (c[None, :].repeat(size, 0), c[:, None].repeat(size, 1))  # x, y
    return _GRID_CACHE[size]


def shape_mask(scene: Scene, size: int = 32) -> np.ndarray:
    x, y = _grid(size)
    r, c = POSITION_CELLS[scene.position]
    cx, cy, h = CELL_CENTERS[c], CELL_CENTERS[r], HALF_SIZE[scene.size]
    dx, dy = x - cx, y - cy
    if scene.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if scene.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if scene.shape == "triangle":  # apex up, base 2h wide, height 2h
        t = (dy + h) / (2 * h)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= h * t)
    raise ValueError(scene.shape)


def render_array(scene: Scene, size: int = 32) -> np.ndarray:
    """uint8 array (size, size, 3)."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = PALETTE[scene.background]
    img[shape_mask(scene, size)] = PALETTE[scene.color]
    return img


def render(scene: Scene, size: int = 32):
    from PIL import Image

    return Image.fromarray(render_array(scene, size))


# ---------------------------------------------------------------------------- captions
def _pick(rng: np.random.Generator, xs):
    return xs[int(rng.integers(len(xs)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    col = _pick(rng, COLOR_SYNONYMS[scene.color])
    bgc = _pick(rng, COLOR_SYNONYMS[scene.background])
    shp = _pick(rng, SHAPE_SYNONYMS[scene.shape])
    siz = _pick(rng, SIZE_SYNONYMS[scene.size])
    pos = _pick(rng, POSITION_PHRASES[scene.position])
    bgn = _pick(rng, BACKGROUND_NOUNS)
    # noun phrase: size and colour in either order
    np_ = f"{siz} {col} {shp}" if rng.random() < 0.75 else f"{col} {siz} {shp}"
    a = _article(np_)
    templates = [
        lambda: f"{a} {np_} {pos} on {_article(bgc)} {bgc} {bgn}",
        lambda: f"{a} {np_} {pos}, {bgc} {bgn}",
        lambda: f"{bgc} {bgn} with {a} {np_} {pos}",
        lambda: f"{pos}, {a} {np_} on {_article(bgc)} {bgc} {bgn}",
        lambda: f"{a} {np_} against {_article(bgc)} {bgc} {bgn}, {pos}",
        lambda: f"on {_article(bgc)} {bgc} {bgn}, {a} {np_} {pos}",
        lambda: f"{a} {bgc} {bgn} and {a} {np_} {pos}".replace(f"{a} {bgc}", f"{_article(bgc)} {bgc}", 1),
        lambda: f"picture of {a} {np_} {pos}; the {bgn} is {bgc}",
        lambda: f"{np_} {pos} over {bgc}",
    ]
    return _pick(rng, templates)()


# ---------------------------------------------------------------------------- parsing
_COLOR_WORDS = {w: c for c, ws in COLOR_SYNONYMS.items() for w in ws}
_SHAPE_WORDS = {w: s for s, ws in SHAPE_SYNONYMS.items() for w in ws}
_SIZE_WORDS = {w: s for s, ws in SIZE_SYNONYMS.items() for w in ws}
_MULTI = {  # multi-word / hyphenated synonyms collapsed to one token before parsing
    "grass-green": "green",
    "snow-white": "white",
    "jet-black": "black",
    "round shape": "circle",
    "square tile": "square",
    "triangular shape": "triangle",
}


def _tokens(text: str) -> list[str]:
    t = text.lower()
    for k, v in _MULTI.items():
        t = t.replace(k, v)
    t = t.replace("-", " ")
    return re.findall(r"[a-z]+", t)


def parse_prompt(text: str) -> dict[str, str]:
    """Attributes named by a prompt: a dict with any of the keys in ATTRIBUTES.

    Background colour: the colour word next to a background noun (``blue background``,
    ``the backdrop is blue``) or, failing that, after ``over``/``on``/``against`` when two
    colours are named; shape colour: the other colour.  Position: row from
    top/upper/bottom/lower, column from left/right, middle otherwise.
    """
    toks = _tokens(text)
    out: dict[str, str] = {}
    colors = [(i, _COLOR_WORDS[w]) for i, w in enumerate(toks) if w in _COLOR_WORDS]
    bg_idx = None
    nouns = [i for i, w in enumerate(toks) if w in BACKGROUND_NOUNS]
    for i, _ in colors:
        if any(i + 1 == j for j in nouns) or any(j + 2 == i and toks[j + 1] == "is" for j in nouns):
            bg_idx = i
            break
    if bg_idx is None and len(colors) >= 2:
        for i, _ in colors:
            if (
                i > 0
                and toks[i - 1] in ("over", "on", "against", "a", "an")
                and i - 2 >= 0
                and toks[i - 2] in ("over", "on", "against")
            ):
                bg_idx = i
                break
            if i > 0 and toks[i - 1] in ("over", "against"):
                bg_idx = i
                break
    if bg_idx is not None:
        out["background"] = dict(colors)[bg_idx]
    fg = [c for i, c in colors if i != bg_idx]
    if fg:
        out["color"] = fg[0]
    for w in toks:
        if w in _SHAPE_WORDS:
            out["shape"] = _SHAPE_WORDS[w]
            break
    for w in toks:
        if w in _SIZE_WORDS:
            out["size"] = _SIZE_WORDS[w]
            break
    row = col = None
    pos_seen = False
    for w in toks:
        if w in ("top", "upper"):
            row, pos_seen = 0, True
        elif w in ("bottom", "lower"):
            row, pos_seen = 2, True
        elif w == "left":
            col, pos_seen = 0, True
        elif w == "right" and not _is_right_in_the_middle(toks):
            col, pos_seen = 2, True
        elif w in ("center", "centre", "middle", "central"):
            pos_seen = True
    if pos_seen:
        out["position"] = POSITIONS[(1 if row is None else row) * 3 + (1 if col is None else col)]
    return out


def _is_right_in_the_middle(toks: list[str]) -> bool:
    s = " ".join(toks)
    return "right in the middle" in s and not re.search(
        r"(upper|lower|top|bottom|middle|center|the) right(?! in the middle)", s.replace("right in the middle", "")
    )


def parse_scene(text: str) -> Scene | None:
    """A full Scene when the prompt names all five attributes, else None."""
    d = parse_prompt(text)
    return Scene(**d) if all(k in d for k in ATTRIBUTES) else None
