"""A full disk, recognised in the errors the writers raise, and reported as one line naming the folder and the fix.

What a full disk (or quota) raises, measured on a full tmpfs: `open().write` and `os` calls an `OSError` with errno
ENOSPC (EDQUOT for a quota); `torch.save` a `RuntimeError` "[enforce fail at inline_container.cc] . unexpected pos
576 vs 534" (PyTorch's zip writer, which drops the errno); safetensors' `save_file` a `SafetensorError` "Error while
serializing: I/O error: No space left on device (os error 28)".
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

from ..data.sources import DataError

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_DISK_MESSAGES = ("unexpected pos", "No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
"""Texts of the errors that carry no errno: PyTorch's zip writer and safetensors (see the module docstring)."""


class DiskFullError(DataError):
    """A folder of the run ran out of space (the message names it and the fix)."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is what a write to a full disk raises."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS:
            return True
        if not isinstance(error, OSError) and any(text in str(error) for text in FULL_DISK_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def reporting_full_disk(folder: str | Path, what: str, fix: str) -> Iterator[None]:
    """Turn a full-disk error raised inside into a `DiskFullError`: "the disk of '<folder>' is full: <what> could not
    be written. Free space there or <fix>." Other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error) or isinstance(error, DiskFullError):
            raise
        raise DiskFullError(
            f"the disk of '{folder}' is full ({_first_line(error)}): {what} could not be written. Free space there "
            f"or {fix}."
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
