"""The simulated accelerator `sim`: a device whose U-Net call costs time and no CPU.

It exists to load-test and scale-test the cluster on machines without GPUs. Everything around the
U-Net is real: the tiny model's tokenizer and text encoder, the scheduler, real-sized latents
(4 × latent_size × latent_size; 64 = SD 1.5 at 512 px) so that cache lookups and write-backs move
real-sized noise states, the artifact store. Only two parts are stand-ins:

- ``SleepingUNet``: its forward sleeps (``time.sleep`` releases the GIL and uses no CPU, as a GPU
  kernel would) and returns ``0.1 * sample`` (deterministic, input-shaped). A call of ``b`` samples
  costs ``call_ms + sample_ms × b``, a GPU's batching curve. The defaults come from diffusers' own
  benchmark records for SD v1-4 (50 steps, guidance on, so 2 U-Net samples per image): 2.66 s for one
  image and 8.18 s for four, i.e. 53.2 ms and 163.6 ms per step at 2 and 8 samples, so
  sample_ms = (163.6 − 53.2) / 6 = 18.4 ms and call_ms = 53.2 − 2 × 18.4 = 16.4 ms (both figures
  include the decode and the text encoder, spread over the 50 steps: an upper bound of the fixed part).
  ``step_ms``, when given, replaces the model: every call costs step_ms whatever its batch.
- ``LatentPreview`` as the VAE: ``decode`` takes the first three latent channels as the picture
  (a latent_size × latent_size PNG) instead of running a decoder. It reports SD's scale factor 8, so
  the served sizes and latent shapes are those of the model it stands in for; the sampler's decode
  needs no change.

Two test-only faults, off unless set (``REPRISE_SIM_OOM_ABOVE``, ``REPRISE_SIM_POISON_PROMPT``):
- a call of more than ``oom_above`` samples raises ``torch.OutOfMemoryError``, as a GPU does when a batch
  does not fit (the engine then halves the batch and lowers the device's limit);
- a call whose conditioning holds ``poison_prompt``'s text encoding raises ``ValueError``, as a kernel that
  rejects one request's inputs does. Why a setting: no request a healthy model is served can make its
  denoiser raise (the schema and ``GenerationService.validate`` reject bad values before any device), so
  the fault is keyed on what the device really receives, the prompt's conditioning rows, and a batch
  holding that request fails as a whole, as it would on a GPU.

Served as model ``sim`` (queue ``reprise.sim``): ``reprise worker --model sim --devices sim:0,sim:1``.
"""

from __future__ import annotations

import hashlib
import time
from functools import lru_cache
from types import SimpleNamespace

import torch

from workers.model_loading import SD_SCHEDULER_CONFIG, Components, ModelSpec, _build_builtin, fingerprint

SIM_MODEL = "sim"


class SleepingUNet(torch.nn.Module):
    """Stands in for a U-Net on an accelerator: a call of b samples sleeps call_ms + sample_ms × b (or
    step_ms flat); the output is 0.1 × input."""

    def __init__(
        self,
        step_ms: float | None,
        latent_size: int,
        channels: int = 4,
        call_ms: float = 16.4,
        sample_ms: float = 18.4,
        oom_above: int = 0,
    ):
        super().__init__()
        self.oom_above = oom_above
        self.poison: torch.Tensor | None = None  # one prompt's conditioning rows (load_sim_components)
        self.flat_s = None if step_ms is None else step_ms / 1000.0
        self.call_s, self.sample_s = call_ms / 1000.0, sample_ms / 1000.0
        self.config = SimpleNamespace(in_channels=channels, out_channels=channels, sample_size=latent_size)

    def cost_s(self, samples: int) -> float:
        return self.flat_s if self.flat_s is not None else self.call_s + self.sample_s * samples

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states=None, **kwargs):
        if self.oom_above and sample.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError(
                f"sim: a call of {sample.shape[0]} samples is over the simulated memory ({self.oom_above} samples)"
            )
        if self.poison is not None and encoder_hidden_states is not None:
            rows = encoder_hidden_states.flatten(1)
            if (rows == self.poison.flatten().to(rows.dtype)).all(dim=1).any():
                raise ValueError("sim: the conditioning of the poison prompt (REPRISE_SIM_POISON_PROMPT)")
        seconds = self.cost_s(sample.shape[0])
        if seconds > 0:
            time.sleep(seconds)
        return SimpleNamespace(sample=0.1 * sample)


class LatentPreview:
    """Stands in for the VAE: the first three latent channels are the image (no decoder run)."""

    def __init__(self):
        self.config = SimpleNamespace(block_out_channels=(1, 1, 1, 1), scaling_factor=1.0)  # scale factor 8, like SD

    def decode(self, latents: torch.Tensor):
        return SimpleNamespace(sample=torch.tanh(latents[:, :3]))


@lru_cache(maxsize=1)
def _text_side():
    """The tiny model's tokenizer and text encoder, built once per process and shared by every sim device
    (inference only, so threads may share it)."""
    tiny = _build_builtin("tiny")
    text_encoder = tiny["text_encoder"].eval().requires_grad_(False)
    text_fp = fingerprint(
        {"scheduler_config": SD_SCHEDULER_CONFIG, "text_encoder": text_encoder, "tokenizer": tiny["tokenizer"]}
    )
    return tiny["tokenizer"], text_encoder, text_fp


def load_sim_components(
    model: str = SIM_MODEL,
    step_ms: float | None = None,
    latent_size: int = 64,
    call_ms: float = 16.4,
    sample_ms: float = 18.4,
    oom_above: int = 0,
    poison_prompt: str = "",
) -> Components:
    """Components of the simulated device. ``model`` is not used: the served name is always ``sim``.
    ``oom_above`` and ``poison_prompt``: the test-only faults of the module's docstring."""
    tokenizer, text_encoder, text_fp = _text_side()
    # The step time changes no output, so it is not part of the fingerprint: sim workers with different
    # step times share one cache generation.
    fp = hashlib.sha256(f"sim-v1|latent={latent_size}|{text_fp}".encode()).hexdigest()[:16]
    size = latent_size * 8
    components = Components(
        name=SIM_MODEL,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=SleepingUNet(step_ms, latent_size, call_ms=call_ms, sample_ms=sample_ms, oom_above=oom_above),
        vae=LatentPreview(),
        scheduler_config=dict(SD_SCHEDULER_CONFIG),
        device=torch.device("cpu"),
        dtype=torch.float32,
        spec=ModelSpec(SIM_MODEL, default_size=size, max_size=size * 2),
        fingerprint=fp,
        extra={
            "simulated": True,
            "step_ms": step_ms,
            "call_ms": call_ms,
            "sample_ms": sample_ms,
            "latent_size": latent_size,
        },
    )
    if poison_prompt:
        with torch.no_grad():
            conditioning, _ = components.family.encode(components, poison_prompt)
        components.unet.poison = conditioning["encoder_hidden_states"][0].clone()
    return components
