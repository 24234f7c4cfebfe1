"""Multi-class PTSAM from semantic label maps: class lists checked against the masks, one token set per class decoded
in one batch, per-class metrics, and the synthetic class maps the tests train on."""

import json
import logging

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import Sam2Model

import sam2_peft  # noqa: F401  (registers PTSAM with peft)
from sam2_peft.adapters import PtsamMethod
from sam2_peft.data.classes import ClassList, check_classes, named_classes, with_class_weights
from sam2_peft.data.sources import DataError, folder_records
from sam2_peft.data.synthetic import SyntheticSceneConfig, write_scene_folder
from sam2_peft.evaluation.metrics import ClassAccumulator, resolve_classes
from sam2_peft.models.loading import build_model_from_config, tiny_config
from sam2_peft.models.segmenter import Sam2Segmenter
from sam2_peft.recipes.arguments import DataArguments, parse_recipe_arguments
from sam2_peft.recipes.ptsam import MULTICLASS_DEFAULTS, multiclass_arguments
from sam2_peft.recipes.ptsam import main as ptsam
from sam2_peft.recipes.runner import semantic_classes
from sam2_peft.training.config import LossConfig
from sam2_peft.training.losses import sam2_loss
from sam2_peft.training.tasks import IGNORED_LOGIT, class_map_loss, without_ignored
from sam2_peft.tuners.options import PtsamOptions

from .conftest import TINY_SIZE

CLASSES = ("ellipse", "polygon", "ring")


def write_class_folder(root, scenes: int = 8, seed: int = 0):
    """Synthetic class maps: ellipses common, rings rare, objects overlapping (the front one keeps its pixels)."""
    config = SyntheticSceneConfig(
        image_size=128, shape_kinds=CLASSES, shape_weights=(4.0, 2.0, 1.0), min_objects=3, max_objects=6
    )
    return write_scene_folder(root, scenes, seed, config, semantic=True)


def write_label_folder(root, labels: list[np.ndarray], classes: dict | None = None):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, label in enumerate(labels):
        Image.fromarray(np.zeros((*label.shape, 3), np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(label.astype(np.uint8)).save(root / "masks" / f"{i}.png")
    if classes is not None:
        (root / "classes.json").write_text(json.dumps(classes))
    return root


def test_synthetic_class_maps_are_the_shapes_in_front(tmp_path):
    data = write_class_folder(tmp_path / "d", scenes=6)
    assert json.loads((data / "classes.json").read_text()) == {"1": "ellipse", "2": "polygon", "3": "ring"}
    records = folder_records(data, "semantic")
    pixels = np.zeros(4, np.int64)
    for record in records:
        pixels += np.bincount(record.objects().labels.ravel(), minlength=4)
    assert pixels[1] > pixels[3] > 0  # imbalanced, every class present


def test_class_list_is_checked_against_every_mask(tmp_path, caplog):
    labels = [np.zeros((20, 20), np.uint8) for _ in range(3)]
    labels[0][:5] = 1
    labels[1][5:8] = 2
    labels[2][:2] = 255  # the ignore value is no class
    data = write_label_folder(tmp_path / "d", labels, {"1": "scratch", "2": "dent"})
    records = folder_records(data, "semantic")
    with caplog.at_level(logging.INFO):
        classes = check_classes(records, named_classes(str(data), None), 255, "d")
    assert classes.id2label == {"1": "scratch", "2": "dent"} and classes.ids == (1, 2)
    assert "Class 1 'scratch': 100 pixels" in caplog.text and "in 1 of 3 images" in caplog.text
    with pytest.raises(DataError, match=r"'.*2\.png' has pixels of class id 255, which has no name"):
        check_classes(records, named_classes(str(data), None), None, "d")
    with pytest.raises(DataError, match="Class 3 \\(rust\\) has no pixels"):
        check_classes(records, named_classes(str(data), "scratch,dent,rust"), 255, "d")
    assert check_classes(records, None, 255, "d").names == ("1", "2")  # no names: the ids
    (data / "classes.json").write_text('{"0": "background"}')
    with pytest.raises(DataError, match="ids 1 and up"):
        named_classes(str(data), None)


def test_coco_categories_are_the_classes_of_semantic_coco_data(tmp_path):
    from sam2_peft.data.sources import open_records

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    square = [[2, 2, 8, 2, 8, 8, 2, 8]]  # x, y corners
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "segmentation": square, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "segmentation": [[12, 12, 18, 12, 18, 18, 12, 18]], "iscrowd": 0},
    ]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 20}],
        "annotations": annotations,
        "categories": [{"id": 3, "name": "dent"}, {"id": 7, "name": "scratch"}],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    records = open_records(str(path), mask_type="semantic")
    classes = check_classes(records, named_classes(str(path), None), 255, "coco.json")
    assert classes.id2label == {"3": "dent", "7": "scratch"}
    labels = records[0].objects().labels
    assert labels[5, 5] == 7 and labels[15, 15] == 3 and labels[0, 0] == 0


def test_class_weights_auto_inverse_frequency_or_a_list_weigh_each_class_loss():
    classes = ClassList((1, 2), ("common", "rare"), pixels=(300, 100))
    assert with_class_weights(classes, None).weights is None
    assert with_class_weights(classes, "auto").weights == pytest.approx((0.5, 1.5))  # inverse frequency, mean 1
    assert with_class_weights(classes, "1,4").weights == (1.0, 4.0)
    for bad in ("1", "1,-2", "a,b"):
        with pytest.raises(DataError, match=f"--class-weights '{bad}' needs 'auto' or 2 positive numbers"):
            with_class_weights(classes, bad)
    logits = torch.zeros(2, 1, 8, 8)  # the same wrong mask for both rows
    targets = torch.zeros(2, 32, 32, dtype=torch.bool)
    targets[:, :16] = True
    plain = sam2_loss(logits, torch.zeros(2, 1), torch.zeros(2, 1), targets)
    weighted = sam2_loss(logits, torch.zeros(2, 1), torch.zeros(2, 1), targets, weights=torch.tensor([0.5, 1.5]))
    assert weighted.mask == pytest.approx(plain.mask.item()) and weighted.dice == pytest.approx(plain.dice.item())
    weighted = sam2_loss(logits, torch.zeros(2, 1), torch.zeros(2, 1), targets, weights=torch.tensor([1.0, 3.0]))
    assert weighted.mask == pytest.approx(2 * plain.mask.item())


def test_class_names_without_semantic_masks_are_refused(tmp_path):
    from sam2_peft.cli import main as cli

    with pytest.raises(SystemExit) as exit_:
        cli(["train", "ptsam", "--class-names", "a,b", "--output-dir", str(tmp_path / "o"), "--report-to", "none"])
    assert str(exit_.value.code).startswith("error: --class-names applies to the classes of semantic masks")


def _adapted(classes: dict | None, tokens: int = 4, tune_upscaling: bool = False):
    model = build_model_from_config(tiny_config(TINY_SIZE), seed=0)
    method = PtsamMethod(num_tokens=tokens, token_init="normal", id2label=classes, tune_upscaling=tune_upscaling)
    return method.prepare(model, None)


def test_three_class_adapter_has_three_token_sets_and_at_most_3x_the_parameters():
    one = sum(p.numel() for p in _adapted(None).parameters() if p.requires_grad)
    three = _adapted(dict(zip("123", CLASSES)))
    trained = [p for p in three.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in trained] == [(3, 4, 64)]
    assert sum(p.numel() for p in trained) <= 3 * one
    # the multi-class default also tunes the upscaling layers, once for all classes: compared like with like
    one, three = (
        sum(p.numel() for p in _adapted(classes, tune_upscaling=True).parameters() if p.requires_grad)
        for classes in (None, dict(zip("123", CLASSES)))
    )
    upscaling = three - 3 * 4 * 64
    assert upscaling > 0 and one == 4 * 64 + upscaling and three <= 3 * one


def test_classes_decode_in_one_batch_exactly_as_one_adapter_per_class():
    model = _adapted(dict(zip("123", CLASSES)))
    tokens = model.base_model.model.prompt_encoder.ptsam_tokens["default"]
    pixels = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        together = Sam2Segmenter(model).eval()(torch.tensor([0, 0, 0, 1, 1, 1]), pixel_values=pixels)
        assert together.mask_logits.shape[:2] == (6, 1)
        for c in range(3):
            single = _adapted(None)
            single.base_model.model.prompt_encoder.ptsam_tokens["default"].copy_(tokens[c])
            alone = Sam2Segmenter(single).eval()(torch.tensor([0, 1]), pixel_values=pixels)
            torch.testing.assert_close(together.mask_logits[c::3], alone.mask_logits, atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="repeated once per class"):
            Sam2Segmenter(model)(torch.tensor([0, 0, 1, 1]), pixel_values=pixels)


def test_absent_classes_train_towards_empty_and_ignored_pixels_count_nowhere():
    logits = torch.full((2, 1, 8, 8), 3.0, requires_grad=True)
    targets = torch.zeros(2, 32, 32, dtype=torch.bool)
    targets[0, :16] = True
    config = LossConfig()
    present_only = sam2_loss(logits, torch.zeros(2, 1), torch.zeros(2, 1), targets, config)
    with_absent = sam2_loss(logits, torch.zeros(2, 1), torch.zeros(2, 1), targets, config, train_absent=True)
    assert with_absent.dice > present_only.dice  # the absent row's all-positive mask is now penalised
    ignore = torch.zeros(2, 32, 32, dtype=torch.bool)
    ignore[:, 16:, :4] = True
    masked = without_ignored(logits, ignore)
    assert (masked[:, :, 4:, :1] == IGNORED_LOGIT).all() and (masked[:, :, :4] == 3.0).all()
    masked.sum().backward()
    assert (logits.grad[:, :, 4:, :1] == 0).all()


def test_multiclass_loss_keeps_a_rare_class_that_looks_like_a_common_one():
    """Class A (6 % of the pixels) looks exactly like class B (25 %): one logit for all object pixels, one for the
    background. The loss the recipe trains a multi-class adapter with must leave A's object pixels predicted (the
    base's "any object" mask); the focal loss weighs negatives 3:1 and trained A to an empty mask."""
    kind = torch.zeros(32, 32, dtype=torch.long)
    kind[:8, :8], kind[16:, :16] = 1, 2
    loss = multiclass_arguments(parse_recipe_arguments("", PtsamOptions, argv=[])).loss
    values = torch.zeros(2, requires_grad=True)  # background logit, object logit
    optimizer = torch.optim.Adam([values], lr=0.05)
    for _ in range(300):
        logits = values[(kind > 0).long()][None, None]
        step = sam2_loss(logits, torch.zeros(1, 1), torch.zeros(1, 1), (kind == 1)[None], loss, train_absent=True)
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
    assert values[1] > 0 > values[0]
    given = parse_recipe_arguments("", PtsamOptions, argv=["--mask-loss", "focal"])
    assert "mask_loss" in given.given and multiclass_arguments(given).loss.mask_loss == "focal"


def test_multiclass_defaults_apply_where_the_command_line_is_silent_and_never_override_it():
    chosen = multiclass_arguments(parse_recipe_arguments("", PtsamOptions, argv=[], lr=1e-2))
    values = {"tune_upscaling": chosen.method.tune_upscaling, "lr": chosen.training.lr}
    values |= {"class_weights": chosen.data.class_weights, "mask_loss": chosen.loss.mask_loss}
    assert values == MULTICLASS_DEFAULTS and MULTICLASS_DEFAULTS["tune_upscaling"] is True
    argv = ["--tune-upscaling", "false", "--lr", "0.01", "--class-weights", "1,2,3", "--mask-loss", "focal"]
    kept = multiclass_arguments(parse_recipe_arguments("", PtsamOptions, argv=argv))
    assert not kept.method.tune_upscaling and kept.training.lr == 0.01
    assert kept.data.class_weights == "1,2,3" and kept.loss.mask_loss == "focal"


def test_class_map_loss_trains_which_class_wins_a_pixel_two_claim():
    """Both classes claim class 1's pixels (logits > 0); class 2 claims them more, so the resolved map gives them to
    class 2. The per-class losses see no conflict; the class-map loss must push class 2 down there and class 1 up."""
    logits = torch.full((2, 1, 4, 4), -4.0)
    logits[:, 0, :2] = torch.tensor([1.0, 2.0])[:, None, None]  # rows: class 1, class 2 of one image
    logits.requires_grad_(True)
    targets = torch.zeros(2, 16, 16, dtype=torch.bool)
    targets[0, :8] = True  # class 1's pixels
    loss = class_map_loss(logits, targets, None, classes=2)
    loss.backward()
    assert (logits.grad[1, 0, :2] > 0).all() and (logits.grad[0, 0, :2] < 0).all()
    assert (logits.grad[:, 0, 2:] > 0).all()  # and both down on background
    ignore = torch.zeros(2, 16, 16, dtype=torch.bool)
    ignore[:, :8] = True  # the contested cells ignored: only background cells count
    assert class_map_loss(logits.detach(), targets, ignore, classes=2) < loss.detach()


def test_class_weights_weigh_the_class_map_loss_where_classes_look_alike():
    """Two classes whose logits cannot differ from cell to cell (one value each, as when their pixels look alike):
    unweighted, the loss raises the more frequent class (it would win every cell); weighted by inverse frequency, the
    rarer one."""
    targets = torch.zeros(2, 16, 16, dtype=torch.bool)
    targets[0, :12], targets[1, 12:] = True, True  # class 1: 3/4 of the pixels, class 2: 1/4

    def gradient(weights):
        values = torch.zeros(2, requires_grad=True)
        class_map_loss(values[:, None, None, None].expand(2, 1, 4, 4), targets, None, 2, weights).backward()
        return values.grad

    unweighted = gradient(None)
    assert unweighted[0] < unweighted[1]  # descent raises class 1 more
    weighted = gradient(torch.tensor([2 / 3, 2.0]))
    assert weighted[1] < weighted[0]
    assert torch.allclose(gradient(torch.ones(2)), unweighted)


def test_overlaps_go_to_the_likeliest_class_and_scores_per_class():
    logits = np.full((2, 1, 4), -5.0)
    logits[0, 0, :2] = 2.0  # class 1 certain on pixels 0, 1
    logits[1, 0, 1:3] = 3.0  # class 2 surer on pixel 1, alone on pixel 2
    logits[1, 0, 3] = -0.1  # below the background threshold (0.5)
    assert resolve_classes(logits).tolist() == [[1, 2, 2, 0]]
    scores = ClassAccumulator(("a", "b"))
    preds = resolve_classes(logits)[None] == np.arange(1, 3)[:, None, None]
    targets = np.array([[[1, 1, 0, 0]], [[0, 0, 1, 0]]], bool)
    scores.update(preds, targets, ignore=np.array([[False, False, False, True]]))
    result = scores.compute()
    assert result["iou_a"] == 0.5 and result["iou_b"] == 0.5 and result["dice_a"] == pytest.approx(2 / 3)
    assert result["mean_iou"] == 0.5 and result["fw_iou"] == pytest.approx((2 * 0.5 + 0.5) / 3)
    assert scores.confusion.tolist() == [[0, 0, 0], [0, 1, 1], [0, 0, 1]]


@pytest.mark.slow  # about 13 s on the shared CPU
def test_semantic_folder_trains_one_adapter_for_every_class(saved_tiny_model, tmp_path, monkeypatch):
    from sam2_peft.training import tasks

    weighed = []  # the class weights each class-map loss gets
    monkeypatch.setattr(tasks, "class_map_loss", lambda *args: weighed.append(args[4]) or class_map_loss(*args))
    data, out = write_class_folder(tmp_path / "d", scenes=6), tmp_path / "run"
    ptsam([
        "--model", str(saved_tiny_model), "--data", str(data), "--mask-type", "semantic", "--output-dir", str(out),
        "--val-fraction", "0.34", "--report-to", "none", "--batch-size", "2", "--max-steps", "2", "--num-tokens", "2",
        "--num-panels", "1",
    ])  # fmt: skip
    settings = json.loads((out / "training_config.json").read_text())  # the multi-class defaults, none given
    assert settings["loss"]["mask_loss"] == "bce" and len(settings["class_weights"]) == 3
    assert settings["training"]["lr"] == 2e-3 and settings["method_settings"]["tune_upscaling"]
    assert weighed and all(torch.allclose(w, torch.tensor(settings["class_weights"])) for w in weighed)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["id2label"] == {"1": "ellipse", "2": "polygon", "3": "ring"}
    metrics = json.loads((out / "metrics.json").read_text())
    for scores in (metrics["base"], metrics["fine_tuned"]):
        assert {f"dice_{name}" for name in CLASSES} | {"mean_iou", "fw_iou"} <= set(scores)
    assert np.array(metrics["confusion_matrix"]).shape == (4, 4)
    assert Image.open(out / "confusion_matrix.png").format == "PNG"
    card = (out / "README.md").read_text()
    assert "name: Dice (ring)" in card and "| Dice (ring) |" in card  # model-index and table, per class
    loaded = PeftModel.from_pretrained(Sam2Model.from_pretrained(saved_tiny_model), out)  # plain peft
    assert loaded.base_model.model.prompt_encoder.ptsam_tokens["default"].shape == (3, 2, 64)
    assert "default" in loaded.base_model.model.mask_decoder.upscale_conv1.ptsam_delta_weight
    from sam2_peft.cli import main as cli

    cli(["predict", "--adapter", str(out), str(data / "images"), str(tmp_path / "pred")])
    written = np.array(Image.open(tmp_path / "pred" / "masks" / "scene_0000.png"))
    assert written.dtype == np.uint8 and set(np.unique(written)) <= {0, 1, 2, 3}
    assert (tmp_path / "pred" / "overlays" / "scene_0000.png").is_file()


def test_predictor_writes_the_trained_ids_resolved_by_probability(tiny_processor):
    from sam2_peft.inference.predictor import Sam2PeftPredictor

    model = _adapted({"3": "scratch", "7": "dent"})
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    prediction = Sam2PeftPredictor(model, tiny_processor, device="cpu").predict(image, return_logits=True)
    assert prediction.class_names == {3: "scratch", 7: "dent"} and prediction.class_map.shape == (70, 90)
    expected = np.array([0, 3, 7])[resolve_classes(prediction.logits)]
    np.testing.assert_array_equal(prediction.class_map, expected)
    assert set(np.unique(prediction.class_map)) - {0} and prediction.masks.shape == (2, 70, 90)
    np.testing.assert_array_equal(prediction.masks[1], prediction.class_map == 7)


def test_datasets_class_label_mask_column_names_the_classes(tmp_path):
    import datasets

    from sam2_peft.data.sources import open_records

    names = ["background", "scratch", "dent"]
    labels = [np.zeros((12, 12), np.int64) for _ in range(2)]
    labels[0][:4] = 1
    labels[1][6:] = 2
    features = datasets.Features(
        {"image": datasets.Image(), "mask": datasets.Sequence(datasets.Sequence(datasets.ClassLabel(names=names)))}
    )
    rows = {"image": [Image.fromarray(np.zeros((12, 12, 3), np.uint8))] * 2, "mask": [m.tolist() for m in labels]}
    path = tmp_path / "saved"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    records = open_records(str(path), mask_type="semantic")
    classes = check_classes(records, named_classes(str(path), None), 255, "saved")
    assert classes.id2label == {"1": "scratch", "2": "dent"}  # as classes.json would name them
    renamed = tmp_path / "renamed"  # the training path: --mask-column names the ClassLabel column
    datasets.Dataset.from_dict(rows, features=features).rename_column("mask", "label").save_to_disk(str(renamed))
    data = DataArguments(data=str(renamed), mask_type="semantic", mask_column="label")
    assert semantic_classes(data).id2label == {"1": "scratch", "2": "dent"}
    labels[1][0, 0] = 3  # a value the ClassLabel does not name
    features["mask"] = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
    datasets.Dataset.from_dict({**rows, "mask": [m.tolist() for m in labels]}, features=features).save_to_disk(
        str(tmp_path / "plain")
    )
    assert named_classes(str(tmp_path / "plain"), None) is None  # no ClassLabel: the ids in the masks
    with pytest.raises(DataError, match="class id 3, which has no name"):
        check_classes(
            open_records(str(tmp_path / "plain"), mask_type="semantic"), named_classes(str(path), None), 255, "p"
        )
