"""Metrics and losses against values computed by hand or by independent formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from sam2_peft.evaluation.metrics import (
    MetricAccumulator,
    boundary_iou,
    boundary_width,
    dice,
    image_metrics,
    iou,
    mask_boundary,
    pixel_accuracy,
)
from sam2_peft.training.losses import LossConfig, balanced_bce_loss, dice_loss, focal_loss, mask_iou, sam2_loss


def _box(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_region_metrics_by_hand():
    target = _box((10, 10), 0, 4, 0, 4)  # 16 px
    pred = _box((10, 10), 2, 6, 0, 4)  # 16 px, overlap 8
    assert iou(pred, target) == pytest.approx(8 / 24)
    assert dice(pred, target) == pytest.approx(16 / 32)
    assert pixel_accuracy(pred, target) == pytest.approx(1 - 16 / 100)
    empty = np.zeros((10, 10), dtype=bool)
    assert iou(empty, empty) == 1.0 and dice(empty, empty) == 1.0
    assert iou(pred, empty) == 0.0


def test_boundary_of_a_square_by_hand():
    mask = _box((20, 20), 5, 15, 5, 15)  # 10x10 square
    boundary = mask_boundary(mask, 2)
    assert boundary.sum() == 100 - 36  # the inner 6x6 is farther than 2 px from the contour
    assert boundary_width((100, 100), 0.02) == round(0.02 * math.hypot(100, 100))


def test_boundary_matches_iterated_erosion_reference():
    rng = np.random.default_rng(0)
    mask = ndimage.binary_opening(rng.random((60, 80)) > 0.4, iterations=2)
    for width in (1, 3):
        padded = np.pad(mask, 1)
        eroded = ndimage.binary_erosion(padded, structure=np.ones((3, 3)), iterations=width)[1:-1, 1:-1]
        np.testing.assert_array_equal(mask_boundary(mask, width), mask & ~eroded)


def test_boundary_iou_crop_equals_full_image_computation():
    target = _box((200, 300), 50, 120, 60, 200)
    pred = _box((200, 300), 55, 130, 50, 190)
    width = boundary_width(target.shape)
    full = iou(mask_boundary(pred, width), mask_boundary(target, width))
    assert boundary_iou(pred, target) == pytest.approx(full)
    touching = _box((200, 300), 0, 40, 0, 300)  # touches the image border
    full = iou(mask_boundary(touching, width), mask_boundary(target | touching, width))
    assert boundary_iou(touching, target | touching) == pytest.approx(full)


def test_image_metrics_average_objects_and_accumulator_averages_images():
    targets = np.stack([_box((10, 10), 0, 4, 0, 4), _box((10, 10), 6, 10, 6, 10)])
    preds = np.stack([targets[0], np.zeros((10, 10), dtype=bool)])
    scores = image_metrics(preds, targets)
    assert scores["iou"] == pytest.approx(0.5)
    accumulator = MetricAccumulator()
    accumulator.update("a", preds, targets)
    accumulator.update("b", targets, targets)
    assert accumulator.compute()["iou"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shape"):
        image_metrics(preds[:1], targets)


def test_dice_and_focal_losses_against_formulas():
    logits = torch.tensor([[[2.0, -1.0], [0.5, -3.0]]])
    targets = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    p = logits.sigmoid()
    expected_dice = 1 - (2 * (p * targets).sum() + 1) / (p.sum() + targets.sum() + 1)
    torch.testing.assert_close(dice_loss(logits, targets)[0], expected_dice)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = 0.25 * targets + 0.75 * (1 - targets)
    expected_focal = (alpha_t * ce * (1 - p_t) ** 2).mean()
    torch.testing.assert_close(focal_loss(logits, targets, 0.25, 2.0)[0], expected_focal)


def test_balanced_bce_weighs_classes_equally():
    targets = torch.zeros(1, 4, 4)
    targets[0, 0, 0] = 1  # 1 foreground, 15 background
    logits = torch.zeros(1, 4, 4)
    torch.testing.assert_close(balanced_bce_loss(logits, targets)[0], torch.tensor(math.log(2)))
    logits[0, 0, 0] = -5  # only the foreground pixel is wrong: half the total weight
    loss = balanced_bce_loss(logits, targets)[0]
    expected = (15 * F.softplus(torch.tensor(5.0)) + 15 * math.log(2)) / 30
    torch.testing.assert_close(loss, expected)


def test_sam2_loss_trains_best_mask_and_true_iou():
    targets = torch.zeros(1, 8, 8, dtype=torch.bool)
    targets[0, :4] = True
    good = torch.where(targets[0], 10.0, -10.0)
    logits = torch.stack([-good, good, torch.zeros(8, 8)])[None]  # candidate 1 is perfect
    iou_scores = torch.tensor([[0.0, 1.0, 0.5]], requires_grad=True)
    out = sam2_loss(logits, iou_scores, torch.tensor([[5.0]]), targets)
    assert out.mask_iou.tolist() == [1.0]  # the best candidate was chosen
    true_iou = mask_iou(logits, targets[:, None].float().expand_as(logits))
    torch.testing.assert_close(out.iou, F.mse_loss(iou_scores, true_iou).detach())
    assert out.loss.requires_grad


def test_absent_object_trains_only_the_object_score():
    targets = torch.zeros(2, 8, 8, dtype=torch.bool)
    targets[0, 2:5, 2:5] = True
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    scores = torch.tensor([[0.3], [0.2]], requires_grad=True)
    object_logits = torch.tensor([[1.0], [1.0]], requires_grad=True)
    out = sam2_loss(logits, scores, object_logits, targets, LossConfig())
    out.loss.backward()
    assert logits.grad[1].abs().sum() == 0 and scores.grad[1].abs().sum() == 0
    assert logits.grad[0].abs().sum() > 0
    assert object_logits.grad[1, 0] > 0  # pushed towards "absent"
    with pytest.raises(ValueError, match="mask_loss"):
        LossConfig(mask_loss="l2")


def test_evaluate_module_matches_the_functions(tmp_path):
    import evaluate

    from sam2_peft.evaluation import segmentation_metric

    metric = evaluate.load(segmentation_metric.__file__, cache_dir=str(tmp_path))
    target = _box((20, 30), 2, 12, 3, 20)
    pred = _box((20, 30), 4, 14, 3, 18)
    result = metric.compute(predictions=[pred, target], references=[target, target], per_object=True)
    assert result["iou"] == pytest.approx((iou(pred, target) + 1.0) / 2)
    assert result["boundary_iou"] == pytest.approx((boundary_iou(pred, target) + 1.0) / 2)
    assert result["per_object"][1]["dice"] == 1.0


def _reference_full_resolution_loss(logits, iou_scores, object_logits, targets, config):
    """SAM 2's mask terms computed the direct way: every candidate upsampled to the targets at once."""
    up = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    t = targets.float()[:, None].expand_as(up)
    combined = config.mask_weight * focal_loss(up, t, config.focal_alpha, config.focal_gamma) + dice_loss(up, t)
    best = combined.argmin(1, keepdim=True)
    iou = F.mse_loss(iou_scores, mask_iou(up, t), reduction="none").mean(1).mean()
    obj = F.binary_cross_entropy_with_logits(object_logits[:, 0], torch.ones(len(t)))
    return combined.gather(1, best).mean() + iou + obj


@pytest.mark.parametrize("chunk", [0, 1, 3, 100])
def test_full_resolution_loss_in_chunks_equals_the_direct_computation(chunk):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 16, 16, generator=generator, requires_grad=True)
    iou_scores = torch.rand(5, 3, generator=generator, requires_grad=True)
    object_logits = torch.randn(5, 1, generator=generator)
    targets = torch.zeros(5, 64, 64, dtype=torch.bool)
    for n in range(5):
        targets[n, 4 * n : 30 + 4 * n, 10:40] = True
    config = LossConfig(loss_chunk=chunk)
    out = sam2_loss(logits, iou_scores, object_logits, targets, config)
    (got_logits, got_iou) = torch.autograd.grad(out.loss, [logits, iou_scores])
    expected = _reference_full_resolution_loss(logits, iou_scores, object_logits, targets, config)
    (want_logits, want_iou) = torch.autograd.grad(expected, [logits, iou_scores])
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(got_logits, want_logits)
    torch.testing.assert_close(got_iou, want_iou)


def test_native_resolution_loss_is_the_full_loss_of_targets_at_the_logits_size():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 16, 16, generator=generator)
    small = torch.rand(2, 16, 16, generator=generator) > 0.5
    big = small.repeat_interleave(4, 1).repeat_interleave(4, 2)  # 64 x 64 blocks: averaging down gives `small` back
    scores, objects = torch.rand(2, 1), torch.ones(2, 1)
    native = sam2_loss(logits, scores, objects, big, LossConfig(loss_resolution="native"))
    direct = sam2_loss(logits, scores, objects, small, LossConfig(loss_resolution="full"))
    torch.testing.assert_close(native.loss, direct.loss)
    with pytest.raises(ValueError, match="loss_resolution"):
        LossConfig(loss_resolution="half")


def test_uncertain_points_gather_where_the_logits_are_near_zero():
    from sam2_peft.training.losses import uncertain_points

    torch.manual_seed(0)
    logits = torch.full((1, 1, 32, 32), 8.0)
    logits[..., 10:21] = 0.0  # an uncertain band of 11 of the 32 columns: more than the 3x oversampling needs
    points = uncertain_points(logits, 400)[0]
    in_band = ((points[:, 0] * 32 >= 10) & (points[:, 0] * 32 <= 21)).float().mean()
    # 300 of the 400 points are the most uncertain of 1200 candidates (all in the band); the 100 random ones ~34 %
    assert points.shape == (400, 2) and 0.78 <= in_band < 0.92, in_band


def test_point_loss_approaches_the_full_loss_with_many_points():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 16, 16).mul(3)
    targets = torch.zeros(2, 64, 64, dtype=torch.bool)
    targets[:, 10:40, 20:50] = True
    scores, objects = torch.rand(2, 1), torch.ones(2, 1)
    full = sam2_loss(logits, scores, objects, targets, LossConfig(loss_resolution="full"))
    # importance sampling over-weights the uncertain band, so compare the uniform part: all points random
    from sam2_peft.training import losses

    original = losses.IMPORTANCE_RATIO
    try:
        losses.IMPORTANCE_RATIO = 0.0
        points = sam2_loss(logits, scores, objects, targets, LossConfig(loss_resolution="points", loss_points=60000))
    finally:
        losses.IMPORTANCE_RATIO = original
    torch.testing.assert_close(points.mask, full.mask, rtol=0.03, atol=1e-4)
    torch.testing.assert_close(points.dice, full.dice, rtol=0.03, atol=1e-3)


@pytest.mark.parametrize("chunk", [0, 2])
def test_chunked_full_resolution_loss_keeps_no_full_resolution_tensor_for_backward(chunk):
    """What autograd keeps for the backward pass: with chunks (recomputed in backward), the chunks' inputs only (the
    low-resolution logits and the targets, which the batch holds anyway); computed at once, the upsampled logits
    and the targets at full resolution (`FocalDiceOnBinaryTargets` recomputes the rest)."""
    logits = torch.randn(6, 1, 16, 16, requires_grad=True)
    targets = torch.zeros(6, 128, 128, dtype=torch.bool)
    targets[:, 20:90, 30:100] = True
    saved: list[int] = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = sam2_loss(logits, torch.rand(6, 1), torch.ones(6, 1), targets, LossConfig(loss_chunk=chunk))
    out.loss.backward()
    targets_numel = 6 * 128 * 128
    if chunk:
        assert sum(saved) < 1.2 * targets_numel, sum(saved) / targets_numel
    else:
        assert sum(saved) >= 2 * targets_numel, sum(saved) / targets_numel


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.6, 1.5), (0.0, 0.0)])
def test_focal_dice_on_binary_targets_equals_the_generic_terms(alpha, gamma, monkeypatch):
    """The blocked focal + dice + IoU with its analytic gradient (bool targets) against torchvision's focal loss,
    `dice_loss` and `mask_iou` through autograd (float targets), and against finite differences (gradcheck,
    float64); blocks smaller than the maps, with a remainder."""
    from sam2_peft.training import losses
    from sam2_peft.training.losses import FocalDiceOnBinaryTargets, mask_loss_terms

    monkeypatch.setattr(losses, "PIXEL_BLOCK", 100)  # 1024 pixels: 10 blocks and 24 left

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 3, 8, 8, generator=generator).mul(4).requires_grad_()
    targets = torch.rand(3, 32, 32, generator=generator) > 0.6
    targets[2] = False  # an absent object: dice against an empty target
    config = LossConfig(focal_alpha=alpha, focal_gamma=gamma)
    fused = mask_loss_terms(logits, targets, config)
    generic = mask_loss_terms(logits, targets.float(), config)
    weights = torch.rand(2, 3, 3, generator=generator)
    grads = [torch.autograd.grad((terms[0] * weights[0] + terms[1] * weights[1]).sum(), logits)[0]
             for terms in (fused, generic)]  # fmt: skip
    for got, want in zip(fused, generic):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-9)
    flat_logits = torch.randn(2, 3, 50, dtype=torch.float64, generator=generator).mul(3).requires_grad_()
    flat_targets = (torch.rand(2, 1, 50, generator=generator) > 0.5).double()
    assert torch.autograd.gradcheck(
        lambda x: FocalDiceOnBinaryTargets.apply(x, flat_targets, alpha, gamma, 16)[:2], (flat_logits,)
    )


def test_focal_dice_on_binary_targets_stays_float32_under_autocast():
    """A caller's bfloat16 autocast must not round the loss: matmul-like reductions would run in bfloat16."""
    from sam2_peft.training.losses import mask_loss_terms

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 64, 64, generator=generator).mul(3)
    targets = torch.rand(2, 256, 256, generator=generator) > 0.5
    reference = mask_loss_terms(logits, targets, LossConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = mask_loss_terms(logits, targets, LossConfig())
    for got, want in zip(under_autocast, reference):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("height, width", [(1, 1), (3, 5), (16, 16)])
def test_bilinear_upsampling_backward_is_pytorchs(height, width):
    """The separable transpose of 4x upsampling equals autograd through `F.interpolate`, edges included."""
    from sam2_peft.training.losses import upsample_logits

    generator = torch.Generator().manual_seed(height)
    logits = torch.randn(2, 3, height, width, dtype=torch.float64, generator=generator, requires_grad=True)
    grad = torch.randn(2, 3, 4 * height, 4 * width, dtype=torch.float64, generator=generator)
    size = (4 * height, 4 * width)
    ours = upsample_logits(logits, size)
    (got,) = torch.autograd.grad(ours, logits, grad)
    reference = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    (want,) = torch.autograd.grad(reference, logits, grad)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
