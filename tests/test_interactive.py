"""The RITM click simulator on hand-made masks where the right click is known, NoC, and the interactive loop on a
tiny model (previous logits fed back, box start = the predictor's box prediction, report and plot written)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from sam2_peft.cli import main
from sam2_peft.data.prompts import NEGATIVE, POSITIVE
from sam2_peft.evaluation.interactive import Click, InteractiveResult, next_click, noc, simulate_clicks
from sam2_peft.inference.predictor import Sam2PeftPredictor


def _box(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_first_click_is_the_object_pixel_farthest_from_its_border():
    target = _box((40, 50), 10, 15, 20, 25)  # 5 x 5: the centre pixel (x 22, y 12) alone is 3 from the border
    click = next_click(np.zeros_like(target), target)
    assert (click.x, click.y, click.positive) == (22, 12, True)


def test_ties_go_to_the_first_pixel_in_row_major_order():
    target = _box((20, 20), 4, 8, 6, 10)  # 4 x 4: four centre pixels at distance 2
    click = next_click(np.zeros_like(target), target)
    assert (click.x, click.y) == (7, 5)


def test_the_image_border_counts_as_background():
    target = _box((20, 30), 0, 3, 0, 30)  # a strip along the top edge, 3 rows: the middle row is deepest
    click = next_click(np.zeros_like(target), target)
    assert click.y == 1 and click.positive


def test_negative_click_in_the_deeper_false_positive_region():
    target = _box((60, 60), 5, 15, 5, 15)
    pred = target.copy()
    pred[5:8, 5:15] = False  # a thin miss: depth 2
    pred |= _box((60, 60), 30, 51, 30, 51)  # a large false positive: depth 11 at its centre (40, 40)
    click = next_click(pred, target)
    assert (click.x, click.y, click.positive) == (40, 40, False)


def test_equal_depths_give_a_negative_click_as_ritm_does():
    target = _box((40, 40), 2, 7, 2, 7)  # 5 x 5 missed entirely, depth 3
    pred = _box((40, 40), 20, 25, 20, 25)  # 5 x 5 false positive, depth 3
    click = next_click(pred, target)
    assert (click.x, click.y, click.positive) == (22, 22, False)  # strictly deeper FN needed for a positive click


def test_an_ignored_click_is_followed_by_one_beside_it():
    target = _box((31, 31), 5, 26, 5, 26)  # 21 x 21: (15, 15) is 11 from the border; its 8 neighbours are 10
    not_clicked = np.ones_like(target)
    clicks = []
    for _ in range(3):  # the model ignores every click: the prediction stays empty
        click = next_click(np.zeros_like(target), target, not_clicked)
        not_clicked[click.y, click.x] = False
        clicks.append((click.y, click.x, click.positive))
    # the reference computes distances on the whole error region, then zeroes clicked pixels: the next deepest
    # pixels are the clicked one's neighbours, first in row-major order (removing it first would give (10, 10))
    assert clicks == [(15, 15, True), (14, 14, True), (14, 15, True)]


def test_with_no_error_left_the_reference_clicks_negative_at_the_origin():
    target = _box((30, 30), 10, 15, 10, 15)
    assert next_click(target, target) == Click(x=0, y=0, positive=False)  # perfect prediction: still a click
    pred = target.copy()
    pred[12, 13] = False  # a one-pixel miss that was already clicked: every distance is 0 again
    not_clicked = np.ones_like(target)
    not_clicked[12, 13] = False
    assert next_click(pred, target, not_clicked) == Click(x=0, y=0, positive=False)
    assert next_click(pred, target) == Click(x=13, y=12, positive=True)


def _reference_click(pred, target, not_clicked):
    """The reference clicker's rule, written from its algorithm: full-image transforms of the padded error masks,
    clicked pixels zeroed afterwards, positive only when the FN maximum is strictly larger, first maximum."""
    fn = ndimage.distance_transform_edt(np.pad(target & ~pred, 1))[1:-1, 1:-1] * not_clicked
    fp = ndimage.distance_transform_edt(np.pad(~target & pred, 1))[1:-1, 1:-1] * not_clicked
    positive = fn.max() > fp.max()
    dist = fn if positive else fp
    ys, xs = np.where(dist == dist.max())
    return Click(x=int(xs[0]), y=int(ys[0]), positive=bool(positive))


def test_click_sequences_equal_the_reference_rule_on_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(40):
        shape = (int(rng.integers(8, 48)), int(rng.integers(8, 64)))
        target = ndimage.binary_dilation(rng.random(shape) > 0.97, iterations=int(rng.integers(1, 4)))
        pred = ndimage.binary_dilation(rng.random(shape) > 0.97, iterations=int(rng.integers(0, 3)))
        if trial % 5 == 0:
            pred = target.copy()  # perfect, until the flips below
        not_clicked = np.ones(shape, bool)
        for step in range(8):
            expected = _reference_click(pred, target, not_clicked)
            assert next_click(pred, target, not_clicked) == expected, (trial, step)
            not_clicked[expected.y, expected.x] = False
            if step % 3 == 2:  # sometimes the model answers: a small patch around the click follows it
                y, x = expected.y, expected.x
                pred[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = expected.positive


def test_noc_counts_never_reached_objects_as_the_maximum():
    ious = np.array([[0.5, 0.86, 0.91], [0.9, 0.95, 0.95], [0.1, 0.2, 0.3]])
    counts, never, at_max = noc(ious, 0.85, max_clicks=3)
    assert counts.tolist() == [2, 1, 3] and never == 1 and at_max == 1
    counts, never, at_max = noc(ious, 0.9, max_clicks=3)
    assert counts.tolist() == [3, 1, 3] and never == 1  # object 0 reaches 0.9 exactly at the last click
    assert at_max == 2  # RITM's count (NoC == max_clicks) includes it
    summary = InteractiveResult({"a": ious}).summary(max_clicks=3)
    assert summary["noc@85"] == pytest.approx(2.0) and summary["never_reached@90"] == 1
    assert summary["noc_at_max@90"] == 2 and summary["noc_at_max@85"] == 1
    assert summary["miou_per_click"] == pytest.approx(ious.mean(0).tolist(), abs=1e-5)


@pytest.fixture
def scene():
    image = np.full((96, 120, 3), 30, np.uint8)
    objects = np.stack([_box((96, 120), 20, 50, 20, 60), _box((96, 120), 60, 85, 70, 110)])
    image[objects.any(0)] = 200
    return image, objects


class Recording:
    """A predictor whose `decode` calls are recorded."""

    def __init__(self, predictor):
        self.predictor, self.calls = predictor, []

    def encode(self, image):
        return self.predictor.encode(image)

    def decode_logits(self, encoded, **kwargs):
        result = self.predictor.decode_logits(encoded, **kwargs)
        self.calls.append((kwargs, result))
        return result


def test_each_click_feeds_back_the_previous_chosen_logits(tiny_model, tiny_processor, scene):
    image, objects = scene
    recording = Recording(Sam2PeftPredictor(tiny_model, tiny_processor, device="cpu"))
    ious = simulate_clicks(recording, image, objects, max_clicks=4)
    assert ious.shape == (2, 4) and ((0 <= ious) & (ious <= 1)).all()
    first, _ = recording.calls[0]
    assert first["mask_inputs"] is None and first["multimask_output"] and first["points"].shape == (2, 1, 2)
    for (previous, result), (kwargs, _) in zip(recording.calls, recording.calls[1:]):
        chosen = result.scores.argmax(1) if previous["multimask_output"] else torch.zeros(2, dtype=torch.long)
        torch.testing.assert_close(kwargs["mask_inputs"], result.low_res_logits[torch.arange(2), chosen][:, None])
        assert not kwargs["multimask_output"]
        assert kwargs["points"].shape[1] == previous["points"].shape[1] + 1  # one more click per object
    clicks = recording.calls[0][0]["points"][:, 0]
    assert clicks.tolist() == [[34.5, 34.5], [82.5, 72.5]]  # deepest pixels, first in row-major order


def test_feeding_logits_back_changes_the_prediction(tiny_model, tiny_processor, scene):
    image, objects = scene
    predictor = Sam2PeftPredictor(tiny_model, tiny_processor, device="cpu")
    encoded = predictor.encode(image)
    points = np.array([[[40.5, 35.5]], [[90.5, 72.5]]], np.float32)
    plain = predictor.decode_logits(encoded, points=points)
    fed = predictor.decode_logits(encoded, points=points, mask_inputs=torch.full_like(plain.low_res_logits, 20.0))
    assert not torch.allclose(plain.logits, fed.logits)


def test_box_start_is_the_predictors_box_prediction(tiny_model, tiny_processor, scene):
    image, objects = scene
    predictor = Sam2PeftPredictor(tiny_model, tiny_processor, device="cpu")
    ious = simulate_clicks(predictor, image, objects, max_clicks=2, start="box")
    boxes = [[20, 20, 60, 50], [70, 60, 110, 85]]
    masks = predictor.predict(image, boxes=boxes).masks
    expected = [np.logical_and(m, o).sum() / np.logical_or(m, o).sum() for m, o in zip(masks, objects)]
    assert ious[:, 0] == pytest.approx(expected)


def test_eval_interactive_writes_json_and_plot(saved_tiny_model, folder_dataset, tmp_path, capsys):
    out = tmp_path / "noc.json"
    main(["eval", "--protocol", "interactive", "--model", str(saved_tiny_model), "--data", str(folder_dataset),
          "--max-images", "2", "--max-clicks", "3", "--output", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["protocol"] == "interactive" and report["num_images"] == 2 and report["max_clicks"] == 3
    for start in ("click", "box"):
        summary = report["results"]["base"][start]
        assert summary["num_objects"] == 6 and len(summary["miou_per_click"]) == 3
        assert 1 <= summary["noc@85"] <= 3 and 0 <= summary["never_reached@90"] <= 6
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"noc@85"' in capsys.readouterr().out


def test_foreground_adapter_is_refused_outside_automatic(saved_tiny_model, folder_dataset):
    with pytest.raises(SystemExit):
        main(["eval", "--protocol", "interactive", "--model", str(saved_tiny_model), "--data", str(folder_dataset),
              "--foreground-adapter", "x"])  # fmt: skip


class Constant:
    """A predictor that always returns the same masks (`(N, H, W)` bool), whatever the clicks; decode calls recorded."""

    def __init__(self, masks):
        self.masks, self.calls = torch.as_tensor(masks), []

    def encode(self, image):
        return None

    def decode_logits(self, encoded, **kwargs):
        self.calls.append(kwargs)
        logits = torch.where(self.masks, 1.0, -1.0)[:, None].repeat(1, 3 if kwargs["multimask_output"] else 1, 1, 1)
        return SimpleNamespace(logits=logits, low_res_logits=logits, scores=torch.zeros(logits.shape[:2]))


def test_the_loop_clicks_beside_an_ignored_click_and_at_the_origin_after_a_perfect_mask():
    target = _box((31, 31), 5, 26, 5, 26)[None]
    image = np.zeros((31, 31, 3), np.uint8)
    ignoring = Constant(np.zeros_like(target))
    simulate_clicks(ignoring, image, target, max_clicks=3)
    assert ignoring.calls[-1]["points"][0].tolist() == [[15.5, 15.5], [14.5, 14.5], [15.5, 14.5]]
    perfect = Constant(target)
    ious = simulate_clicks(perfect, image, target, max_clicks=3)
    assert perfect.calls[-1]["points"][0].tolist() == [[15.5, 15.5], [0.5, 0.5], [0.5, 0.5]]
    assert perfect.calls[-1]["labels"][0].tolist() == [POSITIVE, NEGATIVE, NEGATIVE] and (ious == 1).all()
