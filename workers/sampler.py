"""The denoising loop, readable top to bottom: encode → choose the start → step → capture → decode.

The caches are visible steps of this loop, not patches: a request may start from a stored latent at
step K (the approximate cache), hands out the latents after chosen steps (write-back), and runs the
U-Net through a ``UNetRunner`` (plain, or a feature cache such as DeepCache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image

from workers.models import Components

SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


# Multistep solvers keep the previous model output; a resumable state must carry it too, so their
# stored state is [latent, previous output] stacked on the channel axis (twice the bytes, bit-exact).
MULTISTEP = {"dpmpp_2m"}


def state_channels(scheduler: str, latent_channels: int) -> int:
    return latent_channels * (2 if scheduler in MULTISTEP else 1)


def make_scheduler(name: str, config: dict):
    import diffusers

    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; one of {', '.join(SCHEDULER_CLASSES)}")
    return getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(config)


class UNetRunner(Protocol):
    """How one denoising step calls the U-Net; feature caches implement the same call."""

    def __call__(
        self, unet, sample: torch.Tensor, t: torch.Tensor, step_index: int, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor: ...


class PlainUNet:
    """Every step runs the whole U-Net."""

    method = "off"

    def __init__(self) -> None:
        self.full_passes = 0
        self.partial_passes = 0

    def __call__(self, unet, sample, t, step_index, encoder_hidden_states):
        self.full_passes += 1
        return unet(sample, t, encoder_hidden_states=encoder_hidden_states).sample

    def report(self) -> dict:
        return {
            "method": self.method,
            "full_unet_passes": self.full_passes,
            "partial_unet_passes": self.partial_passes,
            "params": {},
        }


@dataclass
class LoopOutput:
    latents: torch.Tensor
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    steps_computed: int = 0
    denoise_s: float = 0.0


class StopRequested(Exception):
    """Raised inside the loop when ``should_stop`` gives a reason; the caller maps it to its own error."""

    def __init__(self, reason: str, step: int, steps: int):
        super().__init__(f"{reason}: stopped before step {step} of {steps}")
        self.reason, self.step, self.steps = reason, step, steps


class DenoiseLoop:
    """One model on one device. Thread-confined: one job at a time per instance."""

    def __init__(self, components: Components, text_memo=None):
        self.c = components
        self.text_memo = text_memo  # (model version, prompt) → embeddings, shared by the node's devices

    # 1. encode ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, text: str, use_memo: bool = True) -> torch.Tensor:
        """The text encoder's output; ``use_memo=False`` neither reads nor fills the node's memo."""
        memo = self.text_memo if use_memo else None
        if memo is not None:
            cached = memo.get(self.c.fingerprint, text)
            if cached is not None:
                return cached.to(self.c.device)
        tok = self.c.tokenizer(
            [text],
            padding="max_length",
            max_length=self.c.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        embeds = self.c.text_encoder(tok.input_ids.to(self.c.device))[0]
        if memo is not None:
            memo.put(self.c.fingerprint, text, embeds)
        return embeds

    def conditioning(
        self, prompt: str, negative_prompt: str, guidance_scale: float, use_memo: bool = True
    ) -> torch.Tensor:
        cond = self.encode_text(prompt, use_memo)
        if guidance_scale <= 1.0:
            return cond
        return torch.cat([self.encode_text(negative_prompt, use_memo), cond])

    # 2. choose the start --------------------------------------------------------------------------
    def initial_noise(self, seed: int, width: int, height: int) -> torch.Tensor:
        # Drawn on the CPU so a seed gives the same noise on every device.
        gen = torch.Generator("cpu").manual_seed(seed)
        shape = (1, *self.c.latent_shape(width, height))
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(self.c.device, self.c.dtype)

    # 3. step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(
        self,
        *,
        prompt: str,
        negative_prompt: str = "",
        seed: int,
        steps: int,
        guidance_scale: float,
        width: int,
        height: int,
        scheduler: str = "ddim",
        start_latents: torch.Tensor | None = None,
        start_step: int = 0,
        capture_at: tuple[int, ...] | list[int] = (),
        unet_runner: UNetRunner | None = None,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], str | None] | None = None,
        snap_dtype: torch.dtype | None = None,
        use_text_memo: bool = True,
    ) -> LoopOutput:
        """Run steps ``start_step .. steps-1``; ``captured[k]`` is the latent after ``k`` steps.

        ``snap_dtype``: the dtype the cache stores states in. The trajectory itself continues from
        the rounded state at each capture, so a later resume from the stored state reproduces
        this run bit for bit (the rounding moves at most one 8-bit level in about 1% of pixels
        against a run that captures nothing).
        """
        if not 0 <= start_step < steps:
            raise ValueError(f"start_step must be in [0, {steps}), got {start_step}")
        runner = unet_runner or PlainUNet()
        sched = make_scheduler(scheduler, self.c.scheduler_config)
        sched.set_timesteps(steps, device=self.c.device)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start_step)
        cfg = guidance_scale > 1.0
        context = self.conditioning(prompt, negative_prompt, guidance_scale, use_text_memo)

        shape = (1, *self.c.latent_shape(width, height))
        if start_latents is None:
            latents = self.initial_noise(seed, width, height) * sched.init_noise_sigma
        else:
            latents = self._restore_state(sched, scheduler, start_latents, start_step, shape)
        wanted = set(capture_at)
        out = LoopOutput(latents=latents)
        started = time.perf_counter()
        for i in range(start_step, steps):
            reason = should_stop() if should_stop is not None else None
            if reason:
                raise StopRequested(reason, i + 1, steps)
            t = sched.timesteps[i]
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = self.c.unet_input(sched.scale_model_input(model_in, t))
            noise = runner(self.c.unet, model_in, t, i, context)
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = sched.step(noise, t, latents).prev_sample
            out.steps_computed += 1
            if i + 1 in wanted:
                if snap_dtype is not None:
                    latents = self._snap(sched, scheduler, latents, snap_dtype)
                out.captured[i + 1] = self._capture_state(sched, scheduler, latents)
            if on_step is not None:
                on_step(i + 1, steps)
        out.latents = latents
        out.denoise_s = time.perf_counter() - started
        return out

    def _snap(self, sched, scheduler: str, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if scheduler in MULTISTEP:
            sched.model_outputs[-1] = sched.model_outputs[-1].to(dtype).to(latents.dtype)
        return latents.to(dtype).to(latents.dtype)

    def _capture_state(self, sched, scheduler: str, latents: torch.Tensor) -> torch.Tensor:
        if scheduler in MULTISTEP:
            return torch.cat([latents, sched.model_outputs[-1]], dim=1).detach().clone()
        return latents.detach().clone()

    def _restore_state(self, sched, scheduler: str, state: torch.Tensor, start_step: int, shape) -> torch.Tensor:
        state = state.to(self.c.device, self.c.dtype)
        if scheduler not in MULTISTEP:
            return state.reshape(shape)
        state = state.reshape(1, 2 * shape[1], *shape[2:])
        latents, previous = state[:, : shape[1]], state[:, shape[1] :]
        order = sched.config.solver_order
        sched.model_outputs = [None] * (order - 1) + [previous]
        sched.lower_order_nums = min(start_step, order)
        return latents.contiguous()

    # 4. decode --------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Image.Image:
        if self.c.vae is None:  # pixel-space model: the latents are the image in [-1, 1]
            image = latents
        else:
            image = self.c.vae.decode(latents / self.c.vae.config.scaling_factor).sample
        array = (image[0].float().clamp(-1, 1) / 2 + 0.5).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(np.round(array * 255).astype(np.uint8))
