"""The load generator's workload model and prompt-file readers (no broker, no worker)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ops.load_run import percentiles
from ops.workload import PromptRow, Workload, WorkloadParams, parse_priorities, read_prompts

PROMPTS = Path(__file__).resolve().parents[1].parent / "shared" / "prompts"
needs_prompts = pytest.mark.skipif(not PROMPTS.exists(), reason="../shared/prompts not present")


@needs_prompts
def test_reads_the_shared_prompt_files_by_path():
    parti = read_prompts(PROMPTS / "PartiPrompts.tsv")
    assert len(parti) == 1632 and parti[0].prompt == "bond" and parti[0].seed is None
    drawbench = read_prompts(PROMPTS / "drawbench_imagen.csv")  # UTF-8 BOM before the header
    assert len(drawbench) == 200 and drawbench[0].prompt == "A red colored car."
    coco = read_prompts(PROMPTS / "coco_captions_30k.txt")
    assert len(coco) > 30_000 - 10 and coco[0].prompt.startswith("A man about to return a serve")
    krea = read_prompts(PROMPTS / "krea_1k_by_time.csv")
    first = krea[0]
    assert (
        first.seed == 3188425640
        and first.steps == 50
        and (first.width, first.height) == (512, 512)
        and first.guidance_scale == 7.0
    )
    assert len(krea) > 900


def test_reads_jsonl_and_refuses_a_file_without_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"prompt": "a cat", "seed": 3, "steps": 9}) + "\n\n" + json.dumps({"prompt": "a dog"}) + "\n"
    )
    rows = read_prompts(f)
    assert rows == [PromptRow("a cat", seed=3, steps=9), PromptRow("a dog")]
    bad = tmp_path / "x.csv"
    bad.write_text("text,category\nhello,x\n")
    with pytest.raises(ValueError):
        read_prompts(bad)


def _pool(n=200):
    return [PromptRow(f"prompt number {i}") for i in range(n)]


def test_zipf_skews_popularity_and_zero_is_uniform():
    skewed = Workload(_pool(), WorkloadParams(zipf=1.2, session_p=0.0, seed=1))
    counts = Counter(r["prompt"] for r, _ in skewed.take(4000))
    top = counts.most_common(1)[0][1]
    assert top > 4000 * 0.15  # rank 1 of Zipf(1.2) over 200 items has about 22% of the mass
    uniform = Workload(_pool(), WorkloadParams(zipf=0.0, session_p=0.0, seed=1))
    ucounts = Counter(r["prompt"] for r, _ in uniform.take(4000))
    assert ucounts.most_common(1)[0][1] < 4000 * 0.02
    # A popular prompt drawn again is an exact repeat: same canonical seed.
    seeds = {r["seed"] for r, _ in skewed.take(200) if r["prompt"] == counts.most_common(1)[0][0]}
    assert len(seeds) == 1


def test_sessions_edit_and_reroll_the_previous_prompt():
    w = Workload(_pool(), WorkloadParams(session_p=0.8, edit_p=0.5, seed=2))
    items = w.take(2000)
    kinds = Counter(k for _, k in items)
    assert 0.7 < (kinds["edit"] + kinds["reroll"]) / 2000 < 0.85
    assert 0.4 < kinds["edit"] / (kinds["edit"] + kinds["reroll"]) < 0.6
    for (prev, _), (req, kind) in zip(items, items[1:]):
        if kind == "edit":  # refinement: the previous prompt's base, modifiers changed, same seed
            assert req["prompt"].split(", ")[0] == prev["prompt"].split(", ")[0]
            assert req["seed"] == prev["seed"]
        if kind == "reroll":
            assert req["prompt"] == prev["prompt"]
    assert w.describe()["params"]["session_p"] == 0.8 and sum(w.describe()["generated"].values()) == 2000


def test_tenants_priorities_file_params_and_as_is():
    rows = [
        PromptRow("a", seed=7, steps=30, width=512, height=768, guidance_scale=7.5),
        PromptRow("b", width=2048, height=2048),
    ]
    w = Workload(
        rows, WorkloadParams(as_is=True, tenants=3, priorities=parse_priorities("0:1,9:1"), max_size=1024, model="sim")
    )
    items = w.take(10)
    assert [k for _, k in items] == ["as-is", "as-is"] and w.next() is None  # the file once, in order
    first, second = items[0][0], items[1][0]
    assert (first["seed"], first["steps"], first["width"], first["height"], first["guidance_scale"]) == (
        7,
        30,
        512,
        768,
        7.5,
    )
    assert "width" not in second and second["steps"] == 20  # over max_size: the model's default size
    w = Workload(_pool(), WorkloadParams(tenants=3, priorities=parse_priorities("0:1,9:1"), seed=3))
    reqs = [r for r, _ in w.take(600)]
    assert {r["tenant"] for r in reqs} == {"tenant0", "tenant1", "tenant2"}
    assert {r["priority"] for r in reqs} == {0, 9}
    forced = Workload(rows, WorkloadParams(steps=5, file_params=False))
    r, _ = forced.next()
    assert r["steps"] == 5 and "width" not in r and r["seed"] != 7
    with pytest.raises(ValueError):
        parse_priorities("12:1")


def test_percentiles_nearest_rank():
    p = percentiles([float(i) for i in range(1, 101)])
    assert (p["p50"], p["p95"], p["p99"], p["max"]) == (50.0, 95.0, 99.0, 100.0)
    assert percentiles([])["p50"] is None
