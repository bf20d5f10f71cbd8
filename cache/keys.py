"""The identity of a cached generation."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass

# Fixed namespace so every process derives the same point id for the same key.
REPRISE_NAMESPACE = uuid.UUID("6f1c1a52-3a0e-5b55-9d0e-7e1f2b8c4a10")


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines a generation's output, plus who asked for it.

    Beyond the sampler's arguments, whatever else changes the pixels is a field too, so that neither the
    exact key nor the approximate lookup's filter (``cache.latent_cache``) ever hands one generation's
    image or state to another: ``feature`` names the feature cache with its parameters ("off" for the
    plain denoiser; ``workers.feature_cache.feature_identity``). Adapters (LoRA: name, version and scale of
    each) join the same way: a field here with its plain default, in ``content_key``, in the entry's
    payload and in the approximate filter.
    """

    model: str
    model_version: str
    generation: int  # cache generation: the coordinator bumps it to invalidate older entries
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str
    tenant: str = ""
    feature: str = "off"
    # LoRA adapters: "name@version*scale" of each, in name order, comma-separated; "" for none
    adapters: str = ""

    def content_key(self) -> str:
        """sha256 over what fixes the image (tenant excluded): the `exact_key` payload field."""
        fields = {
            "model": self.model,
            "model_version": self.model_version,
            "generation": int(self.generation),
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": int(self.seed),
            "steps": int(self.steps),
            "guidance": float(self.guidance),
            "width": int(self.width),
            "height": int(self.height),
            "scheduler": self.scheduler,
            "feature": self.feature,
            "adapters": self.adapters,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def exact_id(self, isolate_by_tenant: bool = True) -> str:
        """Deterministic point id: UUID5 of the content key, scoped to the tenant when isolating.

        Tenant-scoped ids mean one tenant's write can never occupy (or poison) another tenant's
        slot; a shareable entry is found by other tenants through the `exact_key` payload index.
        The generation is part of the key so that entries written after an invalidation do not
        collide with stale ones still waiting for the sweep.
        """
        scope = self.tenant if isolate_by_tenant else ""
        return str(uuid.uuid5(REPRISE_NAMESPACE, f"{self.content_key()}/{scope}"))

    @property
    def adapter_names(self) -> list[str]:
        """The adapters' names (an invalidation deletes a replaced adapter's entries by name)."""
        return [part.split("@", 1)[0] for part in self.adapters.split(",") if part]

    def as_dict(self) -> dict:
        return asdict(self)
