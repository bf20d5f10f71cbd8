"""Model families: how each kind of text-to-image model is conditioned, shaped and called.

The denoising loop (workers/denoise_loop.py) is one loop for every family; a family is the small adapter it
asks at the few places where families differ:

- ``encode``: a prompt's conditioning (one or more text encoders; pooled outputs) and its pooled vector,
  the `clip` prompt embedder's vector for the approximate cache;
- ``conditioning``: a request's rows for the denoiser (classifier-free guidance doubles them; SDXL adds its
  size/crop time ids, a Flux-dev-like model its guidance embedding);
- ``latent_shape`` and ``size_multiple``: what a latent looks like (the loop keeps latents as (C, h, w);
  Flux's 2×2 packing happens inside ``call``);
- ``make_scheduler``: which schedulers it runs and how their timesteps are set (FlowMatchEuler's shift);
- ``call``: one denoiser call for a batch of samples, each with its own timestep.

The family is chosen from ``model_index.json``'s ``_class_name`` (``family_for_pipeline``); any other class
is refused with ``UnsupportedModelFamily``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scheduler.errors import UnsupportedModelFamily

# request name -> diffusers scheduler class
SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}


@dataclass
class Conditioning:
    """A family's denoiser inputs beside the sample and the timestep, batch first (one row per sample).

    Rows of several requests concatenate (``cat``) into one batched call; ``call`` passes them the way
    the family's denoiser takes them."""

    family: Family
    tensors: dict[str, torch.Tensor]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    @property
    def rows(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def _map(self, fn) -> Conditioning:
        return Conditioning(self.family, {k: fn(v) for k, v in self.tensors.items()})

    def to(self, device=None, dtype=None) -> Conditioning:
        return self._map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))

    def clone(self) -> Conditioning:
        return self._map(torch.Tensor.clone)

    def detach(self) -> Conditioning:
        return self._map(torch.Tensor.detach)

    def equal(self, other: Conditioning) -> bool:
        return self.tensors.keys() == other.tensors.keys() and all(
            torch.equal(v, other.tensors[k]) for k, v in self.tensors.items()
        )

    def with_tensors(self, **extra: torch.Tensor) -> Conditioning:
        return Conditioning(self.family, {**self.tensors, **extra})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        if len(parts) == 1:
            return parts[0]
        return Conditioning(parts[0].family, {k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})

    def call(self, model, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for ``sample`` (rows × latent) at timestep(s) ``t`` (a scalar or one per row)."""
        return self.family.call(model, sample, t, self)


def _tokens(tokenizer, text: str, device, max_length: int | None = None) -> torch.Tensor:
    length = min(tokenizer.model_max_length, max_length or tokenizer.model_max_length)
    return tokenizer(
        [text], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def _per_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    t = torch.as_tensor(t).reshape(-1)
    return t.expand(rows) if t.numel() == 1 else t


class Family:
    """The SD-1.5 class: one CLIP text encoder, a cross-attention U-Net, ε or v prediction."""

    name = "sd15"
    pipeline = "StableDiffusionPipeline"
    denoiser = "unet"  # the model_index component the loop calls
    # model_index components: loaded when present; those in ``optional`` may be null or absent
    components = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
    optional: tuple[str, ...] = ("vae",)  # a pixel-space model has no VAE
    schedulers = ("ddim", "euler", "dpmpp_2m")
    default_scheduler = "ddim"
    default_steps = 25
    default_guidance = 5.0
    default_scheduler_config: dict = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    scheduler_class = "DDIMScheduler"  # the class save_pretrained writes for the default config
    feature_methods = ("deepcache", "block")
    taylorseer_lite = False
    cuda_dtype = torch.float16  # the dtype it is served in on CUDA unless the worker says otherwise

    # --- text -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, c, text: str) -> tuple[Conditioning, torch.Tensor]:
        """(one row of conditioning, the pooled text vector (1, D))."""
        out = c.text_encoder(_tokens(c.tokenizer, text, c.device))
        return Conditioning(self, {"encoder_hidden_states": out.last_hidden_state}), out.pooler_output

    def pooled_dim(self, c) -> int:
        return int(c.text_encoder.config.hidden_size)

    def uses_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    def zero_negative(self, c, negative_prompt: str, positive: Conditioning) -> Conditioning | None:
        """The negative rows without encoding, where the family's pipeline uses zeros (SDXL's empty negative)."""
        return None

    def conditioning(
        self, c, positive: Conditioning, negative: Conditioning | None, guidance_scale: float, width: int, height: int
    ) -> Conditioning:
        """A request's rows: [negative, positive] with classifier-free guidance, else [positive]."""
        return Conditioning.cat([negative, positive]) if self.uses_cfg(guidance_scale) else positive

    # --- latents ----------------------------------------------------------------------------------
    def latent_channels(self, c) -> int:
        return int(c.unet.config.out_channels)

    def size_multiple(self, c) -> int:
        return max(8, c.vae_scale_factor)

    def latent_shape(self, c, width: int, height: int) -> tuple[int, int, int]:
        f = c.vae_scale_factor
        return (self.latent_channels(c), height // f, width // f)

    # --- schedule ---------------------------------------------------------------------------------
    def make_scheduler(self, name: str, config: dict, steps: int, latent_shape: tuple, device=None):
        """A fresh scheduler (one per request: schedulers are state machines) with its timesteps set."""
        sched = self._new_scheduler(name, config)
        sched.set_timesteps(steps, device=device)
        return sched

    def _new_scheduler(self, name: str, config: dict):
        import diffusers

        if name not in self.schedulers:
            raise ValueError(f"the {self.name} family runs the schedulers {', '.join(self.schedulers)}, not {name!r}")
        return getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(config)

    def scale_input(self, sched, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sched.scale_model_input(sample, t)

    # --- the denoiser -------------------------------------------------------------------------------
    def call(self, model, sample: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return model(sample, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def unet_kwargs(self, cond: Conditioning) -> dict:
        """What a U-Net feature cache passes the U-Net's blocks beside the sample (U-Net families)."""
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "added_cond_kwargs": {}}


class SDXLFamily(Family):
    """SDXL: two CLIP encoders (penultimate hidden states concatenated), the second's pooled projection and
    the (original size, crop, target size) time ids as the U-Net's added conditioning."""

    name = "sdxl"
    pipeline = "StableDiffusionXLPipeline"
    components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "unet", "vae", "scheduler")
    optional = ()
    default_steps = 30
    default_guidance = 5.0
    scheduler_class = "EulerDiscreteScheduler"
    default_scheduler = "euler"
    default_scheduler_config = dict(Family.default_scheduler_config, timestep_spacing="leading")

    @torch.no_grad()
    def encode(self, c, text: str) -> tuple[Conditioning, torch.Tensor]:
        hidden = []
        for tokenizer, encoder in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
            out = encoder(_tokens(tokenizer, text, c.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the second encoder's projected pooled output (CLIPTextModelWithProjection)
        cond = Conditioning(self, {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled})
        return cond, pooled

    def pooled_dim(self, c) -> int:
        return int(c.text_encoder_2.config.projection_dim)

    def zero_negative(self, c, negative_prompt, positive):
        if negative_prompt or not c.extra.get("force_zeros_for_empty_prompt"):
            return None
        return positive._map(torch.zeros_like)  # as StableDiffusionXLPipeline does with force_zeros_for_empty_prompt

    def conditioning(self, c, positive, negative, guidance_scale, width, height):
        cond = super().conditioning(c, positive, negative, guidance_scale, width, height)
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond["text_embeds"].dtype)
        return cond.with_tensors(time_ids=ids.to(cond["text_embeds"].device).expand(cond.rows, 6))

    def call(self, model, sample, t, cond):
        return model(sample, t, **self.unet_kwargs(cond)).sample

    def unet_kwargs(self, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "added_cond_kwargs": added}


class FlowFamily(Family):
    """Shared by the flow-matching transformers: FlowMatchEuler, the VAE's shift factor, no U-Net caches."""

    denoiser = "transformer"
    schedulers = ("flow_euler",)
    default_scheduler = "flow_euler"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    feature_methods: tuple[str, ...] = ("taylorseer",)  # diffusers' hook caches (workers/feature_cache.py)
    taylorseer_lite = True  # TaylorSeer's lite mode (whole blocks skipped) runs on this denoiser
    cuda_dtype = torch.bfloat16  # as SD3 and Flux are served: fp16 overflows in their T5 and transformer

    def latent_channels(self, c) -> int:
        return int(c.vae.config.latent_channels)

    def make_scheduler(self, name, config, steps, latent_shape, device=None):
        sched = self._new_scheduler(name, config)
        if sched.config.get("use_dynamic_shifting"):  # Flux: the shift grows with the image's token count
            mu = image_shift(self.image_seq_len(latent_shape), sched.config)
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)
        else:
            sched.set_timesteps(steps, device=device)
        return sched

    def image_seq_len(self, latent_shape) -> int:
        return (latent_shape[1] // 2) * (latent_shape[2] // 2)

    def scale_input(self, sched, sample, t):
        return sample  # flow matching scales nothing


def image_shift(seq_len: int, config) -> float:
    """Flux's ``calculate_shift``: mu linear in the image's token count between the base and max lengths."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + (base_shift - m * base_len)


class SD3Family(FlowFamily):
    """SD3 (MMDiT): CLIP-L and CLIP-G (penultimate states concatenated, padded to T5's width) followed by T5's
    sequence, or zeros where the T5 encoder is absent; the two pooled projections concatenated."""

    name = "sd3"
    pipeline = "StableDiffusion3Pipeline"
    # FirstBlockCache and TaylorSeer's lite mode fail on SD3's last joint block, which returns no text states
    # (diffusers 0.42: None - Tensor; None.dtype)
    taylorseer_lite = False
    components = (
        "tokenizer",
        "text_encoder",
        "tokenizer_2",
        "text_encoder_2",
        "tokenizer_3",
        "text_encoder_3",
        "transformer",
        "vae",
        "scheduler",
    )
    optional = ("tokenizer_3", "text_encoder_3")
    default_steps = 28
    default_guidance = 7.0
    default_scheduler_config = dict(num_train_timesteps=1000, shift=3.0)
    t5_max_length = 256  # the pipeline's max_sequence_length (T5's tokens; zeros of it without T5)

    @torch.no_grad()
    def encode(self, c, text):
        hidden, pooled = [], []
        for tokenizer, encoder in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
            out = encoder(_tokens(tokenizer, text, c.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        if c.text_encoder_3 is not None:
            t5 = c.text_encoder_3(_tokens(c.tokenizer_3, text, c.device, self.t5_max_length))[0]
        else:
            width = int(c.unet.config.joint_attention_dim)
            t5 = torch.zeros(1, self.t5_max_length, width, dtype=clip.dtype, device=clip.device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pooled_vector = torch.cat(pooled, dim=-1)
        cond = {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": pooled_vector}
        return Conditioning(self, cond), pooled_vector

    def pooled_dim(self, c):
        return int(c.text_encoder.config.projection_dim) + int(c.text_encoder_2.config.projection_dim)

    def size_multiple(self, c):
        return max(8, c.vae_scale_factor * int(c.unet.config.patch_size))

    def call(self, model, sample, t, cond):
        return model(
            hidden_states=sample,
            timestep=_per_row(t, sample.shape[0]).to(sample.device),
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]


class FluxFamily(FlowFamily):
    """Flux: CLIP's pooled output and T5's sequence; latents packed in 2×2 patches with their position ids;
    a guidance embedding (dev-like models) instead of classifier-free guidance."""

    name = "flux"
    pipeline = "FluxPipeline"
    t5_max_length = 512  # the pipeline's max_sequence_length
    feature_methods = ("first_block", "taylorseer")
    components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae", "scheduler")
    optional = ()
    default_steps = 28
    default_guidance = 3.5
    default_scheduler_config = dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )

    @torch.no_grad()
    def encode(self, c, text):
        pooled = c.text_encoder(_tokens(c.tokenizer, text, c.device)).pooler_output
        sequence = c.text_encoder_2(_tokens(c.tokenizer_2, text, c.device, self.t5_max_length))[0]
        return Conditioning(self, {"encoder_hidden_states": sequence, "pooled_projections": pooled}), pooled

    def pooled_dim(self, c):
        return int(c.text_encoder.config.hidden_size)

    def uses_cfg(self, guidance_scale):
        return False  # guidance is an input of the transformer (dev), or absent (schnell)

    def conditioning(self, c, positive, negative, guidance_scale, width, height):
        if not c.unet.config.guidance_embeds:
            return positive
        pooled = positive["pooled_projections"]
        return positive.with_tensors(guidance=torch.full((1,), float(guidance_scale), device=pooled.device))

    def size_multiple(self, c):
        return c.vae_scale_factor * 2  # 2×2 patches of latent pixels

    def call(self, model, sample, t, cond):
        b, ch, h, w = sample.shape
        packed = sample.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), -1)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=sample.device, dtype=sample.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=sample.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=sample.device)[None, :]
        text = cond["encoder_hidden_states"]
        guidance = cond.tensors.get("guidance")
        out = model(
            hidden_states=packed,
            timestep=_per_row(t, b).to(sample.device, sample.dtype) / 1000,
            guidance=guidance.to(sample.dtype) if guidance is not None else None,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=sample.device, dtype=sample.dtype),
            img_ids=img_ids.reshape(-1, 3),
            return_dict=False,
        )[0]
        return out.view(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)


SD15 = Family()
SDXL = SDXLFamily()
SD3 = SD3Family()
FLUX = FluxFamily()
FAMILIES: dict[str, Family] = {f.name: f for f in (SD15, SDXL, SD3, FLUX)}
_BY_PIPELINE = {f.pipeline: f for f in FAMILIES.values()}


def family_for_pipeline(class_name: str | None, where: str = "") -> Family:
    """The family of a diffusers pipeline class (model_index.json's ``_class_name``). An index without one is
    read as SD 1.5, as Reprise read every directory before it knew families."""
    if not class_name:
        return SD15
    family = _BY_PIPELINE.get(class_name)
    if family is None:
        supported = ", ".join(f"{f.name} ({f.pipeline})" for f in FAMILIES.values())
        raise UnsupportedModelFamily(
            f"{where + ' is a ' if where else ''}{class_name}, which Reprise does not serve; "
            f"supported families: {supported}",
            [{"class_name": class_name, "supported": {f.name: f.pipeline for f in FAMILIES.values()}}],
        )
    return family
