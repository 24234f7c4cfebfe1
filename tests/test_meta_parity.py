"""Parity with Meta's SAM 2 implementation: a Meta model and its converted transformers model compute the same.

Needs Meta's package (installed without its CUDA extension and without touching torch):
`SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0 && pip install hydra-core iopath`.

Meta's models are built from Meta's packaged YAML configs (Hydra) with Meta's own random initialisation, on CPU
(`device="cpu"`). Parameters Meta initialises to a constant (zero embeddings, LayerNorm weights, 1e-6 layer scales)
get noise so that every tensor takes part. Each model is saved as a Meta `.pt`, converted with `load_meta_checkpoint`
from a copy of Meta's YAML with the image size changed, and both run on the same inputs in float32.

Tolerances (float32, CPU): |transformers - Meta| <= ATOL + RTOL * |Meta| for every compared tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import (
    Sam2ImageProcessor,
    Sam2Model,
    Sam2Processor,
    Sam2VideoModel,
    Sam2VideoProcessor,
)
from transformers.initialization import no_init_weights
from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession
from transformers.models.sam2_video.video_processing_sam2_video import (
    Sam2VideoVideoProcessor,
)

from sam2_peft.models.meta_checkpoint import (
    META_CONFIG_NAMES,
    load_meta_checkpoint,
    meta_state_dict_to_transformers,
    transformers_config_from_meta,
)

sam2 = pytest.importorskip(
    "sam2",
    reason="Meta's SAM 2 package is not installed (SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation "
    "sam2==1.1.0 && pip install hydra-core iopath)",
)
# Imported once the skip above has passed: Hydra comes with Meta's package.
from hydra import compose
from hydra.utils import instantiate
from sam2.build_sam import build_sam2, build_sam2_video_predictor
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2.utils.transforms import SAM2Transforms

ATOL = 1e-5
RTOL = 1e-5
SHAPES_FILE = Path(__file__).parent / "fixtures" / "meta_sam2.1_hiera_t_shapes.json"
SAM2_PACKAGE = Path(sam2.__file__).parent


def _config_file(name: str) -> str:
    """Meta's Hydra name of an official config, e.g. `configs/sam2.1/sam2.1_hiera_t.yaml`."""
    return f"configs/{name.split('_hiera_')[0]}/{name}.yaml"


def _assert_close(actual: torch.Tensor, expected: torch.Tensor | np.ndarray, what: str) -> None:
    expected = torch.as_tensor(expected).reshape(actual.shape)
    print(f"{what}: max |diff| = {(actual - expected).abs().max().item():.3g} (max |Meta| {expected.abs().max():.3g})")
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=what)


def _perturb_constant_parameters(model: torch.nn.Module) -> None:
    """Add N(0, 0.1) noise to each parameter that Meta initialises to one constant value."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1 and bool((parameter == parameter.flatten()[0]).all()):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def _convert(
    meta_model: torch.nn.Module, name: str, image_size: int, tmp_path: Path, video: bool
) -> Sam2Model | Sam2VideoModel:
    """Save `meta_model` as a Meta checkpoint and load it with a copy of Meta's YAML sized `image_size`."""
    checkpoint = tmp_path / f"{name}.pt"
    torch.save({"model": meta_model.state_dict()}, checkpoint)
    config = yaml.safe_load((SAM2_PACKAGE / _config_file(name)).read_text())
    config["model"]["image_size"] = image_size
    config_path = tmp_path / f"{name}_{image_size}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return load_meta_checkpoint(checkpoint, config_path, video=video)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image `(height, width, 3)` uint8 (upsampled noise)."""
    noise = torch.rand(
        1,
        3,
        height // 8 + 1,
        width // 8 + 1,
        generator=torch.Generator().manual_seed(seed),
    )
    image = torch.nn.functional.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False)
    return (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", META_CONFIG_NAMES)
def test_official_name_table_matches_packaged_yaml(name):
    yaml_path = SAM2_PACKAGE / _config_file(name)

    for video in (False, True):
        expected = transformers_config_from_meta(yaml_path, video=video).to_dict()
        assert transformers_config_from_meta(name, video=video).to_dict() == expected


@pytest.mark.parametrize("name", META_CONFIG_NAMES)
def test_every_official_layout_maps_onto_transformers(name):
    """Names and shapes of Meta's full state dict map exactly onto Sam2Model and Sam2VideoModel (no values)."""
    with no_init_weights():
        meta_state_dict = instantiate(compose(config_name=_config_file(name)).model, _recursive_=True).state_dict()
    with torch.device("meta"):
        models = [
            Sam2Model(transformers_config_from_meta(name)),
            Sam2VideoModel(transformers_config_from_meta(name, video=True)),
        ]

    for model in models:
        converted = meta_state_dict_to_transformers(meta_state_dict, model)
        assert converted.keys() == model.state_dict().keys()
    if name == "sam2.1_hiera_t":
        fixture = json.loads(SHAPES_FILE.read_text())
        assert fixture == {key: list(value.shape) for key, value in meta_state_dict.items()}


# ------------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("image_size", [256, 1024])
def test_processor_matches_sam2_transforms_on_non_square_image(image_size):
    image = _image(200, 300)
    points = np.array([[10.5, 20.25], [299.0, 0.0], [150.0, 199.0]], dtype=np.float32)
    boxes = np.array([[12.0, 30.5, 250.0, 190.0], [0.0, 0.0, 300.0, 200.0]], dtype=np.float32)
    meta = SAM2Transforms(resolution=image_size, mask_threshold=0.0)
    size = {"height": image_size, "width": image_size}
    processor = Sam2Processor(
        Sam2ImageProcessor(size=size, mask_size={"height": image_size // 4, "width": image_size // 4})
    )

    expected_pixels = meta(image)
    as_float = processor(images=image.astype(np.float32) / 255, do_rescale=False, return_tensors="pt")
    _assert_close(as_float.pixel_values[0], expected_pixels, "pixels (float input)")
    as_uint8 = processor(
        images=image,
        input_points=[[points.tolist()]],
        input_labels=[[[1, 0, 1]]],
        input_boxes=[boxes.tolist()],
        return_tensors="pt",
    )
    # transformers resizes uint8 images in uint8 (Meta resizes floats): less than one grey level apart.
    std = torch.tensor(meta.std)[:, None, None]
    grey_levels = (as_uint8.pixel_values[0] - expected_pixels).abs() * std * 255
    print(f"pixels (uint8 input): max |diff| = {grey_levels.max():.3g} grey levels")
    assert grey_levels.max() < 1
    assert as_uint8.original_sizes.tolist() == [[200, 300]]
    _assert_close(
        as_uint8.input_points[0, 0],
        meta.transform_coords(torch.from_numpy(points), True, (200, 300)),
        "points",
    )
    _assert_close(
        as_uint8.input_boxes[0],
        meta.transform_boxes(torch.from_numpy(boxes), True, (200, 300)),
        "boxes",
    )


# ------------------------------------------------------------------------------------------------- image model

IMAGE_CASES = [
    pytest.param("sam2.1_hiera_t", 1024, marks=pytest.mark.slow),  # over 10 s on 2 CPU cores
    ("sam2.1_hiera_t", 512),
    ("sam2.1_hiera_s", 256),
    ("sam2_hiera_s", 384),
    ("sam2.1_hiera_b+", 256),
]
# (Meta `predict` kwargs, transformers processor kwargs, multimask_output), on a 200 x 300 image.
PROMPTS = [
    (
        {"point_coords": [[100.0, 60.0]], "point_labels": [1]},
        {"input_points": [[[[100.0, 60.0]]]], "input_labels": [[[1]]]},
        True,
    ),
    (
        {"box": [40.0, 30.0, 220.0, 170.0]},
        {"input_boxes": [[[40.0, 30.0, 220.0, 170.0]]]},
        False,
    ),
    (
        {
            "point_coords": [[120.0, 90.0], [20.0, 180.0]],
            "point_labels": [1, 0],
            "box": [60.0, 40.0, 200.0, 160.0],
        },
        {
            "input_points": [[[[120.0, 90.0], [20.0, 180.0]]]],
            "input_labels": [[[1, 0]]],
            "input_boxes": [[[60.0, 40.0, 200.0, 160.0]]],
        },
        False,
    ),
    (
        {"box": [[10.0, 10.0, 150.0, 120.0], [140.0, 50.0, 290.0, 195.0]]},
        {"input_boxes": [[[10.0, 10.0, 150.0, 120.0], [140.0, 50.0, 290.0, 195.0]]]},
        True,
    ),
]


@pytest.mark.parametrize(("name", "image_size"), IMAGE_CASES)
def test_image_model_parity(name, image_size, tmp_path):
    torch.manual_seed(0)
    meta_model = build_sam2(
        _config_file(name),
        device="cpu",
        hydra_overrides_extra=[f"++model.image_size={image_size}"],
    )
    _perturb_constant_parameters(meta_model)
    hf_model = _convert(meta_model, name, image_size, tmp_path, video=False)
    image = _image(200, 300)
    predictor = SAM2ImagePredictor(meta_model)
    # Meta's predictor hard-codes the 1024-pixel feature sizes; other image sizes need them set.
    predictor._bb_feat_sizes = [(image_size // stride,) * 2 for stride in (4, 8, 16)]
    predictor.set_image(image)
    object_scores = []
    meta_model.sam_mask_decoder.register_forward_hook(lambda module, args, out: object_scores.append(out[3]))
    size = {"height": image_size, "width": image_size}
    processor = Sam2Processor(
        Sam2ImageProcessor(size=size, mask_size={"height": image_size // 4, "width": image_size // 4})
    )
    pixel_values = predictor._transforms(image)[None]

    with torch.no_grad():
        trunk = meta_model.image_encoder.trunk(pixel_values)
        hf_trunk = hf_model.vision_encoder.backbone(pixel_values).intermediate_hidden_states
        for stage, (expected, actual) in enumerate(zip(trunk, hf_trunk, strict=True)):
            _assert_close(actual.permute(0, 3, 1, 2), expected, f"Hiera stage {stage}")
        embeddings = hf_model.get_image_embeddings(pixel_values)
        expected_features = predictor._features["high_res_feats"] + [predictor._features["image_embed"]]
        for level, (expected, actual) in enumerate(zip(expected_features, embeddings, strict=True)):
            _assert_close(actual, expected, f"image embeddings level {level}")

    for index, (meta_prompt, hf_prompt, multimask) in enumerate(PROMPTS):
        masks, iou_scores, low_res_masks = predictor.predict(
            **{key: np.array(value) for key, value in meta_prompt.items()},
            multimask_output=multimask,
            return_logits=True,
        )
        inputs = processor(images=image, **hf_prompt, return_tensors="pt")
        prompts = {key: value for key, value in inputs.items() if key.startswith("input_")}
        # The first prompt runs the whole model; the others reuse the image embeddings, as Meta's predictor does.
        image_inputs = {"pixel_values": pixel_values} if index == 0 else {"image_embeddings": embeddings}
        with torch.no_grad():
            outputs = hf_model(**image_inputs, **prompts, multimask_output=multimask)
        full_res = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], binarize=False)[0]
        assert outputs.pred_masks[0].std() > 1e-2  # the comparison is not between near-constant masks
        what = f"prompt {index} ({'+'.join(meta_prompt)})"
        _assert_close(outputs.pred_masks[0], low_res_masks, f"{what}: low-res mask logits")
        _assert_close(full_res, masks, f"{what}: mask logits at 200x300")
        _assert_close(outputs.iou_scores[0], iou_scores, f"{what}: IoU scores")
        _assert_close(
            outputs.object_score_logits[0],
            object_scores[-1],
            f"{what}: object score logits",
        )


# ------------------------------------------------------------------------------------------------- video model

# (config, image size, bias of the object-score head: > 0 objects visible, < 0 occluded, number of frames)
VIDEO_CASES = [
    ("sam2.1_hiera_t", 256, 3.0, 5),
    ("sam2.1_hiera_s", 256, -3.0, 3),
    ("sam2_hiera_t", 384, 3.0, 3),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "image_size", "object_score_bias", "num_frames"), VIDEO_CASES)
def test_video_propagation_parity(name, image_size, object_score_bias, num_frames, tmp_path):
    torch.manual_seed(0)
    meta_model = build_sam2_video_predictor(
        _config_file(name),
        device="cpu",
        hydra_overrides_extra=[f"++model.image_size={image_size}"],
    )
    _perturb_constant_parameters(meta_model)
    with torch.no_grad():
        meta_model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(object_score_bias)
    # Hole filling runs a CUDA-only kernel (Meta skips it with a warning on CPU); transformers has none.
    meta_model.fill_hole_area = 0
    hf_model = _convert(meta_model, name, image_size, tmp_path, video=True)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for index in range(num_frames):
        Image.fromarray(np.roll(_image(120, 160), 6 * index, axis=1)).save(frames_dir / f"{index:05d}.jpg")

    state = meta_model.init_state(str(frames_dir))
    meta_model.add_new_points_or_box(
        state,
        frame_idx=0,
        obj_id=1,
        points=np.array([[60.0, 40.0]]),
        labels=np.array([1]),
    )
    meta_model.add_new_points_or_box(state, frame_idx=0, obj_id=2, box=np.array([20.0, 30.0, 90.0, 100.0]))
    meta_masks = {frame: masks for frame, _, masks in meta_model.propagate_in_video(state)}

    size = {"height": image_size, "width": image_size}
    processor = Sam2VideoProcessor(Sam2ImageProcessor(size=size), Sam2VideoVideoProcessor(size=size))
    # The same normalised frames as Meta's (Meta resizes its JPEGs with PIL, which is not under test here).
    session = Sam2VideoInferenceSession(video=state["images"], video_height=120, video_width=160, dtype=torch.float32)
    processor.add_inputs_to_inference_session(
        session,
        frame_idx=0,
        obj_ids=1,
        input_points=[[[[60.0, 40.0]]]],
        input_labels=[[[1]]],
    )
    hf_model(inference_session=session, frame_idx=0)
    processor.add_inputs_to_inference_session(
        session, frame_idx=0, obj_ids=2, input_boxes=[[[20.0, 30.0, 90.0, 100.0]]]
    )
    hf_model(inference_session=session, frame_idx=0)
    hf_outputs = {output.frame_idx: output for output in hf_model.propagate_in_video_iterator(session)}

    assert sorted(hf_outputs) == sorted(meta_masks) == list(range(num_frames))
    for frame, output in hf_outputs.items():
        kind = "cond_frame_outputs" if frame == 0 else "non_cond_frame_outputs"
        meta_outputs = [state["output_dict_per_obj"][index][kind][frame] for index in (0, 1)]
        expected_scores = torch.cat([out["object_score_logits"] for out in meta_outputs])
        assert bool(((expected_scores > 0) == (object_score_bias > 0)).all())  # the intended regime
        _assert_close(
            output.object_score_logits,
            expected_scores,
            f"frame {frame} object score logits",
        )
        _assert_close(
            output.pred_masks,
            torch.cat([out["pred_masks"] for out in meta_outputs]),
            f"frame {frame} low-res masks",
        )
        video_res = processor.post_process_masks([output.pred_masks], original_sizes=[[120, 160]], binarize=False)[0]
        _assert_close(video_res, meta_masks[frame], f"frame {frame} masks at 120x160")
