"""The output folder belongs to one run: a lock, no silent overwrite of a finished run, resume only with the same
settings, loud random-state loss, and one-line errors for folders that cannot be used."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sam2_peft.recipes.lora import main as lora_recipe
from sam2_peft.training import tasks as tasks_module
from sam2_peft.training.checkpoints import ResumeMismatchError, RunFolderError
from tests.recipe_helpers import error_line, lora_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_second_run_into_a_finished_run_is_refused_unless_resumed_or_overwritten(
    saved_tiny_model, folder_dataset, tmp_path, capsys
):
    out = tmp_path / "run"
    lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "4", "--eval-every", "2"))
    first_adapter = (out / "adapter_model.safetensors").read_bytes()
    message = error_line(capsys, lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "2"))
    assert str(out) in message and "--resume" in message and "--overwrite" in message
    assert (out / "adapter_model.safetensors").read_bytes() == first_adapter
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]

    # --overwrite starts afresh: none of the old run's checkpoints survive to be pruned into or resumed from.
    lora_recipe(
        lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "3", "--eval-every", "3", "--overwrite")
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def test_resume_with_changed_settings_names_what_differs(saved_tiny_model, folder_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    args = lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "2", "--eval-every", "1")
    lora_recipe(args)
    with pytest.raises(ResumeMismatchError, match=r"training\.lr 0\.001 -> 0\.01"):
        lora_recipe(args + ["--resume", "--lr", "1e-2"])
    message = error_line(capsys, args + ["--resume", "--lora-r", "8"])
    assert "method.lora_r 4 -> 8" in message and "step-2" in message
    lora_recipe(args + ["--resume"])  # the same settings resume (here: nothing left to train)
    assert "pass only one" in error_line(capsys, args + ["--resume", "--overwrite"])


def test_resume_may_train_a_run_for_longer_with_a_warning(saved_tiny_model, folder_dataset, tmp_path, caplog):
    out = tmp_path / "run"
    lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "2", "--eval-every", "1"))
    with caplog.at_level(logging.WARNING):
        lora_recipe(
            lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "3", "--eval-every", "1", "--resume")
        )
    assert "training.max_steps 2 -> 3" in caplog.text and "schedule is rebuilt" in caplog.text
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_a_second_concurrent_run_stops_naming_the_first_and_a_killed_run_does_not_block(
    saved_tiny_model, folder_dataset, tmp_path
):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from sam2_peft.training.checkpoints import claim_output_dir; "
         "lock = claim_output_dir(Path(sys.argv[1]), False, False); print('locked', flush=True); time.sleep(120)",
         str(out)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"in use by another training run \(pid {holder.pid}\)"):
            lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "1"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "1"))  # the killed run's lock is gone
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def test_unusable_output_folders_are_one_line_errors(saved_tiny_model, folder_dataset, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    message = error_line(capsys, lora_args(saved_tiny_model, folder_dataset, a_file, "--max-steps", "1"))
    assert f"--output-dir '{a_file}' is a file" in message
    message = error_line(capsys, lora_args(saved_tiny_model, folder_dataset, a_file / "run", "--max-steps", "1"))
    assert f"--output-dir '{a_file / 'run'}' cannot be a folder: '{a_file}' is a file" in message

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if _writable(read_only):  # root ignores permissions: use a folder the kernel keeps read-only
        read_only = Path("/sys/kernel")
        if not read_only.is_dir() or _writable(read_only):
            pytest.skip("no read-only folder available to this user")
    message = error_line(capsys, lora_args(saved_tiny_model, folder_dataset, read_only, "--max-steps", "1"))
    assert f"'{read_only}'" in message and "--output-dir" in message and "writ" in message


@pytest.mark.slow
def test_five_non_finite_losses_are_a_one_line_error(saved_tiny_model, folder_dataset, tmp_path, capsys, monkeypatch):
    real_loss = tasks_module.sam2_loss

    def always_nan(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(tasks_module, "sam2_loss", always_nan)
    message = error_line(capsys, lora_args(saved_tiny_model, folder_dataset, tmp_path / "nan", "--max-steps", "10"))
    assert "5 consecutive non-finite losses" in message and "--lr" in message


class _NotAllowedInWeightsOnly:
    """A pickled object that `torch.load(weights_only=True)` refuses."""


@pytest.mark.slow
def test_unreadable_random_states_are_a_warning_naming_the_file(saved_tiny_model, folder_dataset, tmp_path, caplog):
    out = tmp_path / "run"
    args = lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "2", "--eval-every", "1")
    lora_recipe(args)
    rng_file = out / "checkpoints" / "step-1" / "random_states_0.pkl"
    torch.save({"step": 0, "random_state": _NotAllowedInWeightsOnly()}, rng_file)
    with caplog.at_level(logging.WARNING):
        lora_recipe(args + ["--resume", str(out / "checkpoints" / "step-1")])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(rng_file) in w and "random" in w and "differ" in w for w in warnings), warnings


@pytest.mark.slow
def test_under_two_processes_only_the_main_one_prints_the_error(saved_tiny_model, folder_dataset, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "recipes" / "lora_decoder.py"), *lora_args(saved_tiny_model, folder_dataset, a_file, "--max-steps", "1"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: --output-dir '{a_file}' is a file, not a folder: choose another --output-dir."]
    ours = result.stderr[: result.stderr.index(errors[0])]
    assert "Traceback" not in ours  # what follows is the launcher's own report of the failed child
    assert "rank      : 0 (local_rank: 0)\n  exitcode  : 1" in result.stderr  # the main process is the root cause


def test_paths_are_checked_before_the_model_loads(saved_tiny_model, folder_dataset, tmp_path, capsys, monkeypatch):
    from sam2_peft.recipes import runner

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the paths were checked")

    monkeypatch.setattr(runner, "load_base_model", no_model)
    message = error_line(
        capsys, lora_args(saved_tiny_model, tmp_path / "no-such-data", tmp_path / "run", "--max-steps", "1")
    )
    assert "--data" in message and "no-such-data" in message
    finished = tmp_path / "finished"
    (finished / "checkpoints" / "step-1").mkdir(parents=True)
    (finished / "metrics.json").write_text("{}")
    message = error_line(capsys, lora_args(saved_tiny_model, folder_dataset, finished, "--max-steps", "1"))
    assert "holds a previous run" in message and "--overwrite" in message
