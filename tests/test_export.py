"""`sam2-peft export`: ONNX graphs with the adapter inside agree with PyTorch (each method), int8 reports its mask IoU,
`predict --onnx` writes what the PyTorch path writes, and bad input gets one `error:` line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")
pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")

from PIL import Image

from sam2_peft.cli import main
from sam2_peft.export import ExportOptions, OnnxSam2Model, load_onnx_predictor
from sam2_peft.export.onnx_export import export_source
from sam2_peft.inference.predictor import Sam2PeftPredictor
from tests.adapter_helpers import make_adapter, non_square_images, save_images

BOXES = [[30, 20, 90, 50], [5, 10, 60, 70]]
POINTS = [[[50, 30], [70, 40]], [[20, 30], [40, 60]]]
LABELS = [[1, 0], [1, 1]]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each method's adapter and its export, made once; `lora` with int8 graphs too. The base is the shipped
    compact-synthetic, whose logits are far from zero (a random tiny model's are ~1e-3: any graph would match them)."""
    root = tmp_path_factory.mktemp("exports")

    def make(kind: str):
        adapter = make_adapter(kind, "compact-synthetic", root / f"{kind}-adapter")
        options = ExportOptions(quantize="int8" if kind == "lora" else None)
        record = export_source(root / f"{kind}-onnx", options, adapter=str(adapter))
        return adapter, root / f"{kind}-onnx", record

    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = make(kind)
        return cache[kind]

    return get


@pytest.mark.slow  # each export (two or three graphs, and its own parity check) takes 5-15 s on one CPU thread
@pytest.mark.parametrize("kind", ["lora", "partial", "ptsam", "ptsam-encoder", "ptsam-upscaling"])
def test_onnx_matches_pytorch_for_each_method(kind, exports):
    adapter, folder, record = exports(kind)
    torch_predictor = Sam2PeftPredictor.from_pretrained(adapter, device="cpu")
    onnx_predictor = load_onnx_predictor(folder)
    prompts = [{"boxes": BOXES}, {"points": POINTS, "labels": LABELS}, {"boxes": BOXES, "points": POINTS}]
    if kind.startswith("ptsam"):
        prompts.append({})  # the prompt-free decoder graph
    image = non_square_images(2)[1]  # non-square: the processor's resizing and the masks' scaling back are checked
    for prompt in prompts:
        want = torch_predictor.predict(image, return_logits=True, **prompt)
        got = onnx_predictor.predict(image, return_logits=True, **prompt)
        assert got.logits.shape == want.logits.shape
        assert np.abs(got.logits - want.logits).max() < 1e-3, (kind, prompt)
        assert (got.masks == want.masks).mean() > 0.999
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-3)
    assert record["source"]["method"] == kind.split("-")[0]
    assert record["parity"]["fp32"]["box"]["max_abs_logit_diff"] < 1e-3
    has_prompt_free = "prompt_free_mask_decoder" in record["graphs"]["fp32"]
    assert has_prompt_free == kind.startswith("ptsam") == record["prompt_free"]


def test_layout_names_and_prompt_free_graph_inputs(exports):
    import onnx

    _, folder, record = exports("ptsam")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "preprocessor_config.json", "README.md", "onnx"}
    names = {}
    for graph, file in record["graphs"]["fp32"].items():
        model = onnx.load(folder / file, load_external_data=False)
        names[graph] = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    embeddings = ["image_embeddings.0", "image_embeddings.1", "image_embeddings.2"]
    assert names["vision_encoder"] == (["pixel_values"], embeddings)
    outputs = ["iou_scores", "pred_masks", "object_score_logits"]
    prompts = ["input_points", "input_labels", "input_boxes"]
    assert names["prompt_encoder_mask_decoder"] == ([*embeddings, *prompts], outputs)
    assert names["prompt_free_mask_decoder"] == (embeddings, outputs)  # no prompt input at all


def test_int8_graphs_report_their_mask_agreement(exports):
    """int8 is an approximation whose agreement depends on the model (on the small compact-synthetic base it can be
    poor): the export measures it and says so, rather than promising a figure."""
    _, folder, record = exports("lora")
    assert set(record["graphs"]) == {"fp32", "int8"}
    assert all(file.endswith("_quantized.onnx") for file in record["graphs"]["int8"].values())
    import onnx

    for file in record["graphs"]["int8"].values():  # weights int8, activations quantised on the fly
        assert "DynamicQuantizeLinear" in {node.op_type for node in onnx.load(folder / file).graph.node}
    fp32 = Sam2PeftPredictor(OnnxSam2Model(folder), load_onnx_predictor(folder).processor, device="cpu")
    int8 = Sam2PeftPredictor(OnnxSam2Model(folder, "int8"), fp32.processor, device="cpu")
    image = non_square_images(1)[0]
    a, b = fp32.predict(image, boxes=BOXES), int8.predict(image, boxes=BOXES)
    assert a.masks.shape == b.masks.shape and not np.array_equal(a.scores, b.scores)  # the int8 graphs ran
    iou = record["parity"]["int8"]["box"]["mask_iou"]
    assert 0.0 <= iou <= 1.0
    assert (
        f"| int8 | box | {record['parity']['int8']['box']['max_abs_logit_diff']:.2e} | {iou:.4f} |"
        in (folder / "README.md").read_text()
    )


def test_predict_onnx_writes_what_the_pytorch_path_writes(exports, tmp_path, capsys):
    adapter, folder, _ = exports("lora")
    images = save_images(non_square_images(2), tmp_path / "images")
    (tmp_path / "boxes.json").write_text(json.dumps({"img_0.png": BOXES, "img_1.png": BOXES[:1]}))
    runs = {"torch": ["--adapter", str(adapter), "--device", "cpu"], "onnx": ["--onnx", str(folder)]}
    for name, model in runs.items():
        main(["predict", str(images), str(tmp_path / name), "--boxes", str(tmp_path / "boxes.json"), *model])
    for image in ("img_0", "img_1"):
        masks = [np.asarray(Image.open(tmp_path / name / "masks" / f"{image}.png")) for name in runs]
        assert (masks[0] == masks[1]).mean() > 0.999 and masks[0].max() > 0
    scores = [json.loads((tmp_path / name / "predictions.json").read_text()) for name in runs]
    for image, entry in scores[0].items():
        np.testing.assert_allclose(entry["scores"], scores[1][image]["scores"], atol=1e-3)


def test_cli_export_prints_parity_and_refuses_an_existing_export(saved_tiny_model, tmp_path, capsys):
    out = tmp_path / "exported"
    main(["export", "--model", str(saved_tiny_model), str(out)])
    printed = capsys.readouterr().out
    assert "fp32 vs PyTorch" in printed and "onnx/vision_encoder.onnx" in printed
    with pytest.raises(SystemExit, match=r"^error: .*already holds an export.*--overwrite"):
        main(["export", "--model", str(saved_tiny_model), str(out)])
    stale = out / "onnx" / "stale_quantized.onnx"
    stale.write_bytes(b"old")
    main(["export", "--model", str(saved_tiny_model), str(out), "--overwrite"])
    assert not stale.exists() and (out / "onnx" / "vision_encoder.onnx").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--opset", "16"], r"--opset 16 is too old.*give --opset 17"),
        (["--opset", "21"], r"--opset 21 is newer than"),
        (["--dtype", "fp16", "--quantize", "int8"], r"--quantize int8 quantises the fp32 graphs"),
    ],
)
def test_bad_export_settings_get_one_error_line(flags, message, saved_tiny_model, tmp_path):
    with pytest.raises(SystemExit, match=rf"^error: {message}"):
        main(["export", "--model", str(saved_tiny_model), str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_missing_onnxruntime_names_the_install_line(saved_tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(SystemExit, match=r'^error: .*missing onnxruntime.*pip install "sam2-peft\[export\]"'):
        main(["export", "--model", str(saved_tiny_model), str(tmp_path / "out")])


def test_an_adapter_of_another_peft_type_is_refused_with_the_reason(saved_tiny_model, tmp_path):
    from peft import IA3Config, get_peft_model

    from sam2_peft.models.loading import load_base_model

    model, _ = load_base_model(str(saved_tiny_model))
    model.name_or_path = str(saved_tiny_model)
    config = IA3Config(
        target_modules=r"mask_decoder\.transformer\.layers\.0\.self_attn\.(k|v)_proj", feedforward_modules=[]
    )
    get_peft_model(model, config).save_pretrained(tmp_path / "ia3")
    with pytest.raises(SystemExit, match=r"^error: .*is a peft IA3 adapter, which sam2-peft cannot fold.*--model"):
        main(["export", "--adapter", str(tmp_path / "ia3"), str(tmp_path / "out")])


def test_predict_onnx_refuses_pytorch_only_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path), str(tmp_path / "out"), "--onnx", str(tmp_path), "--device", "cuda"])
    assert "--device cannot apply to --onnx" in capsys.readouterr().err.strip().splitlines()[-1]


def test_fp16_export_runs_on_onnxruntime_and_agrees(saved_tiny_model, tmp_path):
    record = export_source(tmp_path / "fp16", ExportOptions(dtype="fp16"), model=str(saved_tiny_model))
    assert list(record["graphs"]) == ["fp16"] and record["graphs"]["fp16"]["vision_encoder"].endswith("_fp16.onnx")
    assert record["parity"]["fp16"]["box"]["mask_iou"] > 0.95
    prediction = load_onnx_predictor(tmp_path / "fp16").predict(non_square_images(1)[0], boxes=BOXES)
    assert prediction.masks.shape == (2, 72, 150)


def test_decoder_takes_boxes_alone_as_transformers_js_sends_them(exports):
    """transformers.js sends boxes alone as `input_points` (B, 1, 0, 2) and `input_labels` (B, boxes, 0)."""
    _, folder, _ = exports("lora")
    model = OnnxSam2Model(folder)
    size = model.record["image_size"]
    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    feed = dict(
        zip(
            ["image_embeddings.0", "image_embeddings.1", "image_embeddings.2"],
            model.sessions["vision_encoder"].run(None, {"pixel_values": pixels}),
        )
    )
    boxes = np.array([BOXES], np.float32)
    decoder = model.sessions["prompt_encoder_mask_decoder"]
    ours = decoder.run(
        None,
        {
            **feed,
            "input_points": np.zeros((1, 2, 0, 2), np.float32),
            "input_labels": np.zeros((1, 2, 0), np.int64),
            "input_boxes": boxes,
        },
    )
    theirs = decoder.run(
        None,
        {
            **feed,
            "input_points": np.zeros((1, 1, 0, 2), np.float32),
            "input_labels": np.full((1, 2, 0), -1, np.int64),
            "input_boxes": boxes,
        },
    )
    assert theirs[1].shape == ours[1].shape == (1, 2, 1, size // 4, size // 4)
    np.testing.assert_allclose(theirs[1], ours[1], atol=1e-5)
    assert np.abs(ours[1][0, 0] - ours[1][0, 1]).max() > 1e-2  # two different boxes, two different masks


@pytest.mark.slow  # an export with an extra decoder graph, and its parity check: about 15 s on one CPU thread
def test_multimask_and_mask_input_graphs_match_pytorch(tmp_path):
    import torch

    from sam2_peft.models.loading import load_base_model

    options = ExportOptions(multimask=True, mask_input=True)
    record = export_source(tmp_path / "onnx", options, model="compact-synthetic")
    assert record["multimask_output"] and "prompt_encoder_mask_decoder_with_mask" in record["graphs"]["fp32"]
    model, processor = load_base_model("compact-synthetic")
    exported = OnnxSam2Model(tmp_path / "onnx")
    pixels = processor(images=non_square_images(1)[0], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeddings = model.get_image_embeddings(pixels)
    size = record["image_size"] // 4
    previous = 8 * torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(0))  # a mask's logits
    boxes = torch.tensor([[[30.0, 20.0, 200.0, 150.0], [5.0, 10.0, 60.0, 70.0]]])
    results = {}
    for name, prompt in {"box": {"input_boxes": boxes}, "box+mask": {"input_boxes": boxes, "input_masks": previous},
                         "mask": {"input_masks": previous}}.items():  # fmt: skip
        with torch.no_grad():
            want = model(image_embeddings=embeddings, multimask_output=True, **prompt)
        got = exported(image_embeddings=embeddings, multimask_output=True, **prompt)
        assert got.pred_masks.shape == want.pred_masks.shape and got.pred_masks.shape[2] == 3
        assert (got.pred_masks - want.pred_masks).abs().max() < 1e-3, name
        torch.testing.assert_close(got.iou_scores, want.iou_scores, atol=1e-3, rtol=0)
        results[name] = got.pred_masks
    assert (results["box"] - results["box+mask"]).abs().max() > 1e-2  # the mask input acts
    assert record["parity"]["fp32"]["box"]["max_abs_logit_diff"] < 1e-3  # its parity check ran on three masks


def test_serve_an_export_answers_as_predict_onnx(exports, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient
    from pycocotools import mask as mask_utils

    from sam2_peft.serving.app import ServeConfig, create_app

    _, folder, _ = exports("lora")
    image = non_square_images(1)[0]
    path = save_images([image], tmp_path / "images") / "img_0.png"
    expected = load_onnx_predictor(folder).predict(np.asarray(Image.open(path).convert("RGB")), boxes=BOXES)
    with TestClient(create_app(ServeConfig(model=str(folder), device="cpu", token="t"))) as client:
        image_id = client.post("/v1/images", files={"file": ("a.png", path.read_bytes(), "image/png")}).json()
        answer = client.post("/v1/segment", json={"image_id": image_id["image_id"], "boxes": BOXES}).json()
        masks = np.stack(
            [mask_utils.decode({**m["rle"], "counts": m["rle"]["counts"].encode()}) for m in answer["masks"]]
        )
        np.testing.assert_array_equal(masks, expected.masks)
        np.testing.assert_allclose([m["score"] for m in answer["masks"]], expected.scores, atol=1e-6)
        refused = client.post(
            "/v1/adapters", json={"name": "x", "source": "org/x"}, headers={"Authorization": "Bearer t"}
        )
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "adapters_unsupported"
    with pytest.raises(Exception, match="ONNX export with its adapter inside"):
        create_app(ServeConfig(model=str(folder), device="cpu", adapters=["x=org/x"]))
