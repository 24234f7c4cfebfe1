"""Real data (read in place from the shared folder; skipped when absent) with the built-in random tiny model.

A random-weight base cannot segment; what these tests show is that the pipeline runs on real files end to end,
the training loss falls and the results are complete. They train and score as little as shows that, so that they finish
well within the suite's timeout on a loaded 2-core machine.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from sam2_peft.recipes.lora import main as lora_recipe
from tests.conftest import real_dataset

pytestmark = [pytest.mark.slow, pytest.mark.real_data]


def test_lora_decoder_on_nuclei_instances_with_box_prompts(tmp_path):
    data = real_dataset("nuclei-coelho2009")
    out = tmp_path / "nuclei"
    lora_recipe([
        "--model", "tiny-random", "--data", str(data), "--train-images", "8", "--val-fraction", "0.03",
        "--max-steps", "12", "--eval-every", "1000", "--batch-size", "2", "--max-objects", "8", "--lr", "1e-2",
        "--log-every", "1", "--output-dir", str(out), "--report-to", "none", "--num-panels", "2",
    ])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    assert len(metrics["per_image"]) == 3
    for key in ("iou", "dice", "boundary_iou", "pixel_accuracy"):
        assert 0 <= metrics["base"][key] <= 1 and 0 <= metrics["fine_tuned"][key] <= 1
    assert metrics["base_model"] == "tiny-random" and metrics["data"] == str(data)
    panels = sorted(p.name for p in (out / "panels" / "final").glob("*.png"))
    extremes = [name for name in panels if name.startswith(("worst-dice-change-", "best-dice-change-"))]
    change = [v["dice"] - metrics["base_per_image"][k]["dice"] for k, v in metrics["per_image"].items()]
    drawn = (min(change) < 0) + (max(change) > 0)  # the worst drop and the best rise of Dice, when there are any
    assert len(panels) - len(extremes) == 2 and len(extremes) == drawn, panels  # --num-panels 2
    assert (out / "adapter_model.safetensors").is_file()


VAL_FRAMES = 12
"""Frames scored per validation sequence (of 60 and 49): propagating through whole sequences twice (base, fine-tuned)
was most of the test's time."""


def _first_frames(data: Path, sequences: tuple[str, ...], count: int, out: Path) -> Path:
    """A DAVIS-layout folder of links to the first `count` frames and annotations of `sequences` of `data`."""
    for folder in ("JPEGImages", "Annotations"):
        for sequence in sequences:
            (out / folder / sequence).mkdir(parents=True)
            for frame in sorted((data / folder / sequence).iterdir())[:count]:
                (out / folder / sequence / frame.name).symlink_to(frame)
    return out


def test_video_lora_on_davis_trains_on_three_sequences_and_scores_two(tmp_path):
    from sam2_peft.recipes.video import main as video_recipe

    data = real_dataset("video-davis2016-mini")
    val_data = _first_frames(data, ("dog", "libby"), VAL_FRAMES, tmp_path / "davis-val")
    out = tmp_path / "davis"
    video_recipe([
        "--model", "tiny-random", "--data", str(data), "--annotated-every", "5", "--clip-len", "6",
        "--train-sequences", "blackswan,breakdance,car-shadow", "--val-data", str(val_data),
        "--val-sequences", "dog,libby", "--max-steps", "6", "--eval-every", "1000", "--batch-size", "1",
        "--lr", "5e-4", "--mask-loss", "bce",
        "--log-every", "1", "--output-dir", str(out), "--report-to", "none", "--num-panels", "1",
    ])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_image"]) == {"dog", "libby"}
    for key in ("J", "F", "J&F"):
        assert 0 <= metrics["base"][key] <= 1 and 0 <= metrics["fine_tuned"][key] <= 1
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert len(losses) == 6 and np.isfinite(losses).all()
    assert (out / "adapter_model.safetensors").is_file()
