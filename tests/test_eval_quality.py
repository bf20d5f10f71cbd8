"""The quality harness runs end to end on the shapes model through the real job path (in-process
service, embedded cache), writes its JSON and contact sheet, and its calibration fits sensible tables.

Quality bars are not asserted: the shipped model may be a mid-training checkpoint. What must hold
whatever the weights: every condition ran (or says why not), exact hits equal fresh images bit for
bit, approximate hits resumed at the forced K, and the checker scored every image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ops import calibration_shapes as calibrate
from ops.eval_quality import ALL_RELATIONS, Condition, build_cases, contact_sheet, evaluate, main, write_json
from ops.shapes import scene as sc
from workers.model_loading import SHIPPED_DIR

STEPS = 10


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import torch

    if not (SHIPPED_DIR / "shapes" / "model_index.json").exists():
        pytest.skip("the shapes model is not in workers/models/shapes")
    torch.set_num_threads(1)
    conditions = [
        Condition("fresh", "fresh"),
        Condition("exact", "exact"),
        Condition("approx K=2/10", "approx", fraction=0.2),
        Condition("approx K=5/10", "approx", fraction=0.5),
        Condition("block d=0.5", "feature", feature={"method": "block", "block_delta": 0.5}, relations=("paraphrase",)),
        Condition(
            "approx K=2/10 + block d=0.5",
            "combo",
            fraction=0.2,
            feature={"method": "block", "block_delta": 0.5},
            relations=("paraphrase",),
        ),
    ]
    workdir = tmp_path_factory.mktemp("eval")
    return evaluate(
        "generated", 2, STEPS, "shapes", 0, ("paraphrase", "colour"), conditions, workdir=str(workdir), verbose=False
    )


def test_cases_change_what_the_relation_says():
    cases = build_cases("generated", 6, ALL_RELATIONS, seed=3)
    for case in cases:
        changed = {k for k in sc.ATTRIBUTES if case.source.as_dict()[k] != case.target.as_dict()[k]}
        expected = {
            "paraphrase": set(),
            "synonym": set(),
            "reseed": set(),
            "colour": {"color"},
            "shape": {"shape"},
            "position": {"position"},
            "background": {"background"},
            "size": {"size"},
        }.get(case.relation)
        if expected is not None:
            assert changed == expected, case
        else:
            assert len(changed) == {"two": 2, "reworded": 1}.get(case.relation, len(changed) or 1) and changed, case
        if case.relation in ("colour", "shape", "size", "background", "synonym"):  # edits keep the source's wording
            assert len(set(case.source_prompt.split()) ^ set(case.target_prompt.split())) <= 4, case
        assert case.target.color != case.target.background
        assert sc.parse_scene(case.target_prompt) == case.target  # the caption names the target scene
        if case.relation == "reseed":  # the same caption, another noise seed
            assert case.target_prompt == case.source_prompt and case.target_seed != case.seed, case
        else:
            assert case.target_prompt != case.source_prompt and case.target_seed == case.seed, case


def test_prompt_files_give_the_scenes_they_name(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text(
        "a small red circle in the top left on a blue background\na purple hexagon\n"
        "a large golden square in the center, black backdrop\n"
    )
    cases = build_cases(str(path), 5, ("paraphrase", "position"))
    assert [c.source for c in cases[::2]] == [
        sc.Scene("blue", "circle", "red", "small", "top left"),
        sc.Scene("black", "square", "yellow", "large", "center"),
    ]
    assert len(cases) == 4  # the line that names no whole scene is skipped


def test_every_condition_is_reported_and_exact_hits_are_the_fresh_images(report, tmp_path):
    rows = {r["condition"]: r for r in report["summary"]}
    assert set(rows) == {
        "fresh",
        "exact",
        "approx K=2/10",
        "approx K=5/10",
        "block d=0.5",
        "approx K=2/10 + block d=0.5",
    }
    assert rows["fresh"]["n"] == rows["exact"]["n"] == 4 and rows["block d=0.5"]["n"] == 2
    records = [r for r in report["records"] if "error" not in r and r["family"] != "source"]
    assert not [r for r in report["records"] if "error" in r]
    for r in records:
        assert set(r["checks"]) == set(sc.ATTRIBUTES) and 0 <= r["accuracy"] <= 100  # the checker scored it
    fresh = {(r["scene"], r["target_prompt"]): r for r in records if r["family"] == "fresh"}
    for r in records:
        f = fresh[(r["scene"], r["target_prompt"])]
        if r["family"] == "exact":
            assert r["hit"] == "exact" and r["steps_computed"] == 0
            assert (
                np.array_equal(r["_image"], f["_image"]) and r["identical_to_fresh"] and r["accuracy"] == f["accuracy"]
            )
        if r["family"] in ("approx", "combo"):
            assert r["hit"] == "approximate" and r["k"] == round((0.2 if "K=2" in r["condition"] else 0.5) * STEPS)
            assert r["steps_computed"] == STEPS - r["k"] and -1 <= r["similarity"] <= 1
    assert rows["exact"]["steps_saved_pct"] == 100 and rows["exact"]["delta"] == 0
    assert rows["approx K=5/10"]["steps_saved_pct"] == 50
    assert rows["block d=0.5"]["partial_unet_passes"] > 0  # block caching reused attention outputs
    assert 0 <= rows["fresh"]["accuracy"] <= 100

    out, sheet = tmp_path / "q.json", tmp_path / "q.png"
    write_json(report, out)
    data = json.loads(out.read_text())
    assert {r["condition"] for r in data["summary"]} == set(rows) and data["meta"]["steps"] == STEPS
    contact_sheet(report["records"], sheet)
    with Image.open(sheet) as im:
        assert im.size[0] > 200 and im.size[1] > 32 * 3 * (len(rows) + 2)


def test_calibration_fits_a_table_from_the_records(report):
    pairs = calibrate.pairs_from_records(report["records"], STEPS, fractions=(0.2, 0.5))
    assert len(pairs) == 4 and all(set(p["resumed"]) == {"0.2", "0.5"} for p in pairs)
    table = calibrate.fit_table(pairs, tolerance=100.0, min_pairs=1, fractions=(0.2, 0.5))
    assert table and table[0][1] == 0.5  # with any loss allowed, every pair skips the most
    assert calibrate.score_table(pairs, table, STEPS)["steps_saved_pct"] == 50


def _pairs(rows):
    return [{"similarity": s, "relation": "r", "fresh": 80.0, "resumed": {"0.1": a1, "0.5": a5}} for s, a1, a5 in rows]


def test_fit_table_keeps_each_tail_within_tolerance():
    # K=5/10 is safe only above 0.9, K=1/10 above 0.5; below 0.5 nothing is safe.
    rows = (
        [(0.95, 80, 80)] * 10
        + [(0.92, 80, 79)] * 10
        + [(0.7, 80, 50)] * 10
        + [(0.55, 79, 40)] * 10
        + [(0.3, 40, 40)] * 10
    )
    pairs = _pairs(rows)
    table = calibrate.fit_table(pairs, tolerance=2.0, min_pairs=5, fractions=(0.1, 0.5))
    assert [f for _, f in table] == [0.5, 0.1]
    assert 0.7 <= table[0][0] < 0.92 and 0.3 <= table[1][0] < 0.55
    score = calibrate.score_table(pairs, table, 10)
    assert score["delta"] >= -2.0 and all(b["loss"] <= 2.0 for b in score["bands"].values())
    assert calibrate.fit_table(pairs, tolerance=0.0, min_pairs=5, fractions=(0.1, 0.5))[0][0] >= 0.92  # stricter
    assert calibrate.fit_table(_pairs([(0.9, 20, 20)] * 10), tolerance=2.0, min_pairs=5, fractions=(0.1, 0.5)) == ()


def test_cli_entry_strips_the_subcommand(monkeypatch):
    seen = {}

    def fake_evaluate(*args, **kwargs):
        seen["args"] = args
        raise SystemExit(0)

    monkeypatch.setattr("ops.eval_quality.evaluate", fake_evaluate)
    with pytest.raises(SystemExit):
        main(["quality", "--n", "3", "--steps", "7", "--relations", "shape"])
    assert seen["args"][1:3] == (3, 7) and seen["args"][5] == ["shape"]
