"""Video inference stays bounded: past the memory window, neither the tensors held nor the memory read per frame grow
with the video's length."""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest
import torch

from sam2_peft.inference.video import VideoPredictor
from sam2_peft.models.loading import processor_for_image_size
from sam2_peft.models.video_forward import ClipPrompt, Sam2VideoTracker

from .video_helpers import VIDEO_SIZE, tiny_video_model


def _live_tensors(exclude: set[int]) -> tuple[int, int]:
    """Number and bytes of the torch tensors alive in Python, not counting the ids in `exclude` (the model's)."""
    gc.collect()
    count = size = 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and id(obj) not in exclude:
            count += 1
            size += obj.untyped_storage().nbytes()
    return count, size


@pytest.mark.slow
def test_streaming_a_long_video_holds_the_same_tensors_and_reads_the_same_memory_every_frame():
    model = tiny_video_model()
    model.config.max_object_pointers_in_encoder = 6  # a short pointer window: the plateau comes early
    own = {id(t) for t in [*model.parameters(), *model.buffers()]}
    read = []
    model.memory_attention.register_forward_pre_hook(
        lambda _m, _a, kwargs: read.append(kwargs["memory"].shape[0]), with_kwargs=True
    )
    predictor = VideoPredictor(model, processor_for_image_size(VIDEO_SIZE))
    rng = np.random.default_rng(0)
    frames = (rng.integers(0, 255, (64, 96, 3), dtype=np.uint8) for _ in range(40))
    held = []
    for masks in predictor.track(frames, boxes=np.array([[10, 8, 60, 40], [40, 20, 90, 60]])):
        assert masks.shape == (2, 64, 96)
        held.append(_live_tensors(own))
    assert len(held) == 40 and len(read) == 39 * 2  # one memory read per object and tracked frame
    # memory attention reads the prompted frame + the 6 latest frames (7 = num_maskmem) and 6 object pointers:
    # its input, and so the time per frame, stops growing once the window is full
    assert read[-1] == max(read) and read.count(read[-1]) >= 2 * 30
    # past the window, the tensors held do not grow with the number of frames seen (the last frame holds less:
    # the exhausted frame stream has been released)
    steady = held[15:-1]
    assert max(c for c, _ in steady) == min(c for c, _ in steady)
    assert max(b for _, b in steady) <= min(b for _, b in steady) * 1.01


def test_streaming_with_gradients_warns_that_memory_is_no_longer_bounded(caplog):
    model = tiny_video_model()  # a plain model: every parameter requires grad
    tracker = Sam2VideoTracker(model)
    frames = torch.randn(2, 3, VIDEO_SIZE, VIDEO_SIZE, generator=torch.Generator().manual_seed(0))
    prompt = ClipPrompt(points=torch.tensor([[[10.0, 20.0], [60.0, 70.0]]]), point_labels=torch.tensor([[2, 3]]))
    with caplog.at_level(logging.WARNING, logger="sam2_peft.models.video_forward"):
        with torch.no_grad():
            list(tracker.track(iter(frames), prompt))
        assert not caplog.records
        outputs = list(tracker.track(iter(frames), prompt))
    assert outputs[-1].pred_masks.requires_grad
    assert len(caplog.records) == 1 and "torch.no_grad()" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sam2_peft.models.video_forward"):
        tracker(frames, prompt)  # a training clip of known length: gradients are the point
    assert not caplog.records
