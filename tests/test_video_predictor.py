"""The streaming video predictor: an adapter from disk, prompts in original pixels, masks at original size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam2_peft.adapters import LoraMethod, load_adapter
from sam2_peft.inference.video import VideoPredictor
from sam2_peft.models.loading import processor_for_image_size
from sam2_peft.models.video_forward import ClipPrompt, Sam2VideoTracker

from .video_helpers import VIDEO_SIZE, tiny_video_model


def test_predictor_streams_with_an_adapter_and_matches_the_tracker(tmp_path):
    model = LoraMethod(targets="memory", lora_r=4).prepare(tiny_video_model(), "tiny")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    LoraMethod(targets="memory", lora_r=4).save(model, tmp_path / "adapter", "tiny")
    processor = processor_for_image_size(VIDEO_SIZE)
    predictor = VideoPredictor(load_adapter(tiny_video_model(), tmp_path / "adapter"), processor)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (64, 96, 3), dtype=np.uint8) for _ in range(4)]
    boxes = np.array([[10, 8, 40, 30]])
    masks = list(predictor.track(iter(frames), boxes=boxes))
    assert len(masks) == 4 and masks[0].shape == (1, 64, 96) and masks[0].dtype == bool

    pixel_values = processor.image_processor(images=frames, return_tensors="pt")["pixel_values"]
    corners = torch.tensor([[[10 * 128 / 96, 8 * 2.0], [40 * 128 / 96, 30 * 2.0]]])
    prompt = ClipPrompt(points=corners, point_labels=torch.tensor([[2, 3]]))
    with torch.no_grad():
        expected = Sam2VideoTracker(model.eval())(pixel_values, prompt)
    for got, want in zip(masks, expected):
        reference = processor.post_process_masks([want.pred_masks], [(64, 96)])[0][:, 0].numpy()
        np.testing.assert_array_equal(got, reference)


def test_predictor_rejects_bad_prompts_and_frame_sizes():
    predictor = VideoPredictor(tiny_video_model(), processor_for_image_size(VIDEO_SIZE))
    frame = np.zeros((64, 96, 3), np.uint8)
    with pytest.raises(ValueError, match="exactly one prompt"):
        next(predictor.track([frame]))
    with pytest.raises(ValueError, match="one size"):
        list(predictor.track([frame, np.zeros((32, 32, 3), np.uint8)], boxes=np.array([[1, 1, 20, 20]])))


def test_point_labels_share_the_image_predictors_name_and_the_old_one_warns():
    predictor = VideoPredictor(tiny_video_model(), processor_for_image_size(VIDEO_SIZE))
    frames = [np.random.default_rng(i).integers(0, 255, (64, 96, 3), dtype=np.uint8) for i in range(2)]
    points, labels = np.array([[[20.0, 30.0]]]), np.array([[1]])
    new = list(predictor.track(frames, points=points, labels=labels))
    with pytest.warns(DeprecationWarning, match="point_labels= is deprecated: use labels="):
        old = list(predictor.track(frames, points=points, point_labels=labels))
    for a, b in zip(new, old, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="labels= only"):
        list(predictor.track(frames, points=points, labels=labels, point_labels=labels))
