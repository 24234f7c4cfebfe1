"""How a run ends: the best evaluation kept (--load-best), a result below the base and a loss that does not move
said so, a full disk reported (checkpoints, embedding cache), partial fine-tuning's real learning rates recorded, and
Dice-change panels only for images whose Dice changed that way."""

from __future__ import annotations

import errno
import json
import logging
import shutil

import accelerate.checkpointing
import pytest
from safetensors import SafetensorError
from safetensors.torch import load_file

from sam2_peft.recipes.lora import main as lora_recipe
from sam2_peft.recipes.partial import main as partial_recipe
from sam2_peft.training import embedding_cache as embedding_cache_module
from sam2_peft.training.config import ConfigError
from sam2_peft.training.disk import is_disk_full
from sam2_peft.training.embedding_cache import EmbeddingCache
from sam2_peft.training.trainer import Trainer, dice_extremes, flat_loss
from tests.recipe_helpers import error_line, lora_args
from tests.test_embedding_cache import encoder, fingerprint, pixels  # noqa: F401  (fixtures)

TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
SAFETENSORS_FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"
"""What torch.save and safetensors' save_file raised on a full 256 KiB tmpfs (torch 2.14, safetensors 0.8)."""


def _dice(values: dict[str, float]) -> dict[str, dict[str, float]]:
    return {sample_id: {"dice": value} for sample_id, value in values.items()}


def test_worst_and_best_change_panels_only_for_a_drop_and_a_rise():
    base = _dice({"a": 0.5, "b": 0.5, "c": 0.5})
    assert dice_extremes(_dice({"a": 0.6, "b": 0.9, "c": 0.7}), base) == {"best-dice-change-b": "b"}
    assert dice_extremes(_dice({"a": 0.4, "b": 0.1, "c": 0.3}), base) == {"worst-dice-change-b": "b"}
    mixed = dice_extremes(_dice({"a": 0.4, "b": 0.9, "c": 0.5}), base)
    assert mixed == {"worst-dice-change-a": "a", "best-dice-change-b": "b"}
    assert dice_extremes(base, base) == {}


def test_a_loss_that_does_not_move_is_flat():
    def history(losses):
        return [{"step": 10 * i, "loss": loss} for i, loss in enumerate(losses, 1)] + [{"step": 80, "val_dice": 0.5}]

    assert flat_loss(history([0.80, 0.81, 0.79, 0.80, 0.805, 0.80, 0.795, 0.80])) == pytest.approx((0.805, 0.7975))
    assert flat_loss(history([0.80, 0.75, 0.70, 0.66, 0.62, 0.60, 0.58, 0.57])) is None
    assert flat_loss(history([0.80, 0.80, 0.80])) is None  # too few logs to judge


def test_full_disk_errors_are_recognised():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError(TORCH_FULL_DISK))
    assert is_disk_full(SafetensorError(SAFETENSORS_FULL_DISK))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as chained:
        assert is_disk_full(chained)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("shape mismatch"))


@pytest.mark.slow
def test_the_best_evaluation_is_kept_resume_safe_and_a_run_below_the_base_says_so(
    saved_tiny_model, folder_dataset, tmp_path, monkeypatch, caplog
):
    """The validation Dice is raised by 2 at step 0 (the base) and by 1 at step 2: step 2 is the best fine-tuned
    evaluation, and none beats the base."""
    real_evaluate, measured = Trainer.evaluate, {}

    def evaluate(self, keep_ids=None, loader=None):
        result = real_evaluate(self, keep_ids, loader)
        step = self.state.global_step
        if loader is None and step in (0, 2):
            measured[step] = result.metrics["dice"]
            result.metrics["dice"] += {0: 2.0, 2: 1.0}[step]
        return result

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        result = lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "4", "--eval-every", "2"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kept_step"] == result["kept_step"] == 2 and metrics["steps"] == 4
    kept = load_file(str(out / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(out / "adapter_model.safetensors"))
    assert kept.keys() == final.keys() and all((kept[k] == final[k]).all() for k in kept)
    assert metrics["fine_tuned"]["dice"] == pytest.approx(measured[2], abs=1e-6)  # step 2's weights, re-evaluated
    assert json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())["best_step"] == 2
    assert any("Keeping step 2, the best evaluation" in r.message for r in caplog.records)
    assert metrics["below_base"] is True and metrics["metric_for_best"] == "dice"
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING and "below the base" in r.message]
    assert "none of the 2 fine-tuned evaluations beat it" in warning.message
    assert metrics["warnings"] == [warning.message.removeprefix("[RANK 0] ")]
    card = (out / "README.md").read_text()
    assert "> **Warning:** this adapter scores below the base model" in card
    assert "- **Training steps:** 4 (the adapter is step 2's, the best validation Dice)" in card

    # Resumed from step 2, the run still knows step 2 is the best and keeps it.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    shutil.copy(out / "base_predictions.npz", resumed / "base_predictions.npz")
    args = lora_args(saved_tiny_model, folder_dataset, resumed, "--max-steps", "4", "--eval-every", "2", "--resume")
    assert lora_recipe(args)["kept_step"] == 2
    again = load_file(str(resumed / "adapter_model.safetensors"))
    assert all((again[k] == final[k]).all() for k in final)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(
    saved_tiny_model, folder_dataset, tmp_path, monkeypatch, capsys
):
    real_save = accelerate.checkpointing.save

    def save(obj, path, *args, **kwargs):
        if "step-4" in str(path):
            raise RuntimeError(TORCH_FULL_DISK)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)
    out = tmp_path / "run"
    message = error_line(
        capsys, lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "4", "--eval-every", "2")
    )
    assert f"the disk of '{out / 'checkpoints'}' is full" in message
    assert f"resume from the last complete checkpoint ({out / 'checkpoints' / 'step-2'})" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # the partial one is gone


def test_a_full_cache_folder_keeps_features_in_memory_with_one_warning(
    encoder,  # noqa: F811
    fingerprint,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
):
    folder = tmp_path / "cache"
    cache = EmbeddingCache(encoder, fingerprint, memory_budget_bytes=10**9, directory=folder)

    def full(*args, **kwargs):
        raise SafetensorError(SAFETENSORS_FULL_DISK)

    monkeypatch.setattr(embedding_cache_module, "save_file", full)
    with caplog.at_level(logging.WARNING):
        first = cache.get_or_compute(["a", "b"], pixels(0))
        cache.get_or_compute(["c", "d"], pixels(1))
    (warning,) = [r.message for r in caplog.records if "is full" in r.message]
    assert f"'{folder}'" in warning and "--cache-dir" in warning
    assert cache.disk_full and encoder.images == 4
    again = cache.get_or_compute(["a", "b"], pixels(0))
    assert encoder.images == 4 and all((x == y).all() for x, y in zip(first, again))  # served from memory
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]  # no entry, no temporary file left


def test_a_cache_folder_full_from_the_start_is_memory_only(encoder, fingerprint, tmp_path, monkeypatch, caplog):  # noqa: F811
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embedding_cache_module, "atomic_write_json", full)
    with caplog.at_level(logging.WARNING):
        cache = EmbeddingCache(encoder, fingerprint, memory_budget_bytes=10**9, directory=tmp_path / "cache")
        cache.get_or_compute(["a", "b"], pixels(0))
    assert cache.directory is None and sum("is full" in r.message for r in caplog.records) == 1


def test_partial_fine_tuning_refuses_lr_and_records_its_component_rates(saved_tiny_model, folder_dataset, tmp_path):
    common = ["--model", str(saved_tiny_model), "--data", str(folder_dataset), "--report-to", "none"]
    with pytest.raises(ConfigError, match="--lr 0.001: partial fine-tuning .* --component-lr"):
        partial_recipe([*common, "--output-dir", str(tmp_path / "refused"), "--lr", "1e-3"])
    out = tmp_path / "run"
    partial_recipe([*common, "--output-dir", str(out), "--max-steps", "1", "--component-lr", "mask_decoder=3e-4"])
    recorded = json.loads((out / "training_config.json").read_text())
    assert recorded["training"]["lr"] is None
    assert recorded["method_settings"] == {
        "name": "partial",
        "learning_rates": {"mask_decoder": 3e-4},
        "weight_decay": 1e-4,
    }
