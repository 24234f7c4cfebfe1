"""Instance metrics on hand-made label images whose scores are known, and the instance output files."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam2_peft.evaluation.instances import (
    coco_annotations,
    coco_map,
    instance_metrics,
    instances_to_labels,
    iou_matrix,
    segmentation_accuracy,
)
from sam2_peft.inference.instance_outputs import coco_results, save_label_image


def _squares(*specs, size=(40, 60)):
    """A label image with square instances (label, y0, x0, side)."""
    labels = np.zeros(size, np.int32)
    for label, y0, x0, side in specs:
        labels[y0 : y0 + side, x0 : x0 + side] = label
    return labels


def test_segmentation_accuracy_counts_matches_per_threshold():
    truth = _squares((1, 0, 0, 10), (2, 20, 20, 10))
    # object 1 exact; object 2 shifted by 2 columns: IoU 80/120 = 0.667; one spurious instance
    pred = _squares((7, 0, 0, 10), (3, 20, 22, 10), (5, 30, 45, 5))
    scores = segmentation_accuracy(truth, pred)
    assert scores["num_true"] == 2 and scores["num_pred"] == 3
    assert scores["sa@0.5"] == pytest.approx(2 / 3)  # TP 2, FP 1, FN 0
    assert scores["sa@0.65"] == pytest.approx(2 / 3)
    assert scores["sa@0.7"] == pytest.approx(1 / 4)  # TP 1, FP 2, FN 1
    assert scores["sa@0.95"] == pytest.approx(1 / 4)
    expected = np.mean([2 / 3] * 4 + [1 / 4] * 6)  # thresholds 0.5..0.65 and 0.7..0.95
    assert scores["msa"] == pytest.approx(expected)


def test_matching_is_one_to_one():
    truth = _squares((1, 0, 0, 10))
    pred = _squares((2, 0, 0, 10))
    pred[0:10, 0:5] = 1  # the object split in two halves, each with IoU 0.5
    assert iou_matrix(truth, pred).tolist() == [[0.5, 0.5]]
    scores = segmentation_accuracy(truth, pred)
    assert scores["tp50"] == 1 and scores["sa@0.5"] == pytest.approx(1 / 2)  # TP 1, FP 1, FN 0
    assert scores["sa@0.55"] == 0.0


def test_empty_images_agree_perfectly_and_empty_predictions_score_zero():
    empty = np.zeros((10, 10), np.int32)
    assert segmentation_accuracy(empty, empty)["msa"] == 1.0
    assert segmentation_accuracy(_squares((1, 0, 0, 5), size=(10, 10)), empty)["msa"] == 0.0


def test_coco_map_comes_from_cocoeval():
    truth = [_squares((1, 0, 0, 10), (2, 20, 20, 10)), _squares((1, 5, 5, 12))]
    assert coco_map(truth, truth)["map"] == pytest.approx(1.0)
    half = [_squares((1, 0, 0, 10)), _squares((1, 5, 5, 12))]  # 2 of 3 objects, all exact
    result = coco_map(truth, half)
    # COCO's 101-point interpolated precision: 1 up to recall 2/3, then 0 -> 67 of 101 recall points
    assert result["ap50"] == pytest.approx(67 / 101) and result["map"] == pytest.approx(67 / 101)
    empty = coco_map(truth, [np.zeros_like(t) for t in truth])
    assert empty == {"map": 0.0, "ap50": 0.0, "ap75": 0.0, "coco_max_dets": 100}


def _plain_cocoeval_stats(truth, pred, scores):
    """pycocotools' own `summarize` with its default settings (100 detections per image)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i, "height": t.shape[0], "width": t.shape[1]} for i, t in enumerate(truth, start=1)]
    annotations = [a for i, t in enumerate(truth, start=1) for a in coco_annotations(t, i)]
    for index, annotation in enumerate(annotations, start=1):
        annotation["id"] = index
    results = [a for i, (p, s) in enumerate(zip(pred, scores), start=1) for a in coco_annotations(p, i, s or {})]
    ground_truth = COCO()
    ground_truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "o"}]}
    ground_truth.createIndex()
    evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), iouType="segm")
    evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    return evaluator.stats[:3].tolist()


def test_coco_map_equals_cocoeval_summarize_up_to_100_detections():
    size = (80, 100)  # a 40 x 40 object (COCO's "medium" area) and IoUs 0.82, 0.71, 0.85 between 0.7 and 0.75
    truth = [_squares((1, 0, 0, 40), (2, 50, 50, 12), size=size), _squares((1, 5, 5, 12), (2, 25, 40, 8), size=size)]
    pred = [_squares((1, 0, 4, 40), (2, 50, 52, 12), (3, 60, 80, 5), size=size), _squares((1, 6, 5, 12), size=size)]
    scores = [{1: 0.9, 2: 0.4, 3: 0.7}, {1: 0.8}]
    result = coco_map(truth, pred, scores)
    assert [result["map"], result["ap50"], result["ap75"]] == _plain_cocoeval_stats(truth, pred, scores)
    assert 0 < result["map"] < result["ap50"] < 1


def test_coco_map_keeps_every_detection_past_cocoevals_100():
    truth = np.zeros((60, 50), np.int32)
    for index in range(120):  # 120 instances, 3 x 3 squares on a 12 x 10 grid
        y, x = divmod(index, 10)
        truth[5 * y : 5 * y + 3, 5 * x : 5 * x + 3] = index + 1
    result = coco_map([truth], [truth])
    assert result["coco_max_dets"] == 120 and result["map"] == pytest.approx(1.0)
    assert _plain_cocoeval_stats([truth], [truth], [None])[0] < 0.9  # the default drops 20 exact detections


def test_coco_map_ranks_by_score():
    truth = [_squares((1, 0, 0, 10))]
    pred = [_squares((1, 0, 0, 10), (2, 20, 20, 10))]  # one hit, one false positive
    hit_first = coco_map(truth, pred, [{1: 0.9, 2: 0.1}])["ap50"]
    miss_first = coco_map(truth, pred, [{1: 0.1, 2: 0.9}])["ap50"]
    assert hit_first == pytest.approx(1.0) and miss_first == pytest.approx(0.5, abs=0.01)


def test_instance_metrics_overall_and_per_image():
    truth = {"a": _squares((1, 0, 0, 10)), "b": _squares((1, 0, 0, 10))}
    pred = {"a": _squares((1, 0, 0, 10)), "b": np.zeros((40, 60), np.int32)}
    result = instance_metrics(truth, pred)
    assert result["per_image"]["a"]["msa"] == 1.0 and result["per_image"]["b"]["msa"] == 0.0
    assert result["overall"]["msa"] == 0.5 and result["overall"]["num_true"] == 2
    with pytest.raises(ValueError, match="differ in ids"):
        instance_metrics(truth, {"a": pred["a"]})


def test_label_images_are_16_bit_above_255_instances(tmp_path):
    masks = np.zeros((300, 4, 300), bool)
    for index in range(300):
        masks[index, :, index] = True
    labels = instances_to_labels(masks)
    assert labels.dtype == np.uint16 and labels.max() == 300
    for suffix in (".png", ".tif"):
        path = save_label_image(labels, tmp_path / f"labels{suffix}")
        read = np.asarray(Image.open(path))
        assert read.dtype.itemsize == 2 and np.array_equal(read.astype(np.int64), labels.astype(np.int64)), suffix
    small = save_label_image(instances_to_labels(masks[:3]), tmp_path / "small.png")
    assert np.asarray(Image.open(small)).dtype == np.uint8


def test_overlapping_masks_go_to_the_higher_score():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2], masks[1, 1:3] = True, True
    assert (instances_to_labels(masks, np.array([0.9, 0.1]))[1] == 1).all()
    assert (instances_to_labels(masks, np.array([0.1, 0.9]))[1] == 2).all()


def test_coco_results_round_trip_through_pycocotools(tmp_path):
    labels = _squares((1, 0, 0, 10), (2, 20, 20, 10))
    results = coco_results({"img.png": labels}, {"img.png": {1: 0.8, 2: 0.4}})
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(results))
    loaded = json.loads(path.read_text())
    assert [a["score"] for a in loaded["annotations"]] == [0.8, 0.4]
    for annotation, value in zip(loaded["annotations"], (1, 2)):
        rle = {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), labels == value)
        assert annotation["bbox"] == mask_utils.toBbox(rle).tolist()


def test_an_iou_exactly_on_a_threshold_matches():
    truth = _squares((1, 0, 0, 10))
    pred = np.zeros_like(truth)
    pred[0:6, 0:10] = 1  # IoU 60 / 100 = 0.6 exactly (elf's threshold 0.6000000000000001 would not match it)
    scores = segmentation_accuracy(truth, pred)
    assert scores["sa@0.6"] == 1.0 and scores["sa@0.65"] == 0.0
