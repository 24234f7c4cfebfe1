"""Video clips through the one trainer: a short run, J&F evaluation, frame strips, adapter round trip, resume,
batches of clips; the video recipe's flags."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sam2_peft.adapters import LoraMethod, load_adapter
from sam2_peft.data.prompts import PromptConfig
from sam2_peft.data.video import VideoClipDataset, VideoDatasetConfig, VideoSequenceDataset, open_video_folder
from sam2_peft.models.loading import processor_for_image_size
from sam2_peft.models.video_forward import ClipPrompt, Sam2VideoTracker
from sam2_peft.recipes.video import main as video_recipe
from sam2_peft.training import video as video_module
from sam2_peft.training.config import TrainingConfig
from sam2_peft.training.losses import LossConfig
from sam2_peft.training.trainer import Trainer
from sam2_peft.training.video import VideoClipTask

from .video_helpers import VIDEO_SIZE, tiny_video_model, write_video_folder


def _trainer(root, output_dir, max_steps: int, validate: bool = True, **training) -> Trainer:
    """LoRA on the decoder and memory, trained on clips of sequence `a` (every other frame annotated) and validated
    on sequence `b` (when `validate`); `training` overrides the `TrainingConfig` settings."""
    processor = processor_for_image_size(VIDEO_SIZE)
    train = open_video_folder(root, annotated_every=2, sequences=["a"])
    val = open_video_folder(root, sequences=["b"]) if validate else None
    config = VideoDatasetConfig(clip_len=3, prompts=PromptConfig(prompt="box"))
    # the last weights, not the best evaluation's: a resume that skipped its checkpoint could otherwise end on the
    # same best step as the uninterrupted run and go unnoticed
    settings = dict(
        batch_size=1, lr=1e-2, warmup_ratio=0.0, eval_every=1, report_to="none", num_panels=2, load_best=False
    )
    training = TrainingConfig(output_dir=str(output_dir), max_steps=max_steps, **{**settings, **training})
    task = VideoClipTask(
        VideoClipDataset(train, processor, config),
        VideoSequenceDataset(val) if val else None,
        processor,
        loss_frames="all",
        loss=LossConfig(mask_loss="bce"),
        strip_frames=2,
    )
    method = LoraMethod(targets="decoder+memory", lora_r=4, lora_dropout=0.0)
    return Trainer(tiny_video_model(), method, task, training, base_name="tiny-video")


@pytest.mark.slow
def test_video_training_run_evaluates_saves_reloads_and_resumes(tmp_path, monkeypatch):
    root = write_video_folder(tmp_path / "data", "a", frames=6)  # every clip has 2+ frames
    write_video_folder(root, "b", frames=4)
    output = tmp_path / "run"
    trainer = _trainer(root, output, max_steps=2)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert set(result["base"]) == set(result["fine_tuned"]) == {"J", "F", "J&F"}
    summary = json.loads((output / "metrics.json").read_text())
    assert set(summary["per_image"]) == {"b"} and summary["steps"] == 2
    assert (output / "panels" / "final" / "b.png").exists()
    assert (output / "checkpoints" / "step-1" / "adapter" / "adapter_model.safetensors").exists()
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, initial[n])]
    assert any("memory_attention" in n for n in changed) and any("mask_decoder" in n for n in changed)

    # the saved adapter, loaded into a fresh base model, propagates exactly like the trained model
    frames = torch.randn(3, 3, VIDEO_SIZE, VIDEO_SIZE, generator=torch.Generator().manual_seed(0))
    prompt = ClipPrompt(points=torch.tensor([[[10.0, 20.0], [60.0, 70.0]]]), point_labels=torch.tensor([[2, 3]]))
    trained = Sam2VideoTracker(trainer.model).eval()
    reloaded = Sam2VideoTracker(load_adapter(tiny_video_model(), output)).eval()
    with torch.no_grad():
        for a, b in zip(trained(frames, prompt), reloaded(frames, prompt)):
            torch.testing.assert_close(a.pred_masks, b.pred_masks, atol=1e-6, rtol=0)

    # resuming from step 1 trains one step and ends where the uninterrupted run ended: the checkpoint was loaded
    again = tmp_path / "resumed"
    shutil.copytree(output / "checkpoints" / "step-1", again / "checkpoints" / "step-1")
    shutil.copy(output / "base_predictions.npz", again / "base_predictions.npz")
    steps = []
    forward_backward = Trainer._forward_backward
    monkeypatch.setattr(
        Trainer, "_forward_backward", lambda self, batch: steps.append(1) or forward_backward(self, batch)
    )
    resumed = _trainer(root, again, max_steps=2, resume="latest").train()
    assert len(steps) == 1
    assert json.loads((again / "metrics.json").read_text())["steps"] == 2
    assert set(resumed["fine_tuned"]) == {"J", "F", "J&F"}
    expected, got = (load_file(str(d / "adapter_model.safetensors")) for d in (output, again))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


def test_video_training_takes_batches_of_clips_and_accumulates_them_under_autocast(tmp_path, monkeypatch):
    """Each clip of a batch runs under its own autocast context (Accelerate's cannot be entered twice): one
    optimizer step over 2 micro-batches of 2 clips computes every clip's loss and moves the adapter."""
    root = write_video_folder(tmp_path / "data", "a", frames=10)  # 4 clips: one for each annotated start but the last
    losses = []

    def recording(*args, **kwargs):
        losses.append(real_loss(*args, **kwargs))
        return losses[-1]

    real_loss = video_module.sam2_loss
    monkeypatch.setattr(video_module, "sam2_loss", recording)
    trainer = _trainer(root, tmp_path / "run", 1, validate=False, batch_size=2, grad_accum=2, eval_every=0)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert len(losses) == 8  # 2 micro-batches x 2 clips x 2 annotated frames (loss_frames all)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 1
    assert any(not torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)


IMAGE_ONLY_FLAGS = [
    ["--streaming"],
    ["--train-images", "1"],
    ["--val-fraction", "0.9"],
    ["--mask-type", "instance"],
    ["--max-image-pixels", "10"],
    ["--no-augment"],
    ["--min-object-area", "4"],
    ["--correction-rounds", "1"],
    ["--prompt-chunk", "2"],
    ["--no-cache-embeddings"],
    ["--cache-dir", "features"],
]
"""Flags of the image recipes that clips have no use for."""


@pytest.mark.parametrize("flag", IMAGE_ONLY_FLAGS, ids=lambda flag: flag[0])
def test_video_recipe_refuses_image_only_flags(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        video_recipe(["--data", "videos", *flag])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: unrecognized arguments: {' '.join(flag)}" in last


def test_video_recipe_help_lists_only_the_flags_it_uses(capsys):
    with pytest.raises(SystemExit):
        video_recipe(["--help"])
    shown = capsys.readouterr().out
    assert "--clip-len" in shown and "--data" in shown and "--max-objects" in shown
    for flag, *_ in IMAGE_ONLY_FLAGS:
        assert flag.replace("--no-", "--") not in shown, flag
