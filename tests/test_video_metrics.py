"""DAVIS J and F: hand-checked cases and an independent nearest-boundary computation of F."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from sam2_peft.evaluation.video_metrics import (
    VideoMetricAccumulator,
    boundary_f_measure,
    dilate_disk,
    disk,
    region_jaccard,
    seg2bmap,
)


def _square(shape=(100, 100), top=20, left=20, side=30) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top : top + side, left : left + side] = True
    return mask


def _f_by_distances(pred: np.ndarray, target: np.ndarray, bound_th: float = 0.008) -> float:
    """F with matching as 'a boundary pixel of the other mask lies within the disk radius' (KD-tree, no dilation)."""
    radius = math.ceil(bound_th * math.hypot(*target.shape))
    a, b = np.argwhere(seg2bmap(pred)), np.argwhere(seg2bmap(target))
    precision = float(np.mean(cKDTree(b).query(a)[0] <= radius))
    recall = float(np.mean(cKDTree(a).query(b)[0] <= radius))
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def test_boundary_map_of_a_square():
    boundary = seg2bmap(_square((10, 10), 2, 3, 4))  # rows 2-5, columns 3-6
    # DAVIS's map marks pixels whose right, lower or lower-right neighbour differs: the square's right and bottom
    # rows, and the pixels just above and to the left of it
    assert boundary[2:6, 6].all() and boundary[5, 3:7].all()
    assert boundary[1, 2:7].all() and boundary[1:6, 2].all()
    assert not boundary[3:5, 4:6].any()


def test_f_within_tolerance_is_perfect_and_beyond_it_drops():
    truth = _square()
    # 100 x 100: tolerance ceil(0.008 * 141.4) = 2 pixels
    assert boundary_f_measure(truth, truth) == 1.0
    assert boundary_f_measure(np.roll(truth, 2, axis=1), truth) == 1.0
    shifted = np.roll(truth, 3, axis=1)
    # the two vertical sides (31 boundary pixels each, of 122 per map) move out of reach
    assert 0.4 < boundary_f_measure(shifted, truth) < 0.8


def test_f_matches_nearest_boundary_distances_on_random_blobs():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:120, :160]
    for _ in range(5):
        cy, cx, r = rng.integers(30, 90), rng.integers(40, 120), rng.integers(10, 25)
        truth = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        pred = (yy - cy - rng.integers(-4, 5)) ** 2 / 1.2 + (xx - cx - rng.integers(-4, 5)) ** 2 <= (r + 2) ** 2
        assert abs(boundary_f_measure(pred, truth) - _f_by_distances(pred, truth)) < 1e-12


def test_empty_cases_follow_davis():
    empty, square = np.zeros((50, 50), bool), _square((50, 50), 10, 10, 10)
    assert boundary_f_measure(empty, empty) == 1.0 and region_jaccard(empty, empty) == 1.0
    assert boundary_f_measure(empty, square) == 0.0 and boundary_f_measure(square, empty) == 0.0
    assert region_jaccard(square, _square((50, 50), 10, 15, 10)) == 50 / 150


def test_accumulator_averages_frames_then_objects():
    square = _square((50, 50), 10, 10, 10)
    empty = np.zeros_like(square)
    acc = VideoMetricAccumulator()
    acc.update("a", [1, 2], np.stack([square, square]), np.stack([square, empty]))  # object 2: J 0
    acc.update("a", [1, 2], np.stack([square, empty]), np.stack([square, empty]))  # object 2: J 1
    acc.update("b", [1], square[None], square[None])
    per_sequence = acc.per_sequence()
    assert per_sequence["a"]["J"] == (1.0 + 0.5) / 2 and per_sequence["b"]["J"] == 1.0
    assert acc.compute()["J"] == (1.0 + 0.5 + 1.0) / 3  # DAVIS: mean over all objects
    assert acc.compute()["J&F"] == (acc.compute()["J"] + acc.compute()["F"]) / 2


def test_disk_dilation_equals_scipy_bit_for_bit():
    rng = np.random.default_rng(0)
    for trial in range(300):
        shape = tuple(int(v) for v in rng.integers(1, 70, 2))
        mask = rng.random(shape) > rng.choice([0.5, 0.9, 0.99, 0.999])  # dense to nearly empty, objects at edges
        radius = int(rng.integers(0, 13))
        expected = ndimage.binary_dilation(mask, structure=disk(radius))
        assert np.array_equal(dilate_disk(mask, radius), expected), (trial, shape, radius)


def _reference_f(pred: np.ndarray, target: np.ndarray, bound_th: float = 0.008) -> float:
    """davis2017-evaluation's `f_measure` steps (written from its algorithm), its cv2 dilation done by scipy."""
    radius = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(pred.shape))
    fg, gt = seg2bmap(pred), seg2bmap(target)
    fg_dil = ndimage.binary_dilation(fg, structure=disk(int(radius)))
    gt_dil = ndimage.binary_dilation(gt, structure=disk(int(radius)))
    n_fg, n_gt = np.sum(fg), np.sum(gt)
    if n_fg == 0 or n_gt == 0:
        precision, recall = (1 if n_fg == 0 else 0), (1 if n_gt == 0 else 0)
    else:
        precision, recall = np.sum(fg & gt_dil) / float(n_fg), np.sum(gt & fg_dil) / float(n_gt)
    return 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_f_equals_the_reference_exactly_on_random_masks():
    rng = np.random.default_rng(1)
    for trial in range(60):
        shape = (int(rng.integers(20, 160)), int(rng.integers(20, 240)))
        blobs = [ndimage.binary_dilation(rng.random(shape) > 0.995, iterations=int(rng.integers(1, 8))) for _ in "ab"]
        pred, target = blobs if trial % 4 else (blobs[0], np.roll(blobs[0], int(rng.integers(1, 9)), 1))
        bound_th = 0.008 if trial % 3 else float(rng.integers(1, 6))
        assert boundary_f_measure(pred, target, bound_th) == _reference_f(pred, target, bound_th), trial
