"""Adapters and a live server for the serving tests: several adapters of different kinds on one tiny base, and the
real app under uvicorn on a free loopback port (in a thread)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch

from sam2_peft.adapters import LoraMethod, PartialFinetuneMethod, PtsamMethod, TuningMethod
from sam2_peft.models.loading import load_base_model

ADAPTER_KINDS = {
    "lora_a": lambda: LoraMethod("decoder", lora_r=4),
    "lora_b": lambda: LoraMethod("decoder", lora_r=2),
    "lora_enc": lambda: LoraMethod("encoder", lora_r=2),
    "ptsam": lambda: PtsamMethod(num_tokens=4),
    "ptsam_enc": lambda: PtsamMethod(num_tokens=4, encoder_prompts=2),
    "ptsam_classes": lambda: PtsamMethod(num_tokens=4, id2label={"3": "scratch", "7": "dent"}),
    "ptsam_upscaling": lambda: PtsamMethod(num_tokens=4, tune_upscaling=True),
    "partial": lambda: PartialFinetuneMethod({"mask_decoder": 1e-5}),
}


def make_adapter(kind: str, base_path: Path, out_dir: Path, seed: int = 1, scale: float = 0.2) -> Path:
    """Save an adapter of `kind` (a key of ADAPTER_KINDS) for the base at `base_path`, with random non-zero
    trainable weights (so that every adapter changes the masks differently)."""
    model, _ = load_base_model(str(base_path))
    method: TuningMethod = ADAPTER_KINDS[kind]()
    model = method.prepare(model, str(base_path))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    method.save(model, out_dir, str(base_path))
    return out_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """The app under a real uvicorn server on 127.0.0.1:`port`, in a daemon thread; `stop()` shuts it down."""

    def __init__(self, app, port: int | None = None) -> None:
        import uvicorn

        from sam2_peft.serving.app import uvicorn_config

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        config = uvicorn_config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
