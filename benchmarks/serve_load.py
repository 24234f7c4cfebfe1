"""Bounded load test of `sam2-peft serve` on loopback: what the embedding cache, resident adapters and
micro-batching buy.

```bash
PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/serve_load.py --rounds 3 --requests 48 --max-seconds 20
```
The real app runs under uvicorn in a thread of this process on 127.0.0.1; clients are httpx threads of the same
process (so client work shares the CPU with the server: absolute numbers are a floor). Base: `compact-synthetic`
with four decoder LoRA adapters made on the spot (random non-zero weights: speed does not depend on training).
Variants, interleaved A B C ... in every round (so drift hits all alike), each bounded by `--requests` and
`--max-seconds`:

- `first image`: every request sends a new image inline (encode + decode); `repeated image`: one uploaded image
  (embedding from the cache, decode only); sequential client, one adapter.
- `4 adapters round-robin` against `repeated image` (one adapter): sequential client.
- `N clients, batching off` (`--max-batch 1`) vs `N clients, batching on` (the default: batches form while a decode
  runs, no added wait) for N in `--clients` (1, 4, 16): concurrent clients on one image and adapter; `shared` is the
  fraction of the variant's requests decoded together with at least one other.

Writes `benchmarks/results/serve_load.json` and prints a markdown table (medians over rounds, min-max of req/s).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from sam2_peft.adapters import LoraMethod
from sam2_peft.models.loading import load_base_model
from sam2_peft.serving.app import ServeConfig, create_app, uvicorn_config

BASE = "compact-synthetic"
BOX = [40, 30, 200, 180]


def make_adapters(folder: Path, count: int) -> list[tuple[str, str]]:
    adapters = []
    for index in range(count):
        model, _ = load_base_model(BASE)
        method = LoraMethod("decoder", lora_r=8)
        model = method.prepare(model, BASE)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        method.save(model, folder / f"lora{index}", BASE)
        adapters.append((f"lora{index}", str(folder / f"lora{index}")))
    return adapters


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 80, (240, 320, 3), dtype=np.uint8)
    image[30:180, 40:200] = rng.integers(150, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    def __init__(self, app) -> None:
        import socket

        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def run_variant(url: str, bodies, clients: int, requests: int, max_seconds: float) -> dict:
    """Send `requests` requests (from `clients` threads; bodies(i) gives request i) or stop at `max_seconds`."""
    latencies, failures, lock, counter = [], [], threading.Lock(), iter(range(requests))
    deadline = time.monotonic() + max_seconds

    def loop():
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                start = time.perf_counter()
                response = http.post("/v1/segment", json=bodies(index))
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        failures.append(response.status_code)

    start = time.perf_counter()
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ms = sorted(1000 * t for t in latencies)
    return {
        "requests": len(ms),
        "failures": len(failures),
        "rejected_503": failures.count(503),
        "wall_s": wall,
        "req_per_s": len(ms) / wall if wall else 0.0,
        "p50_ms": float(np.percentile(ms, 50)) if ms else None,
        "p95_ms": float(np.percentile(ms, 95)) if ms else None,
        "p99_ms": float(np.percentile(ms, 99)) if ms else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=40, help="requests per variant and round")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time limit per variant and round")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients of the batching variants")
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as folder:
        adapters = make_adapters(Path(folder), 4)
        app = create_app(ServeConfig(model=BASE, adapters=adapters, device="cpu", max_queue=0))
    service = app.state.service
    server = Server(app)
    image_id = httpx.post(f"{server.url}/v1/images", files={"file": ("a.png", png(0), "image/png")}).json()["image_id"]
    fresh = iter(range(1, 10**6))
    inline = [base64.b64encode(png(next(fresh))).decode() for _ in range(args.requests * args.rounds)]
    inline_index = iter(range(len(inline)))
    repeated = {"image_id": image_id, "adapter": "lora0", "boxes": [BOX]}
    names = [name for name, _ in adapters]

    batcher = service.batcher

    def run_with(max_batch, clients, bodies):
        batcher.max_items = max_batch
        before = (batcher.items, batcher.shared)
        result = run_variant(server.url, bodies, clients, args.requests, args.max_seconds)
        items, shared = batcher.items - before[0], batcher.shared - before[1]
        result.update(decoded=items, shared=shared / items if items else 0.0)
        return result

    def concurrent(max_batch, clients):
        return lambda: run_with(max_batch, clients, lambda i: repeated)

    def sequential(bodies):
        return lambda: run_with(1, 1, bodies)

    def first_image():
        bodies = lambda i: {"image": inline[next(inline_index)], "adapter": "lora0", "boxes": [BOX]}  # noqa: E731
        return run_with(1, 1, bodies)

    variants = {
        "first image (encode + decode)": first_image,
        "repeated image (cached embedding)": sequential(lambda i: repeated),
        "4 adapters round-robin": sequential(lambda i: {**repeated, "adapter": names[i % 4]}),
    }
    for clients in [int(c) for c in args.clients.split(",")]:
        variants[f"{clients} clients, batching off"] = concurrent(1, clients)
        variants[f"{clients} clients, batching on"] = concurrent(64, clients)
    run_variant(server.url, lambda i: repeated, 1, 5, 10)  # warm-up
    results = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, variant in variants.items():
            results[name].append(variant())
    load = os.getloadavg()
    server.stop()
    summary = {}
    for name, rounds in results.items():
        rates = [r["req_per_s"] for r in rounds]
        summary[name] = {
            "req_per_s": statistics.median(rates),
            "req_per_s_min": min(rates),
            "req_per_s_max": max(rates),
            "p50_ms": statistics.median(r["p50_ms"] for r in rounds),
            "p95_ms": statistics.median(r["p95_ms"] for r in rounds),
            "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
            "shared": sum(r["shared"] * r["decoded"] for r in rounds) / max(1, sum(r["decoded"] for r in rounds)),
            "failures": sum(r["failures"] for r in rounds),
            "requests": sum(r["requests"] for r in rounds),
        }
    record = {
        "base": BASE,
        "rounds": args.rounds,
        "requests_per_variant": args.requests,
        "max_seconds_per_variant": args.max_seconds,
        "threads": torch.get_num_threads(),
        "load_average_1_5_15": load,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "batches": batcher.batches,
        "batched_items": batcher.items,
        "shared_items": batcher.shared,
        "summary": summary,
        "rounds_raw": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"load average (1, 5, 15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| variant | req/s (median, min-max) | shared decode | p50 ms | p95 ms | p99 ms | failures |")
    print("|---|---|---|---|---|---|---|")
    for name, row in summary.items():
        print(
            f"| {name} | {row['req_per_s']:.1f} ({row['req_per_s_min']:.1f}-{row['req_per_s_max']:.1f}) | "
            f"{100 * row['shared']:.0f}% | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['p99_ms']:.1f} | "
            f"{row['failures']} |"
        )


if __name__ == "__main__":
    main()
