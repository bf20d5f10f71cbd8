"""Random LoRA adapters built offline for a model, written the ways people publish them: diffusers' folder
(``pytorch_lora_weights.safetensors``, written by the pipeline's ``save_lora_weights``) and a kohya/A1111
``.safetensors`` (diffusers' ``convert_state_dict_to_kohya``). For tests and `reprise bench lora`; no download.

The layers are PEFT's (``inject_adapter_in_model``) on the model's own modules, with random weights: the
attention projections of the denoiser and, unless ``text_encoder=False``, of each CLIP text encoder. Both
low-rank factors are drawn with ``strength`` as their deviation, so the update is about as large as the tiny
models' own weights, as a trained adapter's is; much stronger random updates make a tiny random model chaotic
enough that batching's last-bit float differences grow into visible ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

DENOISER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _random_lora(module, targets: list[str], seed: int, strength: float, rank: int) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), module, adapter_name="x")
    generator = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(module, adapter_name="x")
    return {k: torch.randn(v.shape, generator=generator) * strength for k, v in state.items()}


def write_adapter(
    model: str,
    path: str | Path,
    *,
    seed: int = 0,
    fmt: str = "diffusers",
    text_encoder: bool = True,
    strength: float = 0.15,
    rank: int = 4,
) -> Path:
    """Write a random adapter for ``model`` (a built-in or a diffusers directory): ``fmt="diffusers"`` makes
    the folder ``path``; ``"kohya"`` the file ``path`` (SD 1.5 and SDXL, as A1111 reads them). Returns what
    `reprise lora add` takes."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    from workers.model_loading import load_components

    c = load_components(model, "cpu")
    family, path = c.family, Path(path)
    denoiser = _random_lora(c.unet, DENOISER_TARGETS, seed, strength, rank)
    encoders = {}
    if text_encoder and family.name in ("sd15", "sdxl"):
        for i, name in enumerate(("text_encoder", "text_encoder_2")):
            module = getattr(c, name, None)
            if module is not None:
                encoders[name] = _random_lora(module, TEXT_TARGETS, seed + 1 + i, strength, rank)
    if fmt == "kohya":
        if family.name not in ("sd15", "sdxl"):
            raise ValueError(f"kohya files are written for SD 1.5 and SDXL here, not {family.name}")
        peft = {f"unet.{k}": v for k, v in denoiser.items()}
        for name, state in encoders.items():  # kohya names CLIP's modules from text_model down
            peft.update({f"{name}.text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()})
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(peft).items()}, str(path))
        return path
    layers = {f"{family.denoiser}_lora_layers": convert_state_dict_to_diffusers(denoiser)}
    layers.update({f"{name}_lora_layers": convert_state_dict_to_diffusers(s) for name, s in encoders.items()})
    getattr(diffusers, family.pipeline).save_lora_weights(str(path), safe_serialization=True, **layers)
    return path
