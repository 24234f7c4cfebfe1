"""A save killed between any two of its file operations leaves exactly the old adapter or the new one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sam2_peft.adapters import LoraMethod, load_adapter
from sam2_peft.models.loading import load_base_model
from tests.adapter_helpers import make_adapter

SCRIPT = Path(__file__).parent / "scripts" / "kill_mid_save.py"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill script forks")
@pytest.mark.parametrize("old", ["lora-linked", "partial-plain-files"])
def test_killed_save_leaves_old_or_new_adapter(old, saved_tiny_model, tmp_path):
    out, pristine = tmp_path / "run", tmp_path / "pristine"
    if old == "lora-linked":  # saved by this version: r=4 LoRA, run files beside it
        make_adapter("lora", saved_tiny_model, pristine)
    else:  # plain files, as older versions (or a copy) leave them: a partial fine-tune
        make_adapter("partial", saved_tiny_model, tmp_path / "partial")
        shutil.copytree(tmp_path / "partial", pristine, ignore=shutil.ignore_patterns(".adapter"))
    (pristine / "checkpoints").mkdir()
    (pristine / "checkpoints" / "keep.txt").write_text("run file")
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run(
        [sys.executable, str(SCRIPT), str(saved_tiny_model), str(out), str(pristine), str(report)],
        check=True,
        env=env,
        timeout=300,
    )
    results = json.loads(report.read_text())
    old_files, new_files = results[0]["files"] if not results[0]["finished"] else None, results[-1]["files"]
    assert results[-1]["finished"] and len(results) > 3, "the save ran to its end after several kill points"
    old_kind_files = (
        {"partial_config.json", "partial_model.safetensors"} if "partial" in old else {"adapter_config.json"}
    )
    assert old_kind_files <= set(old_files) and "partial_config.json" not in new_files
    assert old_files != new_files
    states = []
    for result in results:
        state = "old" if result["files"] == old_files else "new" if result["files"] == new_files else "mix"
        assert state != "mix", f"killed at file operation {result['kill_at']}: a mix of old and new: {result}"
        assert result["loads"] is True, f"killed at {result['kill_at']}: {result['loads']}"
        states.append(state)
    assert "old" in states and "new" in states
    assert states == sorted(states, key=lambda s: s == "new"), "once the new adapter shows, it stays"

    # The finished folder loads the new weights; the run files beside the adapter were left alone.
    assert (out / "checkpoints" / "keep.txt").read_text() == "run file" and (out / "metrics.json").exists()
    model = load_adapter(load_base_model(str(saved_tiny_model))[0], out)
    saved = load_file(out / "adapter_model.safetensors")
    assert any(t.shape[0] == 8 for t in saved.values()), "the r=8 adapter"
    trained = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    assert trained and all(p.shape[0] == 8 for p in trained.values())


def test_save_over_a_save_replaces_only_adapter_files(saved_tiny_model, tmp_path):
    out = make_adapter("partial", saved_tiny_model, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    model, _ = load_base_model(str(saved_tiny_model))
    method = LoraMethod("decoder", lora_r=4)
    model = method.prepare(model, str(saved_tiny_model))
    method.save(model, out, str(saved_tiny_model))
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "sam2_peft.json", "notes.txt", "metrics.json"} <= names
    assert not {"partial_config.json", "partial_model.safetensors"} & names, "the old partial adapter is gone"
    assert json.loads((out / "sam2_peft.json").read_text())["method"] == "lora"
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # plain copies (links followed) load the same
    reloaded = dict(load_adapter(load_base_model(str(saved_tiny_model))[0], copy).named_parameters())
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            assert torch.equal(parameter, reloaded[name])
