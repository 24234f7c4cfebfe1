"""Running a command or recipe from the command line: a user's mistake ends it with one `error:` line and status 1,
never a traceback. Shared by `sam2_peft.cli` and the recipes; it loads neither torch nor any other module of the
package."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

USER_ERRORS = (
    ("sam2_peft.models.loading", "Sam2LoadError"),
    ("sam2_peft.data.sources", "DataError"),
    ("sam2_peft.adapters.files", "AdapterMismatchError"),
    ("sam2_peft.adapters.files", "AdapterLoadError"),
    ("sam2_peft.tuners.ptsam.model", "PtsamArchitectureError"),
    ("sam2_peft.training.trainer", "NonFiniteLossError"),
    ("huggingface_hub.errors", "HfHubHTTPError"),
)
"""Errors caused by the user's input (missing files and repos, bad data or settings, mismatched adapters, Hub
refusals, a diverging run), by module and name: a command prints them as one `error:` line, without a traceback.
Named rather than imported so that checking an error never loads torch (an error's module is loaded when it is
raised). `FileNotFoundError` counts too."""

OTHER_RANKS_EXIT_AFTER_S = 20.0
"""How long a non-main process waits, after a user error, for the launcher to stop it (the main process has failed
too and printed the error) before it prints the error itself."""


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is one of `USER_ERRORS` (or a subclass), or a missing file."""
    if isinstance(error, FileNotFoundError):
        return True
    return any(
        isinstance(error, getattr(sys.modules[module], name)) for module, name in USER_ERRORS if module in sys.modules
    )


def check_torchvision() -> None:
    """Exit with one `error:` line when torchvision cannot load into this torch (they come from different builds):
    transformers would otherwise fail much later, as a `ModuleNotFoundError` for some unrelated model class."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return  # not installed: transformers does without it
    except RuntimeError as err:
        import torch

        version = torch.__version__
        build = version.partition("+")[2]
        index = f" --index-url https://download.pytorch.org/whl/{build}" if build else ""
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.exit(
            f"error: torchvision does not fit torch {version} ({cause}): they come from different builds. Install "
            f'both from the same index: pip install --force-reinstall "torch=={version.partition("+")[0]}" '
            f"torchvision{index}"
        )


def run_from_command_line(main: Callable[[], object]) -> None:
    """Run a command or recipe: a user error exits with its message as the last line and status 1, without a
    traceback. In a multi-process run only the main process of each machine prints it (every process meets the same
    error); the others wait for the launcher to stop them once it has printed and exited, so that its line is not
    cut off by their exit. One still running after that wait (its error was its own) prints it with its rank."""
    check_torchvision()
    try:
        main()
    except Exception as error:
        if not is_user_error(error):
            raise
        for stream in (*logging.getLogger().handlers, sys.stdout):  # the error line comes last
            stream.flush()
        rank = os.environ.get("RANK", "0")
        if os.environ.get("LOCAL_RANK", rank) != "0":
            time.sleep(OTHER_RANKS_EXIT_AFTER_S)
            sys.exit(f"error (process {rank}): {error}")
        sys.exit(f"error: {error}")
