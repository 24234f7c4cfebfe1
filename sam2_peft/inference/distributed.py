"""Batch inference over a dataset in several processes (`accelerate launch -m sam2_peft.cli predict ...`): each process
takes a contiguous share of the inputs, writes each image's outputs as soon as they exist, skips those an earlier run
finished (`--resume`, in one process too), and the main process gathers one summary. One process without `--resume`
runs as before: every output appears at the end, together."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..io import atomic_write_dir, atomic_write_json, remove_outputs

DONE_DIR = ".done"
"""`OUT_DIR/.done/<name>.json`: an image's record (what the summary needs) and the files it wrote, written after them,
so that an image is done exactly when its record exists and its files are all there. Files are written whole
(`atomic_write_dir`), so a killed run leaves no half file, and a file without its record is computed again."""

T = TypeVar("T")
Record = dict
"""What one image adds to the summary (JSON-safe), keyed by its file name."""


def several_processes() -> bool:
    """Whether `accelerate launch` started several processes (its WORLD_SIZE), known without initialising anything:
    one process runs as without it (Accelerate's state is left to whoever sets it up, e.g. `eval`'s Accelerator)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Whether this is the process that prints and writes the summary (rank 0, or the only one)."""
    return os.environ.get("RANK", "0") == "0"


def processes():
    """Accelerate's `PartialState`: this process's index, the number of processes, its device. CPU processes
    (`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...`) talk through gloo, as an `Accelerator` would."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def process_device(device: str | None) -> str | None:
    """The device to load a model on: `device`, or under several processes with `--device auto` (None) this
    process's own (`cuda:LOCAL_RANK`, or the CPU), so that each GPU holds one copy."""
    return str(processes().device) if device is None and several_processes() else device


def my_share(items: Sequence[T]) -> list[T]:
    """This process's contiguous share of `items` (shares differ by one item at most): gathered in process order,
    the per-process results come back in the order of `items`. All of them in one process."""
    if not several_processes():
        return list(items)
    with processes().split_between_processes(list(items)) as share:
        return list(share)


def gather_list(part: list) -> list:
    """Every process's `part`, concatenated in process order, on every process."""
    if not several_processes():
        return part
    from accelerate.utils import gather_object

    return gather_object(part)


def gather_dicts(part: dict) -> dict:
    """The union of every process's `part`, in process order, on every process."""
    merged = {}
    for piece in gather_list([part]):
        merged.update(piece)
    return merged


def run_over_images(
    files: Sequence[Path],
    names: dict[Path, str],
    out_dir: str | Path,
    outputs: Sequence[str],
    read: Callable[[list[Path]], Iterable[tuple[Path, np.ndarray]]],
    process: Callable[[Path, np.ndarray, Path], Record],
    finish: Callable[[dict[str, Record], Path], None],
    resume: bool,
) -> dict[str, Record] | None:
    """Run `process(path, image, folder)` (writes the image's files under `folder`, returns its record) on every image
    `read` yields, then `finish(records, folder)` (the summary files) on the main process; returns the records by
    file name, in the order of `files`, on the main process (None on the others).

    One process without `resume`: as before, every file is staged and moved into `out_dir` at the end, replacing
    `outputs` of an earlier run. Otherwise each image's files land in `out_dir` as soon as they exist, then its record
    in `DONE_DIR`; without `resume` the earlier `outputs` are deleted first, with it the images already done are kept
    and the processes share the others."""
    out_dir = Path(out_dir)
    if not resume and not several_processes():
        with atomic_write_dir(out_dir, replaces=(*outputs, DONE_DIR)) as staging:
            records = {path.name: process(path, image, staging) for path, image in read(list(files))}
            finish(records, staging)
        return records
    state = processes()
    if state.is_main_process:  # before any process writes: a killed run's staging folders, or the earlier outputs
        remove_outputs(out_dir, [path.name for path in out_dir.glob(".staging-*")])
        if not resume:
            remove_outputs(out_dir, (*outputs, DONE_DIR))
    state.wait_for_everyone()
    done = {path.name: record for path in files if (record := _done_record(out_dir, names[path])) is not None}
    todo = [path for path in files if path.name not in done]
    state.wait_for_everyone()  # every process has listed the same finished images before any adds one
    if resume and state.is_main_process:
        print(f"{len(done)} image(s) already done in {out_dir} (--resume); {len(todo)} to go", file=sys.stderr)
    mine = {}
    for path, image in read(my_share(todo)):
        with atomic_write_dir(out_dir) as staging:
            mine[path.name] = process(path, image, staging)
            written = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        atomic_write_json(out_dir / DONE_DIR / f"{names[path]}.json", {"files": written, "record": mine[path.name]})
    computed = gather_dicts(mine)
    if not state.is_main_process:
        return None
    found = {**done, **computed}
    records = {path.name: found[path.name] for path in files if path.name in found}
    finish(records, out_dir)
    return records


def _done_record(out_dir: Path, name: str) -> Record | None:
    """The record of an image an earlier run finished, or None (none, unreadable, or some of its files deleted since:
    computed again)."""
    try:
        done = json.loads((out_dir / DONE_DIR / f"{name}.json").read_text())
        return done["record"] if all((out_dir / file).is_file() for file in done["files"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
