"""The command line's own behaviour around any command: the torch/torchvision check at start, who prints a user
error in a multi-process run, and the --device flag."""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder

import pytest
import torch

from sam2_peft import cli, commandline
from sam2_peft.cli import main
from sam2_peft.commandline import run_from_command_line


class BrokenTorchvision(MetaPathFinder):
    """Imports torchvision as a torchvision built for another torch does."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


@pytest.mark.parametrize(
    "version,index", [("2.9.0+cu128", " --index-url https://download.pytorch.org/whl/cu128"), ("2.9.0", "")]
)
def test_a_torchvision_of_another_build_is_one_error_line(version, index, monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenTorchvision(), *sys.meta_path])
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")])
    message = str(exit_info.value.code)
    assert message == (
        f"error: torchvision does not fit torch {version} (operator torchvision::nms does not exist): they come from "
        f'different builds. Install both from the same index: pip install --force-reinstall "torch==2.9.0" '
        f"torchvision{index}"
    )


def fail() -> None:
    raise FileNotFoundError("no such file 'x'")


@pytest.mark.parametrize(
    "local_rank,rank,expected",
    [(None, None, "error: no such file 'x'"), ("0", "3", "error: no such file 'x'"), ("1", "1", None)],
    ids=["one-process", "main-of-second-machine", "other-process"],
)
def test_only_the_main_process_of_a_machine_prints_a_user_error(local_rank, rank, expected, monkeypatch):
    for name, value in (("LOCAL_RANK", local_rank), ("RANK", rank)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    waits = []
    monkeypatch.setattr(commandline.time, "sleep", waits.append)
    with pytest.raises(SystemExit) as exit_info:
        run_from_command_line(fail)
    if expected is None:  # waits for the launcher to stop it; only an error of its own is printed, with its rank
        assert waits == [commandline.OTHER_RANKS_EXIT_AFTER_S]
        assert exit_info.value.code == "error (process 1): no such file 'x'"
    else:
        assert waits == [] and exit_info.value.code == expected


@pytest.mark.parametrize("command", ["predict", "segment-all", "eval", "serve"])
def test_device_help_names_one_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    device = help_text.split("--device DEVICE ", 1)[1].split(" --", 1)[0]
    assert device == "cpu, cuda, cuda:1 ..., or auto: cuda when available (default: auto)"


def test_device_auto_is_none_and_others_pass_through():
    parser = cli._parser("x", "x")
    cli._add_device_argument(parser)
    assert parser.parse_args([]).device is None
    assert parser.parse_args(["--device", "auto"]).device is None
    assert parser.parse_args(["--device", "cuda:1"]).device == "cuda:1"


@pytest.mark.slow  # starts accelerate, then the recipe, in two fresh processes
def test_the_readme_command_ends_with_the_error_line_under_accelerate_launch(tmp_path):
    """The README's first command (`accelerate launch --quiet recipes/lora_decoder.py ...`), given data that does
    not exist: the last line on screen is sam2-peft's `error:` line, not accelerate's traceback."""
    import subprocess
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "lora_decoder.py"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1", str(recipe)]
    command += ["--model", "tiny-random", "--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode != 0
    last = (done.stdout + done.stderr).strip().splitlines()[-1]
    assert last.startswith("error:") and "missing" in last, last
    assert "Traceback" not in done.stderr
