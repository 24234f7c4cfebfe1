"""Helpers for the video tests: a tiny `Sam2VideoModel` whose zero-initialised parts are made non-zero."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Sam2ImageProcessor, Sam2VideoModel, Sam2VideoProcessor
from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

from sam2_peft.models.loading import build_model_from_config, tiny_config

VIDEO_SIZE = 128


def tiny_video_model(seed: int = 0) -> Sam2VideoModel:
    """A 128 px `Sam2VideoModel` where memory actually matters (see `enliven`)."""
    return enliven(build_model_from_config(tiny_config(VIDEO_SIZE, video=True), seed=seed), seed)


def enliven(model: nn.Module, seed: int = 0) -> nn.Module:
    """A config-built video model of the SAM 2 family made to depend on its memory, in eval mode.

    Random init zeroes the memory fuser's layer scale (memory features then ignore the mask, and nothing behind it
    gets a gradient), the temporal encodings, the no-object pointer and the occlusion embedding; they get small
    random values here. The object-score head is biased positive so that objects are predicted present, and the mask
    hypernetworks are scaled up so that mask logits are of order 1, not 1e-3.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.abs().max() == 0 and "bias" not in name and "layer_norm" not in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(3.0)
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.mul_(3000.0)
    return model.eval()


def video_processor(size: int = VIDEO_SIZE) -> Sam2VideoProcessor:
    """transformers' video processor at `size` (points and boxes given in model-input pixels stay unchanged)."""
    image = Sam2ImageProcessor(
        size={"height": size, "width": size}, mask_size={"height": size // 4, "width": size // 4}
    )
    video = Sam2VideoVideoProcessor(size={"height": size, "width": size})
    return Sam2VideoProcessor(image_processor=image, video_processor=video, target_size=size)


def write_video_folder(root: Path, name: str = "seq", frames: int = 6, size=(48, 64), palette: bool = True) -> Path:
    """A moving square (id 1) and a disc (id 2) that leaves the picture after frame 3; palette PNG labels."""
    (root / "JPEGImages" / name).mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / name).mkdir(parents=True, exist_ok=True)
    height, width = size
    yy, xx = np.mgrid[:height, :width]
    for t in range(frames):
        labels = np.zeros(size, np.uint8)
        labels[10:22, 5 + 3 * t : 17 + 3 * t] = 1
        if t <= 3:
            labels[(yy - 32) ** 2 + (xx - 45) ** 2 <= 36] = 2
        image = np.where(labels[..., None] > 0, 220, 30).astype(np.uint8).repeat(3, axis=2)
        Image.fromarray(image).save(root / "JPEGImages" / name / f"{t:05d}.jpg")
        mask = Image.fromarray(labels if palette else (labels == 1).astype(np.uint8) * 255)
        if palette:
            mask = mask.convert("P")
            mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        mask.save(root / "Annotations" / name / f"{t:05d}.png")
    return root
