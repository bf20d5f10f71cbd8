"""Loading a text-to-image model onto one device: diffusers' components, nothing per job.

A model is a diffusers-format directory, a Hugging Face id, or one of the built-ins below, which are
assembled offline from configs with seeded random weights (no download is possible on CI machines):

- ``tiny``: SD-1.5-shaped (CLIP text encoder → cross-attention U-Net → VAE), very small; tests, demo.
- ``sd15-small``: SD 1.5's U-Net block structure with channels (64, 128, 256, 256); benchmarks.
- ``sd15``: SD 1.5's full U-Net configuration (860M parameters), random weights; GPU timing.
- ``shapes``: the trained pixel-space model shipped in ``workers/models/shapes`` (see ops/shapes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from scheduler.errors import UnsupportedModelFamily
from workers.families import FAMILIES, SD15, Family, family_for_pipeline
from workers.lora import SharedLock

log = logging.getLogger("reprise.models")
# .to(dtype) on a model built in-process prints a float32-modules notice on every load: not useful here.
logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)

SHIPPED_DIR = Path(__file__).parent / "models"
_BUILD_LOCK = threading.Lock()


@dataclass
class ModelSpec:
    """Static facts about a model that the scheduler side may need (published to Redis by workers)."""

    name: str
    default_size: int
    max_size: int
    pixel_space: bool = False
    family: str = "sd15"
    # what a request that names none gets (the schema leaves them to the model); None: the family's
    default_steps: int | None = None
    default_guidance: float | None = None
    default_scheduler: str | None = None


@dataclass
class Components:
    """One model's components on one device. ``unet`` is the denoiser the loop calls: the U-Net of the
    U-Net families, the transformer of SD3 and Flux (see ``family``)."""

    name: str
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any | None
    scheduler_config: dict
    device: torch.device
    dtype: torch.dtype
    spec: ModelSpec
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)
    family: Family = SD15
    tokenizer_2: Any = None
    text_encoder_2: Any = None
    tokenizer_3: Any = None
    text_encoder_3: Any = None
    # LoRA (workers/lora.py): the device's loaded adapters, and the lock every text-encoder use takes (shared;
    # exclusive while a request's adapters are applied to the text encoders)
    adapters: Any = None
    text_lock: Any = field(default_factory=lambda: SharedLock())

    def __post_init__(self) -> None:
        spec, family = self.spec, self.family
        if spec.default_steps is None or spec.default_guidance is None or spec.default_scheduler is None:
            self.spec = replace(
                spec,
                default_steps=spec.default_steps or family.default_steps,
                default_guidance=family.default_guidance if spec.default_guidance is None else spec.default_guidance,
                default_scheduler=spec.default_scheduler or family.default_scheduler,
            )

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels(self)

    @property
    def size_multiple(self) -> int:
        """Widths and heights are multiples of this (8 at least: the request schema's own rule)."""
        return self.family.size_multiple(self)

    @property
    def input_coords(self) -> bool:
        """The U-Net also takes two coordinate channels after the latent (see ``with_coords``)."""
        return bool(self.extra.get("input_coords"))

    def unet_input(self, sample: torch.Tensor) -> torch.Tensor:
        return with_coords(sample) if self.input_coords else sample

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        return self.family.latent_shape(self, width, height)


def coord_grid(height: int, width: int, dtype=None, device=None) -> torch.Tensor:
    """(2, H, W): x then y of each pixel centre in [-1, 1], left to right and top to bottom."""
    import torch

    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) * (2.0 / height) - 1.0
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) * (2.0 / width) - 1.0
    return torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)]).to(
        dtype or torch.float32
    )


def with_coords(sample: torch.Tensor) -> torch.Tensor:
    """``sample`` with two fixed coordinate channels appended, the way SD's inpainting and depth U-Nets
    take extra input channels beside the latent. A conv U-Net has no positional embedding, so without
    them "top left" can only be learnt through zero padding (the shapes model never learnt it so)."""
    import torch

    b, _, h, w = sample.shape
    return torch.cat([sample, coord_grid(h, w, sample.dtype, sample.device).expand(b, 2, h, w)], dim=1)


# --- the offline tokenizer -----------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    # transformers 5 no longer exports this mapping; it is GPT-2's reversible byte → printable char table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def byte_level_tokenizer(max_length: int = 77):
    """A CLIPTokenizer over the 256 byte symbols (no merges): every prompt tokenises, offline."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder = Path(tempfile.mkdtemp(prefix="reprise-tok-"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def unigram_t5_tokenizer(max_length: int = 32):
    """A T5TokenizerFast over printable ASCII as a Unigram model (transformers 5 rebuilds a T5 tokenizer's
    Unigram from its vocabulary on reload, so a WordLevel one would not survive save_pretrained)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(i), -3.0) for i in range(33, 127)] + [("\u2581" + chr(i), -2.5) for i in range(33, 127)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


# --- built-in random-weight models ---------------------------------------------------------------

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
)

BUILTINS: dict[str, dict] = {
    "tiny": dict(
        unet=dict(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=32,
            norm_num_groups=8,
        ),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vae_channels=(8, 16, 16, 16),
        spec=ModelSpec("tiny", default_size=64, max_size=512),
    ),
    "sd15-small": dict(
        unet=dict(SD15_UNET, block_out_channels=(64, 128, 256, 256), cross_attention_dim=128, norm_num_groups=32),
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
        vae_channels=(8, 16, 16, 16),
        spec=ModelSpec("sd15-small", default_size=256, max_size=512),
    ),
    "sd15": dict(
        unet=dict(SD15_UNET),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vae_channels=(128, 256, 512, 512),
        spec=ModelSpec("sd15", default_size=512, max_size=1024),
    ),
    "tiny-sdxl": dict(
        family="sdxl",
        unet=dict(
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,  # the pooled projection and six time ids
            cross_attention_dim=64,  # both encoders' hidden states side by side
            norm_num_groups=8,
        ),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text_2=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
        ),
        vae_channels=(8, 16, 16, 16),
        spec=ModelSpec("tiny-sdxl", default_size=64, max_size=512, family="sdxl"),
    ),
    # SDXL's block structure (no attention at the top level, deeper attention below) at small widths: CPU benchmarks.
    "sdxl-small": dict(
        family="sdxl",
        unet=dict(
            block_out_channels=(64, 128, 256),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            attention_head_dim=(2, 4, 8),
            transformer_layers_per_block=(1, 2, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=64 + 6 * 32,
            cross_attention_dim=128,
            norm_num_groups=32,
        ),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        text_2=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64
        ),
        vae_channels=(8, 16, 16, 16),
        spec=ModelSpec("sdxl-small", default_size=256, max_size=512, family="sdxl"),
    ),
    # SDXL's real U-Net (2.6B parameters) and text encoders with random weights: GPU timing only, never in tests.
    "sdxl": dict(
        family="sdxl",
        unet=dict(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            cross_attention_dim=2048,
        ),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        text_2=dict(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
        ),
        vae_channels=(128, 256, 512, 512),
        vae_layers=2,
        spec=ModelSpec("sdxl", default_size=1024, max_size=2048, family="sdxl"),
    ),
    "tiny-sd3": dict(
        family="sd3",
        transformer=dict(
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,  # T5's width; the two CLIPs' states (32 + 32) fill it exactly
            caption_projection_dim=32,
            pooled_projection_dim=64,  # both CLIPs' pooled projections
            pos_embed_max_size=32,
        ),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
        t5=dict(d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4),
        latent_channels=16,
        vae_shift=(1.5305, 0.0609),  # SD3's scaling and shift factors
        vae_channels=(8, 16, 16, 16),
        spec=ModelSpec("tiny-sd3", default_size=64, max_size=512, family="sd3"),
    ),
    # MMDiT and Flux transformers wide enough that a CPU benchmark times their blocks, not Python: benchmarks.
    "sd3-small": dict(
        family="sd3",
        transformer=dict(
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=6,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=128,
            caption_projection_dim=256,
            pooled_projection_dim=128,
            pos_embed_max_size=64,
        ),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64),
        t5=dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4),
        latent_channels=16,
        vae_shift=(1.5305, 0.0609),
        vae_channels=(8, 16, 16, 16),
        spec=ModelSpec("sd3-small", default_size=256, max_size=512, family="sd3"),
    ),
    "flux-small": dict(
        family="flux",
        transformer=dict(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=6,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=128,
            pooled_projection_dim=64,
            guidance_embeds=True,
            axes_dims_rope=(16, 24, 24),
        ),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        t5=dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4),
        latent_channels=16,
        vae_shift=(0.3611, 0.1159),
        vae_channels=(8, 16, 16, 16),
        spec=ModelSpec("flux-small", default_size=256, max_size=512, family="flux"),
    ),
    "tiny-flux": dict(
        family="flux",
        transformer=dict(
            patch_size=1,
            in_channels=16,  # 4 latent channels in 2x2 patches
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=64,  # T5's width
            pooled_projection_dim=32,  # CLIP's pooled output
            guidance_embeds=True,  # dev-like: guidance is an input, not classifier-free
            axes_dims_rope=(4, 4, 8),
        ),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        t5=dict(d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4),
        latent_channels=4,
        vae_shift=(0.3611, 0.1159),  # Flux's scaling and shift factors
        vae_channels=(8, 16, 16, 16),
        spec=ModelSpec("tiny-flux", default_size=64, max_size=512, family="flux"),
    ),
}

SD_SCHEDULER_CONFIG = SD15.default_scheduler_config  # the SD 1.5-class default (workers/families.py)


def _clip_config(tokenizer, recipe: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **recipe,
    )


def _vae(recipe: dict, size: int, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    ch = recipe["vae_channels"]
    scaling, shift = recipe.get("vae_shift", (0.18215, None))
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(ch),
        up_block_types=("UpDecoderBlock2D",) * len(ch),
        block_out_channels=ch,
        layers_per_block=recipe.get("vae_layers", 1),
        latent_channels=latent_channels,
        norm_num_groups=min(8, ch[0]) if ch[0] < 32 else 32,
        sample_size=size,
        scaling_factor=scaling,
        shift_factor=shift,
    )


def _build_builtin(name: str, seed: int = 0) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    recipe = BUILTINS[name]
    family = FAMILIES[recipe.get("family", "sd15")]
    if family is not SD15:
        return _build_family_builtin(name, recipe, family, seed)
    with _BUILD_LOCK:  # the global RNG is seeded per build: keep concurrent builds apart
        torch.manual_seed(seed)
        tokenizer = byte_level_tokenizer()
        text_encoder = CLIPTextModel(_clip_config(tokenizer, recipe["text"]))
        size = recipe["spec"].default_size
        unet = UNet2DConditionModel(sample_size=size // 8, in_channels=4, out_channels=4, **recipe["unet"])
        vae = _vae(recipe, size)
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler_config=dict(SD_SCHEDULER_CONFIG),
        spec=recipe["spec"],
    )


def _build_family_builtin(name: str, recipe: dict, family: Family, seed: int) -> dict:
    """SDXL, SD3 and Flux built-ins: the same offline tokenizers, seeded random weights."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    size = recipe["spec"].default_size
    parts: dict[str, Any] = {"family": family, "spec": recipe["spec"]}
    with _BUILD_LOCK:
        torch.manual_seed(seed)
        parts["tokenizer"] = tokenizer = byte_level_tokenizer()
        if family.name == "sdxl":
            parts["text_encoder"] = CLIPTextModel(_clip_config(tokenizer, recipe["text"]))
            parts["tokenizer_2"] = byte_level_tokenizer()
            parts["text_encoder_2"] = CLIPTextModelWithProjection(_clip_config(tokenizer, recipe["text_2"]))
            parts["unet"] = UNet2DConditionModel(sample_size=size // 8, in_channels=4, out_channels=4, **recipe["unet"])
            parts["vae"] = _vae(recipe, size)
        else:
            t5_tokenizer = unigram_t5_tokenizer()
            t5 = T5EncoderModel(
                T5Config(vocab_size=len(t5_tokenizer.get_vocab()), pad_token_id=0, eos_token_id=1, **recipe["t5"])
            )
            if family.name == "sd3":
                parts["text_encoder"] = CLIPTextModelWithProjection(_clip_config(tokenizer, recipe["text"]))
                parts["tokenizer_2"] = byte_level_tokenizer()
                parts["text_encoder_2"] = CLIPTextModelWithProjection(_clip_config(tokenizer, recipe["text"]))
                parts["tokenizer_3"], parts["text_encoder_3"] = t5_tokenizer, t5
                parts["unet"] = SD3Transformer2DModel(sample_size=size // 8, **recipe["transformer"])
            else:
                parts["text_encoder"] = CLIPTextModel(_clip_config(tokenizer, recipe["text"]))
                parts["tokenizer_2"], parts["text_encoder_2"] = t5_tokenizer, t5
                parts["unet"] = FluxTransformer2DModel(**recipe["transformer"])
            parts["vae"] = _vae(recipe, size, recipe["latent_channels"])
    parts["scheduler_config"] = dict(family.default_scheduler_config)
    if family.name == "sdxl":
        parts["extra"] = {"force_zeros_for_empty_prompt": True}  # what StableDiffusionXLPipeline saves by default
    return parts


# name[.variant][-0000k-of-0000n].safetensors, and the index of sharded weights
_WEIGHTS = re.compile(r"^[^.]+?(?:\.(?P<variant>\w+))?(?:-\d{5}-of-\d{5})?\.safetensors$")
_WEIGHTS_INDEX = re.compile(r"^[^.]+\.safetensors\.index(?:\.(?P<variant>\w+))?\.json$")


def _weights_variant(folder: Path, prefer_fp16: bool) -> str | None:
    """ "fp16" when the folder holds fp16 safetensors and fp16 is wanted (or nothing else is there)."""
    variants = {m["variant"] for p in folder.glob("*.safetensors") if (m := _WEIGHTS.match(p.name))}
    return "fp16" if "fp16" in variants and (prefer_fp16 or None not in variants) else None


# Component classes come only from these libraries (model_index.json names them; nothing else is imported).
_LIBRARIES = ("diffusers", "transformers")


def _load_component(path: Path, name: str, entry, prefer_fp16: bool):
    import importlib

    library, class_name = entry[0], entry[1]
    if library not in _LIBRARIES:
        raise ValueError(f"{path}: component {name} comes from {library!r}; only {', '.join(_LIBRARIES)} are loaded")
    cls = getattr(importlib.import_module(library), class_name)
    if "Tokenizer" in class_name:
        return cls.from_pretrained(path / name)
    return cls.from_pretrained(path / name, variant=_weights_variant(path / name, prefer_fp16))


def _load_directory(path: Path, name: str, prefer_fp16: bool = False) -> dict:
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise FileNotFoundError(f"{path} is not a diffusers model directory (no model_index.json)")
    index = json.loads(index_file.read_text())
    family = family_for_pipeline(index.get("_class_name"), where=str(path))
    extra = index.get("reprise", {})
    parts: dict[str, Any] = {"family": family}
    for component in family.components:
        if component == "scheduler":
            continue
        entry = index.get(component)
        present = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] and (path / component).exists()
        if not present:
            if component in family.optional:
                parts[component] = None
                continue
            raise FileNotFoundError(f"{path}: a {family.pipeline} directory needs {component}/, listed in model_index")
        parts[component] = _load_component(path, component, entry, prefer_fp16)
    parts["unet"] = parts.pop(family.denoiser)
    unet, vae = parts["unet"], parts["vae"]
    parts["scheduler_config"] = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    pixel_space = vae is None
    factor = 1 if pixel_space else 2 ** (len(vae.config.block_out_channels) - 1)
    sample_size = unet.config.get("sample_size")
    default_size = int(extra.get("default_size", sample_size * factor if sample_size else 1024))
    parts["spec"] = ModelSpec(
        name=name,
        default_size=default_size,
        max_size=int(extra.get("max_size", max(default_size * 2, 64))),
        pixel_space=pixel_space,
        family=family.name,
        default_steps=int(extra.get("default_steps", family.default_steps)),
        default_guidance=float(extra.get("default_guidance_scale", family.default_guidance)),
        default_scheduler=_default_scheduler(family, parts["scheduler_config"], extra),
    )
    if family is SD15:
        extra_in = int(unet.config.in_channels) - int(unet.config.out_channels)
        if extra_in != (2 if extra.get("input_coords") else 0):
            raise ValueError(
                f"{path}: the U-Net takes {extra_in} channels beyond the latent, but model_index.json "
                f"says input_coords={bool(extra.get('input_coords'))}"
            )
    # the model's own calibrated table for the `clip` embedder (thresholds belong to one encoder)
    parts["extra"] = {"input_coords": bool(extra.get("input_coords")), **_clip_table(extra)}
    if index.get("force_zeros_for_empty_prompt"):  # SDXL: an empty negative prompt is zeros, not encoded
        parts["extra"]["force_zeros_for_empty_prompt"] = True
    return parts


def _default_scheduler(family: Family, scheduler_config: dict, extra: dict) -> str:
    """The directory's own scheduler where Reprise runs it (SDXL's Euler), else the family's default."""
    from workers.families import SCHEDULER_CLASSES

    if extra.get("default_scheduler") in family.schedulers:
        return extra["default_scheduler"]
    own = {cls: name for name, cls in SCHEDULER_CLASSES.items()}.get(scheduler_config.get("_class_name"))
    return own if own in family.schedulers else family.default_scheduler


def _clip_table(extra: dict) -> dict:
    return {"clip_skip_table": extra["clip_skip_table"]} if extra.get("clip_skip_table") else {}


def resolve_model(model: str) -> tuple[str, Path | None]:
    """(served name, directory or None for a built-in / hub id)."""
    if model in BUILTINS:
        return model, None
    if "/" not in model and (SHIPPED_DIR / model / "model_index.json").exists():
        return model, SHIPPED_DIR / model
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve().name, path.resolve()
    return model.replace("/", "--"), None


def model_extra(model: str) -> dict:
    """The ``reprise`` section of a model directory's model_index.json (default guidance, size, ...); {} for others."""
    _, directory = resolve_model(model)
    if directory is None or not (directory / "model_index.json").exists():
        return {}
    return json.loads((directory / "model_index.json").read_text()).get("reprise", {})


# The modules of a model, in the order the fingerprint hashes them (absent ones are skipped: SD 1.5's is unchanged).
MODULES = ("text_encoder", "unet", "vae", "text_encoder_2", "text_encoder_3")


def fingerprint(parts: dict) -> str:
    """A short hash of everything that changes outputs: configs and every weight."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(parts["scheduler_config"]), sort_keys=True, default=str).encode())
    for key in MODULES:
        module = parts.get(key)
        if module is None:
            continue
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        # Keys such as "_use_default_values" are bookkeeping (and unordered): leave them out.
        config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    for key in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if parts.get(key) is not None:
            h.update(json.dumps(parts[key].get_vocab(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def load_components(model: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Components:
    """Load a model onto a device once: on CUDA the family's dtype (fp16; bf16 for SD3 and Flux), fp32 on the
    CPU, unless ``dtype`` says otherwise."""
    device = torch.device(device)
    chosen = dtype
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    name, directory = resolve_model(model)
    fp16 = dtype == torch.float16  # then an fp16 variant of the weights, where there is one, is loaded
    if model in BUILTINS:
        parts = _build_builtin(model)
    elif directory is not None:
        parts = _load_directory(directory, name, prefer_fp16=fp16)
    else:
        parts = _load_from_hub(model, name, fp16=fp16)
    fp = fingerprint(parts)
    if chosen is None and device.type == "cuda":
        dtype = parts.get("family", SD15).cuda_dtype
    for key in MODULES:
        if parts.get(key) is not None:
            parts[key] = parts[key].to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Components(name=name, device=device, dtype=dtype, fingerprint=fp, **parts)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) read as huggingface_hub reads it, now: 1, true, yes or on
    (any case) is offline; 0, false, empty or unset is online."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return bool(value) and value.upper() in constants.ENV_VARS_TRUE_VALUES


def hub_files(files: Iterable[str], model_index: dict, fp16: bool) -> list[str]:
    """The files of a hub repository that _load_directory reads: model_index.json and, for each pipeline
    component the index names, its configs and tokenizer files and one set of safetensors weights -- the
    fp16 variant when ``fp16`` and the component has one, else the plain weights. Nothing else: not the
    full checkpoints an SD repository keeps beside its folders, other variants, .bin or .ckpt files."""
    files = list(files)
    wanted = ["model_index.json"]
    for component in family_for_pipeline(model_index.get("_class_name"), where="the repository").components:
        entry = model_index.get(component)
        if not isinstance(entry, (list, tuple)) or not entry or entry[0] is None:
            continue
        names = [f.split("/", 1)[1] for f in files if f.startswith(f"{component}/") and f.count("/") == 1]
        configs, weights = [], {}  # weights: variant (None = plain) -> file names
        for n in names:
            if m := _WEIGHTS.match(n) or _WEIGHTS_INDEX.match(n):
                weights.setdefault(m["variant"], []).append(n)
            elif n.endswith((".json", ".txt")):
                configs.append(n)
        variant = "fp16" if "fp16" in weights and (fp16 or None not in weights) else None
        if not component.startswith(("tokenizer", "scheduler")) and variant not in weights:
            raise FileNotFoundError(f"the repository has no {component}/*.safetensors weights (only those are loaded)")
        wanted += [f"{component}/{n}" for n in sorted(configs + weights.get(variant, []))]
    return wanted


def _load_from_hub(model_id: str, name: str, fp16: bool = False) -> dict:
    import huggingface_hub

    try:
        if hub_offline():
            local = huggingface_hub.snapshot_download(model_id, local_files_only=True)
        else:
            index = json.loads(Path(huggingface_hub.hf_hub_download(model_id, "model_index.json")).read_text())
            files = hub_files(huggingface_hub.HfApi().list_repo_files(model_id), index, fp16)
            local = huggingface_hub.snapshot_download(model_id, allow_patterns=files)
    except UnsupportedModelFamily:
        raise
    except Exception as exc:  # offline machines: say what to do instead
        raise FileNotFoundError(
            f"model {model_id!r} is neither a built-in ({', '.join(BUILTINS)}), a shipped model, a local directory, "
            f"nor downloadable here ({type(exc).__name__}: {exc}). Pass a diffusers directory with --model."
        ) from None
    return _load_directory(Path(local), name, prefer_fp16=fp16)


def save_builtin(name: str, directory: str | Path, seed: int = 0, without: tuple[str, ...] = ()) -> Path:
    """Write a built-in model as a diffusers directory (what `--model <dir>` loads); ``without`` leaves out
    optional components (SD3's third text encoder)."""
    directory = Path(directory)
    parts = _build_builtin(name, seed=seed)
    if parts.get("family", SD15) is not SD15:
        return _save_pipeline(parts, directory, without)
    directory.mkdir(parents=True, exist_ok=True)
    for key in ("tokenizer", "text_encoder", "unet", "vae"):
        parts[key].save_pretrained(directory / key)
    (directory / "scheduler").mkdir(exist_ok=True)
    (directory / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", **parts["scheduler_config"]}, indent=2)
    )
    spec = parts["spec"]
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "reprise": {"default_size": spec.default_size, "max_size": spec.max_size},
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return directory


def _save_pipeline(parts: dict, directory: Path, without: tuple[str, ...] = ()) -> Path:
    """The diffusers pipeline of the family, written by its own ``save_pretrained`` (the directory a user makes),
    with the built-in's default and maximum size added to model_index.json. ``without``: optional components
    left out (SD3's T5)."""
    import diffusers

    family = parts["family"]
    scheduler = getattr(diffusers, family.scheduler_class).from_config(parts["scheduler_config"])
    kwargs = {c: parts.get(c) for c in family.components if c not in ("scheduler", family.denoiser)}
    kwargs.update({family.denoiser: parts["unet"], "scheduler": scheduler})
    for component in without:
        if component not in family.optional:
            raise ValueError(f"{component} is not optional in a {family.pipeline}")
        kwargs[component] = None
    getattr(diffusers, family.pipeline)(**kwargs).save_pretrained(directory)
    index_file = directory / "model_index.json"
    index = json.loads(index_file.read_text())
    spec = parts["spec"]
    index["reprise"] = {"default_size": spec.default_size, "max_size": spec.max_size}
    index_file.write_text(json.dumps(index, indent=2))
    return directory
