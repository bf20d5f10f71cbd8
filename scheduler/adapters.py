"""The LoRA adapter registry: which adapters exist for which base model, at which version.

An adapter is registered once (`reprise lora add NAME SOURCE --model MODEL`) and named by requests
(`loras: [{"name", "scale"}]`). Its version is the sha256 of its file's bytes, so the same name with new
content is a new version: cache keys carry the version, and re-adding a name also files an invalidation
rule that deletes the old version's entries from every node's cache.

Where things live, as for the other registries: the entry in Redis (one hash per base model, field =
adapter name, value = JSON), the weights in the artifact store (`REPRISE_ARTIFACT_URL`, any fsspec URL
every node can read) under ``loras/<model>/<version>.safetensors``. Workers read the file from there
(workers/lora.py); nothing here imports model code: a safetensors header is read as plain data.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec
import redis

from scheduler.errors import AdapterModelMismatch, AdapterSourceError, UnknownAdapter

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
# raw key prefixes of text-encoder weights: diffusers' format, and kohya/A1111's (lora_te_, lora_te1_, lora_te2_)
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te")


@dataclass(frozen=True)
class Adapter:
    name: str
    model: str
    version: str  # sha256 of the file's bytes (first 16 hex digits)
    uri: str  # the weights in the artifact store
    bytes: int
    format: str  # "diffusers" | "kohya"
    text_encoder: bool  # the file also holds text-encoder weights
    denoiser: str  # "unet" | "transformer" (what the file's denoiser weights target)
    source: str
    added_at: float

    def as_dict(self) -> dict:
        return asdict(self)


def read_source(source: str) -> tuple[bytes, str]:
    """(the adapter file's bytes, where they came from): a diffusers folder, a .safetensors file, or a hub
    repository id (downloads only when the network is allowed: HF_HUB_OFFLINE=1 gives AdapterSourceError)."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / DIFFUSERS_FILE
        if not path.exists():
            raise AdapterSourceError(f"{source} holds no {DIFFUSERS_FILE} (the file save_lora_weights writes)")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise AdapterSourceError(f"{source}: only .safetensors adapters are read (never pickled .bin/.ckpt)")
        return path.read_bytes(), str(path.resolve())
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise AdapterSourceError(f"{source}: no such file or folder, and not a hub id (owner/name)")
    from huggingface_hub import constants

    # read as huggingface_hub reads it (workers.model_loading.hub_offline does the same on the worker side)
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if value.upper() in constants.ENV_VARS_TRUE_VALUES:
        raise AdapterSourceError(
            f"{source} looks like a hub id, but HF_HUB_OFFLINE is set: download it elsewhere and add the file"
        )
    try:
        import huggingface_hub

        local = huggingface_hub.hf_hub_download(source, DIFFUSERS_FILE)
    except Exception as exc:  # no network, no such repository, no such file
        raise AdapterSourceError(f"cannot download {source}/{DIFFUSERS_FILE}: {type(exc).__name__}: {exc}") from None
    return Path(local).read_bytes(), f"hub:{source}"


def inspect_weights(data: bytes) -> dict:
    """Format facts from a safetensors file's header (no tensor is read): raises AdapterSourceError for a file
    that is not LoRA weights."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterSourceError(f"not a safetensors file ({exc})") from None
    keys = [k for k in header if k != "__metadata__"]
    if not keys or not all("lora" in k or k.endswith(".alpha") for k in keys):
        raise AdapterSourceError("not LoRA weights: every tensor name of a LoRA file contains 'lora' (or is an alpha)")
    kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    denoiser_keys = [k for k in keys if not k.startswith(TEXT_ENCODER_PREFIXES)]
    transformer = any(k.startswith("transformer.") for k in denoiser_keys) or any(
        "double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k for k in denoiser_keys
    )
    return {
        "format": "kohya" if kohya else "diffusers",
        "text_encoder": any(k.startswith(TEXT_ENCODER_PREFIXES) for k in keys),
        "denoiser": "transformer" if transformer else "unet",
    }


class AdapterRegistry:
    def __init__(self, client: redis.Redis, prefix: str = "reprise", store_url: str = "./var/artifacts"):
        self.r, self.prefix, self.store_url = client, prefix, store_url.rstrip("/")

    def _key(self, model: str) -> str:
        return f"{self.prefix}:lora:{model}"

    def add(self, name: str, source: str, model: str) -> tuple[Adapter, Adapter | None]:
        """Register (or replace) ``name`` for ``model``; returns (the new entry, the entry it replaced)."""
        from scheduler.schema import check_adapter_name

        check_adapter_name(name)
        data, where = read_source(source)
        facts = inspect_weights(data)
        version = hashlib.sha256(data).hexdigest()[:16]
        uri = self._write(f"loras/{model}/{version}.safetensors", data)
        adapter = Adapter(
            name=name,
            model=model,
            version=version,
            uri=uri,
            bytes=len(data),
            source=where,
            added_at=time.time(),
            **facts,
        )
        old = self.get(model, name)
        self.r.hset(self._key(model), name, json.dumps(adapter.as_dict()))
        return adapter, old

    def _write(self, relative: str, data: bytes) -> str:
        fs, base = fsspec.core.url_to_fs(self.store_url)
        path = f"{base}/{relative}"
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.part"  # atomic: a reader never sees half a file
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
        return fs.unstrip_protocol(path) if hasattr(fs, "unstrip_protocol") else path

    def get(self, model: str, name: str) -> Adapter | None:
        raw = self.r.hget(self._key(model), name)
        return Adapter(**json.loads(raw)) if raw else None

    def remove(self, model: str, name: str) -> Adapter | None:
        old = self.get(model, name)
        if old is not None:
            self.r.hdel(self._key(model), name)
        return old

    def list(self, model: str | None = None) -> list[Adapter]:
        keys = [self._key(model)] if model else list(self.r.scan_iter(f"{self.prefix}:lora:*"))
        out = [Adapter(**json.loads(raw)) for key in keys for raw in self.r.hvals(key)]
        return sorted(out, key=lambda a: (a.model, a.name))

    def resolve(self, model: str, loras) -> list[tuple[Adapter, float]]:
        """The entries a request's ``loras`` name for ``model``, with their scales; UnknownAdapter for a name the
        registry does not hold, AdapterModelMismatch for one registered only for other base models."""
        out = []
        for i, lora in enumerate(loras or ()):
            adapter = self.get(model, lora.name)
            if adapter is None:
                others = sorted(a.model for a in self.list() if a.name == lora.name)
                field = f"loras.{i}.name"
                if others:
                    raise AdapterModelMismatch(
                        f"adapter {lora.name!r} was made for {', '.join(others)}, not {model}",
                        [{"field": field, "problem": f"registered for {', '.join(others)}"}],
                    )
                raise UnknownAdapter(
                    f"no adapter {lora.name!r} is registered (reprise lora list)",
                    [{"field": field, "problem": "unknown adapter"}],
                )
            out.append((adapter, float(lora.scale)))
        return out
