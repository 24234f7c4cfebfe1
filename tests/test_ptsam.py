"""PTSAM on tiny models: what trains, zero encoder prompts = base model, output-mask choice, peft save/load, adapters."""

import copy

import numpy as np
import pytest
import torch
from peft import AutoPeftModel, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Sam2Model

import sam2_peft  # noqa: F401  (registers PTSAM with peft)
from sam2_peft.inference.prompt_free import predict_prompt_free
from sam2_peft.models.loading import build_model_from_config, tiny_config
from sam2_peft.tuners.ptsam import PtsamArchitectureError, PtsamAttentionLayer, PtsamConfig, PtsamMergeError
from sam2_peft.tuners.ptsam.layer import initial_tokens, row_adapters

SIZE = 128
WIDTH = 64  # decoder width of tiny_config


def _tiny(seed: int = 0) -> Sam2Model:
    return build_model_from_config(tiny_config(SIZE), seed=seed)


def _image(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _masks(model, box: bool = False, multimask: bool = False) -> torch.Tensor:
    boxes = torch.tensor([[[10.0, 20, 70, 90]], [[30.0, 5, 120, 60]]]) if box else None
    with torch.no_grad():
        return model(pixel_values=_image(), input_boxes=boxes, multimask_output=multimask).pred_masks


def test_decoder_only_trains_exactly_n_tokens_of_decoder_width():
    model = get_peft_model(_tiny(), PtsamConfig(num_tokens=5))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["base_model.model.prompt_encoder.ptsam_tokens.default"]
    assert trainable["base_model.model.prompt_encoder.ptsam_tokens.default"].shape == (5, WIDTH)
    assert sum(p.numel() for p in trainable.values()) == 5 * WIDTH


def test_only_prompts_get_gradients_and_change_the_base_stays_bit_identical():
    reference = _tiny()
    model = get_peft_model(_tiny(), PtsamConfig(num_tokens=4, encoder_prompts=2)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(pixel_values=_image(), multimask_output=False).pred_masks.sigmoid().mean()
        loss.backward()
        graded = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert graded and all(".ptsam_" in n for n in graded)
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "base_model.model.prompt_encoder.ptsam_tokens.default" in changed
    assert any("ptsam_encoder_prompts" in n for n in changed)
    assert all(".ptsam_" in n for n in changed)
    unloaded = model.unload()
    for name, value in reference.state_dict().items():
        assert torch.equal(unloaded.state_dict()[name], value), name


def test_prompt_free_replaces_the_padding_and_prompted_mode_appends_tokens():
    model = get_peft_model(_tiny(), PtsamConfig(num_tokens=3))
    encoder = model.base_model.model.prompt_encoder
    tokens = encoder.ptsam_tokens["default"]
    padding_only = (torch.zeros(2, 1, 1, 2), -torch.ones(2, 1, 1, dtype=torch.long), None, None)
    sparse, dense = encoder(*padding_only)
    assert sparse.shape == (2, 1, 3, WIDTH) and torch.equal(sparse[1, 0], tokens)
    base_sparse, base_dense = encoder.base_layer(*padding_only)
    assert torch.equal(dense, base_dense)
    boxes = torch.tensor([[[10.0, 20, 70, 90]]])
    sparse, _ = encoder(None, None, boxes, None)
    base_sparse, _ = encoder.base_layer(None, None, boxes, None)
    assert sparse.shape == (1, 1, 3 + 3, WIDTH)
    assert torch.equal(sparse[:, :, :3], base_sparse) and torch.equal(sparse[0, 0, 3:], tokens)
    # Both modes change the prediction, and disabling the adapter restores the base model exactly.
    base = _tiny()
    for box in (False, True):
        assert not torch.allclose(_masks(model, box), _masks(base, box))
        with model.disable_adapter():
            assert torch.equal(_masks(model, box), _masks(base, box))


def test_zero_or_disabled_encoder_prompts_reproduce_the_base_encoder_exactly():
    model = get_peft_model(_tiny(), PtsamConfig(encoder_prompts=4))
    layers = [m for m in model.modules() if isinstance(m, PtsamAttentionLayer)]
    assert len(layers) == 5  # every block: windowed, global, and the query-pooling first blocks of stages 1-3
    assert any(layer.base_layer.query_stride for layer in layers)
    base = _tiny()
    pixels = _image()
    with torch.no_grad():
        expected = base.vision_encoder(pixels).fpn_hidden_states
        prompted = model.base_model.model.vision_encoder(pixels).fpn_hidden_states
        assert not torch.allclose(prompted[0], expected[0])
        with model.disable_adapter():
            for got, want in zip(model.base_model.model.vision_encoder(pixels).fpn_hidden_states, expected):
                assert torch.equal(got, want)
        for layer in layers:
            layer.ptsam_encoder_prompts["default"].zero_()
        for got, want in zip(model.base_model.model.vision_encoder(pixels).fpn_hidden_states, expected):
            assert torch.equal(got, want)
    # Zero prompts are still trainable: their values get a gradient.
    model.train()
    sum(f.square().mean() for f in model.base_model.model.vision_encoder(pixels).fpn_hidden_states).backward()
    assert all(layer.ptsam_encoder_prompts["default"].grad.abs().sum() > 0 for layer in layers)


def test_encoder_stages_choose_blocks_and_parameter_count():
    config = PtsamConfig(num_tokens=8, encoder_prompts=3, encoder_stages=[2, 3])
    model = get_peft_model(_tiny(), config)
    prompted = sorted(n for n, m in model.named_modules() if isinstance(m, PtsamAttentionLayer))
    assert prompted == [f"base_model.model.vision_encoder.backbone.blocks.{i}.attn" for i in (2, 3, 4)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 8 * WIDTH + 3 * (32 + 64 + 64)  # block input widths of stages 2 and 3
    with pytest.raises(ValueError, match="encoder_stages"):
        get_peft_model(_tiny(), PtsamConfig(encoder_prompts=1, encoder_stages=[7]))


@pytest.mark.parametrize("choice, index", [("multi1", 0), ("multi2", 1), ("multi3", 2)])
def test_output_mask_picks_that_decoder_output(choice, index):
    model = get_peft_model(_tiny(), PtsamConfig(output_mask=choice)).eval()
    three = _masks(model, multimask=True)  # asking for candidates bypasses the choice
    assert three.shape[2] == 3
    assert torch.equal(_masks(model), three[:, :, index : index + 1])


def test_single_output_mask_is_the_same_in_train_and_eval():
    model = get_peft_model(_tiny(), PtsamConfig(output_mask="single"))
    decoder = model.base_model.model.mask_decoder.base_layer
    decoder.dynamic_multimask_stability_thresh = 1.1  # every mask "unstable": SAM 2 alone would switch in eval
    eval_masks = _masks(model.eval())
    assert decoder.dynamic_multimask_via_stability  # restored after the forward
    assert torch.equal(eval_masks, _masks(model.train()))
    dynamic = get_peft_model(_tiny(), PtsamConfig(output_mask="dynamic"))
    dynamic.base_model.model.mask_decoder.base_layer.dynamic_multimask_stability_thresh = 1.1
    assert not torch.equal(_masks(dynamic.eval()), eval_masks)


@torch.no_grad()
def test_point_initialisation_embeds_positive_points_spread_over_the_image():
    """Each token less the positive-point type embedding is exactly a position's sin/cos features (a negative or
    not-a-point label breaks sin^2 + cos^2 = 1: those type embeddings differ by ~0.03), and a search over a quarter-pixel
    grid finds each position inside the image, the five spread over it."""
    encoder = _tiny().prompt_encoder
    tokens = initial_tokens(encoder, PtsamConfig(num_tokens=5, token_init="point"))
    assert tokens.shape == (5, WIDTH)
    fourier = tokens - encoder.point_embed.weight[1]
    sin, cos = fourier.chunk(2, dim=-1)
    torch.testing.assert_close(sin**2 + cos**2, torch.ones_like(sin))
    axis = torch.arange(0, SIZE, 0.25)
    grid = torch.cartesian_prod(axis, axis).reshape(1, 1, -1, 2)
    distance, nearest = torch.cdist(fourier, encoder.shared_embedding(grid, (SIZE, SIZE))[0, 0]).min(dim=1)
    assert distance.max() < 0.1  # grid neighbours are 0.14 apart in these features
    positions = grid[0, 0, nearest]
    assert ((positions.amax(dim=0) - positions.amin(dim=0)) > SIZE / 4).all()


def test_box_and_normal_initialisations():
    encoder = _tiny().prompt_encoder
    box_tokens = initial_tokens(encoder, PtsamConfig(num_tokens=5, token_init="box"))
    corners = box_tokens - encoder.point_embed.weight[[2, 3, 2, 3, 2]]
    assert box_tokens.shape == (5, WIDTH) and corners.abs().max() <= 1 + 1e-6
    normal = initial_tokens(encoder, PtsamConfig(num_tokens=64, token_init="normal", token_init_std=0.5))
    assert 0.45 < normal.std() < 0.55


def test_save_then_plain_peft_and_auto_peft_load_give_identical_outputs(tmp_path, saved_tiny_model):
    model = get_peft_model(Sam2Model.from_pretrained(saved_tiny_model), PtsamConfig(encoder_prompts=2))
    model.peft_config["default"].base_model_name_or_path = str(saved_tiny_model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(".ptsam_" in key for key in saved) and len(saved) == 1 + 5
    expected = [_masks(model.eval()), _masks(model, box=True)]
    loaded = PeftModel.from_pretrained(Sam2Model.from_pretrained(saved_tiny_model), tmp_path).eval()
    auto = AutoPeftModel.from_pretrained(tmp_path).eval()
    for reloaded in (loaded, auto):
        assert torch.equal(_masks(reloaded), expected[0]) and torch.equal(_masks(reloaded, box=True), expected[1])


def test_second_adapter_switch_and_unload(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    single = {}
    for path, seed in ((first, 0), (second, 7)):
        model = get_peft_model(_tiny(), PtsamConfig(init_seed=seed, encoder_prompts=2 if seed else 0))
        model.save_pretrained(path)
        single[path] = _masks(model.eval())
    model = PeftModel.from_pretrained(_tiny(), first).eval()
    model.load_adapter(second, adapter_name="second")
    assert torch.equal(_masks(model), single[first])
    model.set_adapter("second")
    assert torch.equal(_masks(model), single[second])
    model.set_adapter("default")
    assert torch.equal(_masks(model), single[first])
    base = model.unload()
    assert type(base.prompt_encoder).__name__ == "Sam2PromptEncoder"
    assert torch.equal(_masks(base), _masks(_tiny()))


def test_wrong_base_architecture_is_a_clear_error(tmp_path):
    get_peft_model(_tiny(), PtsamConfig(encoder_prompts=1)).save_pretrained(tmp_path)
    other = copy.deepcopy(tiny_config(SIZE))
    other.mask_decoder_config.hidden_size = 32
    other.prompt_encoder_config.hidden_size = 32
    other.vision_config.fpn_hidden_size = 32
    with pytest.raises(PtsamArchitectureError, match="decoder_width: adapter 64, base model 32"):
        PeftModel.from_pretrained(build_model_from_config(other), tmp_path)
    with pytest.raises(PtsamArchitectureError, match="needs a SAM 2 model"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), PtsamConfig())


def test_predict_prompt_free_returns_original_size_masks(tiny_processor):
    model = get_peft_model(_tiny(), PtsamConfig())
    images = [np.zeros((90, 140, 3), np.uint8), np.full((60, 50), 200, np.uint8)]
    results = predict_prompt_free(model, tiny_processor, images, batch_size=1)
    assert [r[0].shape for r in results] == [(90, 140), (60, 50)]
    assert all(r[0].dtype == bool and isinstance(r[1], float) for r in results)
    inputs = tiny_processor(images=images[:1], return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(pixel_values=inputs["pixel_values"], multimask_output=False).pred_masks
    expected = tiny_processor.post_process_masks(logits, inputs["original_sizes"])[0][0, 0].numpy()
    assert np.array_equal(results[0][0], expected) and expected.any() and not expected.all()
    with pytest.raises(ValueError, match="active PTSAM adapter"):
        predict_prompt_free(_tiny(), tiny_processor, images)


def test_padding_initialisation_starts_at_the_base_prompt_free_output():
    """`padding` tokens are the base's own not-a-point embedding plus tiny noise: with 2 tokens (the base's two
    prompt-free padding tokens) step 0 predicts what the base predicts. Checked on the shipped base that segments
    (the random tiny model's logits are ~1e-3, too small for a tolerance to mean anything)."""
    from sam2_peft.models.loading import load_base_model

    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3)) * 4 - 2
    base, _ = load_base_model("compact-synthetic")
    with torch.no_grad():
        original = base.eval()(pixel_values=image, multimask_output=False).pred_masks
    config = PtsamConfig(num_tokens=2, token_init="padding", output_mask="dynamic")  # dynamic: the base's own choice
    model = get_peft_model(load_base_model("compact-synthetic")[0], config).eval()
    tokens = model.base_model.model.prompt_encoder.ptsam_tokens["default"]
    assert not torch.equal(tokens[0], tokens[1])  # the noise keeps tokens apart, so they get different gradients
    with torch.no_grad():
        adapted = model(pixel_values=image, multimask_output=False).pred_masks
    assert (adapted - original).abs().max() < 0.02 * original.abs().max()
    assert ((adapted > 0) == (original > 0)).float().mean() > 0.995


def test_merging_is_one_error_whichever_way_it_is_asked():
    model = get_peft_model(_tiny(), PtsamConfig(encoder_prompts=1))
    layer = next(m for m in model.modules() if isinstance(m, PtsamAttentionLayer))
    for merge in (model.merge_and_unload, layer.merge):
        with pytest.raises(PtsamMergeError, match="cannot be merged into weights. Use unload") as raised:
            merge()
        assert isinstance(raised.value, NotImplementedError) and isinstance(raised.value, ValueError)


def _nonzero_upscaling(model, scale: float = 0.3) -> None:
    """Give every upscaling change a non-zero value (they start at zero), so that it changes the output."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ptsam_delta_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def test_tune_upscaling_trains_the_three_upscaling_layers_from_the_base_and_changes_the_masks():
    model = get_peft_model(_tiny(), PtsamConfig(num_tokens=2, tune_upscaling=True))
    trainable = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if p.requires_grad}
    decoder = _tiny().mask_decoder
    expected = {f"mask_decoder.base_layer.{layer}.ptsam_delta_{kind}.default": getattr(getattr(decoder, layer), kind)
                for layer in ("upscale_conv1", "upscale_layer_norm", "upscale_conv2") for kind in ("weight", "bias")}  # fmt: skip
    assert sorted(trainable) == sorted([*expected, "prompt_encoder.ptsam_tokens.default"])
    assert all(trainable[name].shape == param.shape for name, param in expected.items())
    tokens_only = get_peft_model(_tiny(), PtsamConfig(num_tokens=2))
    assert torch.equal(_masks(model.eval()), _masks(tokens_only.eval()))  # zero changes: the base's upscaling
    model.train()
    model(pixel_values=_image(), multimask_output=False).pred_masks.sigmoid().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "delta" in n)
    _nonzero_upscaling(model)
    assert not torch.equal(_masks(model.eval()), _masks(tokens_only.eval()))


def test_tuned_upscaling_saves_in_the_adapter_file_reloads_with_plain_peft_and_unloads(tmp_path, saved_tiny_model):
    model = get_peft_model(Sam2Model.from_pretrained(saved_tiny_model), PtsamConfig(tune_upscaling=True))
    _nonzero_upscaling(model)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len([k for k in saved if "ptsam_delta_" in k]) == 6 and all(".ptsam_" in k for k in saved)
    expected = _masks(model.eval())
    loaded = PeftModel.from_pretrained(Sam2Model.from_pretrained(saved_tiny_model), tmp_path).eval()
    assert torch.equal(_masks(loaded), expected)
    loaded.load_adapter(tmp_path, adapter_name="again")  # the second adapter's changes sit inside the wrapped decoder
    loaded.set_adapter("again")
    assert torch.equal(_masks(loaded), expected)
    base = loaded.unload()
    assert not any("ptsam" in name for name, _ in base.named_parameters())
    assert torch.equal(_masks(base), _masks(Sam2Model.from_pretrained(saved_tiny_model).eval()))


def test_an_adapter_without_tuned_upscaling_beside_one_with_it_runs_the_base_upscaling(tmp_path):
    tuned, plain_path = tmp_path / "tuned", tmp_path / "plain"
    model = get_peft_model(_tiny(), PtsamConfig(tune_upscaling=True))
    _nonzero_upscaling(model)
    model.save_pretrained(tuned)
    plain = get_peft_model(_tiny(), PtsamConfig(init_seed=3))
    plain.save_pretrained(plain_path)
    both = PeftModel.from_pretrained(_tiny(), tuned).eval()
    both.load_adapter(plain_path, adapter_name="plain")
    both.set_adapter("plain")
    assert torch.equal(_masks(both), _masks(plain.eval()))
    with pytest.raises(ValueError, match="tuned upscaling"), row_adapters(both, ["default", "plain"]):
        pass
