"""The differentiable video forward: parity with transformers' inference session, and where gradients go."""

from __future__ import annotations

import pytest
import torch
from transformers import Sam2VideoInferenceSession

from sam2_peft.adapters import LoraMethod, PartialFinetuneMethod, PtsamMethod
from sam2_peft.models.video_forward import ClipPrompt, Sam2VideoTracker
from sam2_peft.training.video import video_loss

from .video_helpers import VIDEO_SIZE, tiny_video_model, video_processor

S = VIDEO_SIZE
BOXES = torch.tensor([[20.0, 30.0, 70.0, 90.0], [60.0, 10.0, 120.0, 60.0]])
POINTS = torch.tensor([[[40.0, 50.0]], [[90.0, 30.0]]])


def _masks() -> torch.Tensor:
    masks = torch.zeros(2, S, S)
    masks[0, 30:90, 20:70] = 1
    masks[1, 10:60, 60:120] = 1
    return masks


def _prompt(kind: str) -> ClipPrompt:
    if kind == "box":
        return ClipPrompt(points=BOXES.view(2, 2, 2), point_labels=torch.tensor([[2, 3], [2, 3]]))
    if kind == "point":
        return ClipPrompt(points=POINTS, point_labels=torch.ones(2, 1, dtype=torch.long))
    return ClipPrompt(masks=_masks())


def _reference(model, frames: torch.Tensor, kind: str) -> list:
    """transformers' own path: inference session + prompts through the processor + propagate_in_video_iterator."""
    session = Sam2VideoInferenceSession(video=frames, video_height=S, video_width=S, dtype=torch.float32)
    inputs = {
        "box": {"input_boxes": [BOXES.tolist()]},
        "point": {"input_points": [POINTS.tolist()], "input_labels": [[[1], [1]]]},
        "mask": {"input_masks": list(_masks())},
    }[kind]
    video_processor().add_inputs_to_inference_session(session, frame_idx=0, obj_ids=[1, 2], **inputs)
    return list(model.propagate_in_video_iterator(session, start_frame_idx=0))


@pytest.mark.parametrize(("kind", "num_frames"), [("box", 5), ("point", 4), ("mask", 4), ("box", 1)])
def test_training_forward_matches_transformers_inference(kind, num_frames):
    model = tiny_video_model()
    frames = torch.randn(num_frames, 3, S, S, generator=torch.Generator().manual_seed(1))
    reference = _reference(model, frames, kind)
    # transformers stores memories in bfloat16; the tracker rounds the same way when asked to
    ours = Sam2VideoTracker(model, memory_dtype=torch.bfloat16)(frames, _prompt(kind))
    assert len(ours) == len(reference) == num_frames
    for mine, theirs in zip(ours, reference):
        assert mine.pred_masks.shape == theirs.pred_masks.shape == (2, 1, S // 4, S // 4)
        torch.testing.assert_close(mine.pred_masks, theirs.pred_masks, atol=1e-4, rtol=0)
        torch.testing.assert_close(mine.object_score_logits, theirs.object_score_logits.view(-1, 1), atol=1e-4, rtol=0)
    if num_frames > 1:
        # the check has teeth: a different prompt on frame 0 changes the last frame by far more than the tolerance
        other = Sam2VideoTracker(model, memory_dtype=torch.bfloat16)(
            frames, _prompt("point" if kind != "point" else "box")
        )
        assert (other[-1].pred_masks - ours[-1].pred_masks).abs().max() > 1e-2
        # keeping memories in float32 (training) departs from inference only by that rounding
        exact = Sam2VideoTracker(model)(frames, _prompt(kind))
        torch.testing.assert_close(exact[-1].pred_masks, ours[-1].pred_masks, atol=1e-3, rtol=0)


def test_streaming_an_unknown_length_agrees_with_the_clip_forward():
    model = tiny_video_model()
    frames = torch.randn(6, 3, S, S, generator=torch.Generator().manual_seed(2))
    tracker = Sam2VideoTracker(model)
    with torch.no_grad():
        whole = tracker(frames, _prompt("box"))
        streamed = list(tracker.track(iter(frames), _prompt("box")))
    # without a known length, object-pointer positions are scaled by the pointer window (16), not by 6 frames:
    # the prompted frame is identical and later masks stay close
    torch.testing.assert_close(whole[0].pred_masks, streamed[0].pred_masks)
    for a, b in zip(whole[1:], streamed[1:]):
        assert ((a.pred_masks > 0) == (b.pred_masks > 0)).float().mean() > 0.95


def _lora_model(preset: str):
    model = tiny_video_model()
    return LoraMethod(targets=preset, lora_r=4, lora_dropout=0.0).prepare(model, "tiny")


def _last_frame_loss(model, num_frames: int) -> torch.Tensor:
    model.train()
    frames = torch.randn(num_frames, 3, S, S, generator=torch.Generator().manual_seed(3))
    outputs = Sam2VideoTracker(model)(frames, _prompt("box"))
    targets = _masks()[None].expand(num_frames, -1, -1, -1)
    annotated = torch.ones(num_frames, dtype=torch.bool)
    return video_loss(outputs, targets, annotated, loss_frames="last").loss


@pytest.mark.parametrize("preset", ["memory", "memory-encoder", "object-pointer", "decoder"])
def test_last_frame_loss_reaches_memory_adapters(preset):
    model = _lora_model(preset)
    _last_frame_loss(model, num_frames=3).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    # lora_B starts at zero, so at initialisation only it gets a gradient; every adapted module must get one
    lora_b = {n: g for n, g in grads.items() if "lora_B" in n}
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b.values()), preset
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("preset", ["memory", "memory-encoder", "object-pointer"])
def test_single_frame_loss_does_not_depend_on_memory_adapters(preset):
    # a one-frame clip never reads memory: nothing trainable lies on the path to its loss
    loss = _last_frame_loss(_lora_model(preset), num_frames=1)
    assert not loss.requires_grad


def test_last_frame_loss_reaches_the_first_frames_prompt_through_memory():
    model = tiny_video_model().train()
    _last_frame_loss(model, num_frames=3).backward()
    corners = model.prompt_encoder.point_embed.weight.grad
    # the box corner embeddings are used on frame 0 only: their gradient came through memory and object pointers
    assert corners is not None and corners[2:4].abs().sum() > 0


def test_memory_bank_stays_bounded_on_long_videos():
    model = tiny_video_model()
    model.config.max_object_pointers_in_encoder = 4  # window max(7, 4) = 7 frames
    frames = (torch.randn(3, S, S, generator=torch.Generator().manual_seed(t)) for t in range(14))
    with torch.no_grad():
        held = [out.memory_frames for out in Sam2VideoTracker(model).track(frames, _prompt("box"))]
    assert held[:3] == [1, 2, 3]
    assert max(held) == held[-1] == held[-4] <= 7 + 2  # the prompted frame + the window, whatever the length


def test_partial_finetuning_of_video_components_has_per_component_learning_rates():
    method = PartialFinetuneMethod({"memory_attention": 1e-4, "object_pointer_proj": 1e-5})
    model = method.prepare(tiny_video_model(), "tiny")
    groups = method.parameter_groups(model, lr=1.0, weight_decay=0.0)
    assert [g["lr"] for g in groups] == [1e-4, 1e-5]
    _last_frame_loss(model, num_frames=3).backward()
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"memory_attention", "object_pointer_proj"}


def test_ptsam_decoder_tokens_train_through_video_memory():
    model = PtsamMethod(num_tokens=4).prepare(tiny_video_model(), "tiny-video")
    tracker = Sam2VideoTracker(model)
    frames = torch.randn(3, 3, 128, 128)
    prompt = ClipPrompt(points=torch.tensor([[[20.0, 20.0], [80.0, 90.0]]]), point_labels=torch.tensor([[2, 3]]))
    outputs = tracker(frames, prompt)
    outputs[-1].mask_logits.float().sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["base_model.model.prompt_encoder.ptsam_tokens.default"]
    assert trainable["base_model.model.prompt_encoder.ptsam_tokens.default"].grad.abs().sum() > 0
    with torch.no_grad(), model.disable_adapter():
        plain = tracker(frames, prompt)[-1].mask_logits
    assert not torch.allclose(plain, outputs[-1].mask_logits.detach())
