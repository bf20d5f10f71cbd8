"""What every cache costs in accuracy: ``reprise eval quality``.

    reprise eval quality --prompts generated --n 6 --json quality.json --sheet quality.png

On the shapes model (``workers/models/shapes``: 32x32 pixels, one shape per scene) the learning-free
checker (``ops.shapes.checker``) reads background colour, shape colour, position, size and shape off
an image, so the accuracy of a generation against its prompt is measured, not guessed.

For each source scene the harness captions it, generates it through the real job path (an in-process
``GenerationService`` over a real embedded cache, Edge backend in a temporary folder) and so writes
its noise states; then, for each *relation* it derives a target scene (the same scene paraphrased,
another shape colour, shape, position or background) and runs the target under every condition:

- ``fresh``: no cache; the reference image of the target.
- ``exact``: the same request again, served from the exact cache (must equal ``fresh`` bit for bit).
- ``approx K=k/N``: the target resumed at step K from the source's stored state (NIRVANA); K is
  forced by a skip table override ``[(-1, K/N)]``, so every pair hits at every K.
- feature caches (``cache.feature`` of the request): DeepCache and block caching settings.
- combinations: an approximate hit plus a feature cache.

Every result is scored against the TARGET prompt's scene (attribute accuracy, in points: the mean
of the five per-attribute accuracies x 100), timed (steps computed, U-Net passes, wall time) and
compared with the fresh image of the same target (PSNR, 8-bit). ``fresh_same`` in the summary is the
fresh accuracy over exactly the targets a condition ran on, so ``delta`` is a paired comparison.

``ops.calibration_shapes`` runs the same harness over many more pairs to fit the MiniLM skip table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ops.shapes import scene as sc
from ops.shapes.checker import check

STATE_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
HARNESS_RELATIONS = ("paraphrase", "reseed", "colour", "shape", "position", "background")
ALL_RELATIONS = HARNESS_RELATIONS + ("synonym", "size", "two", "reworded", "unrelated")
FEATURE_SETTINGS: tuple[dict, ...] = (
    {"method": "deepcache", "deepcache_interval": 3},
    {"method": "deepcache", "deepcache_interval": 5},
    {"method": "block", "block_delta": 0.3},
    {"method": "block", "block_delta": 0.5},
)
COMBO_FRACTION = 0.2
COMBO_FEATURES: tuple[dict, ...] = (
    {"method": "deepcache", "deepcache_interval": 3},
    {"method": "block", "block_delta": 0.3},
)


# --- cases: (source, target) caption pairs ----------------------------------------------------------


@dataclass(frozen=True)
class Case:
    index: int  # source scene number
    seed: int  # the noise seed of the source
    relation: str
    source: sc.Scene
    source_prompt: str
    target: sc.Scene
    target_prompt: str
    target_seed: int  # the noise seed of every request for the target: the source's, but for "reseed"


# What each relation changes. Attribute edits keep the source's wording (a user editing a prompt);
# "paraphrase", "reworded" (one attribute, new wording) and "unrelated" are written afresh;
# "reseed" is the same caption with another noise seed (a user asking for another picture of it).
RESEED_OFFSET = 500
EDITS = {
    "colour": ("color",),
    "shape": ("shape",),
    "position": ("position",),
    "background": ("background",),
    "size": ("size",),
}


def _other(values: Sequence[str], rng: np.random.Generator, *avoid: str) -> str:
    choices = [v for v in values if v not in avoid]
    return choices[int(rng.integers(len(choices)))]


def edit_scene(scene: sc.Scene, relation: str, rng: np.random.Generator) -> sc.Scene:
    """The target scene of a relation: what changes from the source."""
    d = scene.as_dict()
    if relation in ("paraphrase", "synonym", "reseed"):
        return scene
    if relation == "colour":
        d["color"] = _other(sc.COLORS, rng, scene.color, scene.background)
    elif relation == "shape":
        d["shape"] = _other(sc.SHAPES, rng, scene.shape)
    elif relation == "position":
        d["position"] = _other(sc.POSITIONS, rng, scene.position)
    elif relation == "background":
        d["background"] = _other(sc.COLORS, rng, scene.background, scene.color)
    elif relation == "size":
        d["size"] = _other(sc.SIZES, rng, scene.size)
    elif relation == "two":  # two attributes at once
        first, second = rng.choice(list(EDITS), size=2, replace=False)
        return edit_scene(edit_scene(scene, str(first), rng), str(second), rng)
    elif relation == "reworded":
        return edit_scene(scene, str(rng.choice(list(EDITS))), rng)
    elif relation == "unrelated":
        while (other := sc.random_scene(rng)) == scene:
            pass
        return other
    else:
        raise ValueError(f"unknown relation {relation!r}; one of {', '.join(ALL_RELATIONS)}")
    return sc.Scene(**d)


def _caption(scene: sc.Scene, rng: np.random.Generator, avoid: str = "") -> str:
    for _ in range(20):
        text = sc.caption(scene, rng)
        if text != avoid:
            return text
    return text


def _same_wording(scene: sc.Scene, wording: dict) -> str:
    """The caption the source's random draws give for another scene: the same template and synonym
    choices, only the changed attributes' words differ."""
    rng = np.random.default_rng()
    rng.bit_generator.state = wording
    return sc.caption(scene, rng)


_SYNONYMS = [ws for table in (sc.COLOR_SYNONYMS, sc.SHAPE_SYNONYMS, sc.SIZE_SYNONYMS) for ws in table.values()]


def _swap_synonym(text: str, scene: sc.Scene, rng: np.random.Generator) -> str:
    """The same caption with one word replaced by a synonym (the scene it names unchanged)."""
    import re

    spots = [
        (m, ws)
        for ws in _SYNONYMS
        for w in ws
        if " " not in w
        for m in re.finditer(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)
    ]
    for i in rng.permutation(len(spots)):
        match, words = spots[int(i)]
        new = text[: match.start()] + _other(words, rng, match.group(0)) + text[match.end() :]
        if sc.parse_scene(new) == scene:
            return new
    return _caption(scene, rng, avoid=text)


def source_scenes(prompts: str, n: int, rng: np.random.Generator) -> list[tuple[sc.Scene, str, dict | None]]:
    """(scene, caption, the caption's random state) for ``generated`` (n random scenes); else for the
    first n lines of a file of shape captions that name all five attributes (no state: edits are reworded)."""
    if prompts == "generated":
        out = []
        for _ in range(n):
            scene = sc.random_scene(rng)
            wording = rng.bit_generator.state
            out.append((scene, sc.caption(scene, rng), wording))
        return out
    out = []
    for line in Path(prompts).read_text().splitlines():
        scene = sc.parse_scene(line.strip()) if line.strip() else None
        if scene is not None:
            out.append((scene, line.strip(), None))
        if len(out) == n:
            break
    if not out:
        raise SystemExit(f"{prompts}: no line names a whole shape scene (background, colour, position, size, shape)")
    return out


def target_prompt(
    relation: str, source_prompt: str, target: sc.Scene, wording: dict | None, rng: np.random.Generator
) -> str:
    if relation == "reseed":
        return source_prompt
    if relation == "synonym":
        return _swap_synonym(source_prompt, target, rng)
    if wording is not None and relation in (*EDITS, "two"):
        text = _same_wording(target, wording)
        if sc.parse_scene(text) == target:
            return text
    return _caption(target, rng, avoid=source_prompt)


def build_cases(prompts: str, n: int, relations: Sequence[str], seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i, (scene, prompt, wording) in enumerate(source_scenes(prompts, n, rng)):
        for relation in relations:
            target = edit_scene(scene, relation, rng)
            source_seed = seed * 1000 + i
            target_seed = source_seed + RESEED_OFFSET if relation == "reseed" else source_seed
            cases.append(
                Case(
                    i,
                    source_seed,
                    relation,
                    scene,
                    prompt,
                    target,
                    target_prompt(relation, prompt, target, wording, rng),
                    target_seed,
                )
            )
    return cases


# --- conditions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    name: str
    family: str  # fresh | exact | approx | feature | combo
    fraction: float | None = None  # approximate: K/N forced by the skip table
    feature: dict | None = None  # the request's cache.feature
    relations: tuple[str, ...] | None = None  # None: every target


def feature_label(feature: dict) -> str:
    if feature["method"] == "deepcache":
        return f"deepcache i={feature.get('deepcache_interval', 3)}"
    if feature["method"] == "block":
        return f"block d={feature.get('block_delta', 0.3)}"
    return feature["method"]


def default_conditions(
    steps: int,
    relations: Sequence[str],
    fractions: Sequence[float] = STATE_FRACTIONS,
    features: Iterable[dict] = FEATURE_SETTINGS,
    combos: Iterable[dict] = COMBO_FEATURES,
) -> list[Condition]:
    """fresh, exact, approx at each K, feature caches and approx+feature (the last two on the first
    relation's targets only: a feature cache does not depend on the source)."""
    from cache.skip_table import fraction_to_k

    first = (relations[0],)
    out = [Condition("fresh", "fresh"), Condition("exact", "exact")]
    out += [Condition(f"approx K={fraction_to_k(f, steps)}/{steps}", "approx", fraction=f) for f in fractions]
    out += [Condition(feature_label(f), "feature", feature=dict(f), relations=first) for f in features]
    out += [
        Condition(
            f"approx K={fraction_to_k(COMBO_FRACTION, steps)}/{steps} + {feature_label(f)}",
            "combo",
            fraction=COMBO_FRACTION,
            feature=dict(f),
            relations=first,
        )
        for f in combos
    ]
    return out


# --- the harness: one in-process service over a real embedded cache ----------------------------------


class _BorrowedStore:
    """The shared store as seen by a per-K cache view: everything but close() goes to the owner's store."""

    def __init__(self, store) -> None:
        self._store = store

    def __getattr__(self, name):
        return getattr(self._store, name)

    def close(self) -> None:  # the owning cache closes the store
        pass


def read_image(uri: str) -> np.ndarray:
    """The stored image of a result as uint8 HxWx3 (any fsspec URI)."""
    import fsspec
    from PIL import Image

    with fsspec.open(uri, "rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class QualityHarness:
    """Runs cases under conditions through ``GenerationService.run`` and scores the images."""

    def __init__(
        self,
        model: str = "shapes",
        steps: int = 25,
        guidance: float | None = None,
        workdir: str | None = None,
        fractions: Sequence[float] = STATE_FRACTIONS,
        skip_table=None,
    ) -> None:
        from cache import CacheSettings, LatentCache
        from workers.artifacts import ArtifactStore
        from workers.denoise_loop import DenoiseLoop
        from workers.model_loading import load_components, model_extra
        from workers.node_cache import cache_settings_for
        from workers.service import Device, DevicePool, GenerationService

        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="reprise-eval-")
        self.workdir = Path(workdir or self._tmp.name)
        self.steps = steps
        self.components = load_components(model)
        index = model_extra(model)
        self.guidance = guidance if guidance is not None else float(index.get("default_guidance_scale", 4.0))
        self.model = self.components.name
        # Lookups on a loaded 2-core machine can take longer than the serving time box: never miss by timeout here.
        base = dict(
            backend="edge",
            path=str(self.workdir / "qdrant"),
            state_fractions=list(fractions),
            lookup_timeout_ms=30_000,
            optimize_after_writes=100_000,
        )
        # the main cache serves with skip_table when given, else with the table in force (default or env)
        # the prompt embedder in force (REPRISE_CACHE_EMBEDDER): with `clip`, this model's text encoder
        settings, embedder = cache_settings_for(
            CacheSettings(**base, **({"skip_table": list(skip_table)} if skip_table else {})), self.components
        )
        self.cache = LatentCache.open(settings, embedder=embedder)
        # One cache view per K over the same store: the skip table override makes every lookup hit at that K.
        self.views = {
            f: LatentCache(
                settings.model_copy(update={"skip_table": [(-1.0, f)]}),
                _BorrowedStore(self.cache.store),
                self.cache.embedder,
            )
            for f in fractions
        }
        pool = DevicePool([Device("cpu", DenoiseLoop(self.components))])
        self.service = GenerationService(
            self.model,
            pool,
            ArtifactStore(str(self.workdir / "artifacts")),
            cache=self.cache,
            feature_defaults={"method": "off", "calibration_dir": str(self.workdir / "blockcache")},
        )
        self._jobs = 0

    # --- one request ---------------------------------------------------------------------------
    def _request(
        self, prompt: str, seed: int, tenant: str, *, exact=False, approximate=False, write=False, feature=None
    ) -> dict:
        return {
            "prompt": prompt,
            "seed": seed,
            "steps": self.steps,
            "guidance_scale": self.guidance,
            "model": self.model,
            "tenant": tenant,
            "cache": {"exact": exact, "approximate": approximate, "write": write, "feature": feature or {}},
        }

    def _run(self, request: dict, view=None):
        from workers.service import JobContext

        self.service.cache = view or self.cache
        self._jobs += 1
        try:
            started = time.perf_counter()
            result = self.service.run(request, JobContext(job_id=f"eval-{self._jobs}"))
            wall = time.perf_counter() - started
        finally:
            self.service.cache = self.cache
        return result, read_image(result.image_uri), wall

    def _record(self, case: Case, condition: Condition, result, image: np.ndarray, wall: float, sim: float) -> dict:
        checks = check(image, case.target)
        changed = {k: v for k, v in case.source.as_dict().items() if case.target.as_dict()[k] != v}
        feature = result.cache.feature
        full = feature.full_unet_passes if feature.method != "off" else result.cache.steps_computed
        return {
            "condition": condition.name,
            "family": condition.family,
            "relation": case.relation,
            "scene": case.index,
            "seed": case.target_seed,
            "source_prompt": case.source_prompt,
            "target_prompt": case.target_prompt,
            "target": case.target.as_dict(),
            "similarity": round(sim, 5),
            "hit": result.cache.hit,
            "k": result.cache.k,
            "steps_computed": result.cache.steps_computed,
            "steps_saved": self.steps - result.cache.steps_computed,
            "full_unet_passes": full,
            "partial_unet_passes": feature.partial_unet_passes,
            "wall_s": round(wall, 4),
            "denoise_s": result.timings.denoise_s,
            "checks": checks,
            "accuracy": 100.0 * float(np.mean(list(checks.values()))),
            "all_correct": all(checks.values()),
            # the changed attributes the image shows as the SOURCE had them: what a bad hit inherits
            "inherited": check(image, changed) if changed else {},
            "image_uri": result.image_uri,
            "_image": image,
        }

    # --- one source and its targets ---------------------------------------------------------------
    def run_source(self, cases: Sequence[Case], conditions: Sequence[Condition]) -> list[dict]:
        """All cases of one source scene: generate and store the source, then each target under each condition."""
        if not cases:
            return []
        first = cases[0]
        source_tenant = f"src{first.index}"
        src, src_image, src_wall = self._run(self._request(first.source_prompt, first.seed, source_tenant, write=True))
        self.service.drain_writebacks()
        if src.cache.hit != "miss":
            raise RuntimeError(f"source of scene {first.index} was not generated fresh: {src.cache}")
        records = [
            {
                "condition": "source",
                "family": "source",
                "relation": "-",
                "scene": first.index,
                "seed": first.seed,
                "source_prompt": first.source_prompt,
                "target_prompt": first.source_prompt,
                "target": first.source.as_dict(),
                "accuracy": 100.0 * float(np.mean(list(check(src_image, first.source).values()))),
                "steps_computed": src.cache.steps_computed,
                "wall_s": round(src_wall, 4),
                "image_uri": src.image_uri,
                "_image": src_image,
            }
        ]
        embed = self.cache.embed
        for case in cases:
            sim = float(np.dot(embed(case.source_prompt), embed(case.target_prompt)))
            fresh_tenant = f"fresh{case.index}"
            fresh_image = None
            for condition in conditions:
                if condition.relations is not None and case.relation not in condition.relations:
                    continue
                try:
                    rec = self._run_condition(case, condition, source_tenant, fresh_tenant, sim)
                except Exception as exc:  # e.g. a feature cache this model does not support: report it, go on
                    records.append(
                        {
                            "condition": condition.name,
                            "family": condition.family,
                            "relation": case.relation,
                            "scene": case.index,
                            "target_prompt": case.target_prompt,
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                    )
                    continue
                if condition.family == "fresh":
                    fresh_image = rec["_image"]
                    self.service.drain_writebacks()  # the exact condition looks this one up
                if fresh_image is not None:
                    p = psnr(rec["_image"], fresh_image)
                    rec["identical_to_fresh"] = bool(np.array_equal(rec["_image"], fresh_image))
                    rec["psnr"] = None if math.isinf(p) else round(p, 3)
                records.append(rec)
        return records

    def _run_condition(
        self, case: Case, condition: Condition, source_tenant: str, fresh_tenant: str, sim: float
    ) -> dict:
        family = condition.family
        if family == "fresh":
            request = self._request(case.target_prompt, case.target_seed, fresh_tenant, write=True)
            result, image, wall = self._run(request)
            expect = "miss"
        elif family == "exact":
            request = self._request(case.target_prompt, case.target_seed, fresh_tenant, exact=True)
            result, image, wall = self._run(request)
            expect = "exact"
        elif family == "feature":
            request = self._request(case.target_prompt, case.target_seed, "feature", feature=condition.feature)
            result, image, wall = self._run(request)
            expect = "miss"
        else:  # approx, combo: the target looks up in the source's tenant, where the source is the only entry
            request = self._request(
                case.target_prompt, case.target_seed, source_tenant, approximate=True, feature=condition.feature
            )
            result, image, wall = self._run(request, self.views[condition.fraction])
            expect = "approximate"
        if result.cache.hit != expect:
            raise RuntimeError(
                f"{condition.name}: expected a {expect} outcome, got {result.cache.hit} ({result.cache})"
            )
        return self._record(case, condition, result, image, wall, sim)

    def warm_up(self, conditions: Sequence[Condition]) -> None:
        """Block caching calibrates once per model and step count, inside its first job: do it before timing."""
        from workers.feature_cache import make_unet_runner

        for condition in conditions:
            if condition.feature and condition.feature.get("method") == "block":
                make_unet_runner(self.components, condition.feature, self.service.feature_defaults, steps=self.steps)

    def run(self, cases: Sequence[Case], conditions: Sequence[Condition], progress=None) -> list[dict]:
        self.warm_up(conditions)
        by_scene: dict[int, list[Case]] = {}
        for case in cases:
            by_scene.setdefault(case.index, []).append(case)
        records: list[dict] = []
        for done, scene_cases in enumerate(by_scene.values(), 1):
            records += self.run_source(scene_cases, conditions)
            if progress is not None:
                progress(done, len(by_scene))
        return records

    def close(self) -> None:
        for view in self.views.values():
            view.close()
        self.service.close()
        if self._tmp is not None:
            self._tmp.cleanup()


# --- summaries -----------------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(statistics.fmean(values)), 3) if values else None


def summarise(records: Sequence[dict], steps: int, by: Sequence[str] = ("condition",)) -> list[dict]:
    """One row per group: accuracy against the target, the fresh accuracy on the same targets, speed, PSNR."""
    fresh = {(r["scene"], r["target_prompt"]): r for r in records if r.get("family") == "fresh" and "error" not in r}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("family") == "source":
            continue
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    fresh_wall = _mean(r["wall_s"] for r in fresh.values())
    rows = []
    for key, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        row: dict[str, Any] = dict(zip(by, key))
        row["family"] = rs[0]["family"]
        row["n"] = len(ok)
        if not ok:
            row["error"] = rs[0]["error"]
            rows.append(row)
            continue
        same = [fresh[(r["scene"], r["target_prompt"])] for r in ok if (r["scene"], r["target_prompt"]) in fresh]
        acc, acc_fresh = _mean(r["accuracy"] for r in ok), _mean(r["accuracy"] for r in same)
        finite = [r["psnr"] for r in ok if r.get("psnr") is not None]
        wall = _mean(r["wall_s"] for r in ok)
        row.update(
            accuracy=acc,
            all_correct=_mean(100.0 * r["all_correct"] for r in ok),
            fresh_same=acc_fresh,
            delta=round(acc - acc_fresh, 3) if acc is not None and acc_fresh is not None else None,
            per_attribute={a: _mean(100.0 * r["checks"][a] for r in ok if a in r["checks"]) for a in sc.ATTRIBUTES},
            similarity=_mean(r["similarity"] for r in ok),
            steps_computed=_mean(r["steps_computed"] for r in ok),
            steps_saved_pct=_mean(100.0 * r["steps_saved"] / steps for r in ok),
            full_unet_passes=_mean(r["full_unet_passes"] for r in ok),
            partial_unet_passes=_mean(r["partial_unet_passes"] for r in ok),
            wall_s=wall,
            speedup=round(fresh_wall / wall, 3) if fresh_wall and wall else None,
            psnr=_mean(finite),
            identical_pct=_mean(100.0 * bool(r.get("identical_to_fresh")) for r in ok),
        )
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    head = f"{'condition':<46} {'n':>3} {'acc':>6} {'fresh':>6} {'delta':>6} {'all%':>5} {'saved%':>6} {'unet f/p':>9} {'wall s':>7} {'x':>5} {'PSNR':>6} {'same%':>5}"
    lines = [head, "-" * len(head)]

    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    for r in rows:
        name = r["condition"] + (f" [{r['relation']}]" if "relation" in r else "")
        if "error" in r:
            lines.append(f"{name:<46} {r['n']:>3}  unsupported: {r['error'][:90]}")
            continue
        lines.append(
            f"{name:<46} {r['n']:>3} {f(r['accuracy'], '6.1f')} {f(r['fresh_same'], '6.1f')} {f(r['delta'], '+6.1f')} "
            f"{f(r['all_correct'], '5.0f')} {f(r['steps_saved_pct'], '6.1f')} "
            f"{f(r['full_unet_passes'], '4.1f')}/{f(r['partial_unet_passes'], '<4.1f')} {f(r['wall_s'], '7.2f')} "
            f"{f(r['speedup'], '5.2f')} {f(r['psnr'], '6.1f')} {f(r['identical_pct'], '5.0f')}"
        )
    return "\n".join(lines)


# --- contact sheet ---------------------------------------------------------------------------------


def contact_sheet(records: Sequence[dict], path: str | os.PathLike, columns: int = 8, scale: int = 3) -> Path:
    """Rows: the target as drawn (reference render), the source, then each condition; columns: example
    targets (one per relation first, then more). Each cell is labelled with its checker score."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    ok = [r for r in records if "_image" in r]
    fresh = [r for r in ok if r["family"] == "fresh"]
    picked: list[dict] = []
    for relation in dict.fromkeys(r["relation"] for r in fresh):  # one per relation, then the rest in order
        picked.append(next(r for r in fresh if r["relation"] == relation))
    picked += [r for r in fresh if r not in picked]
    picked = picked[:columns]
    keys = [(r["scene"], r["target_prompt"]) for r in picked]
    conditions = list(dict.fromkeys(r["condition"] for r in records if r.get("family") not in ("source",)))
    by_cell = {(r["condition"], r["scene"], r["target_prompt"]): r for r in ok}
    sources = {r["scene"]: r for r in ok if r["family"] == "source"}

    cell = 32 * scale
    label_w, head_h, text_h, pad = 190, 28, 12, 6
    col_w, row_h = cell + 2 * pad, cell + text_h + pad
    rows = ["target (drawn)", "source"] + conditions
    sheet = Image.new("RGB", (label_w + col_w * len(picked), head_h + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, r in enumerate(picked):
        x = label_w + c * col_w + pad
        draw.text((x, 2), f"{r['relation']}", fill="black", font=font)
        draw.text((x, 14), f"scene {r['scene']}", fill="gray", font=font)
    for row, name in enumerate(rows):
        y = head_h + row * row_h
        draw.text((4, y + cell // 2 - 6), name[:30], fill="black", font=font)
        for c, (scene, target_prompt) in enumerate(keys):
            x = label_w + c * col_w + pad
            if name == "target (drawn)":
                image, label = sc.render_array(sc.Scene(**picked[c]["target"])), "reference"
            elif name == "source":
                src = sources.get(scene)
                image, label = (src["_image"], f"{src['accuracy']:.0f} (own)") if src else (None, "")
            else:
                rec = by_cell.get((name, scene, target_prompt))
                image = rec["_image"] if rec else None
                if rec is None:
                    label = "-"
                else:
                    label = f"{rec['accuracy']:.0f}" + ("" if rec.get("psnr") is None else f" {rec['psnr']:.0f}dB")
                    if rec.get("identical_to_fresh") and name != "fresh":
                        label = f"{rec['accuracy']:.0f} =fresh"
            if image is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(220, 220, 220))
            else:
                sheet.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (x, y))
            draw.text((x, y + cell), label, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# --- the command ------------------------------------------------------------------------------------


def evaluate(
    prompts: str = "generated",
    n: int = 6,
    steps: int = 25,
    model: str = "shapes",
    seed: int = 0,
    relations: Sequence[str] = HARNESS_RELATIONS,
    conditions: Sequence[Condition] | None = None,
    guidance: float | None = None,
    workdir: str | None = None,
    verbose: bool = True,
) -> dict:
    """Run the harness; the report (JSON-ready) plus the records with their images under ``records``."""
    started = time.perf_counter()
    cases = build_cases(prompts, n, relations, seed)
    conditions = list(conditions) if conditions is not None else default_conditions(steps, relations)
    harness = QualityHarness(model, steps, guidance, workdir)
    try:
        load_s = time.perf_counter() - started

        def progress(done, total):
            if verbose:
                print(f"  scene {done}/{total}  ({time.perf_counter() - started:.0f} s)", flush=True)

        records = harness.run(cases, conditions, progress)
        meta = {
            "model": harness.model,
            "model_version": harness.components.fingerprint,
            "steps": steps,
            "guidance_scale": harness.guidance,
            "scheduler": "ddim",
            "n_scenes": len({c.index for c in cases}),
            "n_targets": len(cases),
            "relations": list(relations),
            "prompts": prompts,
            "seed": seed,
            "state_fractions": list(STATE_FRACTIONS),
            "conditions": [c.name for c in conditions],
            "torch_threads": _torch_threads(),
            "machine": f"{platform.node()} ({os.cpu_count()} cpus)",
            "load_s": round(load_s, 2),
            "wall_s": round(time.perf_counter() - started, 2),
            "accuracy": "checker attribute accuracy against the target prompt's scene, points (mean of 5 attributes x 100)",
        }
    finally:
        harness.close()
    return {
        "meta": meta,
        "summary": summarise(records, steps),
        "by_relation": summarise(records, steps, by=("condition", "relation")),
        "records": records,
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def write_json(report: dict, path: str | os.PathLike) -> None:
    records = [{k: v for k, v in r.items() if not k.startswith("_")} for r in report["records"]]
    Path(path).write_text(json.dumps({**report, "records": records}, indent=1))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["quality"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="reprise eval quality", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prompts", default="generated", help="'generated' (random scenes) or a file of shape captions, one a line"
    )
    parser.add_argument(
        "--n", type=int, default=6, help="source scenes (each gives one target per relation; default 6: 2-6 min here)"
    )
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's (shapes: 4.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--relations", default=",".join(HARNESS_RELATIONS), help=f"comma-separated, of {', '.join(ALL_RELATIONS)}"
    )
    parser.add_argument(
        "--json", dest="json_out", default=None, help="write the report (summary, per relation, every record) here"
    )
    parser.add_argument("--sheet", default=None, help="write a contact sheet PNG here")
    parser.add_argument("--workdir", default=None, help="keep the cache and images here (default: a temporary folder)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: more spin against other processes on a shared CPU)",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    relations = [r.strip() for r in args.relations.split(",") if r.strip()]
    report = evaluate(
        args.prompts, args.n, args.steps, args.model, args.seed, relations, guidance=args.guidance, workdir=args.workdir
    )
    print(
        f"\n{report['meta']['model']} ({report['meta']['model_version']}), {args.steps} DDIM steps, "
        f"{report['meta']['n_scenes']} scenes x {len(relations)} relations, {report['meta']['wall_s']:.0f} s\n"
    )
    print(format_table(report["summary"]))
    print("\nper relation (approximate hits):")
    print(format_table([r for r in report["by_relation"] if r["family"] in ("approx", "combo")]))
    if args.sheet:
        contact_sheet(report["records"], args.sheet)
        print(f"\nwrote {args.sheet}")
    if args.json_out:
        write_json(report, args.json_out)
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
