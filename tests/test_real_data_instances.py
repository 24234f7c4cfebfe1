"""Real nuclei, shipped `compact-synthetic` base: a 16-image decoder LoRA (mixed prompts, one correction round, the
settings of benchmarks/nuclei_instances.py) needs fewer simulated clicks than the base (NoC@85, RITM protocol) on
held-out images. Measured there on 4 held-out images (143 nuclei): base 18.41, LoRA 16.87."""

from pathlib import Path

import numpy as np
import pytest

from sam2_peft.data.sources import folder_records
from sam2_peft.evaluation.interactive import evaluate_interactive, noc
from sam2_peft.inference.predictor import Sam2PeftPredictor
from sam2_peft.models.loading import load_base_model
from sam2_peft.recipes.lora import main as lora_recipe
from tests.conftest import real_dataset

pytestmark = [pytest.mark.slow, pytest.mark.real_data]

HELD_OUT = 8
SCORED = 2


def test_16_image_lora_needs_fewer_clicks_than_the_base_on_held_out_nuclei(tmp_path):
    data = real_dataset("nuclei-coelho2009")
    ids = sorted(p.stem for p in (data / "images").iterdir())[-HELD_OUT:]
    split = tmp_path / "held_out.txt"
    split.write_text("\n".join(ids) + "\n")
    out = tmp_path / "lora"
    lora_recipe([
        "--model", "compact-synthetic", "--data", str(data), "--val-split-file", str(split), "--train-images", "16",
        "--eval-every", "100000", "--batch-size", "2", "--report-to", "none", "--num-panels", "0",
        "--output-dir", str(out), "--prompt", "mixed", "--correction-rounds", "1", "--max-objects", "8",
        "--max-steps", "80", "--lr", "2e-3",
    ])  # fmt: skip
    records = [r for r in folder_records(data) if r.sample_id in set(ids[:SCORED])]
    samples = [(r.sample_id, r.load_image(), r.load_instances()) for r in records]
    base = Sam2PeftPredictor(*load_base_model("compact-synthetic"), device="cpu")
    adapter = Sam2PeftPredictor.from_pretrained(Path(out), device="cpu")
    nocs = {}
    for name, predictor in (("base", base), ("adapter", adapter)):
        result = evaluate_interactive(predictor, samples, starts=("click",), progress=False)["click"]
        nocs[name] = noc(np.concatenate(list(result.ious.values())), 0.85)[0].mean()
    assert nocs["adapter"] < nocs["base"] - 0.5, nocs
