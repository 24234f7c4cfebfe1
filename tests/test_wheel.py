"""A wheel installed in a fresh virtual environment, run from outside the repository, trains (issue #13): the recipes
ship inside the package, and the command line answers `--help` and typos before importing torch.

The new environment gets this environment's dependencies through a `.pth` path line (no download), but not its
editable install of sam2_peft: a path line adds the folder without running that folder's `.pth` files, so
`sam2_peft` can only come from the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> dict:
    """A venv holding only the sam2-peft wheel (dependencies reached through a path line); and a folder to run in."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = work.glob("sam2_peft-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    run_dir = work / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    return {"python": python, "bin": venv / "bin", "cwd": run_dir, "env": env}


def _run(wheel_env: dict, *command, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command],
        cwd=wheel_env["cwd"],
        env=wheel_env["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_sam2_peft_comes_from_the_wheel(wheel_env):
    result = _run(wheel_env, wheel_env["python"], "-c", "import sam2_peft; print(sam2_peft.__file__)")
    assert result.returncode == 0, result.stderr
    assert str(wheel_env["bin"].parent) in result.stdout and str(ROOT) not in result.stdout


def test_help_and_a_typo_answer_before_torch_is_imported(wheel_env):
    cli = wheel_env["bin"] / "sam2-peft"
    for command in ([cli, "--help"], [cli, "train", "lora", "--help"], [cli, "train", "lora", "--lerning-rate", "1"]):
        started = time.perf_counter()
        result = _run(wheel_env, *command)
        seconds = time.perf_counter() - started
        assert result.returncode in (0, 2), result.stderr
        assert seconds < 10, f"{command[1:]} took {seconds:.1f} s"  # a loose bound on a shared machine
    assert "--lerning-rate: did you mean --lr?" in result.stderr
    probe = (
        "import sys; from sam2_peft.recipes import lora; "
        "from sam2_peft.recipes.arguments import parse_recipe_arguments; "
        "parse_recipe_arguments('t', lora.LoraOptions, argv=[]); print('torch' in sys.modules)"
    )
    assert _run(wheel_env, wheel_env["python"], "-c", probe).stdout.strip() == "False"


def test_train_lora_from_the_wheel_outside_the_repository(wheel_env):
    flags = ["--model", "compact-synthetic", "--max-steps", "2", "--report-to", "none", "--num-panels", "1"]
    result = _run(wheel_env, wheel_env["bin"] / "sam2-peft", "train", "lora", "--output-dir", "cli-run", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((wheel_env["cwd"] / "cli-run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["method"] == "lora"
    assert (wheel_env["cwd"] / "cli-run" / "adapter_model.safetensors").exists()


def test_accelerate_launch_runs_a_recipe_module_from_the_wheel(wheel_env):
    launch = [wheel_env["python"], "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sam2_peft.recipes.ptsam"]
    flags = ["--model", "compact-synthetic", "--max-steps", "1", "--report-to", "none", "--num-panels", "1"]
    result = _run(wheel_env, *launch, "--output-dir", "launch-run", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((wheel_env["cwd"] / "launch-run" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PTSAM"
