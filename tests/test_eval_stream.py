"""`reprise eval stream`: the request stream has the structure it claims, and serving it through the
real job path (in-process service, embedded cache) pairs every cache-served shape request with a fresh
generation of the same prompt and seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ops.eval_quality import EDITS
from ops.eval_stream import build_stream, main, summarise
from ops.shapes import scene as sc
from workers.model_loading import SHIPPED_DIR

PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "prompts"


def test_generated_stream_structure():
    items = build_stream("generated", 300, seed=3)
    assert len(items) == 300
    kinds = {it.kind.split(":")[0] for it in items}
    assert kinds == {"popular", "edit", "paraphrase", "reroll"}
    for prev, it in zip(items, items[1:]):
        assert it.scene is not None and sc.parse_scene(it.prompt) == it.scene  # the caption names its scene
        if it.kind.startswith("edit:"):
            changed = [k for k, v in it.scene.as_dict().items() if prev.scene.as_dict()[k] != v]
            assert changed == list(EDITS[it.kind.split(":")[1]]) and it.seed == prev.seed
        elif it.kind == "paraphrase":
            assert it.scene == prev.scene and it.prompt != prev.prompt and it.seed == prev.seed
        elif it.kind == "reroll":
            assert it.prompt == prev.prompt and it.seed != prev.seed
    popular = [(it.prompt, it.seed) for it in items if it.kind == "popular"]
    assert len(set(popular)) < len(popular)  # Zipf: popular scenes come back as exact repeats
    assert build_stream("generated", 300, seed=3) == items  # seeded


@pytest.mark.skipif(not PROMPTS.is_dir(), reason="../shared/prompts is not here")
def test_mixed_stream_interleaves_real_prompts():
    items = build_stream("mixed", 200, seed=1, mix=0.5, prompts=str(PROMPTS))
    real = [it for it in items if it.kind == "real"]
    assert 60 < len(real) < 140 and all(it.scene is None for it in real)
    assert all(sc.parse_scene(it.prompt) == it.scene for it in items if it.scene is not None)


def test_bad_stream_kind_is_refused():
    with pytest.raises(SystemExit, match="generated"):
        build_stream("nonsense", 5)


def test_summary_flags_a_table_outside_the_tolerance():
    def rec(hit, acc, fresh):
        return {
            "hit": hit,
            "accuracy": acc,
            "fresh_accuracy": fresh,
            "steps_saved": 5 if hit != "miss" else 0,
            "kind": "edit:color",
        }

    good = summarise([rec("approximate", 80, 80), rec("miss", 60, 60), rec("approximate", 100, 100)], 10, 2.0)
    assert good["within_tolerance"] and good["approximate_hits"]["n"] == 2 and good["hit_pct"]["approximate"] == 66.7
    bad = summarise([rec("approximate", 60, 80), rec("approximate", 100, 100), rec("exact", 80, 80)], 10, 2.0)
    assert not bad["within_tolerance"] and bad["approximate_hits"]["delta"] == -10.0 and bad["steps_saved_pct"] == 50.0


@pytest.mark.skipif(not (SHIPPED_DIR / "shapes" / "model_index.json").exists(), reason="no shapes model")
def test_stream_runs_end_to_end(tmp_path, capsys):
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "stream.json"
    # a table that sends every similar-enough request to K = 2/5: approximate hits must happen and be scored
    rc = main(["--n", "8", "--steps", "5", "--skip-table=-1:0.4", "--json", str(out), "--seed", "4"])
    report = json.loads(out.read_text())
    s = report["tables"]["-1:0.4"]["summary"]
    records = report["tables"]["-1:0.4"]["records"]
    assert s["requests"] == 8 and s["table"] == [[-1.0, 0.4]]
    assert records[0]["hit"] == "miss" and s["approximate_hits"]["n"] >= 2 and s["hit_pct"]["exact"] > 0
    for r in records:
        assert 0 <= r["accuracy"] <= 100 and 0 <= r["fresh_accuracy"] <= 100
        if r["hit"] == "approximate":
            assert r["k"] == 2 and r["steps_computed"] == 3
        if r["hit"] == "miss":
            assert r["accuracy"] == r["fresh_accuracy"] and r["psnr"] is None  # a miss is the fresh image
    assert rc == (0 if s["within_tolerance"] else 1)
    assert "whole stream" in capsys.readouterr().out
