"""The HTTP app: routes, token checks, limits, errors as `{"error": {"code", "message"}}`, Prometheus metrics.

Built by `create_app(ServeConfig(...))`; `run(config)` serves it with uvicorn (graceful shutdown on SIGINT/SIGTERM:
uvicorn stops accepting, lets requests in flight finish, then exits).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterRegistry
from .errors import ServeError
from .service import SegmentService

logger = logging.getLogger(__name__)

GB = 1024**3


@dataclass
class ServeConfig:
    """Everything `sam2-peft serve` takes (each field is one flag of the same name)."""

    model: str
    adapters: list[tuple[str, str]] = field(default_factory=list)
    """(name, Hub id or local folder) loaded at start; the operator's choice, so any local folder is allowed."""
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    """Required (as `Authorization: Bearer TOKEN`) by POST/DELETE /v1/adapters; by every route with token_all."""
    token_all: bool = False
    device: str | None = None
    dtype: str | None = None
    cache_gb: float = 2.0
    image_cache_gb: float = 1.0
    max_image_pixels: int = 40_000_000
    max_prompts: int = 64
    max_body_mb: float = 32.0
    timeout_s: float = 60.0
    batch_wait_ms: float = 5.0
    workers: int = 8
    adapter_root: str | None = None
    """POST /v1/adapters loads local folders only under this folder (None: Hub ids only)."""
    revision: str | None = None


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
            "Request latency by route",
            ["route"],
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
        family = GaugeMetricFamily("sam2peft_adapters_loaded", "adapters resident on the base")
        family.add_metric([], len(self.service.registry.entries))
        yield family


class BodyLimit:
    """ASGI middleware refusing request bodies over `max_bytes` (413): by Content-Length at once, else (chunked
    uploads) as soon as the bytes read pass the limit (the body, at most `max_bytes`, is read before the app runs)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, int(max_bytes)

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
            message = await receive()
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


def create_app(config: ServeConfig, registry: AdapterRegistry | None = None) -> FastAPI:
    """The FastAPI app for `config` (loads the base and the start-up adapters unless `registry` is given).

    Raises `Sam2LoadError` / `AdapterLoadError` / `ServeError` for a base or start-up adapter that cannot load.
    """
    from ..adapters.resolve import download_adapter
    from ..data.sources import set_max_image_pixels
    from ..models.loading import load_base_model

    set_max_image_pixels(config.max_image_pixels)
    if registry is None:
        model, processor = load_base_model(config.model, revision=config.revision, device=config.device)
        registry = AdapterRegistry(
            model, processor, config.model, adapter_root=config.adapter_root, dtype=config.dtype, device=config.device
        )
        for name, source in config.adapters:
            registry.load(name, download_adapter(source), source=source)
    metrics_holder: dict = {}
    service = SegmentService(
        registry,
        cache_bytes=int(config.cache_gb * GB),
        image_cache_bytes=int(config.image_cache_gb * GB),
        max_image_pixels=config.max_image_pixels or None,
        max_prompts=config.max_prompts,
        batch_wait_s=config.batch_wait_ms / 1000,
        on_batch=lambda size: metrics_holder["m"].batch_size.observe(size),
    )
    metrics = metrics_holder["m"] = _Metrics(service)
    pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="sam2peft")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.shutdown(wait=True, cancel_futures=False)

    app = FastAPI(title="sam2-peft", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service, app.state.registry, app.state.config = service, registry, config

    async def in_thread(function, *args):
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(pool, function, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=config.timeout_s)
        except TimeoutError as err:
            raise ServeError(
                504,
                "timeout",
                f"The request took longer than this server's limit of {config.timeout_s:g} s (--timeout-s); the "
                "server is busy or the image is large. Retry later.",
            ) from err

    def check_token(request: Request, admin: bool) -> None:
        if config.token is None or not (admin or config.token_all):
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise ServeError(401, "missing_token", "This route needs 'Authorization: Bearer TOKEN' (--token).")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.token.encode()):
            raise ServeError(403, "invalid_token", "The token given in 'Authorization: Bearer ...' is not valid.")

    async def json_body(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ServeError(400, "bad_json", f"The body is not valid JSON: {err}.") from err

    @app.middleware("http")
    async def record(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        adapter = getattr(request.state, "adapter", None) or "-"
        metrics.requests.labels(path, adapter, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return _error(error.status, error.code, error.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return _error(error.status_code, code, f"{request.method} {request.url.path}: {error.detail}")

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        logger.exception("Unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal", f"Internal server error ({type(error).__name__}); see the server log.")

    @app.get("/health")
    async def health(request: Request):
        check_token(request, admin=False)
        return {
            "status": "ok",
            "base_model": registry.base_name,
            "adapters": sorted(registry.entries),
            "device": str(registry.base.predictor.device),
        }

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        check_token(request, admin=False)
        return {"base_model": registry.base_name, "adapters": registry.describe()}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(request: Request):
        check_token(request, admin=True)
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or "source" not in body:
            raise ServeError(422, "bad_request", 'The body must be {"name": ..., "source": ..., "revision"?: ...}.')
        unknown = sorted(set(body) - {"name", "source", "revision"})
        if unknown:
            raise ServeError(422, "bad_request", f"Unknown field(s) {unknown}; known: name, source, revision.")
        request.state.adapter = body["name"]

        def work():
            directory = registry.resolve_request_source(body["source"], body.get("revision"))
            return registry.load(body["name"], directory, source=body["source"], revision=body.get("revision"))

        return JSONResponse(await in_thread(work), status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        check_token(request, admin=True)
        request.state.adapter = name

        entry = registry.entries.get(name)
        encoder = entry.encoder if entry is not None else "base"

        def work():
            described = registry.unload(name)
            service.drop_adapter(encoder)  # its own embeddings can never be hit again
            return described

        return await in_thread(work)

    @app.post("/v1/images")
    async def upload_image(request: Request):
        check_token(request, admin=False)
        try:
            form = await request.form(max_files=1, max_fields=4)
        except ServeError:
            raise
        except Exception as err:
            raise ServeError(
                400, "bad_upload", f"Expected a multipart/form-data body with a 'file' field ({err})."
            ) from err
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ServeError(400, "bad_upload", "Expected a multipart/form-data body with the image as field 'file'.")
        data = await upload.read()
        adapter = form.get("adapter") or None
        request.state.adapter = adapter

        def work():
            with registry.acquire(adapter) as entry:
                image_id, array = service.add_image(data)
                _, timing = service.embedding(entry, image_id, array)
            return {"image_id": image_id, "width": int(array.shape[1]), "height": int(array.shape[0]), **timing}

        return await in_thread(work)

    @app.post("/v1/segment")
    async def segment(request: Request):
        check_token(request, admin=False)
        body = await json_body(request)
        if isinstance(body, dict) and isinstance(body.get("adapter"), str):
            request.state.adapter = body["adapter"]
        return await in_thread(service.segment, body)

    @app.get("/metrics")
    async def prometheus(request: Request):
        check_token(request, admin=False)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return BodyLimitApp(app, int(config.max_body_mb * 1024 * 1024))


class BodyLimitApp(BodyLimit):
    """The FastAPI app behind the body limit; attributes (`state`, routes) read through to it."""

    def __getattr__(self, name):
        return getattr(self.app, name)


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
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=30)
