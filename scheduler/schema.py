"""The request and result of one generation: declared once, with bounds and descriptions.

Validation, the published JSON schema (`reprise schema`), the CLI's options and the README's
field table all derive from these models.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scheduler.errors import InvalidRequest

SCHEMA_VERSION = "1.0"

SCHEDULERS = ("ddim", "euler", "dpmpp_2m", "flow_euler")
MAX_PROMPT_CHARS = 2000
MAX_SIDE = 2048
MAX_SEED = 2**32 - 1
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class FeatureCacheOptions(BaseModel):
    """Caches inside one request (U-Net work skipped between steps). None means the worker's default."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["off", "deepcache", "block", "recommended", "first_block", "taylorseer"] | None = Field(
        None,
        description="Feature cache to use: off; for U-Nets (SD 1.5, SDXL) deepcache, block (block caching) or "
        "recommended (the project's profile); for transformers, diffusers' hooks: first_block (FirstBlockCache, "
        "Flux) or taylorseer (TaylorSeer, SD3 and Flux). `reprise models` lists each model's methods.",
    )
    deepcache_interval: int | None = Field(None, ge=1, le=20, description="DeepCache: full U-Net every N steps.")
    deepcache_branch: int | None = Field(None, ge=0, le=12, description="DeepCache: skip branch id (0 = shallowest).")
    deepcache_schedule: Literal["uniform", "nonuniform"] | None = Field(
        None, description="DeepCache: where the full steps fall."
    )
    block_delta: float | None = Field(
        None, gt=0, le=10, description="Block caching: accumulated relative change that forces a recompute."
    )
    first_block_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="FirstBlockCache: the first block's relative output change below which the other blocks are "
        "reused (default 0.05).",
    )
    taylorseer_interval: int | None = Field(
        None,
        ge=1,
        le=50,
        description="TaylorSeer: a full transformer pass every N steps, predicted between (default 5).",
    )
    taylorseer_order: int | None = Field(
        None, ge=1, le=4, description="TaylorSeer: order of the Taylor expansion that predicts features (default 1)."
    )
    taylorseer_lite: bool | None = Field(
        None,
        description="TaylorSeer: diffusers' lite mode, whole blocks skipped between full passes and only the output "
        "projection predicted (faster, coarser; default false).",
    )
    text_memo: bool = Field(
        True, description="Reuse the text encoder's output for a prompt seen before; false encodes it afresh."
    )


class CacheOptions(BaseModel):
    """Which caches this request may use, and whether its result may serve other tenants."""

    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(True, description="Return a stored image for an identical earlier request.")
    approximate: bool = Field(True, description="Resume from a similar prompt's stored noise state.")
    write: bool = Field(True, description="Store this generation's states and image for later requests.")
    share: bool = Field(
        False, description="Let other tenants reuse this result (their own requests must allow shared)."
    )
    use_shared: bool = Field(True, description="Accept entries other tenants shared.")
    isolate_timing: bool = Field(
        False, description="Pad cache hits to the time of a miss so timing reveals nothing (costs the speed-up)."
    )
    feature: FeatureCacheOptions = Field(default_factory=FeatureCacheOptions)


MAX_LORAS = 4
MAX_LORA_SCALE = 2.0


class LoraRef(BaseModel):
    """One LoRA adapter applied to this request (registered with `reprise lora add`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=_NAME, description="Adapter name (see `reprise lora list`).")
    scale: float = Field(
        1.0,
        ge=-MAX_LORA_SCALE,
        le=MAX_LORA_SCALE,
        description="How strongly the adapter applies (0 = not at all, 1 = as trained).",
    )

    @field_validator("scale")
    @classmethod
    def _finite_scale(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("scale must be finite")
        return value


def check_adapter_name(name: str) -> str:
    """An adapter name as requests spell it (the registry refuses others)."""
    if not re.match(_NAME, name):
        raise InvalidRequest(f"bad adapter name {name!r}", [{"field": "name", "problem": f"must match {_NAME}"}])
    return name


class GenerationRequest(BaseModel):
    """One text-to-image job."""

    model_config = ConfigDict(extra="forbid", title="GenerationRequest")

    schema_version: Literal["1.0"] = Field(SCHEMA_VERSION, description="Version of this schema.")
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="What to steer away from.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Noise seed; chosen and returned when absent.")
    steps: int | None = Field(None, ge=1, le=500, description="Denoising steps; the model's default when absent.")
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=30.0,
        description="Guidance: classifier-free (<= 1 disables it), or the guidance embedding of a Flux-dev-like "
        "model; the model's default when absent.",
    )
    width: int | None = Field(
        None, ge=8, le=MAX_SIDE, description="Image width in pixels; the model's default when absent."
    )
    height: int | None = Field(
        None, ge=8, le=MAX_SIDE, description="Image height in pixels; the model's default when absent."
    )
    scheduler: Literal["ddim", "euler", "dpmpp_2m", "flow_euler"] | None = Field(
        None,
        description="Sampler: ddim, euler or dpmpp_2m for the U-Net families (SD 1.5, SDXL), flow_euler "
        "(FlowMatchEuler with the model's shift) for the flow-matching ones (SD3, Flux); the model's default "
        "when absent.",
    )
    model: str | None = Field(
        None,
        pattern=_NAME,
        description="Model name a worker serves (see `reprise models`); absent: the cluster's default model "
        "(REPRISE_DEFAULT_MODEL).",
    )
    loras: list[LoraRef] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        description=f"LoRA adapters for this request (at most {MAX_LORAS}, each named once), registered for its model.",
    )
    priority: int = Field(5, ge=0, le=9, description="0 runs first, 9 last.")
    tenant: str = Field("public", pattern=_NAME, description="Who asked; cache entries are scoped to it.")
    cache: CacheOptions = Field(default_factory=CacheOptions)
    deterministic: bool = Field(
        False,
        description="Run alone on the device, never batched with other requests: the same request then gives "
        "the same image bit for bit (batching changes floating-point summation order).",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank")
        if "\x00" in value:
            raise ValueError("prompt contains a NUL character")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _negative_no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("negative_prompt contains a NUL character")
        return value

    @field_validator("guidance_scale")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("guidance_scale must be finite")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"{value} is not a multiple of 8")
        return value

    @model_validator(mode="after")
    def _sizes_together(self) -> "GenerationRequest":
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither")
        names = [lora.name for lora in self.loras]
        if len(set(names)) != len(names):
            raise ValueError("loras: each adapter may be named once")
        return self


class FeatureReport(BaseModel):
    method: str = "off"
    full_unet_passes: int = 0
    partial_unet_passes: int = 0
    params: dict[str, Any] = Field(default_factory=dict)


class CacheReport(BaseModel):
    hit: Literal["exact", "approximate", "miss", "off"] = "miss"
    k: int | None = Field(None, description="Steps skipped by resuming from a stored state (approximate hits).")
    similarity: float | None = None
    source_id: str | None = Field(None, description="Cache entry the hit came from.")
    generation: int | None = Field(None, description="Cache generation of the model at lookup time.")
    steps_computed: int = 0
    steps_saved: int = 0
    steps_discarded: int = Field(
        0,
        description="Steps a request ran fresh while its approximate lookup was under way, then replaced by "
        "the state resumed at K (device work the lookup's overlap cost; not in steps_computed).",
    )
    lookup_ms: float | None = None
    note: str | None = Field(None, description="Why the cache was skipped, when it was.")
    feature: FeatureReport = Field(default_factory=FeatureReport)


class Timings(BaseModel):
    queue_wait_s: float = 0.0
    load_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0


class GenerationResult(BaseModel):
    schema_version: Literal["1.0"] = SCHEMA_VERSION
    job_id: str
    image_uri: str
    seed: int
    width: int
    height: int
    steps: int
    model: str
    model_version: str
    device: str
    worker: str
    timings: Timings
    cache: CacheReport


def parse_request(data: Any) -> GenerationRequest:
    """Validate raw input (dict or JSON text) into a request, or raise InvalidRequest listing every problem."""
    try:
        if isinstance(data, (str, bytes)):
            return GenerationRequest.model_validate_json(data)
        if isinstance(data, GenerationRequest):
            return data
        if not isinstance(data, dict):
            raise InvalidRequest(f"a request must be a JSON object, got {type(data).__name__}", [])
        return GenerationRequest.model_validate(data)
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in err["loc"]) or "(request)", "problem": err["msg"], "type": err["type"]}
            for err in exc.errors(include_url=False, include_input=False)
        ]
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
        raise InvalidRequest(f"invalid request: {summary}", problems) from None


def request_json_schema() -> dict:
    """The published, versioned JSON schema of a request (and of the result)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Reprise generation",
        "version": SCHEMA_VERSION,
        "request": GenerationRequest.model_json_schema(),
        "result": GenerationResult.model_json_schema(),
    }


def with_model(request: GenerationRequest, model: str) -> GenerationRequest:
    """The request with `model` filled in when it names none (producers: the cluster's default; a worker: its own)."""
    return request if request.model is not None else request.model_copy(update={"model": model})


def queue_for(model: str, prefix: str = "reprise") -> str:
    if not re.match(_NAME, model):
        raise InvalidRequest(f"bad model name {model!r}", [{"field": "model", "problem": "bad name"}])
    return f"{prefix}.{model}"


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
