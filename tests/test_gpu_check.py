"""`reprise gpu-check` in its CPU smoke form: every row of the GPU check runs, through the node engine, and
resuming from a request's own stored state is bit-identical (what the GPU form checks on CUDA in fp16)."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
import torch

from ops.cli import main as reprise
from workers import model_loading as models

SMOKE = ["--device", "cpu", "--model", "tiny", "--steps", "4", "--rounds", "1"]


def test_gpu_check_cpu_smoke_run_measures_every_row_and_resumes_exactly(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert reprise(["gpu-check", *SMOKE, "--batches", "1,2", "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and report["finite"]["finite"] and report["environment"]["dtype"] == "float32"
    rows = {(r["run"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {("plain", 1), ("plain", 2), ("deepcache interval 3", 1), ("deepcache interval 3", 2)}
    assert all(not r["errors"] for r in rows.values())
    for (run, batch), r in rows.items():  # each timed image (1 round) decoded, finite, not flat
        assert r["images_checked"] == batch and r["images_nonfinite"] == r["images_flat"] == 0, (run, r)
        assert r["images_per_s"] == pytest.approx(batch / statistics.median(r["rounds_s"]), rel=1e-2)
    assert rows["plain", 2]["mean_batch"] > 1  # the two requests shared calls
    # DeepCache ran (deep blocks cached on steps 1 and 2 of 4), and its speed-up is against plain at its batch
    assert rows["plain", 1]["unet_passes"] == rows["plain", 2]["unet_passes"] == [[4, 0]]
    for batch in (1, 2):
        deepcache = rows["deepcache interval 3", batch]
        assert deepcache["unet_passes"] == [[2, 2]]
        assert deepcache["speedup_vs_plain"] == pytest.approx(
            rows["plain", batch]["s_per_image"] / deepcache["s_per_image"]
        )
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


class PoisonedVae:
    """The tiny VAE, its decoded images spoiled: one NaN pixel (``nan``) or one flat colour (``flat``)."""

    def __init__(self, vae, how: str):
        self.vae, self.how, self.config = vae, how, vae.config

    def __getattr__(self, name):
        return getattr(self.vae, name)

    def decode(self, z, *args, **kwargs):
        out = self.vae.decode(z, *args, **kwargs)
        if self.how == "nan":
            out.sample[:, :, 3, 5] = float("nan")
        else:
            out.sample = torch.full_like(out.sample, 0.25)
        return out


@pytest.mark.parametrize("how", ["nan", "flat"])
def test_gpu_check_fails_when_the_images_it_times_are_not_finite_or_flat(tmp_path, monkeypatch, capsys, how):
    """The latents stay finite (the U-Net is untouched) and the resume stays bit-identical (both images are
    spoiled alike): only the check of the images themselves can fail this run."""
    load = models.load_components
    monkeypatch.setattr(
        models, "load_components", lambda *a, **k: dataclasses.replace(c := load(*a, **k), vae=PoisonedVae(c.vae, how))
    )
    out = tmp_path / "check.json"
    assert reprise(["gpu-check", *SMOKE, "--batches", "1", "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert not report["ok"] and report["finite"]["finite"]
    assert all(r["bit_identical"] for r in report["resume"])
    spoiled = "images_nonfinite" if how == "nan" else "images_flat"
    for r in report["rows"] + report["resume"]:
        assert r[spoiled] == r["images_checked"] > 0, r
    assert "BAD IMAGES" in capsys.readouterr().out
