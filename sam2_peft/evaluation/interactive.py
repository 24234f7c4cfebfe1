"""Interactive evaluation by simulated clicks, the RITM / f-BRS protocol (Sofiiuk et al. 2020, 2022), as its
reference clicker (`isegm/inference/clicker.py`, `Clicker._get_next_click`) places them:

- false negatives FN = object & ~prediction, false positives FP = ~object & prediction; the image border counts as
  background (each error mask is padded by one zero pixel before its exact Euclidean distance transform);
- the distances are computed on the whole FN and FP regions, then pixels already clicked get distance 0 (so when the
  model ignores a click, the next one lands right beside it, as in the reference);
- the click is positive, at the FN pixel farthest from the FN region's border, when that distance is strictly larger
  than the FP one; otherwise negative, at the farthest FP pixel; among equally far pixels the first in row-major order.
  Before any prediction the mask is empty, so the first click is the object pixel farthest from its border;
- when no unclicked error pixel is left (a perfect prediction, say) every distance is 0 and the reference still
  clicks: negative, at pixel (0, 0), the first zero in row-major order. So does `next_click`.

Each click is added to the object's prompt with the previous prediction's low-resolution logits fed back as the mask
input, as SAM's interactive loop does; the first single click asks for SAM's 3 candidates and keeps the one with the
highest predicted IoU (SAM's rule for an ambiguous click). NoC@t is the number of clicks until IoU >= t, counted as
`max_clicks` (20) for objects that never get there. Two counts are reported: objects that never reach t, and RITM's
`compute_noc_metric` count, objects whose NoC equals `max_clicks` (also those that reach t only at the last click).
With `start="box"` the object's tight box is the first interaction and clicks follow it.

Deliberate differences from the reference's `evaluate_sample`: the prediction is the model's own mask (logits > 0,
SAM's threshold) rather than RITM's probability > 0.49, and every object gets all `max_clicks` clicks (RITM stops at
its target IoU; its `--iou-analysis` mode runs all of them, as here), so mIoU after k clicks is defined for every k;
NoC is the same either way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..data.prompts import NEGATIVE, POSITIVE

MAX_CLICKS = 20
NOC_THRESHOLDS = (0.85, 0.9)


@dataclass
class Click:
    """A simulated click: `(x, y)` in pixels of the mask, positive (inside the object) or negative."""

    x: int
    y: int
    positive: bool


def next_click(pred: np.ndarray, target: np.ndarray, not_clicked: np.ndarray | None = None) -> Click:
    """RITM's next click for `(H, W)` bool prediction and object masks (always a click, as in the reference).

    `not_clicked` `(H, W)` bool (default all True) marks pixels that may still be clicked. Distances are computed on
    the box around the error pixels grown by one pixel (exactly the full-image transform: every pixel outside it is
    0, or the image border, which the padding makes 0 too), so clicks stay cheap on large images.
    """
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    false_neg, false_pos = target & ~pred, ~target & pred
    errors = false_neg | false_pos
    if not errors.any():
        return Click(x=0, y=0, positive=False)  # every distance is 0: the reference's first zero, negative
    rows, cols = np.flatnonzero(errors.any(1)), np.flatnonzero(errors.any(0))
    y0, x0 = max(rows[0] - 1, 0), max(cols[0] - 1, 0)
    window = (slice(y0, rows[-1] + 2), slice(x0, cols[-1] + 2))
    fn_dist = _border_distance(false_neg[window])
    fp_dist = _border_distance(false_pos[window])
    if not_clicked is not None:  # after the transform, as the reference multiplies by its not-clicked map
        fn_dist, fp_dist = fn_dist * not_clicked[window], fp_dist * not_clicked[window]
    if max(fn_dist.max(), fp_dist.max()) == 0:
        return Click(x=0, y=0, positive=False)
    positive = fn_dist.max() > fp_dist.max()
    dist = fn_dist if positive else fp_dist
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)  # first maximum in row-major order, as np.where[0]
    return Click(x=int(x + x0), y=int(y + y0), positive=bool(positive))


def _border_distance(region: np.ndarray) -> np.ndarray:
    """Euclidean distance of each region pixel to the nearest non-region pixel, the image border counting as one."""
    if not region.any():
        return np.zeros(region.shape)
    return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]


def mask_iou(pred: np.ndarray, target: np.ndarray) -> float:
    union = np.logical_or(pred, target).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, target).sum() / union)


def _tight_box(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


@torch.no_grad()
def simulate_clicks(
    predictor,
    image: np.ndarray,
    objects: np.ndarray,
    max_clicks: int = MAX_CLICKS,
    start: str = "click",
    encoded=None,
    chunk: int = 16,
) -> np.ndarray:
    """Run the click protocol on every object of one image, all objects decoded together at each step.

    Args:
        predictor: a `Sam2PeftPredictor`.
        image: `(H, W, 3)` uint8.
        objects: `(N, H, W)` bool true masks.
        max_clicks: interactions per object (with `start="box"`, the box is the first of them).
        start: "click" (clicks only) or "box" (the tight box, then clicks with the box kept in the prompt).
        encoded: the image's `predictor.encode(image)` when already computed.
        chunk: objects decoded together (their full-size logits are in memory at once).

    Returns:
        `(N, max_clicks)` IoU after each interaction.
    """
    if start not in ("click", "box"):
        raise ValueError(f"start must be 'click' or 'box', got '{start}'.")
    objects = np.asarray(objects, bool)
    encoded = encoded if encoded is not None else predictor.encode(image)
    ious = [
        _simulate(predictor, encoded, objects[i : i + chunk], max_clicks, start) for i in range(0, len(objects), chunk)
    ]
    return np.concatenate(ious, 0) if ious else np.zeros((0, max_clicks))


def _simulate(predictor, encoded, objects: np.ndarray, max_clicks: int, start: str) -> np.ndarray:
    """`simulate_clicks` for one chunk of objects."""
    count = len(objects)
    ious = np.zeros((count, max_clicks))
    not_clicked = np.ones_like(objects)
    preds = np.zeros_like(objects)
    points = np.zeros((count, 0, 2), np.float32)
    labels = np.zeros((count, 0), np.int64)
    boxes = np.array([_tight_box(m) for m in objects], np.float32) if start == "box" else None
    low_res = None
    for step in range(max_clicks):
        if start == "box" and step == 0:
            decoded = predictor.decode_logits(encoded, boxes=boxes)
            choice = torch.zeros(count, dtype=torch.long)
        else:
            new_points = np.zeros((count, 1, 2), np.float32)
            new_labels = np.empty((count, 1), np.int64)
            for index in range(count):
                click = next_click(preds[index], objects[index], not_clicked[index])
                new_points[index, 0] = (click.x + 0.5, click.y + 0.5)  # the pixel's centre
                new_labels[index, 0] = POSITIVE if click.positive else NEGATIVE
                not_clicked[index, click.y, click.x] = False
            points, labels = np.concatenate([points, new_points], 1), np.concatenate([labels, new_labels], 1)
            single_click = boxes is None and points.shape[1] == 1
            decoded = predictor.decode_logits(
                encoded, boxes=boxes, points=points, labels=labels, mask_inputs=low_res, multimask_output=single_click
            )
            choice = decoded.scores.argmax(1) if single_click else torch.zeros(count, dtype=torch.long)
        rows = torch.arange(count)
        low_res = decoded.low_res_logits[rows, choice][:, None]
        preds = (decoded.logits[rows, choice] > 0).numpy()
        ious[:, step] = [mask_iou(p, t) for p, t in zip(preds, objects)]
    return ious


def noc(ious: np.ndarray, threshold: float, max_clicks: int = MAX_CLICKS) -> tuple[np.ndarray, int, int]:
    """Clicks needed per object to reach `threshold` (`max_clicks` if never), how many objects never reached it, and
    how many have NoC == `max_clicks` (RITM's `compute_noc_metric` count). `ious`: `(N, K)` IoU after each click."""
    reached = ious >= threshold
    counts = np.where(reached.any(1), reached.argmax(1) + 1, max_clicks)
    return counts, int((~reached.any(1)).sum()), int((counts == max_clicks).sum())


@dataclass
class InteractiveResult:
    """IoU after each interaction for every object, and the summary numbers."""

    ious: dict[str, np.ndarray] = field(default_factory=dict)
    """Per image id, `(N, K)` IoU after each interaction of each object."""

    def summary(self, max_clicks: int = MAX_CLICKS) -> dict:
        """NoC@85/90 (mean over all objects), objects never reaching each and objects with NoC == `max_clicks`, mIoU
        after k interactions, per image."""
        if not self.ious:
            return {"num_objects": 0}
        stacked = np.concatenate(list(self.ious.values()), 0)
        result: dict = {"num_objects": int(len(stacked)), "num_images": len(self.ious)}
        for threshold in NOC_THRESHOLDS:
            counts, never, at_max = noc(stacked, threshold, max_clicks)
            tag = f"{round(threshold * 100)}"
            result[f"noc@{tag}"] = float(counts.mean()) if len(counts) else float("nan")
            result[f"never_reached@{tag}"] = never
            result[f"noc_at_max@{tag}"] = at_max  # RITM's ">=20@85%" column
        result["miou_per_click"] = stacked.mean(0).round(5).tolist() if len(stacked) else []
        result["per_image"] = {
            image_id: {
                "num_objects": int(len(values)),
                **{f"noc@{round(t * 100)}": float(noc(values, t, max_clicks)[0].mean()) for t in NOC_THRESHOLDS},
                "miou_per_click": values.mean(0).round(5).tolist(),
            }
            for image_id, values in self.ious.items()
            if len(values)
        }
        return result


def evaluate_interactive(
    predictor,
    samples: Iterable[tuple[str, np.ndarray, np.ndarray]],
    max_clicks: int = MAX_CLICKS,
    starts: tuple[str, ...] = ("click", "box"),
    progress: bool = True,
) -> dict[str, InteractiveResult]:
    """Click simulation over `(image id, image (H, W, 3), objects (N, H, W))` samples, per start ("click", "box")."""
    from tqdm.auto import tqdm

    results = {start: InteractiveResult() for start in starts}
    for image_id, image, objects in tqdm(samples, desc="interactive", unit="image", leave=False, disable=not progress):
        encoded = predictor.encode(image)
        for start in starts:
            results[start].ious[image_id] = simulate_clicks(predictor, image, objects, max_clicks, start, encoded)
    return results


def plot_curves(curves: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """Save mIoU vs number of interactions (one line per name in `curves`) as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for name, values in curves.items():
        axis.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    axis.set_xlabel("interactions (clicks; with a box, the box is the first)")
    axis.set_ylabel("mIoU")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def write_report(report: dict, path: str | Path) -> tuple[Path, Path]:
    """Write the JSON report and, next to it (same name, .png), the mIoU-vs-clicks plot of every model and start."""
    from ..io import atomic_write_json

    path = Path(path)
    atomic_write_json(path, report)
    curves = {
        f"{model}, {start}": summary["miou_per_click"]
        for model, by_start in report["results"].items()
        for start, summary in by_start.items()
        if summary.get("miou_per_click")
    }
    return path, plot_curves(curves, path.with_suffix(".png"), report.get("title", ""))


def dumps(report: dict) -> str:
    """The headline numbers of a report as indented JSON (no per-image detail)."""
    brief = {
        model: {start: {k: v for k, v in s.items() if k != "per_image"} for start, s in by_start.items()}
        for model, by_start in report["results"].items()
    }
    return json.dumps(brief, indent=2)
