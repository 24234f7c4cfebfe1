"""`ServeConfig`: every setting of `sam2-peft serve`, one dataclass field per flag (parsed by `RecipeParser`, so
`--help` shows each default). Imports nothing of the serve extra, so the command can parse and explain first."""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1024**3


def _repeatable(alias: str, metavar: str, help: str):
    """A list field whose flag (also spelled `alias`) can be repeated or given several values."""
    return field(
        default_factory=list, metadata={"aliases": [alias], "action": "extend", "metavar": metavar, "help": help}
    )


@dataclass
class ServeConfig:
    """Everything `sam2-peft serve` takes (each field is the flag of the same name, `--kebab-case`)."""

    model: str = field(
        metadata={
            "help": "Base model: Hub id, local folder, compact-synthetic, ..., or a `sam2-peft export` folder (its "
            "ONNX graphs, adapter inside, run by onnxruntime on the CPU; no --adapter then)."
        }
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --model."})
    adapters: list[str] = _repeatable(
        "--adapter",
        "NAME=SOURCE",
        "Adapters to load at start (Hub id or folder; the operator's choice, so any folder is allowed); repeat the "
        "flag or list several. In Python, (name, source) pairs work too.",
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (loopback only by default)."})
    port: int = field(default=8000, metadata={"help": "Port to bind."})
    token: str | None = field(
        default=None,
        metadata={"help": "Token that POST/DELETE /v1/adapters require (Authorization: Bearer TOKEN)."},
    )
    token_all: bool = field(
        default=False,
        metadata={"help": "Require --token on every API route (the OpenAPI docs stay public; see --openapi)."},
    )
    adapter_root: str | None = field(
        default=None, metadata={"help": "Folder POST /v1/adapters may load from (unset: Hub ids only)."}
    )
    load_on_use: bool = field(
        default=False,
        metadata={
            "help": "A request naming an adapter that is not loaded loads it first (no token): the folder of that "
            "name under --adapter-root, or a Hub repo (org/name) matching --allow-hub-repo. Other names: 404 "
            "unknown_adapter, or 403 adapter_not_allowed for a Hub repo off the list."
        },
    )
    allowed_hub_repos: list[str] = _repeatable(
        "--allow-hub-repo",
        "PATTERN",
        "Hub repos --load-on-use may load: org/name, or a pattern such as org/* (fnmatch). Repeat the flag or list "
        "several.",
    )
    max_adapters: int = field(
        default=0,
        metadata={
            "help": "Most adapters resident at once; loading one more unloads the least recently used after its "
            "requests finish (0: no cap)."
        },
    )
    device: str | None = field(default="auto", metadata={"help": "cpu, cuda, cuda:1 ..., or auto: cuda when available"})
    dtype: str | None = field(
        default=None,
        metadata={"help": "Autocast dtype (unset: the model's).", "choices": ("float32", "float16", "bfloat16")},
    )
    cache_gb: float = field(default=2.0, metadata={"help": "Image-embedding cache budget (GiB)."})
    image_cache_gb: float = field(default=1.0, metadata={"help": "Uploaded-image cache budget (GiB)."})
    max_image_pixels: int = field(default=40_000_000, metadata={"help": "Larger images get 413 (0: no limit)."})
    max_prompts: int = field(default=64, metadata={"help": "Most boxes or point sets per request (413 above)."})
    max_body_mb: float = field(default=32.0, metadata={"help": "Largest request body (MiB; 413 above)."})
    timeout_s: float = field(default=60.0, metadata={"help": "Per-request limit in seconds (504 past it)."})
    batch_wait_ms: float = field(
        default=0.0,
        metadata={
            "help": "Micro-batching: how long a decode that finds the decoder idle waits for others to join (requests "
            "that arrive while a decode of the same image and adapter runs join the next one without it)."
        },
    )
    max_batch: int = field(default=64, metadata={"help": "Most requests decoded together (1: no micro-batching)."})
    max_queue: int = field(
        default=32,
        metadata={
            "help": "Requests admitted to the model threads at once, running or waiting; more get 503 with "
            "Retry-After at once (0: no limit)."
        },
    )
    read_timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "A client must send a request's headers, and each chunk of its body, within this many seconds "
            "(else the connection closes, or 408)."
        },
    )
    keep_alive_s: float = field(
        default=5.0, metadata={"help": "Close a keep-alive connection idle this many seconds (uvicorn's)."}
    )
    max_header_kb: int = field(default=64, metadata={"help": "Largest request head (line and headers, KiB)."})
    workers: int = field(default=8, metadata={"help": "Threads running model work."})
    cors_origins: list[str] = _repeatable(
        "--cors-origin",
        "ORIGIN",
        "Browser origins allowed to call the API (CORS), e.g. http://localhost:3000; '*' for any; none: no CORS "
        "headers. Repeat the flag or list several.",
    )
    openapi: bool = field(
        default=True, metadata={"help": "Serve the OpenAPI schema at /openapi.json and its docs at /docs."}
    )

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = None  # the predictor's choice: cuda when available
        if self.token_all and not self.token:
            raise ValueError("--token-all needs --token TOKEN (the token every route will require)")
        pairs = self.adapter_pairs()  # NAME=SOURCE mistakes are usage errors, raised before anything loads
        if self.allowed_hub_repos and not self.load_on_use:
            raise ValueError("--allow-hub-repo lists what --load-on-use may load: add --load-on-use")
        if self.load_on_use and not (self.adapter_root or self.allowed_hub_repos):
            raise ValueError("--load-on-use needs --adapter-root FOLDER or --allow-hub-repo PATTERN to load from")
        if self.max_adapters and len(pairs) > self.max_adapters:
            raise ValueError(f"--max-adapters {self.max_adapters} is below the {len(pairs)} --adapter given at start")

    def adapter_pairs(self) -> list[tuple[str, str]]:
        """The start-up adapters as (name, source) pairs."""
        pairs = []
        for item in self.adapters:
            name, _, source = item.partition("=") if isinstance(item, str) else (item[0], "=", item[1])
            if not name or not source:
                raise ValueError(f"--adapter takes NAME=SOURCE (e.g. nuclei=org/sam2-nuclei-lora), got '{item}'")
            pairs.append((name, source))
        return pairs
