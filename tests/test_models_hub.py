"""A Hugging Face id: what is read as offline, and which files of a repository are downloaded.

No network: the hub's listing is a fixed file list and its download functions are replaced by fakes."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from workers import model_loading as models
from workers.model_loading import hub_files, hub_offline

# runwayml/stable-diffusion-v1-5's layout: full checkpoints beside the component folders, several
# variants and formats per component.
SD15_FILES = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
]
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
CONFIGS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "vae/config.json",
]


def _selected(files, patterns):
    """What snapshot_download keeps of ``files`` given ``allow_patterns`` (huggingface_hub's own filter)."""
    return sorted(filter_repo_objects(files, allow_patterns=patterns))


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", "On"])
def test_offline_values(monkeypatch, value):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline()


@pytest.mark.parametrize("value", ["0", "false", "no", "off", ""])
def test_online_values(monkeypatch, value):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert not hub_offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not hub_offline()


def test_cpu_downloads_the_plain_component_weights_only():
    patterns = hub_files(SD15_FILES, SD15_INDEX, fp16=False)
    assert _selected(SD15_FILES, patterns) == sorted(
        CONFIGS
        + [
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        ]
    )


def test_cuda_downloads_the_fp16_variant_where_there_is_one():
    files = [f for f in SD15_FILES if f != "vae/diffusion_pytorch_model.fp16.safetensors"]
    patterns = hub_files(files, SD15_INDEX, fp16=True)
    assert _selected(files, patterns) == sorted(
        CONFIGS
        + [
            "text_encoder/model.fp16.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.safetensors",  # no fp16 variant of the VAE here
        ]
    )


def test_sharded_weights_come_with_their_index_and_pixel_space_models_have_no_vae():
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}
    index["vae"] = [None, None]
    plain = _selected(files, hub_files(files, index, fp16=False))
    assert [f for f in plain if f.startswith("unet/")] == [
        "unet/config.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    ]
    half = _selected(files, hub_files(files, index, fp16=True))
    assert [f for f in half if f.startswith("unet/")] == [
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
    ]
    assert not any(f.startswith("vae/") for f in plain + half)


def test_a_repository_without_safetensors_weights_is_a_clear_error():
    files = [f for f in SD15_FILES if not (f.startswith("unet/") and f.endswith(".safetensors"))]
    with pytest.raises(FileNotFoundError, match="unet"):
        hub_files(files, SD15_INDEX, fp16=False)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A "repository" (the tiny model saved as a diffusers directory) served by fakes of the hub's functions."""
    repo = models.save_builtin("tiny", tmp_path / "repo")
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append(kw)
        return str(repo)

    class HfApi:
        def list_repo_files(self, repo_id):
            return files

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kw: str(repo / filename))
    monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return repo, files, calls


def test_hf_hub_offline_0_downloads_the_selected_files(fake_hub, monkeypatch):
    repo, files, calls = fake_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    parts = models._load_from_hub("someone/tiny-sd", "someone--tiny-sd")
    assert parts["unet"] is not None
    assert len(calls) == 1 and not calls[0].get("local_files_only")
    index = json.loads((repo / "model_index.json").read_text())
    assert calls[0]["allow_patterns"] == hub_files(files, index, fp16=False)


def test_hf_hub_offline_1_reads_the_local_cache_only(fake_hub, monkeypatch):
    _, _, calls = fake_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models._load_from_hub("someone/tiny-sd", "someone--tiny-sd")
    assert calls == [{"local_files_only": True}]


def test_a_directory_with_an_fp16_variant_loads_it_for_fp16(tmp_path):
    repo = models.save_builtin("tiny", tmp_path / "m")
    parts = models._load_directory(repo, "m")
    unet = parts["unet"]
    for p in unet.parameters():
        torch.nn.init.zeros_(p)
    unet.to(torch.float16).save_pretrained(repo / "unet", variant="fp16")
    assert any(p.abs().sum() > 0 for p in models._load_directory(repo, "m")["unet"].parameters())
    half = models._load_directory(repo, "m", prefer_fp16=True)["unet"]
    assert all(p.abs().sum() == 0 for p in half.parameters())
    Path(repo / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # only the variant left: loaded anyway
    assert all(p.abs().sum() == 0 for p in models._load_directory(repo, "m")["unet"].parameters())


def test_the_cli_does_not_force_offline(monkeypatch, capsys):
    import os

    from ops.cli import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["schema"]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ


def test_hub_repository_of_an_unsupported_pipeline_is_refused_by_class(fake_hub, monkeypatch):
    from scheduler.errors import UnsupportedModelFamily

    repo, _, calls = fake_hub
    index = json.loads((repo / "model_index.json").read_text())
    (repo / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(UnsupportedModelFamily, match="KandinskyV22Pipeline"):
        models._load_from_hub("someone/kandinsky", "someone--kandinsky")
    assert calls == []  # refused from model_index.json, before any weights were downloaded


def test_hub_files_of_an_sdxl_repository_take_both_text_encoders(tmp_path):
    repo = models.save_builtin("tiny-sdxl", tmp_path / "xl")
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    wanted = hub_files(files, json.loads((repo / "model_index.json").read_text()), fp16=False)
    for component in ("text_encoder_2", "tokenizer_2", "unet", "vae"):
        assert any(f.startswith(f"{component}/") for f in wanted), component
    assert any(f.startswith("text_encoder_2/") and f.endswith(".safetensors") for f in wanted)
