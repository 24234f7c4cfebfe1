"""The training forward must compute exactly what transformers' `Sam2Model.forward` computes."""

import torch

from sam2_peft.models.segmenter import Sam2Segmenter, select_best_mask, wants_multimask


def _exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_box_prompts_equal_model_forward(tiny_model):
    segmenter = Sam2Segmenter(tiny_model)
    pixels = torch.randn(2, 3, 128, 128)
    boxes = torch.tensor([[[10, 20, 60, 70.0], [30, 5, 120, 100]], [[0, 0, 127, 127], [40, 40, 50, 90]]])
    with torch.no_grad():
        reference = tiny_model(pixel_values=pixels, input_boxes=boxes, multimask_output=False)
        output = segmenter(
            torch.tensor([0, 0, 1, 1]),
            pixel_values=pixels,
            points=boxes.reshape(4, 2, 2),
            point_labels=torch.tensor([[2, 3]] * 4),
        )
    _exact(output.mask_logits, reference.pred_masks.flatten(0, 1))
    _exact(output.iou_scores, reference.iou_scores.flatten(0, 1))
    _exact(output.object_score_logits, reference.object_score_logits.flatten(0, 1))


def test_point_prompts_and_multimask_equal_model_forward(tiny_model):
    segmenter = Sam2Segmenter(tiny_model)
    pixels = torch.randn(1, 3, 128, 128)
    points = torch.tensor([[[[40.0, 50.0]], [[90.0, 20.0]]]])
    labels = torch.ones(1, 2, 1, dtype=torch.long)
    with torch.no_grad():
        reference = tiny_model(pixel_values=pixels, input_points=points, input_labels=labels)
        output = segmenter(
            torch.tensor([0, 0]), pixel_values=pixels, points=points[0], point_labels=labels[0], multimask_output=True
        )
    _exact(output.mask_logits, reference.pred_masks[0])
    assert output.mask_logits.shape == (2, 3, 32, 32)


def test_prompt_free_equals_model_forward(tiny_model):
    segmenter = Sam2Segmenter(tiny_model)
    pixels = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        reference = tiny_model(pixel_values=pixels, multimask_output=False)
        output = segmenter(torch.tensor([0, 1]), pixel_values=pixels)
    _exact(output.mask_logits, reference.pred_masks[:, 0])


def test_cached_features_path_equals_get_image_embeddings(tiny_model):
    segmenter = Sam2Segmenter(tiny_model)
    pixels = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = tiny_model.get_image_embeddings(pixels)
        got = segmenter.image_embeddings(segmenter.vision_features(pixels))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_multimask_rule_and_best_mask_selection():
    assert wants_multimask(torch.tensor([[1], [1]]))
    assert not wants_multimask(torch.tensor([[2, 3]]))
    assert not wants_multimask(torch.tensor([[1, 0]]))
    assert not wants_multimask(None)

    class Output:
        mask_logits = torch.arange(2 * 3 * 4.0).view(2, 3, 2, 2)
        iou_scores = torch.tensor([[0.1, 0.9, 0.2], [0.7, 0.1, 0.3]])

    best = select_best_mask(Output())
    _exact(best[0, 0], Output.mask_logits[0, 1])
    _exact(best[1, 0], Output.mask_logits[1, 0])
