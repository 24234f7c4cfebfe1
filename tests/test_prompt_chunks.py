"""Prompt chunks: a batch's prompts decoded and back-propagated a chunk at a time give the loss and the gradients
of the whole batch at once, in the task and in a training run."""

from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sam2_peft.adapters.methods import LoraMethod
from sam2_peft.data.config import DatasetConfig, PromptConfig
from sam2_peft.models.segmenter import Sam2Segmenter
from sam2_peft.recipes.lora import main as lora_recipe
from sam2_peft.training.config import default_prompt_chunk
from sam2_peft.training.losses import sam2_loss, sum_parts
from sam2_peft.training.tasks import ImageSegmentationTask
from tests.recipe_helpers import lora_args

SIZE = 128


def _targets(count: int, generator: torch.Generator) -> torch.Tensor:
    targets = torch.zeros(count, SIZE, SIZE, dtype=torch.bool)
    for index in range(count - 1):  # the last object is absent: it trains only the object score
        x0, y0 = torch.randint(0, SIZE // 2, (2,), generator=generator).tolist()
        targets[index, y0 : y0 + 30, x0 : x0 + 40] = True
    return targets


def test_chunk_losses_normalised_by_the_batch_add_up_to_the_batch_loss():
    generator = torch.Generator().manual_seed(0)
    count = 7
    logits = torch.randn(count, 3, SIZE // 4, SIZE // 4, generator=generator, requires_grad=True)
    iou = torch.rand(count, 3, generator=generator, requires_grad=True)
    scores = torch.randn(count, 1, generator=generator, requires_grad=True)
    targets = _targets(count, generator)
    whole = sam2_loss(logits, iou, scores, targets)
    whole_grads = torch.autograd.grad(whole.loss, (logits, iou, scores))

    counts = (int(targets.flatten(1).any(1).sum()), count)
    parts = [
        sam2_loss(logits[s : s + 3], iou[s : s + 3], scores[s : s + 3], targets[s : s + 3], batch_counts=counts)
        for s in range(0, count, 3)
    ]
    summed = sum_parts(parts)
    for name in ("loss", "mask", "dice", "iou", "object_score"):
        torch.testing.assert_close(getattr(summed, name), getattr(whole, name).detach())
    torch.testing.assert_close(summed.mask_iou, whole.mask_iou)
    chunk_grads = torch.autograd.grad(sum(part.loss for part in parts), (logits, iou, scores))
    for chunked, direct in zip(chunk_grads, whole_grads):
        torch.testing.assert_close(chunked, direct)


def _cached_setup(tiny_model, tiny_processor, count: int, prompts: PromptConfig):
    """A decoder-LoRA segmenter, a batch of 2 images with `count` box prompts, and an `encode` serving the images'
    decoder inputs as the embedding cache does (computed once, no gradient)."""
    torch.manual_seed(0)
    model = LoraMethod("decoder", lora_dropout=0.0).prepare(tiny_model, "test").train()
    segmenter = Sam2Segmenter(model)
    generator = torch.Generator().manual_seed(1)
    targets = _targets(count, generator)
    boxes = []
    for mask in targets:
        ys, xs = mask.nonzero(as_tuple=True)
        boxes.append([[xs.min(), ys.min()], [xs.max(), ys.max()]] if len(xs) else [[10, 10], [40, 40]])
    batch = {
        "sample_ids": ["a", "b"],
        "views": [0, 0],
        "pixel_values": torch.randn(2, 3, SIZE, SIZE, generator=generator),
        "object_image_index": torch.arange(count) % 2,
        "points": torch.tensor(boxes, dtype=torch.float32),
        "point_labels": torch.tensor([[2, 3]] * count),
        "target_masks": targets,
    }
    with torch.no_grad():
        embeddings = segmenter.image_embeddings(segmenter.vision_features(batch["pixel_values"]))

    def encode(keys, pixel_values, sources=None):
        return {"image_embeddings": embeddings}

    data = SimpleNamespace(processor=tiny_processor, config=DatasetConfig(prompts=prompts))
    return model, segmenter, batch, encode, ImageSegmentationTask(data)


def _gradients(model, task, segmenter, batch, encode, chunk: int) -> tuple[torch.Tensor, dict, int]:
    model.zero_grad()
    parts = task.loss_parts(segmenter, batch, torch.device("cpu"), encode, chunk)
    losses = []
    for part in parts:
        loss = part(nullcontext)
        loss.loss.backward()
        losses.append(loss)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return sum_parts(losses).loss.detach(), grads, len(parts)


@pytest.mark.parametrize(
    "prompts", [PromptConfig(), PromptConfig(correction_rounds=2)], ids=["boxes", "boxes+correction-rounds"]
)
def test_chunked_backward_gives_the_gradients_of_one_backward(tiny_model, tiny_processor, prompts):
    model, segmenter, batch, encode, task = _cached_setup(tiny_model, tiny_processor, 7, prompts)
    loss, grads, parts = _gradients(model, task, segmenter, batch, encode, 0)
    assert parts == 1 and any(g.abs().sum() > 0 for g in grads.values())
    for chunk, expected_parts in ((1, 7), (3, 3), (7, 1), (100, 1)):
        chunk_loss, chunk_grads, chunk_parts = _gradients(model, task, segmenter, batch, encode, chunk)
        assert chunk_parts == expected_parts
        torch.testing.assert_close(chunk_loss, loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(chunk_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_without_the_cache_the_batch_is_one_part(tiny_model, tiny_processor):
    model, segmenter, batch, _, task = _cached_setup(tiny_model, tiny_processor, 5, PromptConfig())
    assert len(task.loss_parts(segmenter, batch, torch.device("cpu"), None, 1)) == 1


def test_default_chunk_is_small_on_cpu_and_off_on_accelerators():
    assert default_prompt_chunk("cpu") == 4
    assert default_prompt_chunk("cuda") == 0 and default_prompt_chunk("mps") == 0


@pytest.mark.slow
def test_training_in_prompt_chunks_gives_the_adapter_of_whole_batches(saved_tiny_model, folder_dataset, tmp_path):
    def adapter(chunk: str) -> np.ndarray:
        run = tmp_path / f"chunk-{chunk}"
        lora_recipe(lora_args(saved_tiny_model, folder_dataset, run, "--max-steps", "2", "--no-augment",
                              "--lora-dropout", "0", "--eval-every", "100", "--prompt-chunk", chunk))  # fmt: skip
        weights = load_file(str(run / "adapter_model.safetensors"))
        return np.concatenate([value.numpy().ravel() for _, value in sorted(weights.items())])

    whole, chunked = adapter("0"), adapter("1")
    assert np.abs(whole).sum() > 0
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=2e-6)
