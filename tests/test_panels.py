"""Comparison panels: each object's prompt and each model's per-image Dice drawn on the picture."""

from __future__ import annotations

import numpy as np

from sam2_peft.evaluation.panels import TILE_SIZE, _palette, comparison_panel

IMAGE = np.zeros((48, 96, 3), np.uint8)  # scaled 4x to 384 x 192
MASKS = np.zeros((2, 48, 96), bool)
MASKS[0, 10:20, 10:30] = True
MASKS[1, 30:40, 60:80] = True
TILES = {"ground truth": MASKS, "base": MASKS[:1], "fine-tuned": MASKS}
HEADER = 18


def pixels(panel, tile: int, x: float, y: float) -> tuple[int, ...]:
    """The panel's colour at original-image pixel (x, y) of tile `tile` (0 = the image)."""
    return panel.getpixel((tile * TILE_SIZE + round(x * 4), HEADER + round(y * 4)))


def test_boxes_and_clicks_are_drawn_in_their_objects_colours_on_every_tile():
    boxes = np.array([[5, 5, 35, 25], [55, 28, 85, 44]])
    points = np.array([[[20, 15]], [[70, 35]]])
    plain = comparison_panel(IMAGE, TILES, "img")
    drawn = comparison_panel(IMAGE, TILES, "img", boxes=boxes, points=points, point_labels=[[1], [0]])
    colours = [tuple(c.tolist()) for c in _palette(2)]
    for tile in range(4):
        assert pixels(plain, tile, 5, 15) == (0, 0, 0) and pixels(drawn, tile, 5, 15) == colours[0]  # box 0 left side
        assert pixels(drawn, tile, 70, 28) == colours[1]  # box 1 top side
        assert pixels(drawn, tile, 20, 15) == colours[0]  # foreground click: filled in its object's colour
        assert pixels(drawn, tile, 70, 35) == (0, 0, 0)  # background click: hollow (black inside)


def test_per_image_dice_goes_into_the_tile_labels_only():
    plain = np.asarray(comparison_panel(IMAGE, TILES))
    scored = np.asarray(comparison_panel(IMAGE, TILES, dice={"base": 0.612, "fine-tuned": 0.873}))
    changed = np.argwhere((plain != scored).any(axis=2))
    assert len(changed) and changed[:, 0].max() < HEADER  # only the header row changed
    tiles_with_text = set(changed[:, 1] // TILE_SIZE)
    assert tiles_with_text == {2, 3}  # "base" and "fine-tuned", not the image or ground truth
    assert comparison_panel(IMAGE, TILES, "img").size == (4 * TILE_SIZE, 192 + HEADER)  # old calls unchanged
