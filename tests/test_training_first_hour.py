"""A newcomer's first hour with the trainer (issue #14): quiet checkpoints, missing trackers and typos stop early with
one line, panels spread over the validation set plus the images fine-tuning helped and hurt most, TensorBoard images."""

import json
import logging
import shutil

import pytest

from sam2_peft import cli
from sam2_peft.data.sources import open_records, split_records
from sam2_peft.recipes import runner
from sam2_peft.recipes.lora import main as lora_recipe
from sam2_peft.recipes.ptsam import main as ptsam_recipe
from sam2_peft.training import config
from tests.conftest import write_folder_dataset
from tests.recipe_helpers import error_line, lora_args


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the recipe gets as far as loading the model."""

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(runner, "load_base_model", no_model)


def test_a_checkpoint_is_one_log_line_saved_or_resumed(saved_tiny_model, folder_dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    lora_recipe(lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "2", "--eval-every", "1"))
    accelerate_lines = [r.getMessage() for r in caplog.records if r.name.startswith("accelerate.")]
    assert accelerate_lines == []
    # One line per checkpoint, through Accelerate's logger (main process only, "[RANK 0] " first).
    saved = [r.getMessage() for r in caplog.records if "Saved checkpoint" in r.getMessage()]
    root = out / "checkpoints"
    assert saved == [f"[RANK 0] Saved checkpoint {root / 'step-1'}", f"[RANK 0] Saved checkpoint {root / 'step-2'}"]

    caplog.clear()
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-1", resumed / "checkpoints" / "step-1")
    lora_recipe(
        lora_args(saved_tiny_model, folder_dataset, resumed, "--max-steps", "2", "--eval-every", "1", "--resume")
    )
    assert [r.getMessage() for r in caplog.records if r.name.startswith("accelerate.")] == []
    assert any("Resumed from" in r.getMessage() for r in caplog.records)


def test_report_to_wandb_without_wandb_stops_before_the_model_loads(
    saved_tiny_model, folder_dataset, tmp_path, capsys, monkeypatch, no_model_load
):
    monkeypatch.setattr(config, "is_wandb_available", lambda: False, raising=False)  # it is not installed here
    message = error_line(capsys, lora_args(saved_tiny_model, folder_dataset, tmp_path / "run", "--report-to", "wandb"))
    assert "wandb is not installed" in message and "pip install wandb" in message and "[trackers]" in message


def test_half_base_without_mixed_precision_stops_before_the_model_loads(
    saved_tiny_model, folder_dataset, tmp_path, capsys, monkeypatch, no_model_load
):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    message = error_line(
        capsys, lora_args(saved_tiny_model, folder_dataset, tmp_path / "run", "--base-dtype", "float16")
    )
    assert "--base-dtype float16" in message and "--mixed-precision fp16" in message
    # Accelerate's own setting (accelerate launch --mixed_precision) counts: the run goes on to load the model.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(AssertionError, match="model was loaded"):
        lora_recipe(lora_args(saved_tiny_model, folder_dataset, tmp_path / "run", "--base-dtype", "bfloat16"))


@pytest.mark.parametrize(
    ("recipe", "typo", "suggestion"),
    [
        (lora_recipe, "--learning-rate", "--lr"),
        (lora_recipe, "--lora-rank", "--lora-r"),
        (lora_recipe, "--eval_evry", "--eval-every"),
        (ptsam_recipe, "--num-tokns", "--num-tokens"),
        (ptsam_recipe, "--learning-rate=1e-3", "--lr"),
    ],
)
def test_typo_in_a_flag_suggests_the_flag(recipe, typo, suggestion, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe([typo, "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"{typo.split('=')[0]}: did you mean {suggestion}?" in errors[0], err


def test_typo_in_a_recipe_name_suggests_the_recipe():
    with pytest.raises(SystemExit) as exit_info:
        cli.train(["lora_decodr", "--max-steps", "1"])
    message = str(exit_info.value.code)
    assert message.startswith("error: unknown recipe 'lora_decodr'. did you mean 'lora_decoder'?"), message


def test_spread_indices_take_one_from_each_stretch_deterministically():
    from sam2_peft.training.trainer import spread_indices

    picked = spread_indices(100, 4, seed=0)
    assert [index // 25 for index in picked] == [0, 1, 2, 3]
    assert picked == spread_indices(100, 4, seed=0)
    assert spread_indices(3, 4, seed=0) == [0, 1, 2]


def test_panels_spread_over_validation_and_final_shows_the_worst_drop_and_best_rise_of_dice(saved_tiny_model, tmp_path):
    from sam2_peft.training.trainer import spread_indices

    data = write_folder_dataset(tmp_path / "data", num_images=10)
    out = tmp_path / "run"
    argv = lora_args(saved_tiny_model, data, out, "--max-steps", "2", "--eval-every", "2", "--val-fraction", "0.5")
    lora_recipe([*argv, "--num-panels", "2"])
    _, val_records = split_records(open_records(str(data)), 0.5, 0)
    val_ids = [r.sample_id for r in val_records]
    shown = sorted(p.stem for p in (out / "panels" / "step-2").glob("*.png"))
    assert len(shown) == 2 and shown != sorted(val_ids[:2])
    assert shown == sorted(val_ids[i] for i in spread_indices(len(val_ids), 2, seed=0))

    metrics = json.loads((out / "metrics.json").read_text())
    change = {k: v["dice"] - metrics["base_per_image"][k]["dice"] for k, v in metrics["per_image"].items()}
    worst, best = min(change, key=change.get), max(change, key=change.get)
    extremes = [f"worst-dice-change-{worst}"] * (change[worst] < 0) + [f"best-dice-change-{best}"] * (change[best] > 0)
    final = sorted(p.stem for p in (out / "panels" / "final").glob("*.png"))
    assert final == sorted([*shown, *extremes])  # a worst-change panel only for a drop, a best-change only for a rise


def test_tensorboard_gets_base_metrics_at_step_0_and_panels_as_images(saved_tiny_model, folder_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = lora_args(saved_tiny_model, folder_dataset, out, "--max-steps", "2", "--eval-every", "2")
    lora_recipe([*argv[: argv.index("--report-to")], "--report-to", "tensorboard", *argv[argv.index("none") + 1 :]])
    accumulator = EventAccumulator(str(out / "logs" / "sam2-peft"), size_guidance={"images": 0})
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("val/dice")] == [0, 2]
    base = json.loads((out / "metrics.json").read_text())["base"]["dice"]
    assert accumulator.Scalars("val/dice")[0].value == pytest.approx(base)
    images = accumulator.Tags()["images"]
    assert any(tag.startswith("panels/") for tag in images) and any(tag.startswith("final/") for tag in images)
    (tag,) = [tag for tag in images if tag.startswith("panels/")]
    assert accumulator.Images(tag)[0].step == 2 and accumulator.Images(tag)[0].width > 100


def test_the_training_bar_shows_the_embedding_cache_filling(saved_tiny_model, folder_dataset, tmp_path, capsys):
    # 4 training images without augmentation (one view each) and 2 validation images, which the base evaluation
    # caches before training: 4 of 6 entries after the first step of batch 2, all after the second.
    lora_recipe(lora_args(saved_tiny_model, folder_dataset, tmp_path / "run", "--max-steps", "3", "--no-augment"))
    bar = capsys.readouterr().err
    assert "cache=4/6 views" in bar and "cache=full" in bar and "MiB" in bar


def test_every_flag_takes_its_snake_case_spelling_too():
    from sam2_peft.recipes.arguments import parse_recipe_arguments
    from sam2_peft.tuners.options import LoraOptions

    kebab = parse_recipe_arguments("t", LoraOptions, argv=["--eval-every", "3", "--lora-r", "4", "--no-augment"])
    snake = parse_recipe_arguments("t", LoraOptions, argv=["--eval_every", "3", "--lora_r", "4", "--no_augment"])
    assert kebab == snake and kebab.training.eval_every == 3 and kebab.method.lora_r == 4
    assert not kebab.augmentation.augment
