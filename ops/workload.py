"""Prompt files and the repeat/refinement model that turns a prompt pool into a request stream.

Prompt files (read by path; see ../shared/prompts/SOURCES.md) are read by ``scheduler.prompt_log``
(``read_prompts``, re-exported here): .tsv/.csv with a Prompt column, .jsonl, or one prompt per line.

No public prompt file is a session trace, so repeats and refinements are synthesised. The model, with
every parameter printed in each load-test report (``WorkloadParams``):

1. Each request belongs to a tenant drawn uniformly from ``tenants`` (the cache is scoped by tenant,
   so more tenants means fewer hits).
2. With probability ``session_p`` a request continues that tenant's session (its previous request):
   - with probability ``edit_p`` it *edits* the previous prompt (adds, replaces or drops a style
     modifier) and keeps its seed — a refinement, the approximate cache's case;
   - otherwise it *re-rolls*: the same prompt with a new seed.
3. Otherwise it is a *fresh* draw from the pool with Zipf popularity: the prompt of popularity rank
   r (ranks are a seeded shuffle of the file) is drawn with probability ∝ r^-``zipf`` (0 = uniform).
   A fresh draw uses the prompt's canonical seed (the file's seed, else a hash of the text), so a
   popular prompt drawn again is an exact repeat — the exact cache's case.
4. Steps, sizes and guidance come from the file where it has them (``file_params``), else
   ``default_steps`` and the model's default size; sizes above ``max_size`` fall back to the default.
   ``steps`` forces one step count for every request.
5. Priorities are drawn from ``priorities`` ({priority: weight}).

``as_is`` replays the file in order, once, with no synthetic repeats (tenant and priority as above).
"""

from __future__ import annotations

import bisect
import random
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field

from scheduler.prompt_log import PromptRow, read_prompts  # noqa: F401  (re-exported: ops tools read prompts here)

MODIFIERS = (
    "highly detailed",
    "at sunset",
    "watercolor painting",
    "4k",
    "trending on artstation",
    "cinematic lighting",
    "studio photograph",
    "oil painting",
    "wide angle",
    "pastel colors",
    "black and white",
    "in winter",
    "digital art",
    "soft focus",
    "isometric view",
    "by a famous illustrator",
    "dramatic sky",
    "minimalist",
)


@dataclass
class WorkloadParams:
    zipf: float = 1.0
    session_p: float = 0.5
    edit_p: float = 0.6
    tenants: int = 1
    priorities: dict[int, float] = field(default_factory=lambda: {5: 1.0})
    steps: int | None = None
    default_steps: int = 20
    file_params: bool = True
    pool: int | None = None
    seed: int = 0
    as_is: bool = False
    model: str = "tiny"
    max_size: int | None = None
    cache: dict | None = None  # request cache options (e.g. all off for the baseline of --compare)


def parse_priorities(text: str) -> dict[int, float]:
    """'5' or '5:0.8,0:0.1,9:0.1' → {priority: weight}."""
    out = {}
    for part in text.split(","):
        if part.strip():
            p, _, w = part.partition(":")
            out[int(p)] = float(w) if w else 1.0
    if not out or any(not 0 <= p <= 9 for p in out) or any(w < 0 for w in out.values()) or sum(out.values()) <= 0:
        raise ValueError(f"bad priority mix {text!r}: use e.g. 5:0.8,0:0.1,9:0.1")
    return out


class Workload:
    """An endless (or, ``as_is``, file-long) stream of request dicts following ``WorkloadParams``."""

    def __init__(self, rows: list[PromptRow], params: WorkloadParams):
        if not rows:
            raise ValueError("empty prompt pool")
        self.p = params
        self.rows = rows[: params.pool] if params.pool else list(rows)
        self.rng = random.Random(params.seed)
        order = list(range(len(self.rows)))
        self.rng.shuffle(order)
        self.by_rank = order  # by_rank[r] = row index of popularity rank r+1
        weights = [1.0 / (r + 1) ** params.zipf for r in range(len(self.rows))]
        total, acc = sum(weights), 0.0
        self.cdf = []
        for w in weights:
            acc += w
            self.cdf.append(acc / total)
        self.tenant_names = ["public"] if params.tenants <= 1 else [f"tenant{i}" for i in range(params.tenants)]
        self.prio_values = sorted(params.priorities)
        self.prio_weights = [params.priorities[p] for p in self.prio_values]
        self.last: dict[str, dict] = {}  # tenant → its previous request (with its modifiers)
        self.cursor = 0
        self.kinds: Counter = Counter()

    # --- the parts of one request ---------------------------------------------------------------
    def _fresh(self) -> tuple[PromptRow, int]:
        rank = min(bisect.bisect_left(self.cdf, self.rng.random()), len(self.rows) - 1)
        return self.rows[self.by_rank[rank]], rank

    def canonical_seed(self, row: PromptRow) -> int:
        if self.p.file_params and row.seed is not None and 0 <= row.seed < 2**32:
            return row.seed
        return zlib.crc32(row.prompt.encode()) ^ (self.p.seed & 0xFFFFFFFF)

    def _edit(self, base: str, modifiers: list[str]) -> list[str]:
        modifiers = list(modifiers)
        roll = self.rng.random()
        if modifiers and roll < 0.2:
            modifiers.pop(self.rng.randrange(len(modifiers)))
        elif modifiers and roll < 0.5:
            modifiers[self.rng.randrange(len(modifiers))] = self.rng.choice(MODIFIERS)
        else:
            modifiers.append(self.rng.choice([m for m in MODIFIERS if m not in modifiers] or MODIFIERS))
        return modifiers

    def _request(self, row: PromptRow, prompt: str, seed: int, tenant: str) -> dict:
        p = self.p
        req = {"prompt": prompt, "seed": seed, "model": p.model, "tenant": tenant}
        req["steps"] = p.steps or (row.steps if p.file_params and row.steps else p.default_steps)
        if p.file_params and row.width and row.height and row.width % 8 == 0 and row.height % 8 == 0:
            if p.max_size is None or max(row.width, row.height) <= p.max_size:
                req["width"], req["height"] = row.width, row.height
        if p.file_params and row.guidance_scale is not None and 0 <= row.guidance_scale <= 30:
            req["guidance_scale"] = row.guidance_scale
        req["priority"] = self.rng.choices(self.prio_values, self.prio_weights)[0]
        if p.cache is not None:
            req["cache"] = dict(p.cache)
        return req

    def next(self) -> tuple[dict, str] | None:
        """(request, kind) with kind fresh / edit / reroll / as-is; None when an as-is replay is over."""
        tenant = self.rng.choice(self.tenant_names)
        if self.p.as_is:
            if self.cursor >= len(self.rows):
                return None
            row = self.rows[self.cursor]
            self.cursor += 1
            kind, req = "as-is", self._request(row, row.prompt, self.canonical_seed(row), tenant)
        else:
            prev = self.last.get(tenant)
            if prev is not None and self.rng.random() < self.p.session_p:
                row, base, modifiers = prev["row"], prev["base"], prev["modifiers"]
                if self.rng.random() < self.p.edit_p:
                    kind, modifiers, seed = "edit", self._edit(base, modifiers), prev["seed"]
                else:
                    kind, seed = "reroll", self.rng.randrange(2**32)
            else:
                row, _ = self._fresh()
                kind, base, modifiers, seed = "fresh", row.prompt, [], self.canonical_seed(row)
            prompt = ", ".join([base, *modifiers])
            req = self._request(row, prompt, seed, tenant)
            self.last[tenant] = {"row": row, "base": base, "modifiers": modifiers, "seed": seed}
        self.kinds[kind] += 1
        return req, kind

    def take(self, n: int) -> list[tuple[dict, str]]:
        out = []
        for _ in range(n):
            item = self.next()
            if item is None:
                break
            out.append(item)
        return out

    def describe(self) -> dict:
        """The parameters and what was generated so far: printed in every report."""
        params = asdict(self.p)
        params["priorities"] = {str(k): v for k, v in self.p.priorities.items()}
        return {"params": params, "pool_size": len(self.rows), "generated": dict(self.kinds)}
