"""Atomic file writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_write_dir(directory: str | os.PathLike, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success move each file in it into `directory` with `os.replace`.

    Each file appears complete or not at all. Files already in `directory` that are not rewritten are kept, except
    the files and folders named in `replaces` (a previous run's outputs), deleted on success just before the move.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
    try:
        yield staging
        remove_outputs(directory, replaces)
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                target = directory / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_outputs(directory: Path, names: Iterable[str]) -> None:
    """Delete the files and folders `names` (an earlier run's outputs) in `directory`, where present."""
    for name in names:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, with the permissions a plain `open` would
    give (mkstemp's own are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~_current_umask())
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    """The process umask (Linux reports it in /proc without changing it; elsewhere it is set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float as None (JSON's null) and numpy/torch scalars as Python numbers.

    Non-finite numbers in what this package writes are missing values (a metric over no object, a loss that was not
    computed); strict JSON has no NaN, and `json.dumps` would otherwise write a bare `NaN` that other readers reject.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return json_safe(value.item())
    return value


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as strict JSON (non-finite numbers become null, see `json_safe`) through a temporary file."""
    text = json.dumps(json_safe(data), indent=2, sort_keys=True, default=str, allow_nan=False)
    atomic_write_text(path, text + "\n")


ADAPTER_VERSIONS_DIR = ".adapter"
"""Hidden folder, beside an adapter's files, that holds its complete versions; `current` links to the live one."""


@contextmanager
def atomic_adapter_dir(directory: str | os.PathLike, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty folder for a complete adapter (sidecar included); on success publish it in `directory` at once.

    An adapter is several files, and a folder that also holds other run files (metrics.json, checkpoints/, panels/)
    cannot be swapped whole, so each adapter file in `directory` is a relative link `name -> .adapter/current/name`
    and `.adapter/current` links to one complete version folder. Publishing is a single `os.replace` of that link:
    readers, and a crash at any point, see the whole old adapter or the whole new one, never a mix. Links to files
    the new version lacks dangle after the swap (they read as absent) and are removed; old versions are deleted.
    Files of an older plain (unlinked) layout named in `replaces`, or by the new version, are first turned into
    links to an identical version, so they too change in the one swap. Other files in `directory` are untouched.
    """
    directory = Path(directory)
    versions = directory / ADAPTER_VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=versions))
    try:
        yield staging
        _publish_adapter(directory, staging, set(replaces))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_adapter(directory: Path, staging: Path, replaces: set[str]) -> None:
    versions = directory / ADAPTER_VERSIONS_DIR
    current = versions / "current"
    names = {path.name for path in staging.iterdir()}
    plain = sorted(
        name for name in names | replaces if (directory / name).is_file() and not (directory / name).is_symlink()
    )
    if plain:  # files of an unlinked layout: move them into the live version first (same content, no visible change)
        if not current.is_symlink():
            legacy = versions / f"v-{uuid.uuid4().hex}"
            legacy.mkdir()
            _replace_link(current, legacy.name)
        for name in plain:
            shutil.copy2(directory / name, current / name)
            _replace_link(directory / name, _link_target(name))
    version = versions / f"v-{uuid.uuid4().hex}"
    os.replace(staging, version)
    for name in sorted(names):
        if not (directory / name).is_symlink():
            _replace_link(directory / name, _link_target(name))
    _replace_link(current, version.name)  # the commit point
    for link in directory.iterdir():
        if link.is_symlink() and os.readlink(link) == _link_target(link.name) and link.name not in names:
            link.unlink()
    for old in versions.iterdir():
        if old.name.startswith("v-") and old != version:
            shutil.rmtree(old, ignore_errors=True)


def _link_target(name: str) -> str:
    return os.path.join(ADAPTER_VERSIONS_DIR, "current", name)


def _replace_link(path: Path, target: str) -> None:
    """Point `path` at `target` in one step (a new link beside it, renamed over it)."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.link")
    os.symlink(target, temp)
    os.replace(temp, path)


class OutputDirError(FileNotFoundError):
    """An output folder cannot be written: it is a file, or the folder is read-only (printed as `error: ...`)."""


def check_output_dir(
    directory: str | os.PathLike, what: str = "OUT_DIR", outputs: Iterable[str] = (), overwrite: bool = False
) -> Path:
    """Check, before any long work starts, that `directory` is (or can be created as) a folder one can write in,
    and, unless `overwrite`, that it holds none of the `outputs` (file and folder names) an earlier run wrote.

    Creates nothing: the folder, or its nearest existing parent, is probed with a temporary folder.
    """
    directory = Path(directory)
    existing = next(path for path in (directory, *directory.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise OutputDirError(
            f"{what} '{directory}' cannot be a folder: '{existing}' is a file. Give a folder path (new or existing)."
        )
    try:
        Path(tempfile.mkdtemp(prefix=".write-check-", dir=existing)).rmdir()
    except OSError as err:
        raise OutputDirError(
            f"Cannot write to {what} '{directory}' ('{existing}' is not writable: {err.strerror or err}). Choose a "
            "folder you can write to, or fix its permissions."
        ) from err
    found = [name for name in outputs if os.path.lexists(directory / name)]
    if found and not overwrite:
        raise OutputDirError(
            f"{what} '{directory}' holds the outputs of an earlier run ({', '.join(found)}): pass --overwrite to "
            f"replace them, or choose another {what}."
        )
    return directory
