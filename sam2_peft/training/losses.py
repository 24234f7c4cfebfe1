"""SAM 2 training losses: mask (focal or BCE, plus dice), IoU-prediction and object-score terms.

Choices, following SAM 2's own training: with multimask output, only the candidate with the lowest mask loss is
trained (SAM's "best of 3"), while the IoU head learns the true IoU of every candidate; objects absent from the
target train only the object-score head. Where the mask terms are computed is `LossConfig.loss_resolution`: on logits
upsampled to the target resolution (the model input size, as SAM 2 trains; beyond `loss_chunk` prompts computed
that many at a time and recomputed in the backward pass, so memory does not grow with the prompts), at the decoder's own resolution, or
at importance-sampled points (`uncertain_points`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchvision.ops import sigmoid_focal_loss

from .config import LossConfig


@dataclass
class LossOutput:
    """The total and its parts (scalars), plus the IoU of the trained mask of each object `(N,)`."""

    loss: torch.Tensor
    mask: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor
    object_score: torch.Tensor
    mask_iou: torch.Tensor
    last_round_iou: torch.Tensor | None = None
    """With correction rounds: the IoU of the last round's masks `(N,)`."""

    def log_dict(self) -> dict[str, float]:
        extra = {} if self.last_round_iou is None else {"train_iou_last_round": self.last_round_iou.mean().item()}
        return extra | {
            "loss": self.loss.item(),
            "loss_mask": self.mask.item(),
            "loss_dice": self.dice.item(),
            "loss_iou": self.iou.item(),
            "loss_object_score": self.object_score.item(),
            "train_iou": self.mask_iou.mean().item() if self.mask_iou.numel() else float("nan"),
        }


SCALAR_TERMS = ("loss", "mask", "dice", "iou", "object_score")
"""`LossOutput`'s scalar fields."""


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft dice loss per mask. `(..., H, W)` -> `(...)`."""
    probs = logits.sigmoid().flatten(-2)
    targets = targets.flatten(-2)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Sigmoid focal loss averaged over pixels, per mask. `(..., H, W)` -> `(...)`."""
    return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none").flatten(-2).mean(-1)


def balanced_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with foreground and background weighted equally, per mask. `(..., H, W)` -> `(...)`."""
    flat_logits, flat_targets = logits.flatten(-2), targets.flatten(-2)
    positives = flat_targets.sum(-1, keepdim=True)
    total = flat_targets.shape[-1]
    pos_weight = ((total - positives) / positives.clamp(min=1)).clamp(max=100)
    weights = torch.where(flat_targets > 0, pos_weight, torch.ones_like(flat_targets))
    loss = F.binary_cross_entropy_with_logits(flat_logits, flat_targets, weight=weights, reduction="none")
    return loss.sum(-1) / weights.sum(-1)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of thresholded logits (> 0) with binary targets, per mask. `(..., H, W)` -> `(...)`."""
    predicted = (logits > 0).flatten(-2)
    targets = targets.flatten(-2) > 0.5
    intersection = (predicted & targets).sum(-1).float()
    union = (predicted | targets).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def combine_rounds(losses: list[LossOutput]) -> LossOutput:
    """One loss for an interactive step: the mean of the rounds' totals; parts logged are the first round's."""
    if len(losses) == 1:
        return losses[0]
    first = losses[0]
    first.loss = torch.stack([part.loss for part in losses]).mean()
    first.last_round_iou = losses[-1].mask_iou
    return first


def sum_parts(parts: list[LossOutput]) -> LossOutput:
    """A batch's loss from its prompt chunks' losses, each normalised by the whole batch's counts (`sam2_loss`'s
    `batch_counts`), so that they add up; the total is detached (each part was back-propagated on its own)."""
    if len(parts) == 1:
        return parts[0]
    scalars = {name: sum(getattr(part, name).detach() for part in parts) for name in SCALAR_TERMS}
    last_round = None if parts[0].last_round_iou is None else torch.cat([part.last_round_iou for part in parts])
    return LossOutput(**scalars, mask_iou=torch.cat([part.mask_iou for part in parts]), last_round_iou=last_round)


OVERSAMPLE_RATIO = 3.0
IMPORTANCE_RATIO = 0.75
"""PointRend's sampling: draw 3x the points at random, keep the 75 % most uncertain, add 25 % fresh random ones."""


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of `(B, 1, H, W)` maps at `(B, K, 2)` points in [0, 1] (x, y) -> `(B, K)`."""
    grid = 2 * points[:, :, None] - 1
    return F.grid_sample(maps, grid, mode="bilinear", align_corners=False)[:, 0, :, 0]


def uncertain_points(logits: torch.Tensor, num_points: int) -> torch.Tensor:
    """`(B, K, 2)` points in [0, 1] for `(B, 1, h, w)` logits: mostly where |logit| is smallest (the boundary the
    model is unsure of), some uniformly random, as PointRend and Mask2Former train."""
    batch = len(logits)
    candidates = torch.rand(batch, int(num_points * OVERSAMPLE_RATIO), 2, device=logits.device)
    uncertainty = -point_sample(logits.detach(), candidates).abs()
    num_uncertain = int(IMPORTANCE_RATIO * num_points)
    chosen = uncertainty.topk(num_uncertain, dim=1).indices
    picked = candidates.gather(1, chosen[..., None].expand(-1, -1, 2))
    fresh = torch.rand(batch, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([picked, fresh], dim=1)


def _mask_terms(logits: torch.Tensor, targets: torch.Tensor, config: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and dice terms `(N, M)` of logits and targets of the same shape `(N, M, ..., K)` or `(N, M, H, W)`."""
    if config.mask_loss == "focal":
        per_mask = focal_loss(logits, targets, config.focal_alpha, config.focal_gamma)
    else:
        per_mask = balanced_bce_loss(logits, targets)
    return per_mask, dice_loss(logits, targets)


def _upsampling_transpose(grad: torch.Tensor, dim: int) -> torch.Tensor:
    """The transpose of 4x bilinear upsampling (align_corners=False, clamped at the edges) along `dim`: output pixel
    `4k + r` took weights (0.375, 0.625), (0.125, 0.875) from pixels (k-1, k) for r = 0, 1 and (0.875, 0.125),
    (0.625, 0.375) from (k, k+1) for r = 2, 3."""
    g0, g1, g2, g3 = grad.movedim(dim, -1).unflatten(-1, (-1, 4)).unbind(-1)
    centre = (g0 + g3).mul_(0.625).add_(g1 + g2, alpha=0.875)
    to_previous = g0.mul(0.375).add_(g1, alpha=0.125)
    to_next = g2.mul(0.125).add_(g3, alpha=0.375)
    centre[..., :-1] += to_previous[..., 1:]
    centre[..., 0] += to_previous[..., 0]
    centre[..., 1:] += to_next[..., :-1]
    centre[..., -1] += to_next[..., -1]
    return centre.movedim(-1, dim)


class BilinearUpsample4x(torch.autograd.Function):
    """`F.interpolate(x, scale_factor=4, mode="bilinear")` whose backward pass is its separable transpose (a few
    strided passes, where PyTorch's CPU kernel scatters pixel by pixel); the same values up to float rounding."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        size = (4 * logits.shape[-2], 4 * logits.shape[-1])
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _upsampling_transpose(_upsampling_transpose(grad, -1), -2)


def upsample_logits(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Bilinear upsampling of `(N, M, h, w)` logits to `size` (the decoder's 4x by `BilinearUpsample4x`)."""
    if tuple(size) == (4 * logits.shape[-2], 4 * logits.shape[-1]):
        return BilinearUpsample4x.apply(logits)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


PIXEL_BLOCK = 65536
"""Pixels per block of `FocalDiceOnBinaryTargets` on CPU, where a block's handful of temporaries stays in a core's L2
cache (on a GPU, one block: every operation is a kernel launch)."""


class FocalDiceOnBinaryTargets(torch.autograd.Function):
    """`focal_loss`, `dice_loss` and `mask_iou` per mask for targets in {0, 1}, with an analytic gradient, computed
    `block` pixels at a time in float32 and recomputed in the backward pass (it keeps only its inputs): with the
    upsampling, 2x faster on CPU than autograd through torchvision's focal loss, which serves soft targets too
    (`benchmarks/loss_speed.py`). With `z = x` off the object and `-x` on it, focal's cross-entropy is
    `softplus(z)` and its `1 - p_t` is `sigmoid(z)`.

    `(N, M, K)` logits, `(N, 1, K)` float targets -> focal, dice, IoU `(N, M)` (IoU not differentiable).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float, block: int):
        sums = logits.new_zeros(5, *logits.shape[:2])  # focal, p.t, p, (x > 0) & t, x > 0
        for start in range(0, logits.shape[-1], block):
            x, t = logits[..., start : start + block], targets[..., start : start + block]
            z = x * (1 - 2 * t)
            focal = torch.sigmoid(z).pow_(gamma).mul_(F.softplus(z))
            sums[0] += focal.mul_((2 * alpha - 1) * t + (1 - alpha)).sum(-1)  # elementwise: immune to autocast
            probs = torch.sigmoid(x)
            sums[1] += (probs * t).sum(-1)
            sums[2] += probs.sum(-1)
            positive = x > 0
            sums[3] += (positive & (t > 0.5)).sum(-1)
            sums[4] += positive.sum(-1)
        target_sums = targets.sum(-1)
        numerator, denominator = 2 * sums[1] + 1, sums[2] + target_sums + 1
        union = sums[4] + target_sums - sums[3]
        iou = torch.where(union > 0, sums[3] / union.clamp(min=1), torch.ones_like(union))
        ctx.save_for_backward(logits, targets, numerator, denominator)
        ctx.alpha, ctx.gamma, ctx.block = alpha, gamma, block
        ctx.mark_non_differentiable(iou)
        return sums[0] / logits.shape[-1], 1 - numerator / denominator, iou

    @staticmethod
    def backward(ctx, grad_focal: torch.Tensor, grad_dice: torch.Tensor, _grad_iou: torch.Tensor):
        logits, targets, numerator, denominator = ctx.saved_tensors
        alpha, gamma = ctx.alpha, ctx.gamma
        per_focal = (grad_focal / logits.shape[-1])[..., None]
        # d dice / dx = (numerator / denominator^2 - 2 t / denominator) * p (1 - p), and p (1 - p) = q (1 - q)
        per_dice = (grad_dice * numerator / denominator**2)[..., None]
        per_target = (2 * grad_dice / denominator)[..., None]
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[-1], ctx.block):
            x, t = logits[..., start : start + ctx.block], targets[..., start : start + ctx.block]
            z = x * (1 - 2 * t)
            q, softplus = torch.sigmoid(z), F.softplus(z)
            one_minus_q = 1 - q
            # d focal / dx = sign * alpha_t * q^gamma * (q + gamma * softplus * (1 - q)), sign * alpha_t = 1 - alpha - t
            focal = (
                torch.addcmul(q, softplus, one_minus_q, value=gamma)
                .mul_(q.pow(gamma))
                .mul_(((1 - alpha) - t) * per_focal)
            )
            dice = q.mul_(one_minus_q).mul_(per_dice - per_target * t)
            torch.add(focal, dice, out=grad[..., start : start + ctx.block])
        return grad, None, None, None, None


def _full_resolution_terms(
    mask_logits: torch.Tensor, targets: torch.Tensor, config: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask and dice terms and true IoU of logits upsampled to the `(N, 1, H, W)` targets (float, or bool: binary)."""
    upsampled = upsample_logits(mask_logits.float(), targets.shape[-2:])
    binary, targets = targets.dtype == torch.bool, targets.float()
    if binary and config.mask_loss == "focal" and config.focal_alpha >= 0:  # alpha < 0: torchvision weighs none
        block = PIXEL_BLOCK if upsampled.device.type == "cpu" else upsampled.shape[-2:].numel()
        return FocalDiceOnBinaryTargets.apply(
            upsampled.flatten(-2), targets.flatten(-2), config.focal_alpha, config.focal_gamma, block
        )
    targets = targets.expand_as(upsampled)
    with torch.no_grad():
        true_iou = mask_iou(upsampled, targets)
    return (*_mask_terms(upsampled, targets, config), true_iou)


def mask_loss_terms(
    mask_logits: torch.Tensor, target_masks: torch.Tensor, config: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mask term, dice term and true IoU `(N, M)` of each candidate, at `config.loss_resolution`.

    Args:
        mask_logits: `(N, M, h, w)` low-resolution logits.
        target_masks: `(N, H, W)` targets at the model input resolution.
    """
    if config.loss_resolution == "full" and (config.loss_chunk == 0 or len(mask_logits) <= config.loss_chunk):
        return _full_resolution_terms(mask_logits, target_masks[:, None], config)  # one chunk: nothing to recompute
    if config.loss_resolution == "full":
        parts = []
        for start in range(0, len(mask_logits), config.loss_chunk):
            chunk = slice(start, start + config.loss_chunk)
            logits, chunk_targets = mask_logits[chunk], target_masks[chunk, None]
            if torch.is_grad_enabled() and logits.requires_grad:
                parts.append(checkpoint(_full_resolution_terms, logits, chunk_targets, config, use_reentrant=False))
            else:
                parts.append(_full_resolution_terms(logits, chunk_targets, config))
        return tuple(torch.cat(column) for column in zip(*parts))
    targets = target_masks.float()[:, None]
    logits = mask_logits.float()
    native_targets = F.interpolate(targets, size=logits.shape[-2:], mode="area")
    with torch.no_grad():
        true_iou = mask_iou(logits, native_targets.expand_as(logits))
    if config.loss_resolution == "native":
        per_mask, per_dice = _mask_terms(logits, native_targets.expand_as(logits), config)
        return per_mask, per_dice, true_iou
    n, m = logits.shape[:2]
    flat = logits.reshape(n * m, 1, *logits.shape[-2:])
    points = uncertain_points(flat, config.loss_points)
    point_logits = point_sample(flat, points).reshape(n, m, -1)
    point_targets = point_sample(targets, points.reshape(n, -1, 2)).reshape(n, m, -1)
    per_mask, per_dice = _mask_terms(point_logits[..., None], point_targets[..., None], config)
    return per_mask, per_dice, true_iou


def sam2_loss(
    mask_logits: torch.Tensor,
    iou_scores: torch.Tensor,
    object_score_logits: torch.Tensor,
    target_masks: torch.Tensor,
    config: LossConfig | None = None,
    batch_counts: tuple[int, int] | None = None,
    train_absent: bool = False,
    weights: torch.Tensor | None = None,
) -> LossOutput:
    """Loss for N prompts.

    Args:
        mask_logits: `(N, M, h, w)` low-resolution logits (M candidate masks).
        iou_scores: `(N, M)` predicted IoUs.
        object_score_logits: `(N, 1)` object-presence logits.
        target_masks: `(N, H, W)` bool or float targets (all-zero = object absent).
        batch_counts: when these N prompts are a chunk of a batch, the batch's (objects present, prompts), by
            which the terms are normalised instead of the chunk's own, so that the chunks' losses sum to the batch's.
        train_absent: train the masks of absent objects too, towards empty (a multi-class adapter's class that an
            image does not show must predict no pixel); the object-score head still learns presence.
        weights: `(N,)` weight of each prompt's mask, Dice and IoU terms (a multi-class adapter's class weights).
    """
    config = config or LossConfig()
    per_mask, per_dice, true_iou = mask_loss_terms(mask_logits, target_masks, config)
    combined = config.mask_weight * per_mask + config.dice_weight * per_dice
    best = combined.argmin(dim=1, keepdim=True)
    present = target_masks.flatten(1).any(dim=1)
    num_present, num_prompts = batch_counts or (int(present.sum()), len(present))
    trained = (torch.ones_like(present) if train_absent else present).float()
    if weights is not None:
        trained = trained * weights.to(trained.device)
    if train_absent:
        num_present = num_prompts
    num_present = max(num_present, 1)
    object_loss = F.binary_cross_entropy_with_logits(
        object_score_logits.float()[:, 0], present.float(), reduction="sum"
    ) / max(num_prompts, 1)
    mask_term = (per_mask.gather(1, best)[:, 0] * trained).sum() / num_present
    dice_term = (per_dice.gather(1, best)[:, 0] * trained).sum() / num_present
    iou_term = (F.mse_loss(iou_scores.float(), true_iou, reduction="none").mean(1) * trained).sum() / num_present
    total = (
        config.mask_weight * mask_term
        + config.dice_weight * dice_term
        + config.iou_weight * iou_term
        + config.object_score_weight * object_loss
    )
    return LossOutput(
        loss=total,
        mask=mask_term.detach(),
        dice=dice_term.detach(),
        iou=iou_term.detach(),
        object_score=object_loss.detach(),
        mask_iou=true_iou.gather(1, best)[:, 0][present],
    )
