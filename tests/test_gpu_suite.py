"""benchmarks/gpu_suite.py on CPU: the quick suite runs end to end, and its CUDA-only rows' code paths work."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_cpu_suite_measures_skips_with_reasons_and_writes_json(suite, tmp_path):
    output = tmp_path / "suite.json"
    only = ["train-fp32", "train-fp16", "train-bf16", "qlora-4bit-bf16", "large-decoder-lora-b8-fp32", "predictor-fp32"]
    report = suite.main(["--device", "cpu", "--quick", "--only", *only, "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == only
    for name in ("train-fp32", "train-bf16", "large-decoder-lora-b8-fp32"):
        assert rows[name]["status"] == "measured", rows[name]
        assert rows[name]["seconds_per_step"] > 0 and rows[name]["losses_finite"]
    assert rows["large-decoder-lora-b8-fp32"]["batch_size"] == 8
    assert rows["predictor-fp32"]["status"] == "measured" and rows["predictor-fp32"]["images_per_second"] > 0
    for name in ("train-fp16", "qlora-4bit-bf16"):
        assert rows[name]["status"] == "skipped" and "CUDA" in rows[name]["reason"]
    assert report["total_seconds"] < report["settings"]["deadline_s"]


@pytest.mark.parametrize(
    ("precision", "quantize"), [("fp16", None), ("bf16", "4bit")], ids=["fp16-grad-scaler", "qlora-4bit"]
)
def test_the_cuda_rows_code_paths_train_on_cpu(suite, precision, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    settings = suite.Settings.for_run("cpu", quick=True, deadline_s=None)
    method = "lora-encoder" if quantize else "lora-decoder"
    measurement = suite.Measurement("check", "train", "tiny-random", 2, precision, method, quantize)
    result = suite.run_training(measurement, settings, torch.device("cpu"), time.perf_counter())
    assert result["losses_finite"] and len(result["step_seconds"]) == settings.steps
    if quantize:
        assert result["quantized_layers"] > 0 and result["encoder_mb"][1] < result["encoder_mb"][0]


def test_a_measurement_past_the_deadline_is_skipped_and_one_past_its_limit_is_interrupted(suite, monkeypatch):
    settings = suite.Settings.for_run("cpu", quick=True, deadline_s=10.0)
    measurement = suite.Measurement("train-fp32", "train", "tiny-random", 2, "fp32", budget_s=1.0)
    started = time.perf_counter() - 9.5
    assert suite.run_one(measurement, settings, torch.device("cpu"), started)["status"] == "skipped"

    def hang(*_args):
        time.sleep(30)

    monkeypatch.setattr(suite, "run_training", hang)
    settings.deadline_s, settings.grace_s = 100.0, 1.0
    begin = time.perf_counter()
    result = suite.run_one(measurement, settings, torch.device("cpu"), time.perf_counter())
    assert result["status"] == "timed out" and time.perf_counter() - begin < 10
