"""Training checkpoints: written atomically, only trainable weights, best-k retention, and resume lookup.

A checkpoint is a folder `checkpoints/step-N/` holding Accelerate's state (trainable weights, optimizer, scheduler,
grad scaler, random states of every process), the adapter in its published form (`adapter/`),
`trainer_state.json` (step, epoch, validation metrics) and `run_settings.json` (method, data and optimisation
settings, compared on resume). It is written under a temporary name and renamed once complete, so a crash never
leaves a half-written checkpoint behind.

The output folder itself is claimed by one run at a time (`claim_output_dir`): a lock file held for the run's life,
and a refusal to start over a previous run's results unless told to resume or overwrite.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from accelerate import Accelerator
from torch import nn

from ..data.sources import DataError
from ..io import OutputDirError, atomic_write_json, check_output_dir
from .disk import reporting_full_disk

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
SETTINGS_FILE = "run_settings.json"
LOCK_FILE = ".sam2_peft.lock"
RUN_MARKERS = (
    "checkpoints",
    "metrics.json",
    "adapter_model.safetensors",
    "partial_model.safetensors",
    "model.safetensors",
)
"""What in an output folder shows that a run already wrote there."""
OVERWRITTEN = ("checkpoints", "panels", "metrics.json", "base_predictions.npz")
"""A previous run's outputs that `--overwrite` deletes (the adapter files are replaced when the new run ends)."""
_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunFolderError(DataError):
    """The output folder cannot take this run (not writable, in use, holds another run); the message says why."""


class ResumeMismatchError(DataError):
    """The checkpoint to resume was trained with other settings than the current run's."""


@dataclass
class TrainerState:
    """Progress of a run, saved with each checkpoint."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (skipped when resuming mid-epoch)."""
    metrics: dict[str, float] = field(default_factory=dict)
    base_metrics: dict[str, float] = field(default_factory=dict)
    base_per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    """The base model's metrics of each validation image (to find the images fine-tuning helped and hurt most)."""
    history: list[dict] = field(default_factory=list)
    best_step: int | None = None
    """The step of the fine-tuned evaluation that scored best so far by the task's `metric_for_best` (the earliest of
    equal ones; the base model's step-0 evaluation is not a candidate): the adapter `--load-best` keeps."""
    best_value: float | None = None
    """That evaluation's `metric_for_best`."""

    def note_evaluation(self, metric: str) -> bool:
        """Make the current step the best when its `metrics[metric]` beats `best_value` (a NaN never does); returns
        whether it did."""
        value = self.metrics.get(metric)
        if value is None or value != value or (self.best_value is not None and value <= self.best_value):
            return False
        self.best_step, self.best_value = self.global_step, float(value)
        return True

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


ACCELERATE_CHECKPOINT_LOGGERS = ("accelerate.accelerator", "accelerate.checkpointing")
"""Accelerate's loggers that print an INFO line for each file of a checkpoint saved or loaded."""


@contextlib.contextmanager
def quiet_accelerate_checkpointing() -> Iterator[None]:
    """Keep only warnings and errors of Accelerate's `save_state`/`load_state` (7 INFO lines a checkpoint, which
    break the progress bar); the trainer logs one line of its own."""
    loggers = [logging.getLogger(name) for name in ACCELERATE_CHECKPOINT_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def save_checkpoint(
    accelerator: Accelerator, root: Path, state: TrainerState, save_adapter, settings: dict | None = None
) -> Path:
    """Write `root/step-N` atomically on every process; `save_adapter(folder)` writes the published adapter and
    `settings` (what a resume must match, see `check_run_settings`) goes to `run_settings.json`.

    A failed write leaves the checkpoints already there as they were (the partial one is deleted, freeing its
    space); a full disk raises `DiskFullError` naming the folder and the last complete checkpoint."""
    final = root / f"step-{state.global_step}"
    staging = root / f".tmp-step-{state.global_step}"
    last = checkpoint_dirs(root)
    fix = (
        f"choose another --output-dir, then resume from the last complete checkpoint ({last[-1]})"
        if last
        else "choose another --output-dir"
    )
    try:
        with reporting_full_disk(root, f"the checkpoint of step {state.global_step}", fix):
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            accelerator.wait_for_everyone()
            with quiet_accelerate_checkpointing():
                accelerator.save_state(str(staging))
            if accelerator.is_main_process:
                save_adapter(staging / "adapter")
                atomic_write_json(staging / STATE_FILE, asdict(state))
                if settings is not None:
                    atomic_write_json(staging / SETTINGS_FILE, settings)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        _replace_dir(staging, final)
    accelerator.wait_for_everyone()
    return final


def _replace_dir(source: Path, target: Path) -> None:
    """Rename `source` to `target`; an existing `target` is first moved aside, so a crash leaves one of them whole."""
    old = target.with_name(f".old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    source.rename(target)
    shutil.rmtree(old, ignore_errors=True)


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


def claim_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> IO:
    """Lock `output_dir` for this run and check that it may write there; returns the open lock file (keep it open
    for the run: the lock ends when it is closed or the process dies, so a killed run never blocks a later one).

    Raises `RunFolderError` when the path is a file or not writable, when another run holds the lock (naming its
    pid), or when the folder holds a previous run and neither `resume` nor `overwrite` is set. With `overwrite`,
    the previous run's checkpoints, metrics, base predictions and panels are deleted (so that pruning and a later
    `--resume` never mix the two runs).
    """
    check_output_dir_before_run(output_dir, resume, overwrite)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = open(output_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held open for the whole run)
    except OSError as error:
        raise RunFolderError(
            f"--output-dir '{output_dir}' cannot be written ({error.strerror}): choose a writable --output-dir."
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        _refuse_if_locked(output_dir)
        raise RunFolderError(f"--output-dir '{output_dir}' is in use by another training run: try again.") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    # A previous run without --resume or --overwrite was refused above; under the lock no other run can start here.
    found = [name for name in RUN_MARKERS if _holds(output_dir / name)]
    if found and overwrite:
        logger.warning("--overwrite: deleting the previous run's %s in %s.", ", ".join(OVERWRITTEN), output_dir)
        for name in OVERWRITTEN:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return lock


def check_output_dir_before_run(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """The checks of `claim_output_dir` that change nothing on disk, for a recipe to run before it loads a model:
    raises `RunFolderError` for conflicting flags, a path that cannot be a writable folder, or a folder holding a
    previous run without `resume` or `overwrite`."""
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in --output-dir and --overwrite deletes it: pass only one.")
    if output_dir.exists() and not output_dir.is_dir():
        raise RunFolderError(f"--output-dir '{output_dir}' is a file, not a folder: choose another --output-dir.")
    try:
        check_output_dir(output_dir, "--output-dir")
    except OutputDirError as error:
        raise RunFolderError(str(error)) from None
    _refuse_if_locked(output_dir)
    found = [name for name in RUN_MARKERS if _holds(output_dir / name)]
    if found and not (resume or overwrite):
        raise _previous_run_error(output_dir, found)


def _previous_run_error(output_dir: Path, found: list[str]) -> RunFolderError:
    return RunFolderError(
        f"--output-dir '{output_dir}' holds a previous run ({', '.join(found)}): pass --resume to continue it, "
        "--overwrite to replace it, or choose another --output-dir."
    )


def _refuse_if_locked(output_dir: Path) -> None:
    """Raise `RunFolderError` naming the pid of the run that holds `output_dir`'s lock, if one does."""
    try:
        lock = open(output_dir / LOCK_FILE)  # noqa: SIM115
    except OSError:
        return  # no lock file: no run has claimed the folder
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holder = lock.read().strip() or "unknown"
    raise RunFolderError(
        f"--output-dir '{output_dir}' is in use by another training run (pid {holder}): wait for it to end, or "
        "choose another --output-dir."
    )


def _holds(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


RUN_LENGTH_SETTINGS = ("training.max_steps", "training.epochs")
"""Settings a resume may change (training a finished run for longer), with a warning."""


def check_run_settings(checkpoint: Path, current: dict) -> None:
    """Raise `ResumeMismatchError` listing every setting that differs between `checkpoint` and the current run;
    a changed run length (`RUN_LENGTH_SETTINGS`) only warns.

    Checkpoints written before settings were saved cannot be checked: a warning says so.
    """
    path = checkpoint / SETTINGS_FILE
    if not path.is_file():
        logger.warning("%s has no %s: cannot check that the run resumes with the same settings.", checkpoint, path.name)
        return
    saved, now = _flatten(json.loads(path.read_text())), _flatten(_as_json(current))
    differing = [key for key in sorted(saved.keys() | now.keys()) if saved.get(key) != now.get(key)]

    def describe(key: str) -> str:
        return f"{key} {saved.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}"

    longer = [describe(key) for key in differing if key in RUN_LENGTH_SETTINGS]
    if longer:
        logger.warning(
            "Resuming '%s' with another run length (%s): the learning-rate schedule is rebuilt for the new length, "
            "so the run differs from one started with it.",
            checkpoint,
            "; ".join(longer),
        )
    changed = [describe(key) for key in differing if key not in RUN_LENGTH_SETTINGS]
    if changed:
        raise ResumeMismatchError(
            f"resuming '{checkpoint}' with changed settings: {'; '.join(changed)}. Resume with the checkpoint's "
            "settings, or start a new run (--overwrite, or another --output-dir)."
        )


def _as_json(data: dict) -> dict:
    """`data` as it reads back from JSON (tuples become lists, other objects strings), so saved and current compare."""
    return json.loads(json.dumps(data, default=str))


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
