"""The HTTP API: OpenAI's `POST /v1/images/generations`, asynchronous jobs with SSE progress and webhooks,
images as files, errors in OpenAI's shape. Run it with `reprise api`; state lives in Redis only.

Every request goes through the producer the rest of Reprise uses (scheduler.client: submit, progress,
cancel); one image is one Celery job, a request for n images is n jobs under one API job id.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterable
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated, Literal

import fsspec
import redis
from celery.states import READY_STATES
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from scheduler.api.tenants import KeyStore, Limits
from scheduler.api.webhooks import Outbox, allow_list, check_url
from scheduler.client import check_served, submit
from scheduler.client import job as job_handle
from scheduler.errors import (
    InvalidRequest,
    JobCancelled,
    JobTimeout,
    RepriseError,
    UnknownModel,
)
from scheduler.redis_conn import redis_client
from scheduler.registry import ModelRegistry
from scheduler.schema import GenerationRequest, GenerationResult, parse_request, with_model
from scheduler.settings import ClusterSettings, get_settings

log = logging.getLogger("reprise.api")

ENDED = ("succeeded", "failed", "cancelled")
STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


# --- the request and response models (the typed model is the API) ----------------------------------------


class ImagesRequest(GenerationRequest):
    """OpenAI's images request on top of Reprise's own request (scheduler/schema.py's GenerationRequest):
    every field of that one is accepted too (negative_prompt, seed, steps, guidance_scale, scheduler, cache,
    priority, ...)."""

    model_config = ConfigDict(extra="forbid", title="ImagesRequest")

    n: int = Field(1, ge=1, le=10, description="How many images (one job each; seeds seed, seed+1, ...).")
    size: str | None = Field(
        None,
        pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$",
        description='"WxH" in pixels, or "auto": the model\'s default. Or give width and height.',
        examples=["256x256"],
    )
    response_format: Literal["url", "b64_json"] = Field(
        "url", description="url: a signed, expiring URL of GET /v1/files/{id}; b64_json: the PNG inline."
    )
    user: str | None = Field(None, max_length=256, description="The end user, recorded with the job.")
    tenant: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$", description="Must be the key's tenant when given."
    )

    @model_validator(mode="after")
    def _size_or_sides(self) -> "ImagesRequest":
        if self.size not in (None, "auto") and self.width is not None:
            raise ValueError("give size or width and height, not both")
        return self

    def generation(self, tenant: str) -> GenerationRequest:
        """The GenerationRequest of one image (seed unchanged; the caller varies it per image)."""
        fields = self.model_dump(exclude=set(ImagesRequest.model_fields) - set(GenerationRequest.model_fields))
        if self.size not in (None, "auto"):
            width, height = (int(x) for x in self.size.split("x"))
            fields.update(width=width, height=height)
        fields["tenant"] = tenant
        with self.naming_size():
            return parse_request(fields)

    @contextmanager
    def naming_size(self):
        """A refused width or height (no multiple of 8, over the model's limit) is named as the field the caller
        sent: size."""
        try:
            yield
        except InvalidRequest as exc:
            for d in exc.details or []:
                if d.get("field") in ("width", "height") and self.size is not None:
                    d["field"] = "size"
            raise


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(..., max_length=2048, description="Receives the job's end, signed by Standard Webhooks.")


class JobRequest(ImagesRequest):
    model_config = ConfigDict(extra="forbid", title="JobRequest")
    webhook: Webhook | None = Field(
        None, description='Called once when the job ends (succeeded, failed, cancelled): {"url": ...}.'
    )

    @field_validator("webhook", mode="before")
    @classmethod
    def _url_alone(cls, value):
        return {"url": value} if isinstance(value, str) else value  # "webhook": "https://..." means the same


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None
    file_id: str | None = Field(None, description="GET /v1/files/{file_id} with the tenant's key.")
    seed: int | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    id: str = Field(..., description="The job id (GET /v1/jobs/{id}).")
    results: list[GenerationResult] = Field(default_factory=list, description="Reprise's result of each image.")


class Progress(BaseModel):
    step: int = 0
    total: int | None = None
    images_done: int = 0


class JobView(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: int
    model: str
    n: int
    user: str | None = None
    progress: Progress
    data: list[ImageData] = Field(default_factory=list)
    results: list[GenerationResult] = Field(default_factory=list)
    error: dict | None = None
    webhook: Webhook | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers or {}


def error_response(status: int, message: str, code: str | None, param: str | None = None, headers=None):
    body = {"error": {"message": message, "type": STATUS_TYPES.get(status, "error"), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def reprise_error_status(exc: RepriseError) -> tuple[int, dict]:
    if isinstance(exc, UnknownModel):
        return 503, {"retry-after": "5"}
    if isinstance(exc, InvalidRequest):
        return 400, {}
    if isinstance(exc, JobCancelled):
        return 409, {}
    if isinstance(exc, JobTimeout):
        return 504, {"x-should-retry": "false"}  # a retry would generate again: poll the job instead
    return 500, {"x-should-retry": "false"}


ERRORS = {s: {"model": ErrorResponse, "description": STATUS_TYPES[s]} for s in (400, 401, 403, 404, 409, 413, 429, 503)}


class BodyLimit:
    """413 in OpenAI's shape for a body over ``max_body_size``: refused from its Content-Length before it is read,
    or while it streams in. (FastAPI's own max_body_size answers in plain text, which OpenAI clients cannot parse.)"""

    def __init__(self, app, max_body_size: int):
        self.app, self.max = app, max_body_size

    def too_large(self) -> HTTPException:
        return HTTPException(413, f"request body over the limit of {self.max} bytes (REPRISE_API_MAX_BODY_BYTES)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max:
            exc = self.too_large()
            return await error_response(413, exc.detail, "request_too_large")(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max:
                raise self.too_large()  # inside the route: answered by the HTTPException handler
            return message

        await self.app(scope, counted, send)


# --- state in Redis ----------------------------------------------------------------------------------------


class Store:
    """Jobs, file ownership and the URL-signing key, all in Redis."""

    def __init__(self, r: redis.Redis, settings: ClusterSettings):
        self.r, self.s, self.prefix = r, settings, settings.queue_prefix
        self._signing: bytes | None = None

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:api:job:{job_id}"

    def file_key(self, file_id: str) -> str:
        return f"{self.prefix}:api:file:{file_id}"

    def tenant_jobs_key(self, tenant: str) -> str:
        return f"{self.prefix}:api:jobs:{tenant}"

    def save_job(self, rec: dict) -> None:
        ttl = self.s.result_expires_s
        with self.r.pipeline() as pipe:
            pipe.set(self.job_key(rec["id"]), json.dumps(rec), ex=ttl)
            pipe.zadd(self.tenant_jobs_key(rec["tenant"]), {rec["id"]: rec["created"]})
            pipe.zremrangebyscore(self.tenant_jobs_key(rec["tenant"]), "-inf", time.time() - ttl)
            pipe.expire(self.tenant_jobs_key(rec["tenant"]), ttl)
            for task_id in rec["tasks"]:
                pipe.set(self.file_key(task_id), json.dumps({"tenant": rec["tenant"], "job": rec["id"]}), ex=ttl)
            pipe.execute()

    def recent_jobs(self, tenant: str, limit: int) -> list[dict]:
        ids = [i.decode() for i in self.r.zrevrange(self.tenant_jobs_key(tenant), 0, limit - 1)]
        return [rec for rec in (self.load_job(i) for i in ids) if rec is not None]

    def load_job(self, job_id: str) -> dict | None:
        raw = self.r.get(self.job_key(job_id))
        return json.loads(raw) if raw else None

    def file_owner(self, file_id: str) -> dict | None:
        raw = self.r.get(self.file_key(file_id))
        return json.loads(raw) if raw else None

    def signing_key(self) -> bytes:
        if self._signing is None:
            if self.s.api_signing_key:
                self._signing = self.s.api_signing_key.encode()
            else:  # one key for every replica: the first to start makes it
                key = f"{self.prefix}:api:signing-key"
                self.r.set(key, secrets.token_hex(32), nx=True)
                self._signing = self.r.get(key)
        return self._signing

    def signature(self, file_id: str, expires: int) -> str:
        return hmac.new(self.signing_key(), f"{file_id}.{expires}".encode(), hashlib.sha256).hexdigest()


def read_image(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def job_view(store: Store, rec: dict, base_url: str, response_format: str | None = None) -> JobView:
    """The job's state now, read from each image's Celery result (the producer's Job handles)."""
    fmt = response_format or rec.get("response_format", "url")
    data, results, states, error = [], [], [], None
    step, total, done = 0, 0, 0
    for task_id in rec["tasks"]:
        handle = job_handle(task_id)
        p = handle.progress()
        state = p["state"]
        states.append(state)
        step += p.get("step") or 0
        total += p.get("total") or rec.get("steps") or 0
        if state == "SUCCESS":
            result = handle.result()
            results.append(result)
            done += 1
            item = ImageData(file_id=task_id, seed=result.seed)
            if fmt == "b64_json":
                item.b64_json = base64.b64encode(read_image(result.image_uri)).decode()
            else:
                expires = int(time.time()) + store.s.api_file_url_ttl_s
                item.url = (
                    f"{base_url}/v1/files/{task_id}?expires={expires}&signature={store.signature(task_id, expires)}"
                )
            data.append(item)
        elif state == "FAILURE" and error is None:
            try:
                handle.result()
            except RepriseError as exc:
                error = {"message": str(exc), "type": type(exc).__name__, "code": exc.code}
    if rec.get("cancelled") or "REVOKED" in states:
        status = "cancelled"
    elif error is not None:
        status = "failed"
    elif all(s == "SUCCESS" for s in states):
        status = "succeeded"
    elif any(s in ("STARTED", "PROGRESS", "SUCCESS") for s in states):
        status = "running"
    else:
        status = "queued"
    return JobView(
        id=rec["id"],
        status=status,
        created_at=int(rec["created"]),
        model=rec["model"],
        n=len(rec["tasks"]),
        user=rec.get("user"),
        progress=Progress(step=step, total=total or None, images_done=done),
        data=data,
        results=results,
        error=error,
        webhook=Webhook(url=rec["webhook"]) if rec.get("webhook") else None,
    )


class ResultWaiter:
    """Awaits Celery results without a thread per request: subscribes to the channels Celery's Redis backend
    publishes each stored result on, then reads the results once (so none is missed between the two), and
    reads them again every second (a message lost to a reconnect costs at most that)."""

    def __init__(self, url: str):
        from scheduler.app import get_app
        from scheduler.redis_conn import async_redis_client

        self.r = async_redis_client(url)
        self.backend = get_app().backend

    def _ended(self, raw) -> bool:
        return raw is not None and self.backend.decode_result(raw).get("status") in READY_STATES

    async def wait(self, task_ids: list[str], deadline: float) -> bool:
        """True once every task has a final result; False at ``deadline`` (time.monotonic)."""
        keys = [self.backend.get_key_for_task(t) for t in task_ids]
        pending = set(keys)
        async with self.r.pubsub() as pubsub:
            await pubsub.subscribe(*keys)
            while pending:
                asked = list(pending)
                pending -= {k for k, v in zip(asked, await self.r.mget(asked)) if self._ended(v)}
                recheck = time.monotonic() + 1.0
                while pending and time.monotonic() < min(recheck, deadline):
                    wait_s = max(0.01, min(recheck, deadline) - time.monotonic())
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait_s)
                    if message is not None and self._ended(message["data"]):
                        pending.discard(message["channel"])
                if pending and time.monotonic() >= deadline:
                    return False
        return True


# --- the webhook dispatcher ---------------------------------------------------------------------------------


class Dispatcher(threading.Thread):
    """Watches jobs that asked for a webhook and delivers their end. Every replica runs one; a job or a delivery
    is claimed in Redis by one replica at a time (Outbox.claim), so each event goes out once per attempt."""

    AT_ONCE = 8  # deliveries in flight per replica: one slow receiver does not hold up the others

    def __init__(self, store: Store, keys: KeyStore, outbox: Outbox, base_url: str):
        from concurrent.futures import ThreadPoolExecutor

        super().__init__(name="reprise-webhooks", daemon=True)
        self.store, self.keys, self.outbox, self.base_url = store, keys, outbox, base_url
        self.stopped = threading.Event()
        self.pool = ThreadPoolExecutor(self.AT_ONCE, thread_name_prefix="reprise-webhook")
        self.free = threading.Semaphore(self.AT_ONCE)

    def secret_of(self, tenant: str) -> str:
        record = self.keys.tenant(tenant)
        if record is None:
            raise ConnectionError(f"tenant {tenant} has no webhook secret any more")
        return record.webhook_secret

    def step(self) -> bool:
        s = self.store.s
        busy = False
        job_id = self.outbox.claim(self.outbox.watch_key, lease_s=30)
        if job_id is not None:
            busy = True
            rec = self.store.load_job(job_id)
            view = job_view(self.store, rec, self.base_url, "url") if rec else None
            if view is None:
                self.outbox.r.zrem(self.outbox.watch_key, job_id)
            elif view.status in ENDED:
                event = {
                    "type": f"job.{view.status}",
                    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "data": view.model_dump(mode="json"),
                }
                self.outbox.enqueue(rec["tenant"], rec["webhook"], event, msg_id="msg_" + job_id)
                self.outbox.r.zrem(self.outbox.watch_key, job_id)
            else:
                self.outbox.r.zadd(self.outbox.watch_key, {job_id: time.time() + 0.25})
        if self.free.acquire(blocking=False):
            msg_id = self.outbox.claim(self.outbox.due_key, lease_s=2 * s.webhook_timeout_s + 10)
            if msg_id is None:
                self.free.release()
            else:
                busy = True
                self.pool.submit(self.deliver, msg_id)
        return busy

    def deliver(self, msg_id: str) -> None:
        s = self.store.s
        try:
            outcome = self.outbox.attempt(
                msg_id,
                self.secret_of,
                s.webhook_timeout_s,
                allow_list(s.webhook_allow_hosts),
                s.webhook_max_attempts,
                s.webhook_backoff_s,
            )
            log.info("webhook %s: %s", msg_id, outcome)
        except Exception as exc:  # Redis away: the claim's lease runs out and the delivery is tried again
            log.warning("webhook %s: %s: %s", msg_id, type(exc).__name__, exc)
        finally:
            self.free.release()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                busy = self.step()
            except Exception as exc:  # Redis away, a malformed record: log, keep going
                log.warning("webhook dispatcher: %s: %s", type(exc).__name__, exc)
                busy = False
            if not busy:
                self.stopped.wait(0.1)


# --- the app ---------------------------------------------------------------------------------------------


def create_app(settings: ClusterSettings | None = None) -> FastAPI:
    s = settings or get_settings()
    r = redis_client(s.redis_url)
    store, keys, limits, outbox = (
        Store(r, s),
        KeyStore(r, s.queue_prefix),
        Limits(r, s.queue_prefix),
        Outbox(r, s.queue_prefix),
    )
    registry = ModelRegistry(r, s.queue_prefix)
    results = ResultWaiter(s.backend_url)
    base_default = s.api_public_url.rstrip("/") or f"http://{s.api_host}:{s.api_port}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        dispatcher = Dispatcher(store, keys, outbox, base_default)
        dispatcher.start()
        yield
        dispatcher.stopped.set()
        dispatcher.pool.shutdown(wait=False)

    app = FastAPI(
        title="Reprise API",
        version="1.0",
        summary="Text-to-image generation: OpenAI's images API, asynchronous jobs, webhooks.",
        description="Authenticate with `Authorization: Bearer <key>` (`reprise keys create --tenant T`). "
        'Errors have OpenAI\'s shape `{"error": {"message", "type", "param", "code"}}`.',
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_body_size=s.api_max_body_bytes)
    import swagger_ui_bundle

    # Swagger UI served from the swagger-ui-bundle package, not a CDN: /docs works on a host without internet.
    app.mount("/static/swagger", StaticFiles(directory=str(swagger_ui_bundle.swagger_ui_path)), name="swagger")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Reprise API - docs",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon-32x32.png",
        )

    # --- errors in OpenAI's shape ---
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(RepriseError)
    async def _reprise_error(request: Request, exc: RepriseError):
        status, headers = reprise_error_status(exc)
        details = exc.details if isinstance(exc.details, list) else []
        param = details[0].get("field") if details and isinstance(details[0], dict) else None
        return error_response(status, str(exc), exc.code, param, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        parts = [".".join(str(p) for p in e["loc"] if p != "body") or "(body)" for e in errors]
        message = "; ".join(f"{p}: {e['msg']}" for p, e in zip(parts, errors))
        return error_response(400, f"invalid request: {message}", "invalid_request", parts[0] if parts else None)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        code = "request_too_large" if exc.status_code == 413 else f"http_{exc.status_code}"
        return error_response(exc.status_code, str(exc.detail), code, None, getattr(exc, "headers", None))

    @app.exception_handler(redis.RedisError)
    @app.exception_handler(OperationalError)
    async def _broker_error(request: Request, exc: Exception):
        return error_response(503, f"Redis is unreachable: {exc}", "broker_unavailable", None, {"retry-after": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    # --- auth ---
    bearer = HTTPBearer(auto_error=False, description="An API key from `reprise keys create --tenant T`.")

    def tenant_of(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        if credentials is None:
            raise ApiError(401, "no API key: send Authorization: Bearer <key>", "missing_api_key")
        record = keys.authenticate(credentials.credentials)
        if record is None:
            raise ApiError(401, "invalid or revoked API key", "invalid_api_key")
        return record["tenant"]

    Tenant = Annotated[str, Depends(tenant_of)]

    def base_url(request: Request) -> str:
        return s.api_public_url.rstrip("/") or str(request.base_url).rstrip("/")

    def owned_job(job_id: str, tenant: Tenant) -> dict:
        rec = store.load_job(job_id)
        if rec is None or rec["tenant"] != tenant:  # another tenant's job is as absent as no job
            raise ApiError(404, f"no job {job_id}", "job_not_found", "job_id")
        return rec

    def start(body: ImagesRequest, tenant: str, webhook: str | None = None) -> dict:
        if "tenant" in body.model_fields_set and body.tenant != tenant:
            raise ApiError(403, f"this key belongs to tenant {tenant!r}, not {body.tenant!r}", "wrong_tenant", "tenant")
        record = keys.tenant(tenant)
        wait = limits.take(tenant, (record and record.rate_per_min) or s.api_rate_per_min)
        if wait is not None:
            raise ApiError(
                429,
                f"rate limit of tenant {tenant} reached",
                "rate_limit_exceeded",
                None,
                {"retry-after": str(int(wait))},
            )
        request = with_model(body.generation(tenant), s.default_model)
        with body.naming_size():
            check_served(request, registry)
        if webhook is not None:
            check_url(webhook, allow_list(s.webhook_allow_hosts))
        task_ids = [str(uuid.uuid4()) for _ in range(body.n)]
        cap = (record and record.max_concurrent) or s.api_max_concurrent
        if not limits.admit(tenant, task_ids, cap, lambda t: job_handle(t).ready(), s.result_expires_s):
            raise ApiError(
                429,
                f"tenant {tenant} has {cap} images queued or running already (its concurrency cap)",
                "concurrency_limit_exceeded",
                None,
                {"retry-after": "1"},
            )
        rec = {
            "id": "job_" + uuid.uuid4().hex,
            "tenant": tenant,
            "created": time.time(),
            "tasks": task_ids,
            "model": request.model,
            "steps": request.steps,
            "response_format": body.response_format,
            "user": body.user,
            "webhook": webhook,
        }
        store.save_job(rec)  # before the jobs are sent: a job that ends at once still finds its record
        try:
            for i, task_id in enumerate(task_ids):
                seed = None if request.seed is None else (request.seed + i) % 2**32
                one = request.model_copy(update={"seed": seed}) if i else request
                submit(one, check_model=False, task_id=task_id)
        except Exception:
            limits.release(tenant, task_ids)
            raise
        if webhook is not None:
            outbox.watch(rec["id"])
        return rec

    def cancel(rec: dict) -> None:
        for task_id in rec["tasks"]:
            job_handle(task_id).cancel()  # the producer's cancel: before it starts, or within one step
        rec["cancelled"] = True
        store.save_job(rec)
        limits.release(rec["tenant"], rec["tasks"])

    # --- routes ---
    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        r.ping()
        return {"ok": True}

    @app.get("/v1/models", tags=["models"], summary="Models live workers serve now")
    def models(tenant: Tenant) -> dict:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "owned_by": "reprise", **info}
                for name, info in sorted(registry.all_served().items())
            ],
        }

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        tags=["images"],
        summary="Generate images (OpenAI's images API); answers when they are done",
        responses={**ERRORS, 504: {"model": ErrorResponse, "description": "not done in time; poll the job"}},
    )
    async def generations(body: ImagesRequest, tenant: Tenant, request: Request) -> ImagesResponse:
        rec = await asyncio.to_thread(start, body, tenant)
        waiting = asyncio.ensure_future(results.wait(rec["tasks"], time.monotonic() + s.api_sync_timeout_s))
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.5)
            if not waiting.done() and await request.is_disconnected():
                waiting.cancel()  # the caller has gone: nobody will take these images
                await asyncio.to_thread(cancel, rec)
                log.info("job %s cancelled: its caller disconnected", rec["id"])
                return Response(status_code=499)
        if not waiting.result():
            raise JobTimeout(
                f"job {rec['id']} did not finish within {s.api_sync_timeout_s}s; poll GET /v1/jobs/{rec['id']}",
                [{"field": "job_id", "problem": rec["id"]}],
            )
        # the first failure, typed (InvalidRequest, JobCancelled, JobFailed, ...)
        await asyncio.to_thread(lambda: [job_handle(t).result() for t in rec["tasks"]])
        view = await asyncio.to_thread(job_view, store, rec, base_url(request))
        return ImagesResponse(created=int(rec["created"]), data=view.data, id=rec["id"], results=view.results)

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobView,
        tags=["jobs"],
        summary="Start a generation and answer at once (poll it, stream its events, or get a webhook)",
        responses=ERRORS,
    )
    async def create_job(body: JobRequest, tenant: Tenant, request: Request) -> JobView:
        images = ImagesRequest.model_validate(body.model_dump(exclude={"webhook"}, exclude_unset=True))
        webhook = body.webhook.url if body.webhook else None
        rec = await asyncio.to_thread(start, images, tenant, webhook)
        return await asyncio.to_thread(job_view, store, rec, base_url(request))

    @app.get("/v1/jobs", tags=["jobs"], summary="The tenant's latest jobs, newest first", responses=ERRORS)
    async def list_jobs(tenant: Tenant, request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JobList:
        def views() -> list[JobView]:
            return [job_view(store, rec, base_url(request), "url") for rec in store.recent_jobs(tenant, limit)]

        return JobList(data=await asyncio.to_thread(views))

    @app.get("/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"], summary="A job's state", responses=ERRORS)
    async def get_job(rec: Annotated[dict, Depends(owned_job)], request: Request) -> JobView:
        return await asyncio.to_thread(job_view, store, rec, base_url(request))

    @app.delete(
        "/v1/jobs/{job_id}",
        response_model=JobView,
        tags=["jobs"],
        summary="Cancel a job (a running image stops within one step)",
        responses=ERRORS,
    )
    async def cancel_job(rec: Annotated[dict, Depends(owned_job)], request: Request) -> JobView:
        view = await asyncio.to_thread(job_view, store, rec, base_url(request))
        if view.status in ENDED:
            raise ApiError(409, f"job {rec['id']} has already {view.status}", "job_ended", "job_id")
        await asyncio.to_thread(cancel, rec)
        return await asyncio.to_thread(job_view, store, rec, base_url(request))

    @app.get(
        "/v1/jobs/{job_id}/events",
        response_class=EventSourceResponse,
        tags=["jobs"],
        summary="The job's progress as Server-Sent Events (progress ..., then succeeded | failed | cancelled)",
        responses=ERRORS,
    )
    async def job_events(rec: Annotated[dict, Depends(owned_job)], request: Request) -> AsyncIterable[ServerSentEvent]:
        last = None
        while True:
            fresh = await asyncio.to_thread(store.load_job, rec["id"]) or rec  # a cancel is written to the record
            view = await asyncio.to_thread(job_view, store, fresh, base_url(request))
            now = (view.status, view.progress.step, view.progress.images_done)
            if now != last:
                last = now
                yield ServerSentEvent(event="progress", data={"status": view.status, **view.progress.model_dump()})
            if view.status in ENDED:
                yield ServerSentEvent(event=view.status, data=view.model_dump(mode="json", exclude={"data"}))
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(max(0.05, s.progress_interval_s))

    @app.get(
        "/v1/files/{file_id}",
        tags=["files"],
        summary="An image (PNG): with the owning tenant's key, or with the signature of a URL the API gave",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **ERRORS},
    )
    def get_file(
        file_id: str,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        expires: Annotated[int | None, Query()] = None,
        signature: Annotated[str | None, Query()] = None,
    ) -> Response:
        owner = store.file_owner(file_id)
        if signature is not None:
            good = expires is not None and hmac.compare_digest(signature, store.signature(file_id, expires))
            if not good or owner is None:
                raise ApiError(403, "bad signature", "bad_signature", "signature")
            if expires < time.time():
                raise ApiError(403, "this URL has expired", "url_expired", "expires")
        else:
            tenant = tenant_of(credentials)
            if owner is None or owner["tenant"] != tenant:
                raise ApiError(404, f"no file {file_id}", "file_not_found", "file_id")
        handle = job_handle(file_id)
        if not handle.ready():
            raise ApiError(409, f"image {file_id} is not ready yet", "not_ready", "file_id")
        result = handle.result()
        return Response(read_image(result.image_uri), media_type="image/png")

    return app
