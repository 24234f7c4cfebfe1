"""The SAM 2 family as bases: EdgeTAM and the SAM 3 tracker load, adapt, train, save and refuse each other's adapters,
on their built-in tiny config-built architectures."""

from __future__ import annotations

import base64
import importlib.util
import json

import numpy as np
import pytest
import torch

from sam2_peft.adapters import LoraMethod, PtsamMethod
from sam2_peft.adapters.files import SIDECAR_FILE, AdapterMismatchError, check_signature, load_adapter
from sam2_peft.cli import main as cli_main
from sam2_peft.commandline import run_from_command_line
from sam2_peft.inference.video import VideoPredictor
from sam2_peft.models.loading import family_of, load_base_model
from sam2_peft.models.quantization import quantize_image_encoder
from sam2_peft.models.segmenter import Sam2Segmenter
from sam2_peft.models.video_forward import ClipPrompt, Sam2VideoTracker
from sam2_peft.recipes.lora import main as lora_recipe
from sam2_peft.tuners.ptsam import PtsamArchitectureError

from .conftest import write_folder_dataset
from .recipe_helpers import error_line, lora_args
from .video_helpers import enliven, video_processor

NO_TIMM = importlib.util.find_spec("timm") is None
EDGETAM = pytest.param(
    "edgetam-tiny-random", marks=pytest.mark.skipif(NO_TIMM, reason="EdgeTAM needs timm (the edgetam extra)")
)
BASES = [EDGETAM, "sam3-tracker-tiny-random"]
EXPECTED = {
    "edgetam-tiny-random": ("EdgeTamModel", "Sam2Processor", "edgetam"),
    "sam3-tracker-tiny-random": ("Sam3TrackerModel", "Sam3TrackerProcessor", "sam3_tracker"),
}


def _inputs(model, seed: int = 0) -> dict:
    size = int(model.config.prompt_encoder_config.image_size)
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(2, 3, size, size, generator=generator),
        "points": torch.tensor([[[size * 0.3, size * 0.4]], [[size * 0.6, size * 0.5]]]),
        "point_labels": torch.ones(2, 1, dtype=torch.long),
    }


def _video_model(name: str):
    """The family's tiny video model, made to depend on its memory (`enliven`)."""
    return enliven(load_base_model(name, video=True)[0])


def _clip_prompts(size: int) -> dict[str, tuple[dict, ClipPrompt]]:
    """Two objects prompted by boxes, points or masks: transformers' processor inputs and the same `ClipPrompt`."""
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.45, 0.1, 0.9, 0.45]]) * size
    points = torch.tensor([[[size * 0.3, size * 0.4]], [[size * 0.7, size * 0.2]]])
    masks = torch.zeros(2, size, size)
    masks[0, size // 5 : size // 2, size // 8 : size // 2] = 1
    masks[1, size // 2 :, size // 3 :] = 1
    return {
        "box": ({"input_boxes": [boxes.tolist()]}, ClipPrompt(points=boxes.view(2, 2, 2), point_labels=BOX_LABELS)),
        "point": (
            {"input_points": [points.tolist()], "input_labels": [[[1], [1]]]},
            ClipPrompt(points=points, point_labels=torch.ones(2, 1, dtype=torch.long)),
        ),
        "mask": ({"input_masks": list(masks)}, ClipPrompt(masks=masks)),
    }


BOX_LABELS = torch.tensor([[2, 3], [2, 3]])


def _segment(model, inputs: dict) -> torch.Tensor:
    return Sam2Segmenter(model)(torch.arange(2), **inputs).mask_logits


def _lora(name: str):
    """A LoRA-adapted tiny base whose adapter is not the identity (lora_B randomised)."""
    model, _ = load_base_model(name)
    model = LoraMethod(lora_r=4).prepare(model, name)
    torch.manual_seed(1)
    for param_name, param in model.named_parameters():
        if "lora_B" in param_name:
            param.data.normal_(std=0.1)
    return model.eval()


@pytest.mark.parametrize("name", BASES)
def test_builtin_base_is_its_family_with_tied_positions(name):
    model, processor = load_base_model(name)
    model_class, processor_class, family = EXPECTED[name]
    assert (type(model).__name__, type(processor).__name__, family_of(model).name) == EXPECTED[name]
    assert torch.equal(
        model.shared_image_embedding.positional_embedding, model.prompt_encoder.shared_embedding.positional_embedding
    )
    video, _ = load_base_model(name, video=True)
    assert type(video).__name__ == model_class.replace("Model", "VideoModel")
    size = int(video.config.prompt_encoder_config.image_size)
    prompt = ClipPrompt(points=torch.tensor([[[size / 2, size / 2]]]), point_labels=torch.ones(1, 1, dtype=torch.long))
    frames = Sam2VideoTracker(video)(torch.randn(3, 3, size, size), prompt)
    assert len(frames) == 3 and frames[-1].memory_frames == 3


@pytest.mark.parametrize("name", BASES)
def test_forward_with_adapter_disabled_equals_transformers_bit_for_bit(name):
    model = _lora(name)
    inputs = _inputs(model)
    with torch.no_grad():
        adapted = _segment(model, inputs)
        with model.disable_adapter():
            ours = _segment(model, inputs)
            theirs = model.get_base_model()(
                pixel_values=inputs["pixel_values"],
                input_points=inputs["points"][:, None],
                input_labels=inputs["point_labels"][:, None],
                multimask_output=False,
            ).pred_masks[:, 0]
    assert torch.equal(ours, theirs)
    assert not torch.allclose(adapted, theirs)  # the adapter acts when enabled


@pytest.mark.parametrize("name", BASES)
def test_lora_save_load_merge_round_trip(name, tmp_path):
    model = _lora(name)
    inputs = _inputs(model)
    LoraMethod(lora_r=4).save(model, tmp_path, name)
    assert json.loads((tmp_path / SIDECAR_FILE).read_text())["base_signature"]["family"] == EXPECTED[name][2]
    reloaded = load_adapter(load_base_model(name)[0], tmp_path).eval()
    with torch.no_grad():
        expected = _segment(model, inputs)
        assert torch.equal(_segment(reloaded, inputs), expected)
        merged = reloaded.merge_and_unload()
        assert torch.allclose(_segment(merged, inputs), expected, atol=1e-5)


@pytest.mark.parametrize("name", BASES)
def test_one_training_step_moves_only_adapter_weights(name):
    model = _lora(name).train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _segment(model, _inputs(model)).square().mean().backward()
    optimizer.step()
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert moved and all("lora_" in k for k in moved), sorted(moved)[:5]


@pytest.mark.parametrize("name", BASES)
def test_ptsam_decoder_tokens_train_and_encoder_prompts_are_refused(name):
    model = PtsamMethod(num_tokens=4).prepare(load_base_model(name)[0], name)
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    size = int(model.config.prompt_encoder_config.image_size)
    output = Sam2Segmenter(model)(torch.zeros(1, dtype=torch.long), pixel_values=torch.randn(1, 3, size, size))
    output.mask_logits.mean().backward()
    assert trainable and all(model.get_parameter(k).grad is not None for k in trainable)
    with pytest.raises(PtsamArchitectureError, match="Hiera image encoder.*encoder-prompts 0"):
        PtsamMethod(num_tokens=4, encoder_prompts=2).prepare(load_base_model(name)[0], name)


@pytest.mark.parametrize("name", BASES)
def test_saved_folder_and_config_file_load_the_same_family(name, tmp_path):
    model, processor = load_base_model(name)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    inputs = _inputs(model)
    folder_model, folder_processor = load_base_model(str(tmp_path))
    from_config, _ = load_base_model(str(tmp_path / "config.json"))
    assert type(folder_processor) is type(processor)
    assert type(folder_model) is type(model) is type(from_config)
    with torch.no_grad():
        assert torch.equal(_segment(folder_model, inputs), _segment(model, inputs))


@pytest.mark.skipif(NO_TIMM, reason="EdgeTAM needs timm (the edgetam extra)")
def test_adapter_of_another_family_is_refused(tmp_path):
    edgetam_adapter = tmp_path / "edgetam"
    LoraMethod(lora_r=4).save(_lora("edgetam-tiny-random"), edgetam_adapter, "edgetam-tiny-random")
    sam3, _ = load_base_model("sam3-tracker-tiny-random")
    with pytest.raises(AdapterMismatchError, match="trained for EdgeTAM.*this base model is SAM 3 tracker"):
        check_signature(sam3, edgetam_adapter)
    sidecar = edgetam_adapter / SIDECAR_FILE  # written before families were recorded: a SAM 2 adapter
    data = json.loads(sidecar.read_text())
    del data["base_signature"]["family"]
    sidecar.write_text(json.dumps(data))
    with pytest.raises(AdapterMismatchError, match="trained for SAM 2.*this base model is EdgeTAM"):
        check_signature(load_base_model("edgetam-tiny-random")[0], edgetam_adapter)


@pytest.mark.slow
@pytest.mark.skipif(NO_TIMM, reason="EdgeTAM needs timm (the edgetam extra)")
def test_cli_trains_each_family_and_refuses_a_cross_family_adapter(tmp_path, capsys):
    data = write_folder_dataset(tmp_path / "data", num_images=4)
    for name in ("edgetam-tiny-random", "sam3-tracker-tiny-random"):
        out = tmp_path / name
        run_from_command_line(lambda: lora_recipe(lora_args(name, data, out, "--max-steps", "2")))  # noqa: B023
        assert (out / "adapter_model.safetensors").exists()
    card = (tmp_path / "edgetam-tiny-random" / "README.md").read_text()
    assert "adapter for EdgeTAM" in card and "EdgeTamModel.from_pretrained" in card
    capsys.readouterr()
    argv = ["predict", str(data / "images"), str(tmp_path / "pred"), "--adapter", str(tmp_path / "edgetam-tiny-random")]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--base-model", "sam3-tracker-tiny-random"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and "EdgeTAM" in message, message
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name", BASES)
@pytest.mark.parametrize(("kind", "live"), [("box", True), ("point", True), ("mask", True), ("point", False)])
def test_video_forward_equals_transformers_propagation_bit_for_bit(name, kind, live):
    """Our differentiable video forward (adapter disabled) against transformers' inference session, frame by frame:
    EdgeTAM through its spatial perceiver (memories kept in float32, as transformers keeps them), the SAM 3 tracker
    with memories rounded to bfloat16 as transformers stores them. `live`: the model made to depend on its memory
    (`enliven`), else as built (whose small logits show any reordering of float operations)."""
    video = _video_model(name) if live else load_base_model(name, video=True)[0]
    model = LoraMethod(targets="decoder+memory", lora_r=4).prepare(video, name)
    base = model.get_base_model()
    size = base.image_size
    frames = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    inputs, prompt = _clip_prompts(size)[kind]
    session_class = getattr(
        importlib.import_module(type(base).__module__), type(base).__name__[:-5] + "InferenceSession"
    )
    session = session_class(video=frames, video_height=size, video_width=size, dtype=torch.float32)
    video_processor(size).add_inputs_to_inference_session(session, frame_idx=0, obj_ids=[1, 2], **inputs)
    theirs = list(base.propagate_in_video_iterator(session, start_frame_idx=0))
    memory_dtype = None if family_of(base).name == "edgetam" else torch.bfloat16
    with model.disable_adapter():  # with gradients, as in training
        ours = Sam2VideoTracker(model, memory_dtype=memory_dtype)(frames, prompt)
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.equal(mine.pred_masks, reference.pred_masks)
        assert torch.equal(mine.object_score_logits, reference.object_score_logits.view(-1, 1))
    other_kind = "point" if kind != "point" else "box"
    with torch.no_grad(), model.disable_adapter():
        other = Sam2VideoTracker(model, memory_dtype=memory_dtype)(frames, _clip_prompts(size)[other_kind][1])
    if live:  # the prompt reaches the last frame
        assert (other[-1].pred_masks - ours[-1].pred_masks).abs().max() > 1e-2


@pytest.mark.parametrize("name", BASES)
def test_video_training_step_reaches_memory_lora_and_the_predictor_tracks_with_it(name, tmp_path):
    """A clip's last-frame loss trains LoRA on memory attention (EdgeTAM's attends to its perceiver's latents) and
    moves only adapter weights; the saved adapter then tracks through `VideoPredictor.from_pretrained`."""
    method = LoraMethod(targets="decoder+memory", lora_r=4, lora_dropout=0.0)
    model = method.prepare(_video_model(name), name).train()
    size = model.get_base_model().image_size
    frames = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    _, prompt = _clip_prompts(size)["box"]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    Sam2VideoTracker(model)(frames, prompt)[-1].mask_logits.sigmoid().mean().backward()
    memory_b = [p.grad for k, p in model.named_parameters() if "memory_attention" in k and "lora_B" in k]
    assert memory_b and all(g is not None and g.abs().sum() > 0 for g in memory_b)
    optimizer.step()
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert moved and all("lora_" in k for k in moved), sorted(moved)[:5]
    method.save(model, tmp_path, name)
    predictor = VideoPredictor.from_pretrained(base_model=name, adapter_id_or_path=tmp_path)
    video = [np.random.default_rng(t).integers(0, 255, (48, 64, 3), dtype=np.uint8) for t in range(3)]
    masks = list(predictor.track(video, boxes=np.array([[8, 6, 40, 30]])))
    assert len(masks) == 3 and all(m.shape == (1, 48, 64) and m.dtype == bool for m in masks)


def _saved_lora(name: str, folder) -> str:
    LoraMethod(lora_r=4).save(_lora(name), folder, name)
    return str(folder)


@pytest.mark.parametrize("name", BASES)
def test_segment_all_with_an_adapter_of_each_family(name, tmp_path):
    data = write_folder_dataset(tmp_path / "data", num_images=2)
    adapter = _saved_lora(name, tmp_path / "adapter")
    out = tmp_path / "instances"
    cli_main(["segment-all", "--adapter", adapter, "--points-per-side", "4", str(data / "images"), str(out)])
    coco = json.loads((out / "instances.json").read_text())
    assert len(coco["images"]) == 2 and len(list((out / "labels").iterdir())) == 2


@pytest.mark.parametrize("name", BASES)
def test_serve_segments_with_an_adapter_of_each_family_as_the_predictor_does(name, tmp_path):
    for module in ("fastapi", "uvicorn", "multipart", "httpx"):  # the serve extra
        pytest.importorskip(module)
    import httpx

    from sam2_peft.inference.predictor import Sam2PeftPredictor
    from sam2_peft.serving.app import create_app
    from sam2_peft.serving.config import ServeConfig

    from .serve_helpers import LiveServer
    from .test_serve import _png

    adapter = _saved_lora(name, tmp_path / "adapter")
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    expected = Sam2PeftPredictor.from_pretrained(adapter, base_model=name, device="cpu").predict(
        image, boxes=[[10, 10, 50, 40]]
    )
    server = LiveServer(create_app(ServeConfig(model=name, adapters=[("lora", adapter)], device="cpu")))
    try:
        body = {"image": base64.b64encode(_png(image)).decode(), "adapter": "lora", "boxes": [[10, 10, 50, 40]]}
        answer = httpx.post(f"{server.url}/v1/segment", json=body, timeout=60).json()
    finally:
        server.stop()
    assert [m["area"] for m in answer["masks"]] == expected.masks.sum((1, 2)).tolist()
    np.testing.assert_allclose([m["score"] for m in answer["masks"]], expected.scores, atol=1e-6)


def test_qlora_quantizes_the_sam3_tracker_vit_and_refuses_edgetam_repvit(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    model, _ = load_base_model("sam3-tracker-tiny-random")
    report = quantize_image_encoder(model, "4bit")
    assert report.quantized and not report.skipped and report.bytes_after < report.bytes_before
    model = LoraMethod(lora_r=4).prepare(model, "sam3-tracker-tiny-random")
    _segment(model, _inputs(model)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if NO_TIMM:
        return
    data = write_folder_dataset(tmp_path / "data", num_images=2)
    argv = lora_args("edgetam-tiny-random", data, tmp_path / "out", "--quantize-encoder", "4bit")
    message = error_line(capsys, argv)
    assert "EdgeTAM base's RepViT (timm) image encoder is convolutional, with no Linear layers" in message, message


@pytest.mark.slow  # two ONNX graphs and their parity check per base
@pytest.mark.parametrize("name", BASES)
def test_export_with_an_adapter_of_each_family_agrees_with_pytorch(name, tmp_path):
    for module in ("onnx", "onnxruntime"):  # the export extra
        pytest.importorskip(module)
    from sam2_peft.export import ExportOptions
    from sam2_peft.export.onnx_export import export_source

    record = export_source(tmp_path / "onnx", ExportOptions(), adapter=_saved_lora(name, tmp_path / "adapter"))
    assert record["image_size"] == load_base_model(name)[0].config.prompt_encoder_config.image_size
    for prompt in ("box", "click"):
        parity = record["parity"]["fp32"][prompt]
        assert parity["max_abs_logit_diff"] < 1e-4 and parity["mask_iou"] > 0.99, parity
