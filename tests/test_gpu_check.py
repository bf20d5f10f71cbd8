"""`reprise gpu-check` in its CPU smoke form: every row of the GPU check runs, through the node engine, and
resuming from a request's own stored state is bit-identical (what the GPU form checks on CUDA in fp16)."""

from __future__ import annotations

import json

import pytest
import torch

from ops.cli import main as reprise


def test_gpu_check_cpu_smoke_run_measures_every_row_and_resumes_exactly(tmp_path, capsys):
    out = tmp_path / "check.json"
    argv = ["--device", "cpu", "--model", "tiny", "--steps", "4", "--batches", "1,2", "--rounds", "1"]
    assert reprise(["gpu-check", *argv, "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and report["finite"]["finite"] and report["environment"]["dtype"] == "float32"
    rows = {(r["run"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {("plain", 1), ("plain", 2), ("deepcache interval 3", 1), ("deepcache interval 3", 2)}
    assert all(r["images_per_s"] > 0 and not r["errors"] for r in rows.values())
    assert rows["plain", 2]["mean_batch"] > 1  # the two requests shared calls
    assert rows["deepcache interval 3", 1]["speedup_vs_plain"] > 0
    assert [(r["scheduler"], r["hit"], r["k"], r["bit_identical"]) for r in report["resume"]] == [
        ("ddim", "approximate", 2, True),
        ("dpmpp_2m", "approximate", 2, True),
    ]
    table = capsys.readouterr().out
    assert "reprise gpu-check" in table and "bit-identical at K=2/4" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: the full check is the one to run")
def test_gpu_check_without_cuda_says_what_to_do(capsys):
    assert reprise(["gpu-check", "--device", "cuda"]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err
