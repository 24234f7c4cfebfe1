"""Scores per class beyond multi-class PTSAM: prompted methods' objects keep the class the data names (semantic masks,
COCO categories) and their IoU and Dice are grouped by it; the automatic protocol's COCO AP per category."""

import json

import numpy as np
import pytest
from PIL import Image

from sam2_peft.cli import main
from sam2_peft.data.classes import objects_by_class
from sam2_peft.data.config import DatasetConfig
from sam2_peft.data.dataset import SegmentationDataset
from sam2_peft.data.sources import open_records
from sam2_peft.evaluation.instance_runner import true_instances
from sam2_peft.evaluation.instances import coco_annotations, instance_metrics
from sam2_peft.evaluation.metrics import METRIC_NAMES, MetricAccumulator
from sam2_peft.recipes.lora import main as lora_recipe
from sam2_peft.recipes.runner import build_datasets, data_classes, dataset_config
from tests.recipe_helpers import error_line, lora_args, parse_args
from tests.test_instances import _squares
from tests.test_multiclass import CLASSES, write_class_folder, write_label_folder


def _square(size, y0, x0, side):
    mask = np.zeros(size, bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


def test_object_scores_are_grouped_by_class_beside_the_image_means():
    size = (20, 20)
    truth = np.stack([_square(size, 0, 0, 4), _square(size, 10, 10, 4), _square(size, 0, 10, 4)])
    pred = truth.copy()
    pred[1, 12:] = False  # half the object: IoU 0.5, Dice 2/3
    pred[2] = False  # missed
    accumulator = MetricAccumulator()
    image = accumulator.update("a", pred, truth, np.array([1, 1, 2]))
    assert image["iou"] == pytest.approx((1 + 0.5 + 0) / 3)  # the per-image mean is unchanged
    scores = accumulator.class_scores({1: "dent", 2: "scratch"})
    assert scores == pytest.approx(
        {"iou_dent": 0.75, "iou_scratch": 0.0, "mean_iou": 0.375, "dice_dent": (1 + 2 / 3) / 2, "dice_scratch": 0.0,
         "mean_dice": (1 + 2 / 3) / 4}
    )  # fmt: skip
    plain = MetricAccumulator()
    plain.update("a", pred, truth)  # objects without classes: no class scores
    assert plain.class_scores({1: "dent"}) == {} and set(plain.compute()) == set(METRIC_NAMES)


def test_semantic_objects_keep_their_class_and_the_ignore_value_is_no_object(tmp_path, tiny_processor):
    label = np.zeros((40, 40), np.uint8)
    label[2:12, 2:12], label[20:30, 20:30], label[2:12, 25:35] = 2, 1, 255
    data = write_label_folder(tmp_path / "d", [label], {"1": "dent", "2": "scratch"})
    config = DatasetConfig(class_ids=(1, 2), ignore_index=255)
    records = objects_by_class(open_records(str(data), mask_type="semantic"), config)
    assert records[0].objects().values.tolist() == [1, 2]
    item = SegmentationDataset(records, tiny_processor, config, train=False)[0]
    assert item["object_classes"].tolist() == [1, 2] and len(item["original_masks"]) == 2
    assert item["original_masks"][1][5, 5] and not item["original_masks"].any(0)[5, 30]
    plain = SegmentationDataset(records, tiny_processor, DatasetConfig(), train=False)[0]
    assert "object_classes" not in plain  # data without classes: items as before
    args = parse_args("--data", str(data), "--mask-type", "semantic", "--val-fraction", "0")  # as LoRA builds them
    train, _ = build_datasets(args.data, tiny_processor, dataset_config(args, "instances", data_classes(args.data)))
    assert train.records[0].objects().values.tolist() == [1, 2]
    assert build_datasets(args.data, tiny_processor, dataset_config(args))[0].records[0].objects().values.tolist() == [
        1,
        2,
        255,
    ]  # without classes (as before), the ignore value is an object


def _coco(tmp_path, categories=True):
    """Two 40 x 40 images: two squares of category 7 in the first, one of category 3 in the second."""
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((40, 40, 3), 30, np.uint8)).save(tmp_path / "images" / name)

    def square(index, image, category, x, y, side=12):
        corners = [x, y, x + side, y, x + side, y + side, x, y + side]
        return {"id": index, "image_id": image, "category_id": category, "segmentation": [corners], "iscrowd": 0}

    coco = {
        "images": [{"id": i, "file_name": n, "height": 40, "width": 40} for i, n in ((1, "a.png"), (2, "b.png"))],
        "annotations": [square(1, 1, 7, 2, 2), square(2, 1, 7, 22, 22), square(3, 2, 3, 10, 14)],
    }
    if categories:
        coco["categories"] = [{"id": 3, "name": "dent"}, {"id": 7, "name": "scratch"}]
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    return path


def test_coco_instances_keep_their_category(tmp_path):
    path = _coco(tmp_path)
    assert [r.objects().classes().tolist() for r in open_records(str(path))] == [[7, 7], [3]]
    assert open_records(str(_coco(tmp_path / "plain", categories=False)))[0].objects().classes() is None


def test_lora_on_semantic_masks_scores_each_class_for_base_and_fine_tuned(saved_tiny_model, tmp_path):
    data, out = write_class_folder(tmp_path / "d", scenes=6), tmp_path / "run"
    renamed = ("e", "p", "r")  # --class-names names them instead of classes.json
    lora_recipe(lora_args(saved_tiny_model, data, out, "--max-steps", "2", "--mask-type", "semantic",
                          "--class-names", ",".join(renamed)))  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == {"1": "e", "2": "p", "3": "r"} and "confusion_matrix" not in metrics
    for scores in (metrics["base"], metrics["fine_tuned"]):
        assert {f"{m}_{c}" for m in ("iou", "dice") for c in renamed} | {"mean_iou", "mean_dice"} <= set(scores)
        assert scores["mean_dice"] == pytest.approx(np.mean([scores[f"dice_{c}"] for c in renamed]))
        assert not {f"dice_{c}" for c in CLASSES} & set(scores)
    card = (out / "README.md").read_text()
    assert "name: Dice (r)" in card and "| Dice (r) |" in card  # model-index and table, per class


def test_ptsam_with_box_prompts_on_semantic_masks_scores_each_class(saved_tiny_model, tmp_path):
    """PTSAM's tokens appended to box prompts train per object, as LoRA does: each object scored in its class too."""
    data, out = write_class_folder(tmp_path / "d", scenes=6), tmp_path / "run"
    main(["train", "ptsam", "--model", str(saved_tiny_model), "--data", str(data), "--mask-type", "semantic",
          "--prompt", "box", "--class-names", "e,p,r", "--output-dir", str(out), "--max-steps", "2",
          "--num-tokens", "2", "--num-panels", "1", "--report-to", "none", "--val-fraction", "0.34"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == {"1": "e", "2": "p", "3": "r"} and "confusion_matrix" not in metrics
    for scores in (metrics["base"], metrics["fine_tuned"]):
        assert {f"dice_{c}" for c in "epr"} | {"mean_dice"} <= set(scores)
    assert json.loads((out / "adapter_config.json").read_text())["id2label"] is None  # one token set: prompted


def test_prompted_methods_refuse_class_weights_and_streaming_semantic_masks(saved_tiny_model, tmp_path, capsys):
    data = write_class_folder(tmp_path / "d", scenes=2)
    semantic = lora_args(saved_tiny_model, data, tmp_path / "run", "--mask-type", "semantic")
    assert "--class-weights applies to the classes of a multi-class PTSAM" in error_line(
        capsys, [*semantic, "--class-weights", "auto"]
    )
    assert "--streaming does not do" in error_line(capsys, [*semantic, "--streaming", "--max-steps", "1"])


def test_eval_prompted_scores_coco_categories_and_data_without_classes_as_before(
    saved_tiny_model, folder_dataset, tmp_path
):
    path, out = _coco(tmp_path), tmp_path / "scores.json"
    main(["eval", "--model", str(saved_tiny_model), "--data", str(path), "--min-object-area", "1",
          "--output", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    metrics, per_image = report["metrics"], report["per_image"]
    assert report["classes"] == {"3": "dent", "7": "scratch"}
    # one class per image here, so each class's mean over its objects is its image's mean
    assert metrics["iou_scratch"] == pytest.approx(per_image["a"]["iou"])
    assert metrics["dice_dent"] == pytest.approx(per_image["b"]["dice"])
    assert metrics["mean_iou"] == pytest.approx((per_image["a"]["iou"] + per_image["b"]["iou"]) / 2)
    plain = tmp_path / "plain.json"
    main(["eval", "--model", str(saved_tiny_model), "--data", str(folder_dataset), "--max-images", "2",
          "--output", str(plain)])  # fmt: skip
    report = json.loads(plain.read_text())
    assert set(report["metrics"]) == set(METRIC_NAMES) and "classes" not in report


def test_true_instances_of_a_class_map_are_its_connected_components():
    from sam2_peft.data.sources import LabelMap

    labels = np.zeros((20, 20), np.uint8)
    labels[0:4, 0:4] = labels[10:14, 10:14] = 1  # two pieces of class 1
    labels[4:8, 4:8] = 1  # touches the first at a corner: the same instance
    labels[0:4, 12:16], labels[16:20, 0:4] = 2, 255
    found, classes = true_instances(LabelMap.from_labels(labels, semantic=True), ignore_index=255)
    assert classes == {1: 1, 2: 1, 3: 2} and found.max() == 3
    assert found[0, 0] == found[5, 5] != found[11, 11] and found[17, 1] == 0
    stacked, none = true_instances(LabelMap.from_labels(labels))  # instance labels: each value one instance
    assert none is None and stacked.max() == 3


def _cocoeval_stats(truth, pred, scores, true_classes, pred_classes, category_ids):
    """pycocotools' own `summarize` (default settings), restricted to `category_ids`."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i, "height": t.shape[0], "width": t.shape[1]} for i, t in enumerate(truth, start=1)]
    annotations = [
        a for i, (t, c) in enumerate(zip(truth, true_classes), start=1) for a in coco_annotations(t, i, classes=c)
    ]
    for index, annotation in enumerate(annotations, start=1):
        annotation["id"] = index
    results = [
        a
        for i, (p, s, c) in enumerate(zip(pred, scores, pred_classes), start=1)
        for a in coco_annotations(p, i, s, classes=c)
    ]
    ground_truth = COCO()
    categories = [{"id": 3, "name": "dent"}, {"id": 7, "name": "scratch"}]
    ground_truth.dataset = {"images": images, "annotations": annotations, "categories": categories}
    ground_truth.createIndex()
    evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), iouType="segm")
    evaluator.params.catIds = category_ids
    evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    return evaluator.stats[:3].tolist()


def test_per_class_ap_equals_cocoeval_summarize_with_that_category_only():
    size = (60, 60)
    truth = [
        _squares((1, 0, 0, 20), (2, 30, 30, 10), (3, 0, 40, 12), size=size),
        _squares((1, 5, 5, 12), (2, 40, 0, 16), size=size),
    ]
    true_classes = [{1: 3, 2: 7, 3: 7}, {1: 3, 2: 7}]
    # dents found well, one misclassified as a scratch; scratches found loosely, one false scratch ranked high
    pred = [
        _squares((1, 0, 1, 20), (2, 31, 32, 10), (3, 2, 40, 12), (4, 50, 50, 8), size=size),
        _squares((1, 5, 6, 12), size=size),
    ]
    scores = [{1: 0.9, 2: 0.5, 3: 0.6, 4: 0.95}, {1: 0.7}]
    pred_classes = [{1: 3, 2: 7, 3: 3, 4: 7}, {1: 7}]
    ids = ["a", "b"]
    result = instance_metrics(
        dict(zip(ids, truth)), dict(zip(ids, pred)), dict(zip(ids, scores)),
        dict(zip(ids, true_classes)), dict(zip(ids, pred_classes)), {3: "dent", 7: "scratch"},
    )["overall"]  # fmt: skip
    dent, scratch = result["per_class"]["dent"], result["per_class"]["scratch"]
    assert [dent["map"], dent["ap50"], dent["ap75"]] == _cocoeval_stats(
        truth, pred, scores, true_classes, pred_classes, [3]
    )
    assert [scratch["map"], scratch["ap50"], scratch["ap75"]] == _cocoeval_stats(
        truth, pred, scores, true_classes, pred_classes, [7]
    )
    assert dent["ap50"] != scratch["ap50"] and dent["map"] != scratch["map"]
    assert [result["class_map"], result["class_ap50"], result["class_ap75"]] == _cocoeval_stats(
        truth, pred, scores, true_classes, pred_classes, [3, 7]
    )
    agnostic = instance_metrics(dict(zip(ids, truth)), dict(zip(ids, pred)), dict(zip(ids, scores)))["overall"]
    assert result["map"] == agnostic["map"] and "per_class" not in agnostic  # the class-agnostic AP as before
    no_class = instance_metrics(
        dict(zip(ids, truth)), dict(zip(ids, pred)), dict(zip(ids, scores)), dict(zip(ids, true_classes))
    )["overall"]
    assert no_class["per_class"] is None and "predictions carry no class" in no_class["per_class_note"]


def test_eval_automatic_reports_ap_per_class_with_a_multi_class_foreground(saved_tiny_model, tmp_path):
    from tests.adapter_helpers import make_adapter

    adapter = make_adapter("ptsam-classes", saved_tiny_model, tmp_path / "classes")
    rng = np.random.default_rng(0)
    label = np.zeros((64, 64), np.uint8)
    for value, (y, x) in zip((3, 7, 3), rng.integers(0, 48, (3, 2))):
        label[y : y + 14, x : x + 14] = value
    data, out = write_label_folder(tmp_path / "d", [label], {"3": "scratch", "7": "dent"}), tmp_path / "auto.json"
    main(["eval", "--protocol", "automatic", "--model", str(saved_tiny_model), "--foreground-adapter", str(adapter),
          "--data", str(data), "--mask-type", "semantic", "--points-per-side", "2", "--cells-per-side", "2",
          "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--output", str(out)])  # fmt: skip
    results = json.loads(out.read_text())["results"]
    guided = results["specialist-guided (base separates)"]["overall"]
    assert set(guided["per_class"]) == {"scratch", "dent"}
    assert all(set(ap) == {"map", "ap50", "ap75"} for ap in guided["per_class"].values()) and "class_map" in guided
    grid = results["base (grid)"]["overall"]
    assert grid["per_class"] is None and "predictions carry no class" in grid["per_class_note"]


def test_eval_interactive_on_semantic_masks_clicks_each_class_region_and_not_the_ignore_region(
    saved_tiny_model, tmp_path
):
    label = np.zeros((64, 64), np.uint8)
    label[2:20, 2:20], label[30:50, 30:50], label[2:20, 40:60] = 2, 1, 255
    data = write_label_folder(tmp_path / "d", [label, label], {"1": "dent", "2": "scratch"})
    out = tmp_path / "noc.json"
    main(["eval", "--protocol", "interactive", "--model", str(saved_tiny_model), "--data", str(data),
          "--mask-type", "semantic", "--max-clicks", "1", "--min-object-area", "1", "--output", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["results"]["base"]["click"]["num_objects"] == 4  # 2 classes x 2 images; the 255 region is none
