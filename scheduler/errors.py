"""Typed errors a caller can catch. Celery rebuilds them on the client from (module, type, args),
so every class takes only JSON-friendly positional arguments and keeps them in ``args``."""

from __future__ import annotations


class RepriseError(Exception):
    """Base of every error Reprise returns to a caller."""

    code = "reprise_error"

    def __init__(self, message: str, details: list | dict | None = None):
        super().__init__(message, details)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


class InvalidRequest(RepriseError):
    """The request broke the schema's bounds; ``details`` lists each field's problem. Never retried."""

    code = "invalid_request"


class UnknownModel(InvalidRequest):
    """No worker serves the requested model."""

    code = "unknown_model"


class SizeOverLimit(InvalidRequest):
    """Width or height beyond what the model serves."""

    code = "size_over_limit"


class UnknownAdapter(InvalidRequest):
    """A request names a LoRA adapter the registry does not hold (`reprise lora list`)."""

    code = "unknown_adapter"


class AdapterModelMismatch(InvalidRequest):
    """A request names a LoRA adapter registered for another base model."""

    code = "adapter_model_mismatch"


class AdapterSourceError(RepriseError):
    """`reprise lora add` could not read the adapter: no such file, not LoRA weights, or a hub id offline."""

    code = "adapter_source"


class UnsupportedModelFamily(RepriseError):
    """A model directory of a pipeline class Reprise does not serve; ``details`` names it and the supported ones.
    Raised when a worker loads the model, so the node refuses to start."""

    code = "unsupported_model_family"


class InvalidWorkerSetting(RepriseError):
    """A worker setting (``REPRISE_*``) that the worker cannot serve with, e.g. a feature profile its model's
    family does not run; ``details`` names each setting, its value and the allowed values. Raised at start,
    so the node refuses to start."""

    code = "invalid_worker_setting"


class JobCancelled(RepriseError):
    """The job was cancelled (revoked) before it finished."""

    code = "cancelled"


class JobTimeout(RepriseError):
    """The job ran past its time limit (or the caller's wait timed out)."""

    code = "timeout"


class ArtifactWriteError(RepriseError):
    """The image could not be written to the artifact store (full, read-only, unreachable)."""

    code = "artifact_write_failed"


class JobFailed(RepriseError):
    """Any other failure inside a worker."""

    code = "job_failed"


class DenoiserFailed(JobFailed):
    """The denoiser raised on this request run alone (the requests batched with it were run again without it
    and completed). The request's own failure: final, never retried."""

    code = "denoiser_failed"


class DeviceFailed(JobFailed):
    """The device failed, not the request: out of memory on one request alone, a stalled device thread, every
    request of a batch failing alone. The worker sends the job again (``REPRISE_DEVICE_RETRIES`` times, to any
    node); a caller sees this error only once those retries are spent."""

    code = "device_failed"


def error_payload(exc: BaseException) -> dict:
    """The machine-readable form the CLI prints with --json."""
    code = getattr(exc, "code", "job_failed")
    return {"error": code, "type": type(exc).__name__, "message": str(exc), "details": getattr(exc, "details", None)}


class RedisURLError(RepriseError, ValueError):
    """REDIS_URL (or a sentinel setting) is malformed: unknown scheme, no host, a bad port or database, sentinel
    addresses without REPRISE_REDIS_SENTINEL_MASTER. Raised before any connection is tried."""

    code = "bad_redis_url"


class JobNotAccepted(RepriseError):
    """The send could not be made durable (with Redis Sentinel: no replica confirmed the job's ledger entry, or
    the master failed over during the send): the job is not accepted, and the caller sends it again."""

    code = "not_accepted"
