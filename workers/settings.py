"""Worker settings: one home for each knob of a worker node (env prefix ``REPRISE_``)."""

from __future__ import annotations

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from scheduler.errors import InvalidWorkerSetting


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REPRISE_", extra="ignore")

    model: str = Field("tiny", description="Model a worker serves: built-in name, shipped model, directory or hub id.")
    devices: str = Field(
        "auto", description="auto | cpu | sim | cuda:0,cuda:1 — one pipeline per device, all in one process."
    )
    cache_enabled: bool = Field(
        True, description="Use the latent cache (exact and approximate); off = plain generation only."
    )
    feature_profile: str = Field(
        "off",
        description="Default feature cache when a request names none: off, or one the family runs (checked at start).",
    )
    lora_cache_mb: float = Field(
        512.0,
        gt=0,
        description="LoRA adapters a device keeps loaded, in MB of weights; past it the least recently used goes "
        "(an adapter in use on the device stays).",
    )
    lora_batching: str = Field(
        "mixed",
        pattern="^(mixed|grouped)$",
        description="Requests with different LoRA adapters: mixed = one denoiser call, each sample with its own "
        "adapter (PEFT's mixed-adapter batches; a request with several adapters still runs with its own set); "
        "grouped = one call per adapter set, the sets taking turns.",
    )
    text_memo_entries: int = Field(1024, ge=0, description="Bound of the text-encoder memo (0 disables it).")
    text_memo_bytes: int = Field(
        256 * 2**20,
        ge=1,
        description="Bound of the text-encoder memo in bytes of its tensors (on the device; a Flux T5 state is ~4 MB).",
    )
    writeback_queue: int = Field(
        64, ge=1, description="Pending cache write-backs a worker keeps before dropping new ones."
    )
    approx_gate: str = Field(
        "auto",
        pattern="^(auto|on|off)$",
        description="Approximate lookups only while their hits save more device time than the lookups cost "
        "(measured on the node; while not, one in sixteen is still made and the rest are stored unembedded): "
        "auto = on a node whose devices are the host's CPU (its embedding takes a device's cores), on = on any "
        "node, off = every lookup is made.",
    )
    heartbeat_s: float = Field(10.0, gt=0, description="How often a worker refreshes its entry in the model registry.")
    max_batch: int = Field(
        8, ge=1, le=64, description="Most requests a device steps in one denoiser call (1 = one request at a time)."
    )
    sim_step_ms: float | None = Field(
        None,
        ge=0,
        description="If set, every denoiser call on `sim` costs this long whatever its batch (no cost model).",
    )
    sim_call_ms: float = Field(
        16.4, ge=0, description="`sim` cost model: fixed time of one denoiser call (SD v1-4 on a GPU, see README)."
    )
    sim_sample_ms: float = Field(
        18.4, ge=0, description="`sim` cost model: time each sample adds to a call (2 per image with guidance)."
    )
    sim_oom_above: int = Field(
        0,
        ge=0,
        description="`sim` (tests and `make faults`): a denoiser call of more than this many samples raises "
        "torch.OutOfMemoryError, as a GPU out of memory does (2 samples per image with guidance; 0 = never).",
    )
    sim_poison_prompt: str = Field(
        "",
        description="`sim` (tests and `make faults`): a denoiser call whose conditioning holds this prompt raises "
        "ValueError, as a kernel rejecting one request's inputs does ('' = none).",
    )
    oom_recover_s: float = Field(
        30.0,
        gt=0,
        description="After an out-of-memory error halved a device's batch limit: each this many seconds without "
        "another raises the limit by one, back to max_batch.",
    )
    device_stall_s: float = Field(
        300.0,
        gt=0,
        description="Watchdog: a device thread that spends longer than this in one iteration (one denoiser call "
        "and its steps) marks the node unhealthy; it takes no more jobs and its jobs are redelivered.",
    )
    device_retries: int = Field(
        3,
        ge=0,
        le=100,
        description="Times a job that failed because of the device (not the request: out of memory alone, a "
        "stalled device) is sent again, to any node, before its DeviceFailed is final.",
    )
    table_refresh_s: float = Field(
        15.0,
        gt=0,
        description="How often a worker reads the skip table stored for its model version (`reprise cache table`).",
    )
    sim_latent_size: int = Field(64, ge=8, description="Latent side of the simulated device (64 = SD 1.5 at 512 px).")
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch on a cpu device; 0 = cores ÷ cpu devices.")
    blockcache_dir: str = Field(
        "", description="Where block-caching calibrations are kept (default ~/.cache/reprise/blockcache)."
    )
    warmup: bool = Field(True, description="Run one short generation per device at start.")
    switch_interval_ms: float = Field(
        1.0,
        gt=0,
        le=100,
        description="How long a thread running Python may keep the interpreter lock while another waits for it (sys.setswitchinterval; Python's own default is 5 ms). Device threads take the lock back after every small torch call of a step, so a shorter interval keeps the devices from idling behind the node's other threads.",
    )
    metrics_port: int = Field(
        9101, ge=0, le=65535, description="Prometheus metrics port of a worker; the next free one if taken; 0 disables."
    )
    metrics_addr: str = Field(
        "127.0.0.1", description="Address the metrics endpoint listens on (0.0.0.0 to let another host scrape)."
    )

    def env_name(self, field: str) -> str:
        return f"{self.model_config['env_prefix']}{field.upper()}"

    def check_for(self, components) -> None:
        """Every setting that depends on the served model, checked against its family at start (before the
        other devices load): a wrong value raises InvalidWorkerSetting naming the allowed values."""
        from workers.feature_cache import methods_for

        family = components.family
        problems = []
        allowed = ["off", *methods_for(components)]
        if self.feature_profile not in allowed:
            problems.append(
                {
                    "setting": self.env_name("feature_profile"),
                    "value": self.feature_profile,
                    "allowed": allowed,
                    "problem": f"{self.feature_profile!r} does not run on {components.name} ({family.name})",
                }
            )
        if problems:
            raise InvalidWorkerSetting(_message(problems), problems)


def _message(problems: list[dict]) -> str:
    return "; ".join(
        f"{p['setting']}={p['value']!r}: {p['problem']}; allowed: {', '.join(map(str, p['allowed']))}"
        if p.get("allowed")
        else f"{p['setting']}={p['value']!r}: {p['problem']}"
        for p in problems
    )


def checked_settings(cls, **overrides):
    """A settings class (``WorkerSettings``, ``CacheSettings``, ...) from the environment and ``overrides``; a
    value out of its bounds raises InvalidWorkerSetting naming the variable and pydantic's reason (which lists
    the allowed values of a choice), not a traceback."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            info = cls.model_fields.get(field)
            names = env_names(cls, field, info) if info is not None else [field or cls.__name__]
            problems.append({"setting": " / ".join(names), "value": error.get("input"), "problem": error["msg"]})
        raise InvalidWorkerSetting(_message(problems), problems) from None


def load_worker_settings(**overrides) -> WorkerSettings:
    return checked_settings(WorkerSettings, **overrides)


def invalid_setting(field: str, value, problem: str, allowed: list | None = None) -> InvalidWorkerSetting:
    """One setting's typed error (e.g. ``REPRISE_DEVICES`` naming a device this machine lacks)."""
    detail = {"setting": f"{WorkerSettings.model_config['env_prefix']}{field.upper()}", "value": value}
    detail.update(problem=problem, **({"allowed": allowed} if allowed else {}))
    return InvalidWorkerSetting(_message([detail]), [detail])


def env_names(cls, name: str, field) -> list[str]:
    alias = field.validation_alias
    if alias is not None and hasattr(alias, "choices"):
        return [str(c) for c in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [(cls.model_config.get("env_prefix") or "") + name.upper()]
