"""`RayServeConfig`: the flags `sam2-peft serve --engine ray` adds to `ServeConfig` (replicas, autoscaling, adapters
per replica). Imports nothing of Ray, so the command parses and explains before Ray loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..flags import Applies, flags_of


@dataclass
class RayServeConfig:
    """The Ray Serve settings (each field is the flag of the same name, `--kebab-case`)."""

    engine: str = field(
        default="uvicorn",
        metadata={
            "choices": ("uvicorn", "ray"),
            "help": "uvicorn: one process; ray: a Ray Serve application (replicas of the model, adapters routed to "
            "the replicas that hold them; needs the ray extra).",
        },
    )
    ray_address: str | None = field(
        default=None, metadata={"help": "Ray cluster to join (ray.init's address, e.g. auto); unset: a local one."}
    )
    replicas: int = field(default=1, metadata={"help": "Model replicas (a fixed count, without --max-replicas)."})
    max_replicas: int | None = field(
        default=None, metadata={"help": "Autoscale the model replicas between --min-replicas and this many."}
    )
    min_replicas: int = field(default=1, metadata={"help": "Autoscaling: the fewest replicas (0: scale to zero)."})
    target_ongoing_requests: float = field(
        default=2.0, metadata={"help": "Autoscaling: requests in flight per replica that Ray Serve scales towards."}
    )
    max_adapters_per_replica: int = field(
        default=3,
        metadata={"help": "Adapters one replica holds (LRU; Ray Serve's max_num_models_per_replica)."},
    )
    replica_cpus: float = field(default=1.0, metadata={"help": "CPUs Ray reserves for each model replica."})
    replica_gpus: float = field(
        default=0.0, metadata={"help": "GPUs Ray reserves for each model replica (0.5: two share one)."}
    )
    image_store_gb: float = field(
        default=1.0, metadata={"help": "Budget of the shared store of uploaded image files (GiB), one per application."}
    )

    def deployment_options(self, max_queue: int) -> dict:
        """`Deployment.options(...)` of the model deployment: resources, replicas or autoscaling, and `max_queue`
        (--max-queue) as the requests one replica holds at once (0: 1000)."""
        options = {
            "ray_actor_options": {"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus},
            "max_ongoing_requests": max_queue or 1000,
        }
        if self.max_replicas is None:
            return {**options, "num_replicas": self.replicas}
        autoscaling = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }
        return {**options, "autoscaling_config": autoscaling}


def _ray(values) -> bool:
    return values.engine == "ray"


RULES = (
    Applies(flags_of(RayServeConfig, leave_out=("engine",)), _ray, "applies to --engine ray only"),
    Applies(
        ("--min-replicas", "--target-ongoing-requests"),
        lambda v: v.max_replicas is not None,
        "applies with --max-replicas (autoscaling) only",
    ),
    Applies(
        ("--replicas",), lambda v: v.max_replicas is None, "is a fixed count: with --max-replicas, use --min-replicas"
    ),
    Applies(
        ("--adapter-root", "--max-header-kb"),
        lambda v: not _ray(v),
        "does not apply to --engine ray (adapters are the --adapter catalogue, loaded by the replicas on demand; "
        "Ray's proxy reads the request heads)",
    ),
    Applies(
        ("--load-on-use", "--allow-hub-repo", "--max-adapters"),
        lambda v: not _ray(v),
        "does not apply to --engine ray (replicas load the --adapter catalogue on demand; cap them with "
        "--max-adapters-per-replica)",
    ),
    Applies(
        ("--token",),
        lambda v: not _ray(v) or v.token_all,
        "with --engine ray applies with --token-all only (POST/DELETE /v1/adapters are off there)",
    ),
)
"""Which `sam2-peft serve` flags act with which engine."""
