"""The trainer runs any `Task`: one whose data are not images (no augmentation, cache keys or sample ids) trains."""

from __future__ import annotations

import json

import torch
from torch import nn

from sam2_peft.adapters import LoraMethod
from sam2_peft.training.config import TrainingConfig
from sam2_peft.training.losses import LossOutput
from sam2_peft.training.tasks import Task
from sam2_peft.training.trainer import Trainer


class WeightsNorm(nn.Module):
    """Scores a batch of numbers against the trainable weights of the model it holds (as `sam`, like a segmenter)."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        trainable = [p for p in self.sam.parameters() if p.requires_grad]
        return batch.mean() * sum((p.float() - 1).square().mean() for p in trainable)


class Numbers(list):
    """A training set of numbers; like every task's training set it takes `set_epoch`."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class NumbersTask(Task):
    """A task that knows no image: a list of numbers, a loss on the weights, no validation."""

    def __init__(self, processor) -> None:
        self.train_dataset, self.val_dataset, self.processor = Numbers([1.0, 2.0, 3.0, 4.0]), None, processor

    def segmenter(self, model: nn.Module) -> nn.Module:
        return WeightsNorm(model)

    def collate(self, items: list) -> torch.Tensor:
        return torch.tensor(items)

    def loss(self, segmenter, batch, device, autocast, encode) -> LossOutput:
        assert encode is None  # nothing to cache
        with autocast():
            loss = segmenter(batch.to(device))
        zero = loss.detach() * 0
        return LossOutput(loss, loss.detach(), zero, zero, zero, zero.reshape(1))

    def evaluate(self, segmenter, loader, accelerator, keep_ids, encode):
        raise AssertionError("no validation set: never evaluated")

    def panel_ids(self, count: int, seed: int) -> list[str]:
        return []

    def draw_panels(self, tuned, names, base, scores):
        return {}


def test_a_task_without_images_trains(tiny_model, tiny_processor, tmp_path):
    config = TrainingConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=2, log_every=1, report_to="none")
    trainer = Trainer(tiny_model, LoraMethod("decoder", lora_r=2), NumbersTask(tiny_processor), config, "tiny")
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    trainer.train()
    assert trainer.cache is None
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["embedding_cache"] == {"enabled": False, "views": 0}
