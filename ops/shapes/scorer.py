"""The shapes checker as a `reprise calibrate` scorer (``--scorer checker``): ground truth for ``shapes``.

Each image scores the checker's attribute accuracy against the scene its prompt names (points: the mean of
the five per-attribute checks x 100), so the loss of a hit is the accuracy it costs. Registered by the
``reprise`` command (``ops.cli``); the product's scorers live in ``workers.scorers``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ops.shapes import scene as sc
from ops.shapes.checker import check
from workers.scorers import Scorer, ScorerError, Scores


class CheckerScorer:
    name = "checker"

    def __call__(self, prompt: str, fresh: np.ndarray, resumed: Sequence[np.ndarray]) -> Scores:
        scene = sc.parse_scene(prompt)
        if scene is None:
            raise ScorerError(f"--scorer checker scores shape captions only; {prompt!r} does not name a whole scene")

        def accuracy(image: np.ndarray) -> float:
            return 100.0 * float(np.mean(list(check(image, scene).values())))

        return Scores(fresh=accuracy(fresh), resumed=[accuracy(r) for r in resumed])


def make(**_options) -> Scorer:
    return CheckerScorer()
