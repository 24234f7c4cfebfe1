"""Automatic mask generation: grid and specialist-guided prompts, filtering and NMS through transformers' helpers,
with a stand-in predictor whose masks are known (the image's bright region under each point), and the commands."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from sam2_peft.cli import main
from sam2_peft.evaluation.instances import segmentation_accuracy
from sam2_peft.evaluation.metrics import resolve_classes
from sam2_peft.inference.automatic import (
    AutomaticMaskConfig,
    generate_instances,
    specialist_guided_instances,
    specialist_points,
)
from sam2_peft.inference.predictor import DecodedPrompts, Prediction
from sam2_peft.models.loading import processor_for_image_size


class RegionPredictor:
    """Decodes a point into the connected region of equal, non-zero grey value under it (+8 logits inside, -8
    outside; 3 identical candidates, predicted IoU 0.9); a background point gives an empty mask. `predict` with no
    prompt returns every non-zero pixel (a "foreground" specialist)."""

    def __init__(self):
        self.processor = processor_for_image_size(128)
        self.points_seen = []

    def encode(self, image):
        return image[..., 0]

    def decode_logits(self, grey, points=None, **_):
        logits = np.full((len(points), 3, *grey.shape), -8.0, np.float32)
        for index, (x, y) in enumerate(points[:, 0]):
            value = grey[int(y), int(x)]
            self.points_seen.append((x, y))
            if value:
                regions, _ = ndimage.label(grey == value)
                logits[index, :, regions == regions[int(y), int(x)]] = 8.0
        scores = torch.full((len(points), 3), 0.9)
        return DecodedPrompts(logits=torch.from_numpy(logits), scores=scores, low_res_logits=torch.zeros(0))

    def predict(self, image, **_):
        return Prediction(masks=(image[..., 0] > 0)[None], scores=np.ones(1))


class ClassPredictor:
    """A two-class prompt-free specialist: grey values 50 and 90 are class 3, brighter ones class 7, except that on the
    left 60 % of the 210 object class 3 is likelier (logit 2 against 1.5) while class 7 is certain on the rest."""

    def predict(self, image, return_logits=False):
        grey = image[..., 0]
        logits = np.full((2, *grey.shape), -8.0, np.float32)
        logits[0, (grey == 50) | (grey == 90)] = 8.0
        logits[1, grey > 90] = 8.0
        logits[:, 70:110, 110:134] = np.array([2.0, 1.5])[:, None, None]
        class_map = np.array([0, 3, 7], np.uint8)[resolve_classes(logits)]
        masks = class_map[None] == np.array([3, 7])[:, None, None]
        return Prediction(masks, np.ones(2), logits, class_map, {3: "dark", 7: "bright"})


def _scene():
    """Three separate objects and two touching ones (different grey values) on a black 120 x 160 image."""
    grey = np.zeros((120, 160), np.uint8)
    grey[10:40, 10:50] = 50
    grey[70:100, 20:45] = 90
    yy, xx = np.mgrid[:120, :160]
    grey[(yy - 30) ** 2 + (xx - 120) ** 2 <= 15**2] = 130
    grey[70:110, 80:110] = 170  # touching the next one
    grey[70:110, 110:150] = 210
    return np.repeat(grey[..., None], 3, axis=2), grey.astype(np.int32)


def test_grid_mask_generation_finds_every_object_once():
    image, truth = _scene()
    config = AutomaticMaskConfig(points_per_side=16, min_area=20)
    result = generate_instances(RegionPredictor(), image, config)
    assert len(result.points) == 256
    assert segmentation_accuracy(truth, result.labels.astype(np.int32))["msa"] == 1.0  # NMS left one mask each
    assert len(result.scores) == 5 and result.labels.dtype == np.uint8


def test_crops_add_masks_but_nms_keeps_one_per_object():
    image, truth = _scene()
    config = AutomaticMaskConfig(points_per_side=8, crop_n_layers=1, min_area=20)
    result = generate_instances(RegionPredictor(), image, config)
    assert len(result.points) == 64 * 5  # the image and its 4 crops
    assert segmentation_accuracy(truth, result.labels.astype(np.int32))["msa"] == 1.0


def test_thresholds_and_min_area_drop_masks():
    image, _ = _scene()
    predictor = RegionPredictor()
    assert (
        len(generate_instances(predictor, image, AutomaticMaskConfig(points_per_side=16, pred_iou_thresh=0.95)).scores)
        == 0
    )
    big_only = generate_instances(predictor, image, AutomaticMaskConfig(points_per_side=16, min_area=1000))
    assert len(big_only.scores) == 3  # 1200, 1200 and 1200 pixels; the 750-pixel box and the 709-pixel disc go


def test_funnel_counts_what_each_setting_dropped():
    image, _ = _scene()
    config = AutomaticMaskConfig(points_per_side=16, min_area=20)
    result = generate_instances(RegionPredictor(), image, config)
    funnel = result.funnel
    assert funnel.candidates == 256 * 3 and funnel.best_iou == pytest.approx(0.9)
    assert funnel.below_iou == 0 and funnel.unstable > 0  # background points decode empty masks, which are unstable
    assert funnel.duplicates > 0  # every point on an object gives the same mask 3 times
    dropped = funnel.below_iou + funnel.unstable + funnel.at_crop_edge + funnel.duplicates + funnel.small_or_covered
    assert dropped + len(result.scores) == funnel.candidates

    strict = AutomaticMaskConfig(points_per_side=16, pred_iou_thresh=0.95)
    assert generate_instances(RegionPredictor(), image, strict).funnel.describe(strict) == (
        "768 candidate mask(s); dropped: 768 by --pred-iou-thresh 0.95, 0 by --stability-score-thresh 0.95, 0 by "
        "touching a crop edge, 0 by --nms-thresh 0.7 (duplicates), 0 by --min-area 0 or covered by higher-scored "
        "instances; highest predicted IoU 0.900"
    )


def test_working_size_keeps_labels_at_the_original_size():
    image, truth = _scene()
    # masks made at half size; the stand-in's downscaled image has blended edge rings (< 100 pixels at the original
    # size), which min_area (in original pixels) removes
    config = AutomaticMaskConfig(points_per_side=16, max_side=80, min_area=150)
    result = generate_instances(RegionPredictor(), image, config)
    assert result.labels.shape == truth.shape
    assert segmentation_accuracy(truth, result.labels.astype(np.int32))["sa@0.5"] == 1.0


def test_specialist_points_lie_in_the_foreground_one_per_component_or_cell():
    foreground = np.zeros((100, 100), bool)
    foreground[10:20, 10:20] = True  # within one cell of a 4 x 4 grid (cells 25 px)
    foreground[60:90, 5:95] = True  # spans 2 x 4 cells
    points = specialist_points(foreground, cells_per_side=4)
    assert all(foreground[int(y), int(x)] for x, y in points)
    inside_small = [(x, y) for x, y in points if y < 30]
    assert inside_small == [(15.5, 15.5)] or np.allclose(inside_small, [(14.5, 14.5)], atol=1.01)
    assert len(points) - len(inside_small) == 8  # one per cell piece of the large component
    assert len(specialist_points(np.zeros((10, 10), bool))) == 0
    assert len(specialist_points(foreground, cells_per_side=4, min_area=200)) == 8  # the 100-pixel part has none


def test_specialist_guided_mode_separates_touching_objects_and_skips_background():
    image, truth = _scene()
    specialist, separator = RegionPredictor(), RegionPredictor()
    config = AutomaticMaskConfig(cells_per_side=8, min_area=20)
    result = specialist_guided_instances(specialist, separator, image, config)
    foreground = truth > 0
    assert np.array_equal(result.foreground, foreground)
    assert all(foreground[int(y), int(x)] for x, y in separator.points_seen)  # no prompt on background
    assert len(result.points) < 64
    assert segmentation_accuracy(truth, result.labels.astype(np.int32))["msa"] == 1.0  # the touching pair split


def test_a_multi_class_foreground_labels_each_instance_with_its_likeliest_class():
    image, truth = _scene()
    config = AutomaticMaskConfig(cells_per_side=8, min_area=20)
    result = specialist_guided_instances(ClassPredictor(), RegionPredictor(), image, config)
    assert segmentation_accuracy(truth, result.labels.astype(np.int32))["msa"] == 1.0
    grey = image[..., 0]
    found = {int(np.bincount(grey[result.labels == k]).argmax()): c for k, c in result.class_by_label.items()}
    # the 210 object: most of its pixels resolve to class 3, but class 7's mean probability is higher
    assert found == {50: 3, 90: 3, 130: 7, 170: 7, 210: 7} and result.class_names == {3: "dark", 7: "bright"}


def test_segment_all_labels_instances_by_the_classes_of_a_multi_class_ptsam(saved_tiny_model, tmp_path):
    from scipy.special import expit

    from sam2_peft.inference.predictor import Sam2PeftPredictor
    from tests.adapter_helpers import make_adapter

    adapter = make_adapter("ptsam-classes", saved_tiny_model, tmp_path / "classes")
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    image = _scene()[0]
    Image.fromarray(image).save(images / "a.png")
    main(["segment-all", str(images), str(out), "--model", str(saved_tiny_model), "--foreground-adapter",
          str(adapter), "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--cells-per-side", "4"])  # fmt: skip
    coco = json.loads((out / "instances.json").read_text())
    assert coco["categories"] == [{"id": 3, "name": "scratch"}, {"id": 7, "name": "dent"}]
    labels = np.asarray(Image.open(out / "labels" / "a.png"))
    logits = Sam2PeftPredictor.from_pretrained(str(adapter), device="cpu").predict(image, return_logits=True).logits
    names = json.loads((out / "summary.json").read_text())["a.png"]["classes"]
    assert len(coco["annotations"]) == labels.max() == len(names) > 0
    for annotation in coco["annotations"]:
        label = int(np.bincount(labels[mask_utils.decode(annotation["segmentation"]) > 0]).argmax())
        likeliest = [3, 7][int(np.argmax([expit(c[labels == label]).mean() for c in logits]))]
        assert annotation["category_id"] == likeliest
        assert names[str(label)] == {3: "scratch", 7: "dent"}[likeliest]


def test_segment_all_writes_labels_coco_json_and_overlays(saved_tiny_model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.fromarray(_scene()[0]).save(images / f"img_{index}.png")
    out = tmp_path / "out"
    main(["segment-all", str(images), str(out), "--model", str(saved_tiny_model), "--points-per-side", "4",
          "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--format", "tif"])  # fmt: skip
    coco = json.loads((out / "instances.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == ["img_0.png", "img_1.png"]
    summary = json.loads((out / "summary.json").read_text())
    for index in range(2):
        labels = np.asarray(Image.open(out / "labels" / f"img_{index}.tif"))
        assert labels.shape == (120, 160) and labels.max() == summary[f"img_{index}.png"]["instances"]
        assert (out / "overlays" / f"img_{index}.png").is_file()
    assert len(coco["annotations"]) == sum(s["instances"] for s in summary.values())
    assert "Wrote" in capsys.readouterr().out


def test_segment_all_says_why_it_found_no_instances(saved_tiny_model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_scene()[0]).save(images / "a.png")
    main(["segment-all", str(images), str(tmp_path / "out"), "--model", str(saved_tiny_model), "--points-per-side",
          "4", "--pred-iou-thresh", "1"])  # fmt: skip
    captured = capsys.readouterr()
    assert "Wrote 0 instance(s)" in captured.out
    warning = captured.err.strip().splitlines()[-1]
    assert warning.startswith("warning: no instances: 48 candidate mask(s); dropped: 48 by --pred-iou-thresh 1, 0 by")
    assert re.search(r"highest predicted IoU 0\.\d{3}\. Lower the setting that dropped most\.$", warning), warning


def test_segment_all_refuses_a_foreground_adapter_that_is_not_ptsam(saved_tiny_model, tmp_path):
    from tests.adapter_helpers import make_adapter

    lora = make_adapter("lora", saved_tiny_model, tmp_path / "lora")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_scene()[0]).save(images / "a.png")
    with pytest.raises(SystemExit, match="error: --foreground-adapter .* is not a PTSAM adapter"):
        main(["segment-all", str(images), str(tmp_path / "out"), "--model", str(saved_tiny_model),
              "--foreground-adapter", str(lora)])  # fmt: skip


def test_eval_automatic_reports_base_and_adapter(saved_tiny_model, folder_dataset, tmp_path):
    from tests.adapter_helpers import make_adapter

    lora = make_adapter("lora", saved_tiny_model, tmp_path / "lora")
    out = tmp_path / "auto.json"
    main(["eval", "--protocol", "automatic", "--adapter", str(lora), "--base-model", str(saved_tiny_model),
          "--data", str(folder_dataset), "--max-images", "2", "--points-per-side", "4", "--pred-iou-thresh", "0",
          "--stability-score-thresh", "0", "--output", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"base (grid)", "adapter (grid)"} and report["num_images"] == 2
    for result in report["results"].values():
        assert set(result["per_image"]) == {"img_000", "img_001"}
        assert {"msa", "sa50", "ap50", "map"} <= set(result["overall"])
        assert result["overall"]["num_true"] == 6 and result["overall"]["prompts_per_image"] == 16
