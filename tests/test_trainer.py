"""The trainer end to end on tiny models: outputs, plain-peft reload, resume, non-finite losses, 2-process DDP."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Sam2Model

from sam2_peft.recipes.lora import main as lora_recipe
from sam2_peft.training import tasks as tasks_module
from sam2_peft.training.trainer import NonFiniteLossError, Trainer
from tests.recipe_helpers import lora_args

ROOT = Path(__file__).resolve().parents[1]


def _adapter(path: Path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


def test_recipe_end_to_end_outputs_and_plain_peft_reload(saved_tiny_model, folder_dataset, tmp_path, monkeypatch):
    image = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[[20.0, 20, 80, 90]]])

    def masks(model) -> torch.Tensor:
        with torch.no_grad():
            return model(pixel_values=image, input_boxes=box, multimask_output=False).pred_masks

    evaluated = []  # the probe's masks from the model each validation scores: the last is the one reported
    evaluate = Trainer.evaluate

    def recording_evaluate(self, *args, **kwargs):
        sam = self.accelerator.unwrap_model(self.wrapped).sam
        training = sam.training
        evaluated.append(masks(sam.eval()))
        sam.train(training)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", recording_evaluate)
    out = tmp_path / "run"
    flags = ("--max-steps", "4", "--eval-every", "2", "--no-load-best")  # the last weights: step 4's
    result = lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, *flags))
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "training_config.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("iou", "dice", "boundary_iou", "pixel_accuracy"):
        assert 0 <= metrics["base"][key] <= 1 and 0 <= metrics["fine_tuned"][key] <= 1
    assert metrics["steps"] == 4 and metrics["kept_step"] == 4 and metrics["trainable_parameters"] > 0
    assert metrics["fine_tuned"] == result["fine_tuned"]
    assert len(metrics["per_image"]) == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    # One panel image plus the worst Dice change if an image's Dice went down and the best if one's went up.
    panels = sorted((out / "panels" / "final").glob("*.png"))
    changes = [scores["dice"] - metrics["base_per_image"][i]["dice"] for i, scores in metrics["per_image"].items()]
    expected = [name for name, shown in (("best", max(changes) > 0), ("worst", min(changes) < 0)) if shown]
    assert len(panels) == 1 + len(expected) and all(p.stat().st_size > 1000 for p in panels)
    assert [p.name.split("-")[0] for p in panels if "-dice-change-" in p.name] == expected
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(saved_tiny_model)

    # Plain peft + transformers reproduce the masks the trainer evaluated at the end.
    model = PeftModel.from_pretrained(Sam2Model.from_pretrained(saved_tiny_model), out).eval()
    adapted = masks(model)
    with model.disable_adapter():
        assert not torch.allclose(adapted, masks(model))  # the adapter changed something
    torch.testing.assert_close(adapted, evaluated[-1])
    trained = load_file(str(out / "checkpoints" / "step-4" / "adapter" / "adapter_model.safetensors"))
    for key, value in _adapter(out).items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)


def test_resume_continues_with_the_same_state(saved_tiny_model, folder_dataset, tmp_path):
    full = tmp_path / "full"
    lora_recipe(lora_args(saved_tiny_model, folder_dataset, full, "--max-steps", "4", "--eval-every", "2"))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    shutil.copy(full / "base_predictions.npz", resumed / "base_predictions.npz")
    lora_recipe(
        lora_args(saved_tiny_model, folder_dataset, resumed, "--max-steps", "4", "--eval-every", "2", "--resume")
    )
    state = json.loads((resumed / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    expected, got = _adapter(full), _adapter(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    # Checkpoints keep only trainable weights: adapter-sized, not model-sized.
    weights = resumed / "checkpoints" / "step-4" / "model.safetensors"
    assert weights.stat().st_size < 3 * (resumed / "adapter_model.safetensors").stat().st_size


def test_resume_without_checkpoint_is_a_clear_error(saved_tiny_model, folder_dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        lora_recipe(lora_args(saved_tiny_model, folder_dataset, tmp_path / "x", "--max-steps", "2", "--resume"))


def test_non_finite_losses_are_skipped_then_stop_the_run(saved_tiny_model, folder_dataset, tmp_path, monkeypatch):
    real_loss = tasks_module.sam2_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        if calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(tasks_module, "sam2_loss", sometimes_nan)
    out = tmp_path / "one-nan"
    lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "3", "--eval-every", "100"))
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    assert np.isfinite(np.concatenate([v.numpy().ravel() for v in _adapter(out).values()])).all()

    def always_nan(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(tasks_module, "sam2_loss", always_nan)
    with pytest.raises(NonFiniteLossError, match="5 consecutive non-finite losses"):
        lora_recipe(lora_args(saved_tiny_model, folder_dataset, tmp_path / "all-nan", "--max-steps", "10"))


def _record_logit_dtypes(monkeypatch) -> list[torch.dtype]:
    """Record the dtype of the mask logits (an activation of the forward pass) that each training loss receives."""
    dtypes, real_loss = [], tasks_module.sam2_loss

    def recording(mask_logits, *args, **kwargs):
        dtypes.append(mask_logits.dtype)
        return real_loss(mask_logits, *args, **kwargs)

    monkeypatch.setattr(tasks_module, "sam2_loss", recording)
    return dtypes


@pytest.mark.slow
def test_bf16_autocast_and_gradient_accumulation_on_cpu(saved_tiny_model, folder_dataset, tmp_path, monkeypatch):
    dtypes = _record_logit_dtypes(monkeypatch)
    out = tmp_path / "bf16"
    lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "2", "--grad-accum", "2",
                      "--mixed-precision", "bf16", "--eval-every", "100", "--prompt-chunk", "0"))  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert all(np.isfinite(v.float().numpy()).all() for v in _adapter(out).values())
    assert len(dtypes) == 4 and set(dtypes) == {torch.bfloat16}  # 2 steps x 2 micro-batches, under autocast

    # One optimizer step over 2 micro-batches of 1 image is (nearly: objects are averaged per micro-batch) the step
    # over one batch of the same 2 images, and unlike the step over the first image alone.
    def one_step(name: str, batch_size: str, grad_accum: str) -> np.ndarray:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave bf16
        run = tmp_path / name
        lora_recipe(lora_args(saved_tiny_model, folder_dataset, run, "--max-steps", "1", "--warmup-ratio", "0",
                          "--no-augment", "--batch-size", batch_size, "--grad-accum", grad_accum,
                          "--eval-every", "100", "--mixed-precision", "no", "--lora-dropout", "0"))  # fmt: skip
        return np.concatenate([v.numpy().ravel() for _, v in sorted(_adapter(run).items())])

    accumulated, batched, single = one_step("accum", "1", "2"), one_step("batch", "2", "1"), one_step("one", "1", "1")
    np.testing.assert_allclose(accumulated, batched, rtol=0, atol=1e-5)
    assert np.linalg.norm(accumulated - single) > 0.01


def test_mixed_precision_is_accelerates_choice_unless_given(saved_tiny_model, folder_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    dtypes = _record_logit_dtypes(monkeypatch)
    out = tmp_path / "accelerate-choice"
    # A half-precision base needs autocast: the check must see Accelerate's bf16, not a default "no".
    lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "1", "--base-dtype", "bfloat16"))
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert json.loads((out / "training_config.json").read_text())["training"]["mixed_precision"] == "bf16"

    AcceleratorState._reset_state(reset_partial_state=True)
    dtypes.clear()
    out = tmp_path / "flag"
    lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "1", "--mixed-precision", "no"))
    assert dtypes and set(dtypes) == {torch.float32}
    assert json.loads((out / "training_config.json").read_text())["training"]["mixed_precision"] == "no"


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical_and_the_schedule_of_one_process(
    saved_tiny_model, folder_dataset, tmp_path
):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "tests" / "scripts" / "ddp_train.py"),
        *lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "4", "--grad-accum", "2", "--batch-size", "1",
               "--log-every", "1", "--prompt-chunk", "1",  # ranks with different numbers of prompt chunks
               "--no-load-best"),  # the last weights (the best evaluation may be step 1's, still at the base: lr 0)
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2: steps 4" in result.stdout and "rank 0 of 2: steps 4" in result.stdout
    # One line per checkpoint, from the main process only; none of Accelerate's own per-file lines.
    saved = [line for line in result.stderr.splitlines() if "Saved checkpoint" in line]
    assert saved and len(saved) == len(set(saved)) and all("[RANK 0]" in line for line in saved), result.stderr
    assert "Saving current state" not in result.stderr and "Random states saved" not in result.stderr
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and rank0
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)  # training happened

    # The learning rate of every optimizer step is that of one process with the same global batch (2 x 1 x 2).
    single = tmp_path / "single"
    lora_recipe(lora_args(saved_tiny_model, folder_dataset, single, "--max-steps", "4", "--grad-accum", "2",
                      "--batch-size", "2", "--log-every", "1"))  # fmt: skip

    def learning_rates(run: Path) -> list[tuple[int, float]]:
        history = json.loads((run / "metrics.json").read_text())["history"]
        return [(h["step"], h["lr"]) for h in history if "lr" in h]

    expected = learning_rates(single)
    assert [step for step, _ in expected] == [1, 2, 3, 4] and expected[-1][1] == 0
    got = learning_rates(out)
    assert [step for step, _ in got] == [1, 2, 3, 4]
    assert [lr for _, lr in got] == pytest.approx([lr for _, lr in expected], abs=1e-12)
