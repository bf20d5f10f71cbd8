"""LoRA adapters on a device: loaded on demand through diffusers' PEFT integration, kept within a byte budget.

A request names adapters (`loras`); the worker resolves them in the registry (scheduler/adapters.py) to
``ActiveLora`` entries: name, version (the file's content hash), scale and where the weights are. Each
device holds its own ``DeviceAdapters``: the adapters loaded into that device's denoiser, least recently
used first, at most ``REPRISE_LORA_CACHE_MB`` of weights. The base model is never reloaded: an adapter is
added with diffusers' ``load_lora_weights`` and removed with ``delete_adapters``; between calls the
device thread activates the batch's adapters with ``set_adapters`` (or turns LoRA off for plain requests).

Who touches what: the denoiser's adapters are loaded, activated and deleted only by the device thread that
runs the denoiser (``prepare``, ``activate`` and ``release``, called by the engine between denoiser calls), so no module
is patched while another thread runs it. Text-encoder weights (SD 1.5's and SDXL's adapters may carry
them) change the conditioning, which is computed off the device on the job's thread: the text encoders
are shared by every job thread of the node (and the `clip` prompt embedder), so a text encoder is used
under ``text_lock`` -- shared by plain encodes, exclusive while adapters are loaded, set, used and
turned off again (``encode``).

Several adapter sets in one denoiser call: PEFT's LoRA layers take per-sample ``adapter_names`` (its
mixed-adapter batches: each sample's rows go through the one adapter it names, ``__base__`` through
none). diffusers' models do not pass that argument down, so it is given to every LoRA layer for the call
by PEFT's own pre-forward hook, the way PEFT's models do it. It serves requests with at most one adapter;
each adapter has one scale per call (PEFT's scaling is per adapter), so requests using one adapter at two
scales do not share a call (``compatible``). A request with several adapters runs with its own set.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

# raw key prefixes of a file's text-encoder weights (diffusers' and kohya's), as the registry reads them
from scheduler.adapters import TEXT_ENCODER_PREFIXES as RAW_TEXT_PREFIXES

log = logging.getLogger("reprise.lora")
# Loading an adapter beside others makes PEFT list the others' keys as "missing" from the new file: noise.
logging.getLogger("peft").setLevel(logging.ERROR)
logging.getLogger("diffusers.loaders.peft").setLevel(logging.ERROR)
logging.getLogger("diffusers.loaders.lora_base").setLevel(logging.ERROR)
logging.getLogger("diffusers.loaders.lora_pipeline").setLevel(logging.ERROR)
logging.getLogger("diffusers.utils.peft_utils").setLevel(logging.ERROR)

# PEFT's notes on a model holding several adapters, which is the point here
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted", category=UserWarning)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
TEXT_ENCODERS = (("text_encoder", "text_encoder."), ("text_encoder_2", "text_encoder_2."))


@dataclass(frozen=True)
class ActiveLora:
    """One adapter of a request, resolved: what it is (name, version), how strongly, where its weights are."""

    name: str
    version: str
    scale: float
    uri: str
    text_encoder: bool = False

    @property
    def key(self) -> str:
        """The adapter's name inside PEFT: its content hash, so two names of one file share the loaded weights."""
        return f"v{self.version}"


AdapterSet = tuple[ActiveLora, ...]


def adapter_identity(adapters: AdapterSet) -> str:
    """The adapters as cache keys and filters name them: name, version and scale of each, in name order;
    "" for none."""
    return ",".join(f"{a.name}@{a.version}*{a.scale:g}" for a in sorted(adapters, key=lambda a: a.name))


def batch_key(adapters: AdapterSet, mode: str) -> tuple:
    """Whom a request may share a denoiser call with, as far as adapters go: in ``grouped`` mode the same set;
    in ``mixed`` mode any request with at most one adapter (per-sample adapters), a larger set only its own."""
    if mode == "mixed" and len(adapters) <= 1:
        return ("lora-mixed",)
    return ("lora", adapter_identity(adapters))


def compatible(sets: list[AdapterSet]) -> list[int]:
    """Indexes of the requests (in order) that can share one call: an adapter has one scale per call."""
    scales: dict[str, float] = {}
    keep = []
    for i, adapters in enumerate(sets):
        if all(scales.get(a.key, a.scale) == a.scale for a in adapters):
            keep.append(i)
            scales.update({a.key: a.scale for a in adapters})
    return keep


def read_weights(uri: str) -> dict[str, torch.Tensor]:
    """An adapter's tensors from the artifact store (any fsspec URL)."""
    import fsspec
    from safetensors.torch import load

    with fsspec.open(uri, "rb") as f:
        return load(f.read())


class SharedLock:
    """Many holders in shared mode, one in exclusive mode (a reader-writer lock, which the standard library
    lacks): plain text encodes run together; loading or applying a text encoder's adapters runs alone. The
    exclusive holder's own thread passes ``shared`` (its encode runs inside its exclusive section)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._owner: int | None = None  # the thread holding it exclusively

    @contextmanager
    def shared(self):
        me = threading.get_ident()
        if self._owner == me:
            yield
            return
        with self._cond:
            self._cond.wait_for(lambda: self._owner is None)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._cond.wait_for(lambda: self._owner is None)
            self._owner = threading.get_ident()
            self._cond.wait_for(lambda: self._shared == 0)
        try:
            yield
        finally:
            with self._cond:
                self._owner = None
                self._cond.notify_all()


def _lora_host(components):
    """An object with diffusers' LoRA loader of the model's family, holding the device's denoiser: what a
    diffusers pipeline is to ``load_lora_weights``. Text encoders are loaded apart (``_load_text_encoder``)."""
    from diffusers.loaders import (
        FluxLoraLoaderMixin,
        SD3LoraLoaderMixin,
        StableDiffusionLoraLoaderMixin,
        StableDiffusionXLLoraLoaderMixin,
    )

    mixin = {
        "sd15": StableDiffusionLoraLoaderMixin,
        "sdxl": StableDiffusionXLLoraLoaderMixin,
        "sd3": SD3LoraLoaderMixin,
        "flux": FluxLoraLoaderMixin,
    }[components.family.name]
    host = type(f"Reprise{mixin.__name__}", (mixin,), {})()
    setattr(host, components.family.denoiser, components.unet)
    # what diffusers' loader asks a pipeline about offloading: nothing offloaded, one module
    host.hf_device_map = None
    host.components = {components.family.denoiser: components.unet}
    for name in mixin._lora_loadable_modules:
        if name != components.family.denoiser:
            setattr(host, name, None)
    return host


def _tensor_bytes(state: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    return sum(t.numel() for t in state.values()) * torch.empty((), dtype=dtype).element_size()


def _load_text_encoder(host, text_encoder, state: dict[str, torch.Tensor], prefix: str, key: str) -> bool:
    """An adapter's text-encoder weights into ``text_encoder`` with PEFT itself. Why not diffusers' own path:
    it goes through transformers' ``load_adapter``, which transformers 5 refuses below PEFT 0.22 (not
    released). Same steps as diffusers' ``_load_lora_into_text_encoder``: the file's format converted by
    diffusers (kohya's too), PEFT's config from diffusers' helper, PEFT's injection and state-dict load."""
    import inspect

    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    # the family's own format conversion (kohya's key names, alphas); Flux's loader returns alphas on request
    extra = {"return_alphas": True} if "return_alphas" in inspect.signature(host.lora_state_dict).parameters else {}
    converted, alphas, _ = host.lora_state_dict(dict(state), return_lora_metadata=True, **extra)
    part = {k.removeprefix(prefix): v for k, v in converted.items() if k.startswith(prefix)}
    if not part:
        return False
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(text_encoder, "text_model"):  # transformers 5 flattened CLIPTextModel
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
    rank = {k: v.shape[1] for k, v in part.items() if k.endswith("lora_B.weight")}
    alphas = {k.removeprefix(prefix): v for k, v in (alphas or {}).items() if k.startswith(prefix)} or None
    config = _create_lora_config(part, alphas, None, rank, is_unet=False)
    inject_adapter_in_model(config, text_encoder, adapter_name=key)
    set_peft_model_state_dict(text_encoder, part, adapter_name=key)
    text_encoder.to(device=text_encoder.device, dtype=text_encoder.dtype)
    return True


class DeviceAdapters:
    """The adapters loaded on one device's model, least recently used first, within ``budget_bytes``."""

    def __init__(self, components, budget_bytes: int):
        self.c = components
        self.budget_bytes = int(budget_bytes)
        self.host = _lora_host(components)
        self.loaded: OrderedDict[str, int] = OrderedDict()  # denoiser: PEFT key -> bytes
        self.text_loaded: OrderedDict[str, tuple[int, list[str]]] = OrderedDict()  # key -> (bytes, encoders)
        self.text_lock: SharedLock = components.text_lock
        self.loads = 0  # adapters loaded into the denoiser since start (a reload after eviction counts)
        self.evictions = 0
        self._active: tuple | None = None  # what set_adapters last made active (skips repeats)
        self._hooks: list = []
        self.mixed_calls = 0  # calls with per-sample adapters

    # --- the denoiser: the device thread only -----------------------------------------------------------
    def prepare(self, adapters: AdapterSet, pinned: set[str]) -> None:
        """Load what ``adapters`` need into the denoiser (most recently used now); evict the least recently
        used unpinned ones past the budget. Raises what loading raises (the request alone fails)."""
        for a in adapters:
            if a.key in self.loaded:
                self.loaded.move_to_end(a.key)
                continue
            state = read_weights(a.uri)
            denoiser = {k: v for k, v in state.items() if not k.startswith(RAW_TEXT_PREFIXES)}
            size = _tensor_bytes(denoiser, self.c.dtype)
            self._evict(size, pinned | {x.key for x in adapters})
            if denoiser:
                self.host.load_lora_weights(denoiser, adapter_name=a.key)
            self.loaded[a.key] = size
            self.loads += 1
            self._active = None
            log.info("adapter %s (%s) loaded on %s: %.1f MB", a.name, a.version, self.c.device, size / 2**20)

    def _evict(self, incoming: int, pinned: set[str]) -> None:
        for key in list(self.loaded):
            if sum(self.loaded.values()) + incoming <= self.budget_bytes:
                return
            if key in pinned:
                continue
            if self.loaded.pop(key):
                self.c.unet.delete_adapters([key])
            self.evictions += 1
            self._active = None

    @property
    def bytes_loaded(self) -> int:
        return sum(self.loaded.values())

    def _peft(self) -> bool:
        return bool(getattr(self.c.unet, "_hf_peft_config_loaded", False))

    def activate(self, sets: list[AdapterSet], rows: list[int]) -> None:
        """Make each request's adapters active for the next call (``rows`` samples each): one set for all
        (``set_adapters``), none (LoRA off), or one adapter or none per request (per-sample ``adapter_names``,
        until ``release``). A call that failed before its ``release`` leaves nothing behind: this starts by
        removing what the previous call hooked."""
        self.release()
        unet = self.c.unet
        if not self._peft():  # nothing was ever loaded: the plain denoiser
            return
        keys = {a.key: a.scale for adapters in sets for a in adapters if self.loaded.get(a.key)}
        if not keys:
            self._set(("off",), unet.disable_lora)
            return
        active = (tuple(keys), tuple(keys.values()))
        self._set(("on",) + active, lambda: (unet.enable_lora(), unet.set_adapters(list(keys), list(keys.values()))))
        if all(s == sets[0] for s in sets):
            return
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.model import _adapter_names_pre_forward_hook

        names = [
            (adapters[0].key if adapters and self.loaded.get(adapters[0].key) else BASE)
            for adapters, n in zip(sets, rows)
            for _ in range(n)
        ]
        hook = partial(_adapter_names_pre_forward_hook, adapter_names=names)
        self._hooks = [
            m.register_forward_pre_hook(hook, with_kwargs=True) for m in unet.modules() if isinstance(m, LoraLayer)
        ]
        self.mixed_calls += 1

    def release(self) -> None:
        """Remove the per-sample adapter hooks of the last call, if it had any."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _set(self, state: tuple, apply) -> None:
        if self._active != state:
            apply()
            self._active = state

    # --- the text encoders: a job thread, under the exclusive text lock -----------------------------------
    def encode(self, adapters: AdapterSet, fn):
        """``fn()`` (the request's conditioning) with the text-encoder weights of ``adapters`` applied, alone on
        the text encoders; they are turned off again before anyone else encodes."""
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        with self.text_lock.exclusive():
            used: dict[str, list[tuple[str, float]]] = {}
            for a in adapters:
                if not a.text_encoder:
                    continue
                if a.key not in self.text_loaded:
                    self._load_text(a)
                self.text_loaded.move_to_end(a.key)
                for encoder in self.text_loaded[a.key][1]:
                    used.setdefault(encoder, []).append((a.key, a.scale))
            try:
                for encoder, pairs in used.items():
                    module = getattr(self.c, encoder)
                    enable_lora_for_text_encoder(module)  # turned off after the previous request's encode
                    set_adapters_for_text_encoder([k for k, _ in pairs], module, [s for _, s in pairs])
                return fn()
            finally:
                for encoder in used:
                    disable_lora_for_text_encoder(getattr(self.c, encoder))

    def _load_text(self, a: ActiveLora) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers

        state = {k: v for k, v in read_weights(a.uri).items() if k.startswith(RAW_TEXT_PREFIXES)}
        size = _tensor_bytes(state, self.c.dtype)
        for key in list(self.text_loaded):  # the text side has its own budget of the same size
            if sum(b for b, _ in self.text_loaded.values()) + size <= self.budget_bytes:
                break
            _, encoders = self.text_loaded.pop(key)
            for encoder in encoders:
                module = getattr(self.c, encoder)
                delete_adapter_layers(module, key)
                getattr(module, "peft_config", {}).pop(key, None)
        encoders = []
        for encoder, prefix in TEXT_ENCODERS:
            module = getattr(self.c, encoder, None)
            if module is not None and _load_text_encoder(self.host, module, state, prefix, a.key):
                encoders.append(encoder)
        self.text_loaded[a.key] = (size, encoders)

    def stats(self) -> dict:
        return {
            "loaded": list(self.loaded),
            "bytes": self.bytes_loaded,
            "budget_bytes": self.budget_bytes,
            "loads": self.loads,
            "evictions": self.evictions,
            "mixed_calls": self.mixed_calls,
        }


class SimAdapters(DeviceAdapters):
    """The `sim` device's adapters: no weights (its denoiser is a timer), the same bookkeeping, so batching
    by adapter set is measured as on a real device (`reprise bench lora --devices sim`)."""

    def __init__(self, components, budget_bytes: int):
        self.c = components
        self.budget_bytes = int(budget_bytes)
        self.loaded = OrderedDict()
        self.text_loaded = OrderedDict()
        self.text_lock = components.text_lock
        self.loads = self.evictions = self.mixed_calls = 0
        self._active = None
        self._hooks = []

    def prepare(self, adapters: AdapterSet, pinned: set[str]) -> None:
        for a in adapters:
            if a.key not in self.loaded:
                self.loaded[a.key] = 0
                self.loads += 1
            self.loaded.move_to_end(a.key)

    def activate(self, sets: list[AdapterSet], rows: list[int]) -> None:
        if len({adapter_identity(x) for x in sets}) > 1:
            self.mixed_calls += 1

    def encode(self, adapters, fn):
        return fn()


def device_adapters(components, budget_bytes: int) -> DeviceAdapters:
    """The device's adapter cache (made once per device by the worker)."""
    if components.extra.get("simulated"):
        return SimAdapters(components, budget_bytes)
    return DeviceAdapters(components, budget_bytes)
