"""PTSAM's tuner layers: what wraps SAM 2's prompt encoder, mask decoder and Hiera attention.

Each layer keeps its per-adapter state in a dict keyed by adapter name (peft's convention), runs the wrapped module
unchanged, and only then applies the active adapter. One PTSAM adapter is active at a time.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import PtsamConfig

PROMPT_FREE_LABELS = (-1, -10)
"""Point labels that carry no prompt: SAM's "not-a-point" (-1, position discarded) and padding (-10)."""


PADDING_NOISE = 1e-2
"""Std of `padding` token init's noise, relative to `token_init_std`: small beside the unit-scale embeddings."""


class PtsamMergeError(NotImplementedError, ValueError):
    """A PTSAM adapter cannot be merged: it adds prompt tokens, not weight deltas (`unload()` takes it out). A
    `NotImplementedError` and a `ValueError`, which the layer and the model raised before."""

    def __init__(self) -> None:
        super().__init__("PTSAM adapters add prompt tokens; they cannot be merged into weights. Use unload().")


class PtsamLayer(BaseTunerLayer):
    """Common behaviour of PTSAM layers: the active adapter's entry, or None when adapters are off."""

    def _active_entry(self, container):
        if self.disable_adapters or not self.active_adapters:
            return None
        if len(self.active_adapters) > 1:
            raise ValueError(f"PTSAM runs one adapter at a time; active: {self.active_adapters}.")
        return container.get(self.active_adapters[0]) if hasattr(container, "get") else None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise PtsamMergeError()


class _Wrapper(nn.Module):
    """A module wrapping `base_layer` that reads through to it, e.g. `Sam2Model` reading
    `prompt_encoder.image_embedding_size`."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


class PtsamPromptEncoderLayer(_Wrapper, PtsamLayer):
    """Wraps `Sam2PromptEncoder`: appends the learned decoder tokens to the sparse prompt embeddings.

    Returns `(sparse, dense)` like the prompt encoder: sparse `(B, P, k, C)` and dense `(B, C, h, w)`. Without a user
    prompt (no boxes, and only not-a-point/padding labels, which is what `Sam2Model.forward` passes when called without
    points or boxes) sparse is the `n` tokens alone, `(B, P, n, C)`; otherwise the user's `k` embeddings followed by
    the tokens, `(B, P, k + n, C)`. The dense embedding is untouched (the no-mask embedding unless a mask is given).

    A multi-class adapter holds `(classes, n, C)` tokens and is prompt-free only: each prompt row becomes one row per
    class, sparse `(B, classes, n, C)`, so the decoder decodes every class against one image encoding in one batch.
    """

    adapter_layer_names = ("ptsam_tokens",)

    row_adapters: list[str] | None = None
    """Set by `row_adapters(...)`: each batch row's adapter, whose tokens that row gets (a mixed-adapter batch)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PtsamConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ptsam_tokens = nn.ParameterDict()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: PtsamConfig) -> None:
        if config.num_classes is None:
            tokens = initial_tokens(self.base_layer, config)
        else:  # class c starts as a single-class adapter of seed init_seed + c would
            seeds = range(config.init_seed, config.init_seed + config.num_classes)
            tokens = torch.stack([initial_tokens(self.base_layer, config, seed) for seed in seeds])
        self.ptsam_tokens[adapter_name] = nn.Parameter(tokens)
        self.set_adapter(self.active_adapters)

    def forward(
        self,
        input_points: torch.Tensor | None,
        input_labels: torch.Tensor | None,
        input_boxes: torch.Tensor | None,
        input_masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.base_layer(input_points, input_labels, input_boxes, input_masks)
        tokens = self._active_entry(self.ptsam_tokens)
        if tokens is None:
            return sparse, dense
        prompt_free = sparse is None or is_prompt_free(input_labels, input_boxes)
        if self.row_adapters is not None:  # (B, 1, n, C): row b gets its own adapter's tokens
            tokens = torch.stack([self.ptsam_tokens[name] for name in self.row_adapters])[:, None]
            if tokens.dim() != 4 or len(tokens) != len(dense):
                raise ValueError("Mixed PTSAM batches take single-class adapters and one adapter name per batch row.")
            if prompt_free:
                return tokens.to(dense.dtype).expand(-1, 1 if sparse is None else sparse.shape[1], -1, -1), dense
            return torch.cat([sparse, tokens.to(sparse.dtype).expand(-1, sparse.shape[1], -1, -1)], dim=2), dense
        if tokens.dim() == 3:
            if not prompt_free or (sparse is not None and sparse.shape[1] != 1):
                raise ValueError("A multi-class PTSAM adapter segments without prompts: give no points or boxes.")
            return tokens.to(dense.dtype).expand(dense.shape[0], -1, -1, -1), dense
        if prompt_free:
            batch, point_batch = (dense.shape[0], 1) if sparse is None else sparse.shape[:2]
            return tokens.to(dense.dtype).expand(batch, point_batch, -1, -1), dense
        tokens = tokens.to(sparse.dtype).expand(*sparse.shape[:2], -1, -1)
        return torch.cat([sparse, tokens], dim=2), dense


@contextlib.contextmanager
def row_adapters(model: nn.Module, names: list[str]):
    """Within the block, batch row b of a PTSAM model's forward gets the decoder tokens of adapter `names[b]` (the
    adapters single-class, with equal token counts and output-mask choices and no tuned upscaling; the active
    adapter's choice applies)."""
    tuned = {name for m in model.modules() if isinstance(m, PtsamDeltaLayer) for name in m.ptsam_delta_weight}
    if tuned & set(names):
        raise ValueError(f"PTSAM adapters with tuned upscaling ({sorted(tuned & set(names))}) batch on their own.")
    layers = [m for m in model.modules() if isinstance(m, PtsamPromptEncoderLayer)]
    for layer in layers:
        layer.row_adapters = list(names)
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapters = None


def ptsam_classes(model: nn.Module) -> int:
    """How many classes the model's active PTSAM adapter decodes per prompt-free row (1: single-class, or none)."""
    for module in model.modules():
        if isinstance(module, PtsamPromptEncoderLayer):
            tokens = module._active_entry(module.ptsam_tokens)
            return 1 if tokens is None or tokens.dim() == 2 else len(tokens)
    return 1


def active_classes(model: nn.Module) -> dict[int, str] | None:
    """The classes of the active multi-class PTSAM adapter of `model` (a `PeftModel`), mask value -> name, in class
    order; None when no multi-class adapter is active."""
    if ptsam_classes(model) == 1:
        return None
    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    id2label = model.peft_config[adapter].id2label
    return {int(key): id2label[key] for key in sorted(id2label, key=int)}


def is_prompt_free(input_labels: torch.Tensor | None, input_boxes: torch.Tensor | None) -> bool:
    """True when the prompt holds no box and no real point (only labels -1 or -10, whose positions SAM discards)."""
    if input_boxes is not None:
        return False
    if input_labels is None:
        return True
    return bool(torch.isin(input_labels, torch.tensor(PROMPT_FREE_LABELS, device=input_labels.device)).all())


@torch.no_grad()
def initial_tokens(prompt_encoder: nn.Module, config: PtsamConfig, seed: int | None = None) -> torch.Tensor:
    """The `(num_tokens, C)` starting tokens: normal noise, embeddings of random boxes or points, or padding.

    Box init takes the two corner embeddings of `ceil(n / 2)` random boxes (corners uniform in the input image, sorted);
    point init the embeddings of `n` random positive points. Both use the base prompt encoder, so the tokens start as
    prompts SAM already understands. Padding init repeats the not-a-point embedding (what the base feeds its decoder
    prompt-free) with noise of std `PADDING_NOISE * token_init_std`, so the tokens differ yet step 0 is the base.
    """
    weight = prompt_encoder.not_a_point_embed.weight
    width, size = weight.shape[1], prompt_encoder.input_image_size
    generator = torch.Generator().manual_seed(config.init_seed if seed is None else seed)
    n = config.num_tokens
    if config.token_init == "normal":
        tokens = torch.randn(n, width, generator=generator) * config.token_init_std
    elif config.token_init == "padding":
        noise = torch.randn(n, width, generator=generator) * (PADDING_NOISE * config.token_init_std)
        tokens = weight.detach().float().cpu().expand(n, -1) + noise
    elif config.token_init == "point":
        points = torch.rand(1, 1, n, 2, generator=generator) * size
        labels = torch.ones(1, 1, n, dtype=torch.long)
        sparse, _ = prompt_encoder(points.to(weight), labels.to(weight.device), None, None)
        tokens = sparse[0, 0, :n]
    else:
        corners = torch.rand(1, (n + 1) // 2, 2, 2, generator=generator) * size
        boxes = torch.cat([corners.amin(dim=2), corners.amax(dim=2)], dim=-1)
        sparse, _ = prompt_encoder(None, None, boxes.to(weight), None)
        tokens = sparse[0, :, :2].reshape(-1, width)[:n]
    return tokens.to(device=weight.device, dtype=weight.dtype).clone()


class PtsamMaskDecoderLayer(_Wrapper, PtsamLayer):
    """Wraps `Sam2MaskDecoder` to choose which output mask is the prediction (`PtsamConfig.output_mask`).

    Applies only when one mask is asked for (`multimask_output=False`, the prompt-free case); a call asking for the
    three candidates gets them unchanged. Returns the decoder's tuple `(masks (B, P, 1, h, w), iou (B, P, 1),
    mask_tokens (B, P, 1, C), object_score_logits (B, P, 1))`. Holds no parameters.
    """

    other_param_names = ("ptsam_output_mask",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PtsamConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ptsam_output_mask: dict[str, str] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: PtsamConfig) -> None:
        self.ptsam_output_mask[adapter_name] = config.output_mask
        if config.tune_upscaling:
            self._tune_upscaling(adapter_name)
        self.set_adapter(self.active_adapters)

    def _tune_upscaling(self, adapter_name: str) -> None:
        """Give each upscaling layer of the decoder (`UPSCALING_LAYERS`) this adapter's weight change. Done here
        rather than by peft's matching: peft does not look inside an adapter layer for a second adapter's targets,
        and the decoder is one."""
        found = [name for name in UPSCALING_LAYERS if hasattr(self.base_layer, name)]
        if not found:
            raise ValueError(f"tune_upscaling: this mask decoder has none of {UPSCALING_LAYERS}.")
        for name in found:
            layer = getattr(self.base_layer, name)
            if not isinstance(layer, (nn.ConvTranspose2d, nn.LayerNorm, PtsamDeltaLayer)):
                raise ValueError(f"tune_upscaling: {name} is a {type(layer).__name__}, not a layer it can change.")
            if isinstance(layer, PtsamDeltaLayer):
                layer.update_layer(adapter_name)
            else:
                delta = PtsamDeltaLayer(layer, adapter_name)
                delta.set_adapter(self.active_adapters)  # a second adapter's new layer follows the active one
                self.base_layer.register_module(name, delta)

    def forward(self, *args, multimask_output: bool, **kwargs) -> tuple[torch.Tensor, ...]:
        choice = self._active_entry(self.ptsam_output_mask)
        if choice is None or multimask_output or choice == "dynamic":
            return self.base_layer(*args, multimask_output=multimask_output, **kwargs)
        if choice == "single":
            with _without_dynamic_multimask(self.base_layer):
                return self.base_layer(*args, multimask_output=False, **kwargs)
        masks, iou, mask_tokens, object_scores = self.base_layer(*args, multimask_output=True, **kwargs)
        if choice == "best":
            index = iou.argmax(dim=-1, keepdim=True)
        else:
            index = torch.full_like(iou[..., :1], int(choice[-1]) - 1, dtype=torch.long)
        masks = masks.gather(2, index[..., None, None].expand(-1, -1, -1, *masks.shape[-2:]))
        mask_tokens = mask_tokens.gather(2, index[..., None].expand(-1, -1, -1, mask_tokens.shape[-1]))
        return masks, iou.gather(2, index), mask_tokens, object_scores


UPSCALING_LAYERS = ("upscale_conv1", "upscale_layer_norm", "upscale_conv2")
"""The mask decoder's upscaling layers (`tune_upscaling`), applied inside its forward. Its projections of the
encoder's high-resolution features (`conv_s0`, `conv_s1`) are left out: SAM 2 applies them while encoding the image,
so changing them would change the image encoding, which the classes, the embedding cache and the server share."""


class PtsamDeltaLayer(_Wrapper, PtsamLayer):
    """Wraps one of the decoder's upscaling layers with a learned change to each of its parameters (weight and bias),
    zero at the start so that step 0 is the base: the layer runs with `weight + delta_weight`, `bias + delta_bias`."""

    adapter_layer_names = ("ptsam_delta_weight", "ptsam_delta_bias")

    def __init__(self, base_layer: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ptsam_delta_weight = nn.ParameterDict()
        self.ptsam_delta_bias = nn.ParameterDict()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name)

    def update_layer(self, adapter_name: str) -> None:
        self.ptsam_delta_weight[adapter_name] = nn.Parameter(torch.zeros_like(self.base_layer.weight))
        self.ptsam_delta_bias[adapter_name] = nn.Parameter(torch.zeros_like(self.base_layer.bias))
        self.set_adapter(self.active_adapters)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        delta_weight = self._active_entry(self.ptsam_delta_weight)
        if delta_weight is None:
            return self.base_layer(hidden_states)
        layer = self.base_layer
        weight, bias = layer.weight + delta_weight, layer.bias + self.ptsam_delta_bias[self.active_adapters[0]]
        if isinstance(layer, nn.ConvTranspose2d):  # written out, not functional_call: the ONNX export traces it
            return F.conv_transpose2d(
                hidden_states, weight, bias, layer.stride, layer.padding, layer.output_padding, layer.groups,
                layer.dilation,
            )  # fmt: skip
        channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"  # SAM 2's LayerNorm
        features = hidden_states.permute(0, 2, 3, 1) if channels_first else hidden_states
        features = F.layer_norm(features, layer.normalized_shape, weight, bias, layer.eps)
        return features.permute(0, 3, 1, 2) if channels_first else features


@contextlib.contextmanager
def _without_dynamic_multimask(decoder: nn.Module):
    """Make the decoder return its single-mask token even in eval mode (SAM 2 may otherwise switch to a multimask)."""
    saved = decoder.dynamic_multimask_via_stability
    decoder.dynamic_multimask_via_stability = False
    try:
        yield
    finally:
        decoder.dynamic_multimask_via_stability = saved


class PtsamAttentionLayer(_Wrapper, PtsamLayer):
    """Wraps a Hiera block's attention (`Sam2MultiScaleAttention`) with `p` learned prompt tokens (deep VPT).

    Design. Hiera cannot take extra tokens in its sequence: attention runs inside windows, the first block of a stage
    pools its queries, and widths change between stages. Instead every image token also attends to the block's
    prompts, through the block's own frozen projections, in a separate softmax whose result is added to the
    attention output before the output projection:

        out = proj(attn(q, K, V) + softmax(q K_p^T * scale) V_p),   K_p = prompts W_k + b_k,   V_p = prompts W_v

    with q the (pooled, if the block pools) queries of the image tokens. Since this term is per position and the
    prompts are shared, every window of a windowed block sees the same prompts (as in PTSAM's ViT design) and global
    blocks work the same way; no partitioning is needed. The prompt values carry no bias, so zero prompts (or no
    active adapter) add exactly zero: the pretrained computation is reproduced bit for bit, and the term is linear in
    the values, so training from small prompts is well conditioned. Because `proj` is linear the term is computed as
    `attn_out_base + (softmax(...) V_p) W_proj^T`, leaving the base attention code untouched.

    Prompts have the block's input width (`dim`, before the stage's widening), as they enter its `qkv` projection.
    """

    adapter_layer_names = ("ptsam_encoder_prompts",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PtsamConfig, seed: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ptsam_encoder_prompts = nn.ParameterDict()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, seed)

    def update_layer(self, adapter_name: str, config: PtsamConfig, seed: int) -> None:
        weight = self.base_layer.qkv.weight
        generator = torch.Generator().manual_seed(seed)
        prompts = torch.randn(config.encoder_prompts, weight.shape[1], generator=generator) * config.encoder_init_std
        self.ptsam_encoder_prompts[adapter_name] = nn.Parameter(prompts.to(weight))
        self.set_adapter(self.active_adapters)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        output = self.base_layer(hidden_states, **kwargs)
        prompts = self._active_entry(self.ptsam_encoder_prompts)
        if prompts is None:
            return output
        return output + self.prompt_attention(hidden_states, prompts)

    def prompt_attention(self, hidden_states: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """The prompts' contribution `(B, h, w, dim_out)` for input windows `(B, H, W, dim)` and prompts `(p, dim)`."""
        attn = self.base_layer
        heads, dim_out = attn.num_attention_heads, attn.dim_out
        w_q, w_k, w_v = attn.qkv.weight.split(dim_out)
        b_q, b_k, _ = attn.qkv.bias.split(dim_out)
        query = F.linear(hidden_states, w_q, b_q)  # (B, H, W, dim_out)
        if attn.query_stride:
            query = F.max_pool2d(query.permute(0, 3, 1, 2), attn.query_stride, attn.query_stride).permute(0, 2, 3, 1)
        batch, height, width, _ = query.shape
        query = query.reshape(batch, height * width, heads, -1).transpose(1, 2)  # (B, heads, L, d)
        prompts = prompts.to(hidden_states.dtype)
        key = F.linear(prompts, w_k, b_k).reshape(len(prompts), heads, -1).transpose(0, 1)  # (heads, p, d)
        value = F.linear(prompts, w_v).reshape(len(prompts), heads, -1).transpose(0, 1)
        weights = torch.softmax((query @ key.transpose(-1, -2)) * attn.scale, dim=-1, dtype=torch.float32)
        mixed = (weights.to(value.dtype) @ value).transpose(1, 2).reshape(batch, height, width, dim_out)
        return F.linear(mixed, attn.proj.weight)
