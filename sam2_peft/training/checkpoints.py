"""Training checkpoints: written atomically, only trainable weights, best-k retention, and resume lookup.

A checkpoint is a folder `checkpoints/step-N/` holding Accelerate's state (trainable weights, optimizer, scheduler,
grad scaler, random states of every process), the adapter in its published form (`adapter/`), and
`trainer_state.json` (step, epoch, validation metrics). It is written under a temporary name and renamed once
complete, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator
from torch import nn

from ..io import atomic_write_json

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Progress of a run, saved with each checkpoint."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (skipped when resuming mid-epoch)."""
    metrics: dict[str, float] = field(default_factory=dict)
    base_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, directory: Path) -> TrainerState:
        return cls(**json.loads((directory / STATE_FILE).read_text()))


def only_trainable_weights(model: nn.Module):
    """An Accelerate save-state hook keeping only parameters that train (a checkpoint stays adapter-sized)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}

    def hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        for state in weights:
            for key in [k for k in state if k.removeprefix("module.") not in trainable]:
                del state[key]

    return hook


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()
    ]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, root: Path) -> Path:
    """The checkpoint folder that `resume` names (`latest` or a path); raises with what was looked for."""
    if resume == "latest":
        found = checkpoint_dirs(root)
        if not found:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint in '{root}'.")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"--resume '{resume}' is not a checkpoint folder (no {STATE_FILE}).")
    return path


def save_checkpoint(accelerator: Accelerator, root: Path, state: TrainerState, save_adapter) -> Path:
    """Write `root/step-N` atomically on every process; `save_adapter(folder)` writes the published adapter."""
    final = root / f"step-{state.global_step}"
    staging = root / f".tmp-step-{state.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        save_adapter(staging / "adapter")
        atomic_write_json(staging / STATE_FILE, asdict(state))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(root: Path, metric: str, keep_best: int) -> list[Path]:
    """Delete checkpoints that are neither among the best `keep_best` by `metric` nor the latest. Returns the kept."""
    found = checkpoint_dirs(root)
    if not found:
        return []

    def score(path: Path) -> float:
        value = TrainerState.load(path).metrics.get(metric)
        return float("-inf") if value is None or value != value else value

    best = sorted(found, key=score, reverse=True)[:keep_best]
    keep = set(best) | {found[-1]}
    for path in found:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
    return [p for p in found if p in keep]
