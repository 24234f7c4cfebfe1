"""Bounded load test of `sam2-peft serve` on loopback: throughput, latency percentiles, batch sizes, the fraction
of requests that share a decode, rejections, and memory over many requests.

```bash
PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/serve_load.py --rounds 3 --requests 48 --max-seconds 20
```
The real app runs under uvicorn in a thread of this process on 127.0.0.1; clients are httpx threads of the same
process (so client work shares the CPU with the server: absolute numbers are a floor). Base: `compact-synthetic`
with four decoder LoRA adapters made on the spot (random non-zero weights: speed does not depend on training); the
server's defaults (8 model threads) except `--max-queue 0` (no rejections) for the throughput variants.
Variants, interleaved in every round (so drift hits all alike), each bounded by `--requests` (at least 3 per client)
and `--max-seconds`:

- `first image`: every request sends a new image inline (encode + decode); `repeated image`: one uploaded image
  (embedding from the cache, decode only); sequential client, one adapter.
- For each scenario and N in `--clients` (1, 4, 16, 64), `batching off` (`--max-batch 1`) then `batching on` (the
  default: batches form while a decode runs, across images and adapters of one peft tree, no added wait):
  `one image` (one image, one adapter), `many images` (16 images, one adapter), `mixed adapters` (one image, four
  LoRA adapters in turn). `shared` is the fraction of the variant's requests decoded together with at least one
  other, `batch` the mean and largest decode batch (requests).

Then, once: `overload` (64 clients against `--max-queue 8`: how many get 503, how fast, and whether the next request
gets 200), and `soak` (`--soak` requests, 16 clients, many images and mixed adapters: the process's RSS before and
after). Writes `benchmarks/results/serve_load.json` and prints markdown tables (medians over rounds).
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
IMAGES = 16


def rss_mib() -> float:
    """This process's resident memory (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


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
    latencies, failures, refusals, lock, counter = [], [], [], threading.Lock(), iter(range(requests))
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
                        if response.status_code == 503:
                            refusals.append(elapsed)

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
        "rejected_p50_ms": float(np.percentile(refusals, 50) * 1000) if refusals else None,
        "wall_s": wall,
        "req_per_s": len(ms) / wall if wall else 0.0,
        "p50_ms": float(np.percentile(ms, 50)) if ms else None,
        "p95_ms": float(np.percentile(ms, 95)) if ms else None,
        "p99_ms": float(np.percentile(ms, 99)) if ms else None,
    }


def summarize(rounds: list[dict]) -> dict:
    """Medians over rounds (req/s with its min-max), and totals of counts."""
    rates = [r["req_per_s"] for r in rounds]

    def median(key):
        values = [r[key] for r in rounds if r[key] is not None]
        return statistics.median(values) if values else None

    decoded = sum(r["decoded"] for r in rounds)
    return {
        "req_per_s": statistics.median(rates),
        "req_per_s_min": min(rates),
        "req_per_s_max": max(rates),
        **{key: median(key) for key in ("p50_ms", "p95_ms", "p99_ms")},
        "shared": sum(r["shared"] * r["decoded"] for r in rounds) / max(1, decoded),
        "mean_batch": decoded / max(1, sum(r["batches"] for r in rounds)),
        "max_batch": max(r["max_batch"] for r in rounds),
        "rejected_503": sum(r["rejected_503"] for r in rounds),
        "failures": sum(r["failures"] for r in rounds),
        "requests": sum(r["requests"] for r in rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48, help="requests per variant and round (at least 3/client)")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time limit per variant and round")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrent clients of the batching variants")
    parser.add_argument("--soak", type=int, default=5000, help="requests of the memory run (0: skip it)")
    parser.add_argument("--soak-seconds", type=float, default=240.0, help="time limit of the memory run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as folder:
        adapters = make_adapters(Path(folder), 4)
        app = create_app(ServeConfig(model=BASE, adapters=adapters, device=args.device, max_queue=0))
    service, config = app.state.service, app.state.config
    server = Server(app)

    def upload(seed: int) -> str:
        files = {"file": ("a.png", png(seed), "image/png")}
        return httpx.post(f"{server.url}/v1/images", files=files, timeout=60).json()["image_id"]

    image_ids = [upload(seed) for seed in range(IMAGES)]
    fresh = iter(range(IMAGES, 10**6))
    inline = [base64.b64encode(png(next(fresh))).decode() for _ in range(args.requests * args.rounds)]
    inline_index = iter(range(len(inline)))
    names = [name for name, _ in adapters]
    one = {"image_id": image_ids[0], "adapter": names[0], "boxes": [BOX]}
    scenarios = {
        "one image": lambda i: one,
        "many images": lambda i: {**one, "image_id": image_ids[i % IMAGES]},
        "mixed adapters": lambda i: {**one, "adapter": names[i % len(names)]},
    }

    batcher, sizes = service.batcher, []
    recorded = batcher.on_batch
    batcher.on_batch = lambda size: (sizes.append(size), recorded(size))

    def run_with(max_batch, clients, bodies, requests=None, max_seconds=args.max_seconds):
        batcher.max_items = max_batch
        before, sizes[:] = (batcher.items, batcher.shared), []
        requests = requests or max(args.requests, 3 * clients)
        result = run_variant(server.url, bodies, clients, requests, max_seconds)
        items, shared = batcher.items - before[0], batcher.shared - before[1]
        batches = len(sizes) if max_batch > 1 else items  # one batch per item when batching is off
        result.update(decoded=items, shared=shared / items if items else 0.0, batches=batches)
        result["max_batch"] = max(sizes, default=1)
        return result

    variants = {
        "first image (encode + decode)": lambda: run_with(
            1, 1, lambda i: {"image": inline[next(inline_index)], "adapter": names[0], "boxes": [BOX]}
        ),
        "repeated image (cached embedding)": lambda: run_with(1, 1, scenarios["one image"]),
    }
    for scenario, bodies in scenarios.items():
        for clients in [int(c) for c in args.clients.split(",")]:
            for mode, max_batch in (("off", 1), ("on", 64)):
                name = f"{scenario}, {clients} clients, batching {mode}"
                variants[name] = lambda mb=max_batch, c=clients, b=bodies: run_with(mb, c, b)
    run_variant(server.url, scenarios["one image"], 1, 5, 10)  # warm-up
    results = {name: [] for name in variants}
    started = time.monotonic()
    for _ in range(args.rounds):
        for name, variant in variants.items():
            results[name].append(variant())
    load = os.getloadavg()
    print(f"rounds took {time.monotonic() - started:.0f} s", flush=True)

    # Overload: a bounded queue answers 503 at once; the next request after the burst gets 200.
    config.max_queue = 8
    overload = run_with(64, 64, scenarios["many images"], requests=256)
    config.max_queue = 0
    overload["next_status"] = httpx.post(f"{server.url}/v1/segment", json=one, timeout=60).status_code

    soak = None
    if args.soak:
        mixed = lambda i: {**one, "image_id": image_ids[i % IMAGES], "adapter": names[i % len(names)]}  # noqa: E731
        before = rss_mib()
        soak = run_with(64, 16, mixed, requests=args.soak, max_seconds=args.soak_seconds)
        soak.update(rss_before_mib=before, rss_after_mib=rss_mib())
    server.stop()
    summary = {name: summarize(rounds) for name, rounds in results.items()}
    record = {
        "base": BASE,
        "device": args.device,
        "rounds": args.rounds,
        "requests_per_variant": args.requests,
        "max_seconds_per_variant": args.max_seconds,
        "threads": torch.get_num_threads(),
        "load_average_1_5_15": load,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "summary": summary,
        "overload": overload,
        "soak": soak,
        "rounds_raw": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"load average (1, 5, 15 min) after the rounds: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| variant | req/s (median, min-max) | shared decode | batch mean / max | p50 ms | p95 ms | p99 ms | 503 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in summary.items():
        print(
            f"| {name} | {row['req_per_s']:.1f} ({row['req_per_s_min']:.1f}-{row['req_per_s_max']:.1f}) | "
            f"{100 * row['shared']:.0f}% | {row['mean_batch']:.1f} / {row['max_batch']} | {row['p50_ms']:.1f} | "
            f"{row['p95_ms']:.1f} | {row['p99_ms']:.1f} | {row['rejected_503']} |"
        )
    print(
        f"overload (64 clients, --max-queue 8, 256 requests): {overload['requests']} answered 200, "
        f"{overload['rejected_503']} got 503 (median {overload['rejected_p50_ms'] or 0:.1f} ms), next request: "
        f"{overload['next_status']}"
    )
    if soak:
        print(
            f"soak ({soak['requests']} requests answered, {soak['failures']} failed, {soak['wall_s']:.0f} s): RSS "
            f"{soak['rss_before_mib']:.0f} -> {soak['rss_after_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
