"""The denoising loop, readable top to bottom: encode → choose the start → step → capture → decode.

The caches are visible steps of this loop, not patches: a request may start from a stored latent at
step K (the approximate cache), hands out the latents after chosen steps (write-back), and runs the
denoiser through a ``UNetRunner`` (plain, or a feature cache such as DeepCache).

The loop is the same for every model family (workers/families.py): the family says how a prompt becomes
the denoiser's conditioning, what a latent looks like, which schedulers it runs and how its denoiser is
called; the loop itself never asks which family it runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image

from workers.families import Conditioning
from workers.model_loading import Components

# Multistep solvers keep the previous model output; a resumable state must carry it too, so their
# stored state is [latent, previous output] stacked on the channel axis (twice the bytes, bit-exact).
MULTISTEP = {"dpmpp_2m"}


def state_channels(scheduler: str, latent_channels: int) -> int:
    return latent_channels * (2 if scheduler in MULTISTEP else 1)


class UNetRunner(Protocol):
    """How one denoising step calls the denoiser (a U-Net or a transformer); feature caches implement the same
    call. ``context`` is the family's conditioning of the rows in ``sample``."""

    def __call__(
        self, unet, sample: torch.Tensor, t: torch.Tensor, step_index: int, context: Conditioning
    ) -> torch.Tensor: ...


class PlainUNet:
    """Every step runs the whole denoiser."""

    method = "off"

    def __init__(self) -> None:
        self.full_passes = 0
        self.partial_passes = 0

    def __call__(self, unet, sample, t, step_index, context):
        self.full_passes += 1
        return context.call(unet, sample, t)

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


class Trajectory:
    """One request's way through the denoising loop: its latents, its own scheduler (a state machine:
    step index, a multistep solver's kept outputs), its conditioning, its captures. Many trajectories
    at different steps can share one U-Net call, each with its own timestep."""

    def __init__(self, loop, sched, scheduler, latents, context, guidance_scale, steps, start_step, capture, snap):
        self.loop, self.sched, self.scheduler = loop, sched, scheduler
        self.latents, self.context = latents, context
        self.guidance_scale, self.cfg = guidance_scale, loop.c.family.uses_cfg(guidance_scale)
        self.steps, self.i = steps, start_step
        self.capture, self.snap_dtype = capture, snap
        self.captured: dict[int, torch.Tensor] = {}
        self.steps_computed = 0

    @property
    def done(self) -> bool:
        return self.i >= self.steps

    @property
    def rows(self) -> int:
        """Samples this trajectory puts into a U-Net call (2 with classifier-free guidance)."""
        return 2 if self.cfg else 1

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U-Net input rows, this step's timestep)."""
        t = self.sched.timesteps[self.i]
        model_in = torch.cat([self.latents] * 2) if self.cfg else self.latents
        c = self.loop.c
        return c.unet_input(c.family.scale_input(self.sched, model_in, t)), t

    @torch.no_grad()
    def advance(self, noise: torch.Tensor) -> None:
        """Guidance, one scheduler step, and the capture after it, from this trajectory's U-Net output rows."""
        t = self.sched.timesteps[self.i]
        if self.cfg:
            uncond, cond = noise.chunk(2)
            noise = uncond + self.guidance_scale * (cond - uncond)
        self.latents = self.sched.step(noise, t, self.latents).prev_sample
        self.steps_computed += 1
        self.i += 1
        if self.i in self.capture:
            loop = self.loop
            if self.snap_dtype is not None:
                self.latents = loop._snap(self.sched, self.scheduler, self.latents, self.snap_dtype)
            self.captured[self.i] = loop._capture_state(self.sched, self.scheduler, self.latents)

    def output(self, denoise_s: float) -> LoopOutput:
        return LoopOutput(self.latents, self.captured, self.steps_computed, denoise_s)


class DenoiseLoop:
    """One model on one device. Thread-confined: one job at a time per instance."""

    def __init__(self, components: Components, text_memo=None):
        self.c = components
        self.text_memo = text_memo  # (model version, prompt) → embeddings, shared by the node's devices

    # 1. encode ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, text: str, use_memo: bool = True) -> Conditioning:
        """The text encoders' output for one prompt; ``use_memo=False`` neither reads nor fills the node's memo."""
        memo = self.text_memo if use_memo else None
        if memo is not None:
            cached = memo.get(self.c.fingerprint, text)
            if cached is not None:
                return cached.to(self.c.device)
        with self.c.text_lock.shared():  # a request's LoRA may be applying its text-encoder weights
            embeds, _ = self.c.family.encode(self.c, text)
        if memo is not None:
            memo.put(self.c.fingerprint, text, embeds)
        return embeds

    def conditioning(
        self,
        prompt: str,
        negative_prompt: str,
        guidance_scale: float,
        use_memo: bool = True,
        width: int | None = None,
        height: int | None = None,
    ) -> Conditioning:
        """The request's rows of conditioning (two with classifier-free guidance; the family adds its own)."""
        family = self.c.family
        cond = self.encode_text(prompt, use_memo)
        negative = None
        if family.uses_cfg(guidance_scale):
            negative = family.zero_negative(self.c, negative_prompt, cond) or self.encode_text(
                negative_prompt, use_memo
            )
        size = self.c.spec.default_size
        return family.conditioning(self.c, cond, negative, guidance_scale, width or size, height or size)

    # 2. choose the start --------------------------------------------------------------------------
    def initial_noise(self, seed: int, width: int, height: int) -> torch.Tensor:
        # Drawn on the CPU so a seed gives the same noise on every device.
        gen = torch.Generator("cpu").manual_seed(seed)
        shape = (1, *self.c.latent_shape(width, height))
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(self.c.device, self.c.dtype)

    # 3. step ----------------------------------------------------------------------------------------
    def trajectory(
        self,
        *,
        prompt: str,
        negative_prompt: str = "",
        seed: int,
        steps: int,
        guidance_scale: float,
        width: int,
        height: int,
        scheduler: str | None = None,
        start_latents: torch.Tensor | None = None,
        start_step: int = 0,
        capture_at: tuple[int, ...] | list[int] = (),
        snap_dtype: torch.dtype | None = None,
        context: torch.Tensor | None = None,
        use_text_memo: bool = True,
    ) -> Trajectory:
        """One request's denoising state before its first step: the start (fresh noise or a stored state
        at ``start_step``), its own scheduler, its conditioning. ``denoise`` steps it alone; the node
        engine steps many of them in one U-Net call."""
        if not 0 <= start_step < steps:
            raise ValueError(f"start_step must be in [0, {steps}), got {start_step}")
        scheduler = scheduler or self.c.spec.default_scheduler
        shape = (1, *self.c.latent_shape(width, height))
        sched = self.c.family.make_scheduler(scheduler, self.c.scheduler_config, steps, shape[1:], self.c.device)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start_step)
        if context is None:
            context = self.conditioning(prompt, negative_prompt, guidance_scale, use_text_memo, width, height)
        if start_latents is None:
            latents = self.initial_noise(seed, width, height) * getattr(sched, "init_noise_sigma", 1.0)
        else:
            latents = self._restore_state(sched, scheduler, start_latents, start_step, shape)
        return Trajectory(
            self, sched, scheduler, latents, context, guidance_scale, steps, start_step, set(capture_at), snap_dtype
        )

    @torch.no_grad()
    def denoise(
        self,
        *,
        unet_runner: UNetRunner | None = None,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], str | None] | None = None,
        **start,
    ) -> LoopOutput:
        """Run steps ``start_step .. steps-1`` of one request alone; ``captured[k]`` is the latent after
        ``k`` steps. ``start`` are the arguments of ``trajectory``.

        ``snap_dtype``: the dtype the cache stores states in. The trajectory itself continues from
        the rounded state at each capture, so a later resume from the stored state reproduces
        this run bit for bit (the rounding moves at most one 8-bit level in about 1% of pixels
        against a run that captures nothing).
        """
        runner = unet_runner or PlainUNet()
        traj = self.trajectory(**start)
        started = time.perf_counter()
        while not traj.done:
            reason = should_stop() if should_stop is not None else None
            if reason:
                raise StopRequested(reason, traj.i + 1, traj.steps)
            model_in, t = traj.model_input()
            traj.advance(runner(self.c.unet, model_in, t, traj.i, traj.context))
            if on_step is not None:
                on_step(traj.i, traj.steps)
        return traj.output(time.perf_counter() - started)

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
    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder's output, about [-1, 1], before it is clamped and cast to bytes (a NaN is still visible
        here; in the PNG it becomes some byte)."""
        vae = self.c.vae
        if vae is None:  # pixel-space model: the latents are the image in [-1, 1]
            return latents
        shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD3's and Flux's VAEs also shift their latents
        return vae.decode(latents / vae.config.scaling_factor + shift).sample

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Image.Image:
        image = self.decode_pixels(latents)
        array = (image[0].float().clamp(-1, 1) / 2 + 0.5).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(np.round(array * 255).astype(np.uint8))
