"""`sam2-peft serve --engine ray`: the same HTTP API as `sam2-peft serve`, as a Ray Serve application.

Three deployments per base model:

- `AdapterServer`, the model: each replica runs the very app `sam2-peft serve` runs (`create_app`: routes, schemas,
  errors, limits, metrics), with the base loaded and the adapters of the `--adapter` catalogue loaded on demand by
  Ray Serve's model multiplexing (`serve.multiplexed`, the adapter name as model id; LRU beyond
  `--max-adapters-per-replica`). Answers carry the replica's id in the `x-sam2peft-replica` header.
- `Router`, the HTTP ingress: reads the adapter a request names (`adapter` in the JSON body or the upload form) and
  hands the request to the model with that adapter as the multiplexed model id, so that Ray routes it to a replica
  that already holds the adapter. POST/DELETE /v1/adapters answer 501 (replicas load the catalogue themselves).
- `ImageStore`: the uploaded image files by content id (`image_id`, a hash of the bytes), bounded LRU. A replica
  asked for an `image_id` it does not hold fetches the file from there and decodes and encodes it itself.

Shared across replicas: the image files (in `ImageStore`). Per replica, recomputed where missing: the decoded image,
its embeddings (one per encoder) and the loaded adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import replace

from ray import serve
from starlette.requests import Request

from .app import BodyLimit, _error
from .cache import ByteLRU
from .config import GB, ServeConfig
from .errors import ServeError
from .images import decode_base64
from .ray_config import RULES, RayServeConfig

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-sam2peft-replica"
"""Response header naming the model replica that answered."""


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ImageStore:
    """Uploaded image files by content id, for every replica (LRU bounded by `max_bytes`)."""

    def __init__(self, max_bytes: int) -> None:
        self.files = ByteLRU(max_bytes, len)

    def put(self, image_id: str, data: bytes) -> None:
        if self.files.peek(image_id) is None:
            self.files.put(image_id, data)

    def get(self, image_id: str) -> bytes | None:
        return self.files.get(image_id)


class _Resident:
    """An adapter loaded on this replica, as Ray's multiplexing holds it: evicting it unloads it."""

    def __init__(self, server: AdapterServer, name: str) -> None:
        self.server, self.name = server, name

    def __del__(self) -> None:  # Ray calls it on eviction; Python at collection (then it does nothing)
        server, self.server = self.server, None
        if server is not None:
            server.unload(self.name)


@serve.deployment
class AdapterServer:
    """One base model with the `create_app` app in front; adapters loaded on demand (multiplexed)."""

    async def __init__(self, config: ServeConfig, max_adapters: int, store) -> None:
        from .app import create_app

        self.catalogue = dict(config.adapter_pairs())
        self.app = create_app(replace(config, adapters=[]))
        self.registry, self.service = self.app.state.registry, self.app.state.service
        self.store = store

        async def load(name: str) -> _Resident:  # a function: Ray's multiplexing keeps its cache on it
            return await self._load(name)

        self.load_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.lifespan = contextlib.AsyncExitStack()  # the app's start-up (warm-up) and shutdown
        await self.lifespan.enter_async_context(self.app.router.lifespan_context(self.app.app))

    async def _load(self, name: str) -> _Resident:
        from ..adapters.resolve import download_adapter

        source = self.catalogue[name]
        directory = await asyncio.to_thread(download_adapter, source)
        await asyncio.to_thread(self.registry.load, name, directory, source=source)
        return _Resident(self, name)

    def unload(self, name: str) -> None:
        entry = self.registry.entries.get(name)
        if entry is not None:
            self.registry.unload(name)
            self.service.drop_adapter(entry.encoder)

    async def fetch_image(self, image_id: str) -> None:
        """Bring an image this replica does not hold from the store (nothing when the store lacks it too: the app
        then answers 404 unknown_image)."""
        if self.service.images.peek(image_id) is None:
            data = await self.store.get.remote(image_id)
            if data is not None:
                await asyncio.to_thread(self.service.add_image, data)

    async def handle(self, request: dict) -> dict:
        """Answer a forwarded HTTP request (`Router._forward`) with the app."""
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            await self.load_adapter(adapter)
        if request["image_id"]:
            await self.fetch_image(request["image_id"])
        response = await _call_asgi(self.app, request)
        response["headers"].append((REPLICA_HEADER.encode(), self.replica.encode()))
        return response

    async def __del__(self) -> None:
        if hasattr(self, "lifespan"):  # not when the start-up failed
            await self.lifespan.aclose()


async def _call_asgi(app, request: dict) -> dict:
    """Run one buffered HTTP request through an ASGI app; its status, headers and body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "http",
        "root_path": "",
        **{key: request[key] for key in ("method", "path", "query_string", "headers", "client", "server")},
        "raw_path": request["path"].encode(),
    }
    pending = [{"type": "http.request", "body": request["body"], "more_body": False}]
    response = {"status": 500, "headers": [], "body": b""}

    async def receive():
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # the client never disconnects: the router waits for the whole answer

    async def send(message):
        if message["type"] == "http.response.start":
            response["status"], response["headers"] = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            response["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return response


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Router:
    """The HTTP ingress: each request goes to a model replica chosen by the adapter it names."""

    def __init__(self, model, store, config: ServeConfig) -> None:
        self.model, self.store = model, store
        self.catalogue = sorted(name for name, _ in config.adapter_pairs())
        self.asgi = BodyLimit(self._forward, int(config.max_body_mb * 1024 * 1024), config.read_timeout_s)

    def __serve_build_asgi_app__(self):
        return self.asgi

    async def _forward(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        body = (await receive()).get("body", b"")  # BodyLimit replays the whole body as one message
        try:
            adapter, image_id, image = await self._read(scope, body)
            response = await self._send(scope, body, adapter, image_id)
        except ServeError as err:
            headers = {"Retry-After": "1"} if err.status == 503 else None
            return await _error(err.status, err.code, err.message, headers)(scope, receive, send)
        if response["status"] == 200 and image is not None:
            await self.store.put.remote(json.loads(response["body"])["image_id"], image)
        await send({"type": "http.response.start", "status": response["status"], "headers": response["headers"]})
        await send({"type": "http.response.body", "body": response["body"]})

    async def _read(self, scope, body: bytes) -> tuple[str | None, str | None, bytes | None]:
        """The adapter, the `image_id` and the image file a request names (None where it names none, or where it is
        malformed: the replica's app answers that with its own error)."""
        method, path = scope["method"], scope["path"]
        if path.startswith("/v1/adapters") and method in ("POST", "DELETE"):
            raise ServeError(
                501,
                "not_supported",
                "Adapters are not loaded or unloaded over HTTP on Ray Serve: the replicas load the --adapter "
                f"catalogue ({', '.join(self.catalogue) or 'empty'}) on demand; redeploy to change it.",
            )
        adapter = image_id = image = None
        if method == "POST" and path == "/v1/segment":
            with contextlib.suppress(ValueError):
                fields = json.loads(body)
                if isinstance(fields, dict):
                    adapter, image_id, image = fields.get("adapter"), fields.get("image_id"), fields.get("image")
                    image = decode_base64(image) if isinstance(image, str) else None
        elif method == "POST" and path == "/v1/images":
            with contextlib.suppress(Exception):  # not a form: the app says why
                replay = [{"type": "http.request", "body": body, "more_body": False}]
                form = await Request(scope, lambda: _pop(replay)).form()
                adapter, upload = form.get("adapter"), form.get("file")
                image = await upload.read() if hasattr(upload, "read") else None
        adapter = adapter if isinstance(adapter, str) else None
        if adapter is not None and adapter not in self.catalogue:
            raise ServeError(
                404,
                "unknown_adapter",
                f"No adapter named '{adapter}' in this deployment (adapters: {', '.join(self.catalogue) or 'none'}); "
                "send adapter: null for the base model.",
            )
        return adapter, image_id if isinstance(image_id, str) else None, image

    async def _send(self, scope, body: bytes, adapter: str | None, image_id: str | None) -> dict:
        request = {
            "method": scope["method"],
            "path": scope["path"],
            "query_string": scope.get("query_string", b""),
            "headers": list(scope.get("headers", [])),
            "client": scope.get("client"),
            "server": scope.get("server"),
            "body": body,
            "image_id": image_id,
        }
        try:
            return await self.model.options(multiplexed_model_id=adapter or "").handle.remote(request)
        except Exception as err:  # a replica died or is out of reach: the client may retry
            logger.exception("Forwarding %s %s failed", scope["method"], scope["path"])
            raise ServeError(503, "unavailable", f"No model replica answered ({type(err).__name__}); retry.") from err


async def _pop(messages: list) -> dict:
    return messages.pop() if messages else {"type": "http.disconnect"}


def application(config: ServeConfig, ray_config: RayServeConfig):
    """The Ray Serve application for `config`: the router, the model deployment and the image store, bound."""
    store = ImageStore.bind(int(ray_config.image_store_gb * GB))
    model = AdapterServer.options(**ray_config.deployment_options(config.max_queue))
    return Router.bind(model.bind(config, ray_config.max_adapters_per_replica, store), store, config)


RAY_OWN = ("host", "port", "keep_alive_s", "ray_address", "engine")
"""`sam2-peft serve` settings that Ray's own CLI sets instead (`serve run` / the config file's http_options)."""


def app_builder(args: dict):
    """The application for Ray's CLI: `serve run sam2_peft.serving.ray_app:app_builder model=... adapters=a=dir`
    (or `import_path` + `args` in a config file); the args are `sam2-peft serve --engine ray`'s flags, by field
    name, and are checked as the command checks them."""
    from ..cli import serve_parser

    refused = sorted(set(args) & set(RAY_OWN))
    if refused:
        raise ValueError(f"{', '.join(refused)}: set by Ray's own CLI or config file (http_options), not in args")
    argv = ["--engine", "ray"]
    for name, value in args.items():
        for item in value if isinstance(value, list) else [value]:
            argv += [f"--{name.replace('_', '-')}", str(item)]
    config, ray_config = serve_parser().parse(argv, RULES)
    return application(config, ray_config)


def _start_up_error() -> str:
    """What a failed replica start-up raised (its last exception's message), from Ray Serve's deployment status."""
    messages = [d.message for app in serve.status().applications.values() for d in app.deployments.values()]
    causes = re.findall(r"^\s*[\w.]+(?:Error|Exception): (.+)$", "\n".join(messages), re.MULTILINE)
    return causes[-1] if causes else "see the replicas' messages above"


def run(config: ServeConfig, ray_config: RayServeConfig) -> None:
    """Start (or join) Ray, deploy the application on `config.host:config.port`, serve until SIGINT/SIGTERM."""
    import signal
    import sys
    import threading

    import ray

    ray.init(address=ray_config.ray_address, include_dashboard=False)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(
            http_options={"host": config.host, "port": config.port, "keep_alive_timeout_s": config.keep_alive_s}
        )
        try:
            serve.run(application(config, ray_config), name="sam2-peft", route_prefix="/")
        except RuntimeError as err:  # a replica's start-up failed: the base or the catalogue does not load
            if not str(err).startswith("Deploying application"):
                raise
            sys.exit(f"error: the Ray Serve application did not start: {_start_up_error()}")
        logger.warning("Serving '%s' on Ray Serve at http://%s:%d", config.model, config.host, config.port)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
