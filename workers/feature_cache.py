"""Caches inside one request: U-Net work skipped between denoising steps.

Two training-free methods, each a ``UNetRunner`` the sampler calls once per step:

- ``DeepCacheUNet`` (Ma et al., CVPR 2024): the whole U-Net on "full" steps; in between only the
  shallow branch (down layers up to the branch, the up layers from it), fed with the deep feature kept
  from the last full pass.
- ``BlockCacheUNet`` (Wimbauer et al., CVPR 2024, the schedule only): each attention block is
  recomputed when its calibrated change since its last recompute passes δ, reused otherwise.

Runners are made per job by ``make_unet_runner``, by the device thread that runs the job, on that
device's modules; they hold their caches (per-request state), and what they change or record in a module
is applied per call and scoped to the calling thread, so no other request's call meets it, even where
two devices share one pipeline.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from workers.models import Components
from workers.sampler import DenoiseLoop, PlainUNet

FEATURE_DEFAULTS: dict[str, Any] = {
    "method": "off",  # pixels unchanged unless a request or the worker asks for a cache
    "deepcache_interval": 3,
    "deepcache_branch": 0,
    "deepcache_schedule": "uniform",
    "deepcache_center": 0.3,  # non-uniform: full steps gather around 30% of the steps (15 of 50, as in the paper)
    "deepcache_power": 1.4,
    "block_delta": 0.3,  # sd15-small, 50 steps: 1.98x U-Net, PSNR 34.6; 0.5 adds little speed for more error
    "first_block_threshold": 0.05,  # diffusers' default (FLUX.1-dev was reported at 0.08: 1.55x)
    "taylorseer_interval": 5,  # diffusers' defaults: a full pass every 5 steps, Taylor order 1
    "taylorseer_order": 1,
    "taylorseer_lite": False,  # diffusers' lite mode: whole blocks skipped, only proj_out predicted
    "calibration_dir": None,  # None → ~/.cache/reprise/blockcache
    "calibration_prompts": 3,
    "calibration_size": None,  # None → the model's default image size
}

# The recommended profile, from ops/bench_feature.py on sd15-small (50 steps): 2.46x U-Net, PSNR 41.7, SSIM 0.998.
RECOMMENDED: dict[str, Any] = {
    "method": "deepcache",
    "deepcache_interval": 3,
    "deepcache_branch": 0,
    "deepcache_schedule": "uniform",
}

REQUEST_FIELDS = (
    "method",
    "deepcache_interval",
    "deepcache_branch",
    "deepcache_schedule",
    "block_delta",
    "first_block_threshold",
    "taylorseer_interval",
    "taylorseer_order",
    "taylorseer_lite",
)


# --- schedules (pure functions) -------------------------------------------------------------------


def uniform_full_steps(steps: int, interval: int) -> list[int]:
    """Full U-Net passes at 0, N, 2N, ... of ``steps`` steps."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    return list(range(0, steps, interval))


def nonuniform_full_steps(steps: int, interval: int, center: float = 0.3, power: float = 1.4) -> list[int]:
    """As many full passes as the uniform schedule, denser around ``center`` (a fraction of ``steps``).

    DeepCache's non-uniform schedule: evenly spaced points x between -c^(1/p) and (steps-1-c)^(1/p)
    mapped to c + sign(x)|x|^p, so the gaps grow with the distance from the centre. When rounding
    merges two steps the power is lowered (towards uniform) until the count is right. Step 0 is
    always full.
    """
    count = len(uniform_full_steps(steps, interval))
    if count >= steps:
        return list(range(steps))
    if count <= 1:
        return [0]
    c = min(max(center, 0.0), 1.0) * (steps - 1)
    p = power
    while p > 1.0:
        xs = np.linspace(-(c ** (1 / p)), (steps - 1 - c) ** (1 / p), count)
        chosen = sorted({int(round(c + math.copysign(abs(x) ** p, x))) for x in xs} | {0})
        if len(chosen) == count:
            return chosen
        p -= 0.02
    return uniform_full_steps(steps, interval)


def block_recompute_steps(changes: Sequence[float], delta: float, start_step: int = 0) -> list[int]:
    """Steps at which one block is recomputed: ``changes[s]`` is its relative change from step s-1 to s.

    The first step is always computed; afterwards the block is reused until the change accumulated
    since its last recompute passes ``delta``.
    """
    computed = [start_step]
    accumulated = 0.0
    for s in range(start_step + 1, len(changes)):
        accumulated += changes[s]
        if accumulated > delta:
            computed.append(s)
            accumulated = 0.0
    return computed


# --- helpers ------------------------------------------------------------------------------------


def attention_blocks(unet) -> dict[str, torch.nn.Module]:
    """The U-Net's transformer (attention) blocks by module name; ResBlocks are never cached."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return {name: m for name, m in unet.named_modules() if isinstance(m, Transformer2DModel)}


# A module's forward is shared by every thread that calls the module: where two devices share one pipeline
# (``sim:N``, or a test), another device thread may be inside the same block while this one runs its call.
# So what a runner changes or records is scoped to the calling thread: other threads' calls meet the
# module's own forward and leave nothing in this runner's state.
_SCOPE_LOCK = threading.Lock()


class _ThreadScopedForward:
    """A module's forward while some threads replace its output: each of those threads gets its own stored
    output, every other thread the module's own forward. Removed when the last such thread is done."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.previous = module.__dict__.get("forward")  # an instance-level forward put there before (or None)
        self.original = module.forward
        self.values: dict[int, Any] = {}

    def __call__(self, *args, **kwargs):
        value = self.values.get(threading.get_ident(), _OWN)
        return self.original(*args, **kwargs) if value is _OWN else value


_OWN = object()


@contextmanager
def _outputs_replaced(outputs: dict[torch.nn.Module, Any]) -> Iterator[None]:
    """For one U-Net call on this thread, the given modules return their stored output instead of computing."""
    me = threading.get_ident()
    with _SCOPE_LOCK:
        for module, value in outputs.items():
            scoped = module.__dict__.get("forward")
            if not isinstance(scoped, _ThreadScopedForward):
                scoped = _ThreadScopedForward(module)
                module.forward = scoped
            scoped.values[me] = value
    try:
        yield
    finally:
        with _SCOPE_LOCK:
            for module in outputs:
                scoped = module.__dict__["forward"]
                del scoped.values[me]
                if not scoped.values:
                    if scoped.previous is None:
                        del module.forward
                    else:
                        module.forward = scoped.previous


@contextmanager
def _outputs_recorded(modules: dict[str, torch.nn.Module], into: dict[str, Any]) -> Iterator[None]:
    """For one U-Net call on this thread, ``into[name]`` receives each module's output."""
    me = threading.get_ident()

    def record(name: str, out) -> None:
        if threading.get_ident() == me:
            into[name] = out

    handles = [m.register_forward_hook(lambda _m, _a, out, _n=name: record(_n, out)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- DeepCache -----------------------------------------------------------------------------------


class PassCounts:
    """What a feature-cache runner reports in the result: its method, full and partial passes, parameters."""

    method: str
    full_passes: int
    partial_passes: int
    params: dict

    def report(self) -> dict:
        return {
            "method": self.method,
            "full_unet_passes": self.full_passes,
            "partial_unet_passes": self.partial_passes,
            "params": dict(self.params),
        }


# Not DeepCacheSDHelper: it patches the shared U-Net until disable(), finds the step via pipe.scheduler (we have none), no non-uniform.
class DeepCacheUNet(PassCounts):
    """Full U-Net on the schedule's steps; otherwise the shallow branch around a cached deep feature.

    Branch b pairs the U-Net's b-th skip connection (0 = the conv_in output) with the up layer that
    consumes it: a partial pass runs conv_in, the first b down layers, then the up layers from b down
    to 0, starting from the hidden state that entered up layer b on the last full pass. For SD 1.5
    the numbering is the deepcache package's ``cache_branch_id`` (0..11).
    """

    method = "deepcache"

    def __init__(
        self,
        unet,
        *,
        steps: int,
        start_step: int = 0,
        interval: int = 3,
        branch: int = 0,
        schedule: str = "uniform",
        center: float = 0.3,
        power: float = 1.4,
    ) -> None:
        self._check_supported(unet)
        self.down_layers, self.up_layers = self._layers(unet)
        if not 0 <= branch < len(self.up_layers):
            raise ValueError(f"deepcache_branch must be in [0, {len(self.up_layers) - 1}] for this U-Net, got {branch}")
        remaining = steps - start_step
        if schedule == "uniform":
            local = uniform_full_steps(remaining, interval)
        elif schedule == "nonuniform":
            local = nonuniform_full_steps(remaining, interval, center, power)
        else:
            raise ValueError(f"deepcache_schedule must be uniform or nonuniform, got {schedule!r}")
        self.full_steps = {start_step + s for s in local}
        self.branch = branch
        self.params = {"interval": interval, "branch": branch, "schedule": schedule}
        if schedule == "nonuniform":
            self.params.update(center=center, power=power)
        self.deep_input: torch.Tensor | None = None  # the input of up layer `branch` on the last full pass
        self.full_passes = 0
        self.partial_passes = 0

    @staticmethod
    def _check_supported(unet) -> None:
        cfg = unet.config
        extras = {
            k: cfg.get(k)
            for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim")
        }
        # "text" (and SDXL's "text_time") add the pooled prompt (and time ids) to the time embedding, as _partial does
        extras = {
            k: v
            for k, v in extras.items()
            if v is not None and not (k == "addition_embed_type" and v in ("text", "text_time"))
        }
        if extras or cfg.get("num_class_embeds") is not None:
            raise ValueError(
                f"DeepCache here supports SD-style U-Nets without extra conditioning; this one has {extras}"
            )
        if any(getattr(block, "s1", None) for block in unet.up_blocks):
            raise ValueError("DeepCache here does not support FreeU: disable it first")

    @staticmethod
    def _layers(unet) -> tuple[list[tuple], list[tuple]]:
        """Down layers (each makes one skip connection after conv_in's) and up layers (each consumes one),
        up_layers[j] consuming skip connection j."""
        down: list[tuple] = []
        for block in unet.down_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            down += [("resnet", resnet, attn) for resnet, attn in zip(block.resnets, attentions)]
            if block.downsamplers is not None:
                down.append(("downsample", block.downsamplers, None))
        up_in_order: list[tuple] = []
        for block in unet.up_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            last = len(block.resnets) - 1
            up_in_order += [
                (resnet, attn, block.upsamplers if i == last else None)
                for i, (resnet, attn) in enumerate(zip(block.resnets, attentions))
            ]
        if len(up_in_order) != len(down) + 1:
            raise ValueError("DeepCache: this U-Net's up path does not mirror its down path")
        return down, up_in_order[::-1]

    def __call__(self, unet, sample, t, step_index, context):
        return self.run_batch([self], unet, sample, t, context, [sample.shape[0]], [step_index])

    def wants_full(self, step_index: int, rows: int) -> bool:
        stale = self.deep_input is None or self.deep_input.shape[0] != rows
        return step_index in self.full_steps or stale

    def batch_key(self, step_index: int, rows: int) -> tuple:
        """Requests whose runners give the same key can share this step's U-Net call (``run_batch``)."""
        return ("deepcache", self.branch, self.wants_full(step_index, rows))

    @staticmethod
    def run_batch(runners, unet, sample, t, context, rows, step_indices):
        """One U-Net call for several requests at the same kind of step (all full, or all partial with the
        same branch): a full pass keeps each request's slice of the deep feature; a partial pass runs the
        shallow branch once around all of their kept features. ``rows``: each request's samples."""
        lead = runners[0]
        if lead.wants_full(step_indices[0], rows[0]):
            out, deep = lead._full(unet, sample, t, context)
            for runner, part in zip(runners, deep.split(rows)):
                runner.deep_input = part
                runner.full_passes += 1
            return out
        deep = torch.cat([r.deep_input for r in runners]) if len(runners) > 1 else lead.deep_input
        for runner in runners:
            runner.partial_passes += 1
        return lead._partial(unet, sample, t, context, deep)

    def _full(self, unet, sample, t, context):
        branch_resnet = self.up_layers[self.branch][0]
        kept = []
        me = threading.get_ident()

        def keep_input(_module, args):
            if threading.get_ident() == me:  # another thread's call of a shared module is not this request's
                kept.append(args[0])

        handle = branch_resnet.register_forward_pre_hook(keep_input)
        try:
            return context.call(unet, sample, t), kept[-1]
        finally:
            handle.remove()

    def _partial(self, unet, sample, t, context, deep_input):
        """UNet2DConditionModel.forward restricted to the shallow branch (no masks, adapters or ControlNet)."""
        kwargs = context.family.unet_kwargs(context)
        encoder_hidden_states = kwargs["encoder_hidden_states"]
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t), None)
        aug = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=kwargs["added_cond_kwargs"]
        )
        if aug is not None:  # as UNet2DConditionModel.forward does, before the activation
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        h = unet.conv_in(sample)
        skips = [h]
        for kind, module, attn in self.down_layers[: self.branch]:
            if kind == "downsample":
                for downsampler in module:
                    h = downsampler(h)
            else:
                h = self._resnet_attention(module, attn, h, emb, encoder_hidden_states)
            skips.append(h)

        # The kept input is [deep hidden state, skip b]; the skip is recomputed fresh.
        h = deep_input[:, : deep_input.shape[1] - skips[self.branch].shape[1]]
        up_factor = 2**unet.num_upsamplers
        forward_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])
        for j in range(self.branch, -1, -1):
            resnet, attn, upsamplers = self.up_layers[j]
            h = torch.cat([h, skips[j]], dim=1)
            h = self._resnet_attention(resnet, attn, h, emb, encoder_hidden_states)
            if upsamplers is not None:
                size = skips[j - 1].shape[2:] if forward_size and j > 0 else None
                for upsampler in upsamplers:
                    h = upsampler(h, size)
        if unet.conv_norm_out:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)

    @staticmethod
    def _resnet_attention(resnet, attn, h, emb, encoder_hidden_states):
        h = resnet(h, emb)
        if attn is not None:
            h = attn(h, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return h


# --- block caching ---------------------------------------------------------------------------------


class BlockCacheUNet:
    """Each attention block recomputed on its own calibrated schedule, its stored output reused between."""

    method = "block"

    def __init__(
        self, unet, changes: dict[str, list[float]], *, steps: int, start_step: int = 0, delta: float = 0.3
    ) -> None:
        self.blocks = attention_blocks(unet)
        missing = set(self.blocks) - set(changes)
        if missing:
            raise ValueError(f"block calibration lacks {sorted(missing)[:3]}...; recalibrate")
        if any(len(changes[name]) != steps for name in self.blocks):
            raise ValueError(f"block calibration is for another step count than {steps}")
        self.recompute = {name: set(block_recompute_steps(changes[name], delta, start_step)) for name in self.blocks}
        self.params = {"delta": delta}
        self.outputs: dict[str, Any] = {}
        self.full_passes = 0
        self.partial_passes = 0
        self.blocks_computed = 0
        self.blocks_reused = 0

    def __call__(self, unet, sample, t, step_index, context):
        reuse = {
            name
            for name in self.blocks
            if step_index not in self.recompute[name]
            and name in self.outputs
            and self._batch(self.outputs[name]) == sample.shape[0]
        }
        compute = {name: m for name, m in self.blocks.items() if name not in reuse}
        if reuse:
            self.partial_passes += 1
        else:
            self.full_passes += 1
        self.blocks_reused += len(reuse)
        self.blocks_computed += len(compute)
        with (
            _outputs_replaced({self.blocks[name]: self.outputs[name] for name in reuse}),
            _outputs_recorded(compute, self.outputs),
        ):
            return context.call(unet, sample, t)

    @staticmethod
    def _batch(output) -> int:
        return (output[0] if isinstance(output, tuple) else output.sample).shape[0]

    def report(self) -> dict:
        total = self.blocks_computed + self.blocks_reused
        return {
            **PassCounts.report(self),
            "attention_reused": round(self.blocks_reused / total, 4) if total else 0.0,
        }


class _ChangeRecorder(PlainUNet):
    """The plain U-Net, noting each attention block's relative L1 change from the previous step."""

    def __init__(self, unet, steps: int) -> None:
        super().__init__()
        self.blocks = attention_blocks(unet)
        self.previous: dict[str, torch.Tensor] = {}
        self.changes = {name: [0.0] * steps for name in self.blocks}

    def __call__(self, unet, sample, t, step_index, context):
        outputs: dict[str, Any] = {}
        with _outputs_recorded(self.blocks, outputs):
            noise = super().__call__(unet, sample, t, step_index, context)
        for name, out in outputs.items():
            out = (out[0] if isinstance(out, tuple) else out.sample).float()
            before = self.previous.get(name)
            if before is not None:
                self.changes[name][step_index] = float(
                    (out - before).abs().mean() / before.abs().mean().clamp_min(1e-12)
                )
            self.previous[name] = out
        return noise


CALIBRATION_PROMPTS = (
    "a lighthouse on a rocky coast at sunset",
    "a bowl of ramen, studio photograph",
    "an astronaut riding a horse, oil painting",
    "a city street in the rain at night",
)


def calibrate_block_changes(
    components: Components, steps: int, prompts: int = 3, size: int | None = None
) -> dict[str, list[float]]:
    """Each attention block's mean relative L1 change per step, over a few plain (DDIM, CFG 7.5) runs."""
    loop = DenoiseLoop(components)
    size = size or components.spec.default_size
    total: dict[str, np.ndarray] = {}
    for i in range(prompts):
        recorder = _ChangeRecorder(components.unet, steps)
        loop.denoise(
            prompt=CALIBRATION_PROMPTS[i % len(CALIBRATION_PROMPTS)],
            seed=i,
            steps=steps,
            guidance_scale=7.5,
            width=size,
            height=size,
            unet_runner=recorder,
        )
        for name, values in recorder.changes.items():
            total[name] = total.get(name, 0) + np.asarray(values)
    return {name: [round(float(v) / prompts, 6) for v in values] for name, values in total.items()}


class BlockCalibrationStore:
    """Calibrated block changes as JSON, one file per model fingerprint, one entry per step count."""

    def __init__(self, directory: str | os.PathLike | None = None, prompts: int = 3, size: int | None = None) -> None:
        self.directory = (
            Path(directory).expanduser() if directory else Path.home() / ".cache" / "reprise" / "blockcache"
        )
        self.prompts = prompts
        self.size = size
        self.calibrations_run = 0
        self._lock = threading.Lock()
        self._known: dict[tuple[str, int], dict[str, list[float]]] = {}

    def path(self, fingerprint: str) -> Path:
        return self.directory / f"{fingerprint}.json"

    def load(self, fingerprint: str, steps: int) -> dict[str, list[float]] | None:
        try:
            data = json.loads(self.path(fingerprint).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        entry = data.get("steps", {}).get(str(steps))
        return entry["blocks"] if entry else None

    def changes(self, components: Components, steps: int) -> dict[str, list[float]]:
        """The stored calibration for this model and step count; calibrated (and stored) on first use."""
        key = (components.fingerprint, steps)
        with self._lock:  # devices of one worker share the store: calibrate once
            if key not in self._known:
                found = self.load(*key)
                if found is None:
                    started = time.perf_counter()
                    found = calibrate_block_changes(components, steps, self.prompts, self.size)
                    self.calibrations_run += 1
                    self._save(components, steps, found, time.perf_counter() - started)
                self._known[key] = found
            return self._known[key]

    def _save(self, components: Components, steps: int, blocks: dict[str, list[float]], seconds: float) -> None:
        path = self.path(components.fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            data = {"fingerprint": components.fingerprint, "model": components.name, "steps": {}}
        data["steps"][str(steps)] = {
            "prompts": self.prompts,
            "size": self.size or components.spec.default_size,
            "scheduler": components.spec.default_scheduler,
            "guidance_scale": 7.5,
            "seconds": round(seconds, 2),
            "blocks": blocks,
        }
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)  # atomic: another process may be reading it


_STORES: dict[tuple, BlockCalibrationStore] = {}
_STORES_LOCK = threading.Lock()


def calibration_store(
    directory: str | os.PathLike | None = None, prompts: int = 3, size: int | None = None
) -> BlockCalibrationStore:
    """One store per directory and recipe in a process, so concurrent devices share its lock."""
    key = (str(Path(directory).expanduser()) if directory else "", prompts, size)
    with _STORES_LOCK:
        if key not in _STORES:
            _STORES[key] = BlockCalibrationStore(directory, prompts, size)
        return _STORES[key]


# --- the factory the worker uses ---------------------------------------------------------------------


def resolve_feature_options(options: Any = None, defaults: dict | None = None) -> dict[str, Any]:
    """Request fields over the worker's defaults over FEATURE_DEFAULTS; "recommended" expands to RECOMMENDED."""
    if options is not None and hasattr(options, "model_dump"):
        options = options.model_dump()
    request = {k: v for k, v in (options or {}).items() if k in REQUEST_FIELDS and v is not None}
    settings = {**FEATURE_DEFAULTS, **{k: v for k, v in (defaults or {}).items() if v is not None}}
    method = request.pop("method", None) or settings["method"]
    if method == "recommended":  # the profile replaces the defaults; a request's own fields still win
        settings.update(RECOMMENDED)
        method = RECOMMENDED["method"]
    settings.update(request)
    settings["method"] = method
    return settings


def batches(method: str) -> bool:
    """Whether requests with this feature cache may share a denoiser call (the engine's groups): the plain
    denoiser and DeepCache (``DeepCacheUNet.run_batch``); block caching and diffusers' hooks keep one
    request's state in the call itself and run alone."""
    return method in ("off", "deepcache")


# The resolved settings that change a method's pixels (the cache key names them; workers/service.py).
PIXEL_SETTINGS: dict[str, tuple[str, ...]] = {
    "deepcache": ("deepcache_interval", "deepcache_branch", "deepcache_schedule"),
    "block": ("block_delta", "calibration_prompts", "calibration_size"),
    "first_block": ("first_block_threshold",),
    "taylorseer": ("taylorseer_interval", "taylorseer_order", "taylorseer_lite"),
}


def feature_identity(settings: dict[str, Any]) -> str:
    """The feature cache of resolved ``settings`` (``resolve_feature_options``) as one stable string:
    "off", or the method with every setting that changes its pixels, e.g. ``deepcache{"deepcache_branch": 0, ...}``.
    Two requests with the same identity get the same pixels from the same start."""
    method = settings.get("method") or "off"
    if method == "off":
        return "off"
    names = PIXEL_SETTINGS.get(method, ())
    if method == "deepcache" and settings.get("deepcache_schedule") == "nonuniform":
        names += ("deepcache_center", "deepcache_power")
    return method + json.dumps({name: settings.get(name) for name in names}, sort_keys=True)


def methods_for(components: Components) -> list[str]:
    """The feature cache methods this model's family runs, besides off."""
    methods = list(components.family.feature_methods)
    return methods + ["recommended"] if "deepcache" in methods else methods


def make_unet_runner(components: Components, options: Any, defaults: dict | None, steps: int, start_step: int = 0):
    """The runner for one job: ``options`` is the request's ``cache.feature``, ``defaults`` the worker's.

    The loop may resume at ``start_step`` (approximate cache): schedules cover the remaining steps and
    the first step the runner sees is a full pass.
    """
    settings = resolve_feature_options(options, defaults)
    method = settings["method"]
    if method in ("off", None):
        return PlainUNet()
    family = components.family
    if method in DIFFUSERS_METHODS:
        if method not in family.feature_methods:
            raise ValueError(f"feature cache {method!r} does not run on the {family.name} family's denoiser")
        if method == "taylorseer" and settings["taylorseer_lite"] and not family.taylorseer_lite:
            raise ValueError(f"TaylorSeer's lite mode does not run on the {family.name} family's denoiser")
        if method == "first_block":
            params = {"threshold": float(settings["first_block_threshold"])}
        else:
            params = {
                "cache_interval": int(settings["taylorseer_interval"]),
                "max_order": int(settings["taylorseer_order"]),
                "use_lite_mode": bool(settings["taylorseer_lite"]),
                # diffusers keeps the factors in bfloat16 (GPU memory); on the CPU bfloat16 arithmetic is slow
                "taylor_factors_dtype": torch.bfloat16 if components.device.type == "cuda" else torch.float32,
            }
        return DiffusersCacheRunner(components.unet, method, params, steps=steps, start_step=start_step)
    if method in ("deepcache", "block") and method not in family.feature_methods:
        raise ValueError(
            f"feature cache {method!r} works on U-Nets; the {family.name} family's denoiser is a transformer"
        )
    if method == "deepcache":
        return DeepCacheUNet(
            components.unet,
            steps=steps,
            start_step=start_step,
            interval=int(settings["deepcache_interval"]),
            branch=int(settings["deepcache_branch"]),
            schedule=settings["deepcache_schedule"],
            center=float(settings["deepcache_center"]),
            power=float(settings["deepcache_power"]),
        )
    if method == "block":
        store = calibration_store(
            settings["calibration_dir"], int(settings["calibration_prompts"]), settings["calibration_size"]
        )
        changes = store.changes(components, steps)
        return BlockCacheUNet(
            components.unet, changes, steps=steps, start_step=start_step, delta=float(settings["block_delta"])
        )
    raise ValueError(
        f"unknown feature cache method {method!r}; one of off, deepcache, block, recommended, {', '.join(DIFFUSERS_METHODS)}"
    )


# --- transformer caches: diffusers' own hooks ---------------------------------------------------------

# request method -> (diffusers config class, apply function), all in diffusers.hooks
# Not offered: PyramidAttentionBroadcast keeps its state in the hook and resets it whenever the hook is put on
# (see DiffusersCacheRunner), MagCache needs ratios calibrated per model, FasterCache is written for video.
DIFFUSERS_METHODS = {
    "first_block": ("FirstBlockCacheConfig", "apply_first_block_cache"),
    "taylorseer": ("TaylorSeerCacheConfig", "apply_taylorseer_cache"),
}


class DiffusersCacheRunner(PassCounts):
    """A transformer feature cache made of diffusers' own hooks (FirstBlockCache, TaylorSeer), for one request.

    diffusers keeps a cache's state in its hooks and applies them to every call of the model they sit on;
    ``enable_cache`` allows one configuration per model. A node's transformer is shared by requests with
    other caches or none, so this runner applies its hooks (``apply_*``) at its first call, then takes the
    same hook objects off after each of its calls and puts them back before the next: their state stays
    with them, and other requests' calls never meet them. It does not batch (its state is one request's).
    diffusers' hooks sit on the model for the whole call: a device thread is the only caller of its own
    pipeline (one per device, workers/node.py), so no other request's call meets them there; on a pipeline
    that two device threads share (``sim:N``), they would.
    """

    def __init__(self, model, method: str, params: dict, *, steps: int, start_step: int = 0) -> None:
        import diffusers.hooks as hooks

        if method not in DIFFUSERS_METHODS:
            raise ValueError(f"unknown diffusers cache {method!r}; one of {', '.join(DIFFUSERS_METHODS)}")
        config_name, apply_name = DIFFUSERS_METHODS[method]
        self.method, self.params = method, {k: v for k, v in params.items() if not isinstance(v, torch.dtype)}
        self.config = getattr(hooks, config_name)(**params)
        self._apply = getattr(hooks, apply_name)
        self.hooks: list[tuple[torch.nn.Module, str, Any]] | None = None
        self.steps, self.start_step = steps, start_step
        self.counted = _ComputedBlocks(model)
        self.full_passes = 0
        self.partial_passes = 0  # calls in which the hooks reused anything (blocks, attention, features)
        self.reused_blocks = 0

    @staticmethod
    def _registered(model) -> set[tuple[int, str]]:
        return {
            (id(m), name)
            for _, m in model.named_modules()
            if hasattr(m, "_diffusers_hook")
            for name in m._diffusers_hook._hook_order
        }

    @contextmanager
    def _hooks_on(self, model) -> Iterator[None]:
        from diffusers.hooks import HookRegistry

        if self.hooks is None:  # the first call: diffusers applies them; note what it put where
            before = self._registered(model)
            self._apply(model, self.config)
            self.hooks = [
                (m, name, m._diffusers_hook.hooks[name])
                for _, m in model.named_modules()
                if hasattr(m, "_diffusers_hook")
                for name in list(m._diffusers_hook._hook_order)
                if (id(m), name) not in before
            ]
            # modules gained registries: rebuild diffusers' cached list of them (they stay, empty, between calls)
            HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
        else:
            for module, name, hook in self.hooks:
                module._diffusers_hook.register_hook(hook, name)
        try:
            yield
        finally:
            for module, name, _ in reversed(self.hooks):
                module._diffusers_hook.remove_hook(name, recurse=False)

    def __call__(self, unet, sample, t, step_index, context):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        counted = self.counted
        counted.ran = 0
        with self._hooks_on(unet), counted:
            _set_cache_context(
                unet,
                CacheContext("request", step_index=step_index - self.start_step, num_inference_steps=self.steps),
            )
            try:
                out = context.call(unet, sample, t)
            finally:
                _set_cache_context(unet, None)
        skipped = counted.total - counted.ran
        self.reused_blocks += skipped
        if skipped:
            self.partial_passes += 1
        else:
            self.full_passes += 1
        return out


class _ComputedBlocks:
    """Counts the attention computations that ran in one call: each attention's query projection runs only
    when the attention itself is computed, not when a cache hook returns a kept or predicted output."""

    def __init__(self, model) -> None:
        self.modules = [m for name, m in model.named_modules() if name.endswith(".to_q")]
        self.total = len(self.modules)
        self.ran = 0
        self.handles: list = []

    def __enter__(self):
        self.thread = threading.get_ident()
        self.handles = [m.register_forward_hook(self._ran) for m in self.modules]
        return self

    def _ran(self, *_args) -> None:
        if threading.get_ident() == self.thread:
            self.ran += 1

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
