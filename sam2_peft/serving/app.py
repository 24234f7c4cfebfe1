"""The HTTP app: routes, token checks, limits, errors as `{"error": {"code", "message"}}`, Prometheus metrics.

`build_app(config)` declares the API (routes, request and response models, token dependencies, error handlers; no
model), `create_app(config)` loads the base and adapters behind it; `run(config)` serves it with uvicorn (graceful
shutdown on SIGINT/SIGTERM: uvicorn stops accepting, lets requests in flight finish, then exits).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterRegistry
from .config import GB, ServeConfig
from .errors import ServeError
from .schemas import (
    Adapter,
    AdapterList,
    ErrorResponse,
    Health,
    ImageResponse,
    Liveness,
    LoadAdapterRequest,
    Readiness,
    SegmentRequest,
    SegmentResponse,
)
from .service import SegmentService

__all__ = ["GB", "ServeConfig", "build_app", "create_app", "run"]

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
"""What a 503 (overloaded, not ready, the Hub unreachable) asks clients to wait before retrying."""
RETRY = {"Retry-After": str(RETRY_AFTER_S)}
NPZ = "application/x-npz"
"""The media type of an embedding (numpy's `.npz`: a zip of `.npy` arrays)."""
OTHER_ADAPTER = "other"
"""The metric label of a request naming an adapter never loaded here (labels stay bounded by the loaded names)."""


class _Metrics:
    def __init__(self, service: SegmentService) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sam2peft_requests",
            "HTTP requests by route, adapter and status",
            ["route", "adapter", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sam2peft_request_latency_seconds",
            "Request latency by route and adapter (label values: loaded adapters, '-' for none, 'other')",
            ["route", "adapter"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.batch_size = Histogram(
            "sam2peft_decode_batch_size",
            "Requests decoded together by micro-batching",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.registry.register(_CacheCollector(service))


class _CacheCollector:
    def __init__(self, service: SegmentService) -> None:
        self.service = service

    def collect(self):
        for name, cache in (("embedding", self.service.embeddings), ("image", self.service.images)):
            stats = cache.stats()
            for key in ("hits", "misses", "evictions"):
                family = CounterMetricFamily(f"sam2peft_{name}_cache_{key}", f"{name} cache {key}")
                family.add_metric([], stats[key])
                yield family
            for key in ("bytes", "entries"):
                family = GaugeMetricFamily(f"sam2peft_{name}_cache_{key}", f"{name} cache {key}")
                family.add_metric([], stats[key])
                yield family
        registry = self.service.registry
        family = GaugeMetricFamily("sam2peft_adapters_loaded", "adapters resident on the base")
        family.add_metric([], len(registry.entries))
        yield family
        for key, text in (
            ("loads_on_use", "adapters loaded by a request's first use"),
            ("evictions", "adapters unloaded by --max-adapters"),
        ):
            family = CounterMetricFamily(f"sam2peft_adapter_{key}", text)
            family.add_metric([], getattr(registry, key))
            yield family


class BodyLimit:
    """ASGI middleware refusing request bodies over `max_bytes` (413): by Content-Length at once, else (chunked
    uploads) as soon as the bytes read pass the limit (the body, at most `max_bytes`, is read before the app runs)."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float | None = None) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, int(max_bytes), read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = _error(413, "body_too_large", self._message(int(length)))
            return await response(scope, receive, send)
        # No (or an honest) Content-Length: read the body here, up to the limit, and hand the app a replay of it.
        # Raising from inside `receive` instead would surface through Starlette's middleware as a 500.
        chunks, received, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                response = _error(408, "body_timeout", f"No part of the body arrived for {self.read_timeout_s:g} s.")
                return await response(scope, receive, send)
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            more = message.get("more_body", False)
            if received > self.max_bytes:
                response = _error(413, "body_too_large", self._message(received))
                return await response(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _message(self, size: int) -> str:
        return f"The request body ({size} bytes or more) is over this server's limit of {self.max_bytes} bytes."


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# ---- tokens -------------------------------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="--token: the admin routes; every route with --token-all.")


def _check_token(request: Request, credentials: HTTPAuthorizationCredentials | None, admin: bool) -> None:
    config: ServeConfig = request.app.state.config
    if config.token is None or not (admin or config.token_all):
        return
    if credentials is None and not request.headers.get("authorization"):
        raise ServeError(401, "missing_token", "This route needs 'Authorization: Bearer TOKEN' (--token).")
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), config.token.encode()):
        raise ServeError(403, "invalid_token", "The token given in 'Authorization: Bearer ...' is not valid.")


def reader(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
    """Routes that read or segment: a token only with --token-all."""
    _check_token(request, credentials, admin=False)


def admin(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
    """Routes that load or unload adapters: the token whenever --token is set."""
    _check_token(request, credentials, admin=True)


# ---- routes -------------------------------------------------------------------------------------------------------

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 415, 422, 500, 503, 504)}
router = APIRouter(responses=ERRORS)


async def in_pool(request: Request, work):
    """`work(deadline)` on the model threads (`deadline`: `time.monotonic()` + --timeout-s). 503 with Retry-After
    when --max-queue requests are already admitted; 504 past the deadline, and work still waiting for a thread then
    is dropped, not run (a decode already under way finishes)."""
    state = request.app.state
    config: ServeConfig = state.config
    if config.max_queue and state.admitted >= config.max_queue:
        raise ServeError(
            503,
            "overloaded",
            f"The server is busy ({state.admitted} requests queued or running, --max-queue {config.max_queue}); "
            "retry after the time in Retry-After.",
        )
    deadline = time.monotonic() + config.timeout_s

    def guarded():
        if time.monotonic() > deadline:
            raise ServeError(504, "timeout", "The request waited past its deadline for a model thread; dropped.")
        return work(deadline)

    state.admitted += 1
    future = asyncio.get_running_loop().run_in_executor(state.pool, guarded)
    future.add_done_callback(lambda _: setattr(state, "admitted", state.admitted - 1))
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout=config.timeout_s)
    except TimeoutError as err:
        raise ServeError(
            504,
            "timeout",
            f"The request took longer than this server's limit of {config.timeout_s:g} s (--timeout-s); the "
            "server is busy or the image is large. Retry later.",
        ) from err


@router.get("/health", response_model=Health, dependencies=[Depends(reader)])
async def health(request: Request) -> dict:
    """The base model, the loaded adapters and the device."""
    registry: AdapterRegistry = request.app.state.registry
    return {
        "status": "ok",
        "base_model": registry.base_name,
        "adapters": sorted(registry.entries),
        "device": str(registry.base.predictor.device),
    }


@router.get("/health/live", response_model=Liveness)
async def live() -> dict:
    """The process answers (no token: for orchestrators' liveness probes)."""
    return {"status": "ok"}


@router.get("/health/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and warmed by one decode, 503 before (no token: for readiness probes)."""
    warmed = request.app.state.warmed.is_set()
    body = {"status": "ready" if warmed else "warming", "warmed": warmed}
    return JSONResponse(body, status_code=200 if warmed else 503, headers=None if warmed else RETRY)


@router.get("/v1/adapters", response_model=AdapterList, dependencies=[Depends(reader)])
async def list_adapters(request: Request) -> dict:
    """The loaded adapters: kind, peft type, whether they share the base's image embeddings, prompt-free or not."""
    registry: AdapterRegistry = request.app.state.registry
    return {"base_model": registry.base_name, "adapters": registry.describe()}


@router.post("/v1/adapters", status_code=201, response_model=Adapter, dependencies=[Depends(admin)])
async def load_adapter(body: LoadAdapterRequest, request: Request) -> dict:
    """Load an adapter (token): a Hub repo id, or a folder under --adapter-root."""
    registry: AdapterRegistry = request.app.state.registry
    request.state.adapter = body.name

    def work(deadline):
        directory = registry.resolve_request_source(body.source, body.revision)
        return registry.load(body.name, directory, source=body.source, revision=body.revision)

    return await in_pool(request, work)


@router.delete("/v1/adapters/{name}", response_model=Adapter, dependencies=[Depends(admin)])
async def unload_adapter(name: str, request: Request) -> dict:
    """Unload an adapter (token); its requests in flight finish first, new ones get 404."""
    registry: AdapterRegistry = request.app.state.registry
    request.state.adapter = name
    return await in_pool(request, lambda deadline: registry.unload(name))  # its cached embeddings go with it


@router.post("/v1/images", response_model=ImageResponse, dependencies=[Depends(reader)])
async def upload_image(
    request: Request,
    file: UploadFile = File(description="The image file (PNG, JPEG, TIFF, BMP, WebP ...)."),
    adapter: str | None = Form(None, description="Encode it for this adapter's encoder (default: the base's)."),
) -> dict:
    """Upload an image and encode it; its `image_id` (a hash of the bytes) names it in /v1/segment."""
    service: SegmentService = request.app.state.service
    data = await file.read()
    request.state.adapter = adapter

    def work(deadline):
        with service.registry.acquire(adapter) as entry:
            image_id, array = service.add_image(data)
            _, timing = service.embedding(entry, image_id, array)
        return {"image_id": image_id, "width": int(array.shape[1]), "height": int(array.shape[0]), **timing}

    return await in_pool(request, work)


@router.get(
    "/v1/images/{image_id}/embedding",
    response_class=Response,
    responses={200: {"content": {NPZ: {}}, "description": "An .npz file; its arrays are listed above."}},
    dependencies=[Depends(reader)],
)
async def image_embedding(
    image_id: str,
    request: Request,
    adapter: str | None = Query(None, description="Through this adapter's encoder (default: the base's)."),
) -> Response:
    """An uploaded image's embedding, for decoding on the client (e.g. with the exported ONNX decoder): an `.npz`
    with `image_embeddings.0` `(1, C0, S/4, S/4)`, `image_embeddings.1` `(1, C1, S/8, S/8)` (high-resolution
    features), `image_embeddings.2` `(1, C, S/16, S/16)`, `original_size` `[H, W]` and `input_size` `[S, S]`."""
    request.state.adapter = adapter
    data = await in_pool(request, lambda deadline: request.app.state.service.embedding_file(image_id, adapter))
    disposition = {"Content-Disposition": f'attachment; filename="{image_id}.npz"'}
    return Response(data, media_type=NPZ, headers=disposition)


@router.post(
    "/v1/segment", response_model=SegmentResponse, response_model_exclude_unset=True, dependencies=[Depends(reader)]
)
async def segment(body: SegmentRequest, request: Request) -> dict:
    """Masks for boxes or points (original pixels), or prompt-free with a PTSAM adapter."""
    request.state.adapter = body.adapter
    return await in_pool(request, partial(request.app.state.service.segment, body))


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(reader)])
async def prometheus(request: Request) -> Response:
    """Prometheus metrics: requests, latency, cache hits/misses/bytes, decode batch sizes."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# ---- errors and metrics -------------------------------------------------------------------------------------------

FIELD_ERRORS = {
    "file": (400, "bad_upload"),
    "format": (422, "bad_format"),
    "boxes": (422, "bad_prompt"),
    "points": (422, "bad_prompt"),
    "labels": (422, "bad_prompt"),
    "source": (422, "bad_source"),
}
"""The status and code of a request that fails its model, by the first failing field (else 422 bad_request)."""


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    if problems[0]["type"] == "json_invalid":
        detail = problems[0].get("ctx", {}).get("error", problems[0]["msg"])
        return _error(400, "bad_json", f"The body is not valid JSON: {detail}.")
    if isinstance(error.body, bytes):  # not parsed: no JSON content type (FastAPI's guard against cross-site posts)
        return _error(400, "bad_json", "The body must be JSON, sent with 'Content-Type: application/json'.")
    places = [[str(part) for part in p["loc"] if part != "body"] for p in problems]
    status, code = FIELD_ERRORS.get(places[0][0] if places[0] else "", (422, "bad_request"))
    message = "; ".join(
        f"'{'.'.join(place)}': {p['msg']}" if place else f"the body: {p['msg']}" for place, p in zip(places, problems)
    )
    return _error(status, code, message + ".")


async def _serve_error(request: Request, error: ServeError) -> JSONResponse:
    headers = {401: {"WWW-Authenticate": "Bearer"}, 503: RETRY}.get(error.status)
    return _error(error.status, error.code, error.message, headers)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return _error(error.status_code, code, f"{request.method} {request.url.path}: {error.detail}")


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("Unexpected error on %s %s", request.method, request.url.path)
    return _error(500, "internal", f"Internal server error ({type(error).__name__}); see the server log.")


async def _record(request: Request, call_next):
    """Count and time every request by route, adapter and status."""
    start = time.perf_counter()
    response = await call_next(request)
    metrics: _Metrics = request.app.state.metrics
    path = getattr(request.scope.get("route"), "path", "unmatched")
    adapter = getattr(request.state, "adapter", None) or "-"
    if adapter != "-" and adapter not in request.app.state.registry.ever_loaded:
        adapter = OTHER_ADAPTER
    metrics.requests.labels(path, adapter, str(response.status_code)).inc()
    metrics.latency.labels(path, adapter).observe(time.perf_counter() - start)
    return response


def build_app(config: ServeConfig, lifespan=None) -> FastAPI:
    """The API alone: routes, models, token checks and error handlers, with no model behind it (the OpenAPI schema
    comes from it: `build_app(config).openapi()`)."""
    docs = {} if config.openapi else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="sam2-peft",
        summary="One SAM 2 base with many adapters, chosen per request.",
        version=_version(),
        lifespan=lifespan,
        **docs,
    )
    app.state.config = config
    app.include_router(router)
    app.middleware("http")(_record)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
        )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    return app


def _version() -> str:
    from .. import __version__

    return __version__


def onnx_registry(config: ServeConfig) -> AdapterRegistry:
    """A `sam2-peft export` folder as the base (its graphs on onnxruntime, CPU), with no adapters: its own is inside."""
    from ..export import load_onnx_predictor

    if config.adapters or config.adapter_root or config.load_on_use:
        raise ServeError(
            422, "onnx_no_adapters", f"'{config.model}' is an ONNX export with its adapter inside: drop --adapter, "
            "--adapter-root and --load-on-use (or serve the PyTorch base with --model).",
        )  # fmt: skip
    predictor = load_onnx_predictor(config.model)
    return AdapterRegistry(predictor.model, predictor.processor, config.model, device="cpu", accepts_adapters=False)


def create_app(config: ServeConfig, registry: AdapterRegistry | None = None) -> FastAPI:
    """The FastAPI app for `config` (loads the base and the start-up adapters unless `registry` is given).

    Raises `Sam2LoadError` / `AdapterLoadError` / `ServeError` for a base or start-up adapter that cannot load.
    """
    from ..adapters.resolve import download_adapter
    from ..data.sources import set_max_image_pixels
    from ..export.runtime import is_export
    from ..models.loading import load_base_model

    set_max_image_pixels(config.max_image_pixels)
    if registry is None and is_export(config.model):
        registry = onnx_registry(config)
    if registry is None:
        model, processor = load_base_model(config.model, revision=config.revision, device=config.device)
        registry = AdapterRegistry(
            model,
            processor,
            config.model,
            adapter_root=config.adapter_root,
            dtype=config.dtype,
            device=config.device,
            load_on_use=config.load_on_use,
            allowed_hub_repos=tuple(config.allowed_hub_repos),
            max_adapters=config.max_adapters,
        )
        for name, source in config.adapter_pairs():
            registry.load(name, download_adapter(source), source=source)
    metrics_holder: dict = {}
    service = SegmentService(
        registry,
        cache_bytes=int(config.cache_gb * GB),
        image_cache_bytes=int(config.image_cache_gb * GB),
        max_image_pixels=config.max_image_pixels or None,
        max_prompts=config.max_prompts,
        batch_wait_s=config.batch_wait_ms / 1000,
        max_batch=config.max_batch,
        on_batch=lambda size: metrics_holder["m"].batch_size.observe(size),
    )
    pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="sam2peft")

    warmed = threading.Event()

    def warm_up() -> None:
        service.warm_up()
        warmed.set()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        pool.submit(warm_up)  # /health/ready answers 503 until it is done
        yield
        pool.shutdown(wait=True, cancel_futures=False)

    app = build_app(config, lifespan)
    app.state.service, app.state.registry, app.state.pool, app.state.admitted = service, registry, pool, 0
    app.state.warmed = warmed
    app.state.metrics = metrics_holder["m"] = _Metrics(service)
    return BodyLimitApp(app, int(config.max_body_mb * 1024 * 1024), config.read_timeout_s)


class BodyLimitApp(BodyLimit):
    """The FastAPI app behind the body limit; attributes (`state`, routes) read through to it."""

    def __getattr__(self, name):
        return getattr(self.app, name)


def _read_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, also closing a connection whose request head does not fully arrive within `seconds`
    of the connection opening or of its first byte (uvicorn alone times out idle keep-alive connections only)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutH11Protocol(H11Protocol):
        read_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.read_timer = self.loop.call_later(seconds, self.read_timed_out)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a whole request head arrived
                self._cancel_read_timer()
            elif self.read_timer is None:
                self.read_timer = self.loop.call_later(seconds, self.read_timed_out)

        def connection_lost(self, exc) -> None:
            self._cancel_read_timer()
            super().connection_lost(exc)

        def _cancel_read_timer(self) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
                self.read_timer = None

        def read_timed_out(self) -> None:
            self.read_timer = None
            if self.conn.their_state is h11.IDLE:  # still no whole request head
                self.timeout_keep_alive_handler()  # closes the connection

    return ReadTimeoutH11Protocol


def uvicorn_config(app, **overrides):
    """The `uvicorn.Config` that serves `app` with its `ServeConfig`'s address, timeouts and limits."""
    import uvicorn

    config: ServeConfig = app.state.config
    settings = dict(
        host=config.host,
        port=config.port,
        http=_read_timeout_protocol(config.read_timeout_s),
        timeout_keep_alive=config.keep_alive_s,
        h11_max_incomplete_event_size=config.max_header_kb * 1024,
        timeout_graceful_shutdown=30,
        log_level="info",
    )
    return uvicorn.Config(app, **{**settings, **overrides})


def run(config: ServeConfig) -> None:
    """Serve `config` with uvicorn until SIGINT/SIGTERM (graceful: requests in flight finish first)."""
    import uvicorn

    app = create_app(config)
    logger.warning(
        "Serving '%s' with adapters %s on http://%s:%d",
        config.model,
        sorted(app.state.registry.entries) or "none",
        config.host,
        config.port,
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it shut down on, as uvicorn.run does
        uvicorn.Server(uvicorn_config(app)).run()
