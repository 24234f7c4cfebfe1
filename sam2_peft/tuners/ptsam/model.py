"""`PtsamModel`: how PTSAM finds its targets in a SAM 2 model and injects its layers (a peft `BaseTuner`)."""

from __future__ import annotations

import re

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ...models.names import family_of_model_type
from .config import PtsamConfig
from .layer import (
    PtsamAttentionLayer,
    PtsamLayer,
    PtsamMaskDecoderLayer,
    PtsamMergeError,
    PtsamPromptEncoderLayer,
)

PROMPT_ENCODER = "prompt_encoder"
MASK_DECODER = "mask_decoder"
ENCODER_BLOCKS = "vision_encoder.backbone.blocks"


ENCODER_PROMPTS_WHY = (
    "EdgeTAM's RepViT is convolutional, with no attention tokens to prompt; SAM 3's ViT could take prompt tokens but "
    "they are not implemented for it"
)


class PtsamArchitectureError(ValueError):
    """The model is not a SAM 2, or not the architecture a PTSAM adapter was trained for."""


class PtsamModel(BaseTuner):
    """Injects PTSAM into a `Sam2Model`: tokens at `prompt_encoder`, output choice at `mask_decoder`, and (optional)
    prompts at `vision_encoder.backbone.blocks.N.attn` for the chosen stages.

    Use through peft: `get_peft_model(sam, PtsamConfig(...))`, `PeftModel.from_pretrained(sam, path)`.
    """

    prefix: str = "ptsam_"
    tuner_layer_cls = PtsamLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: PtsamConfig, model_config: dict) -> PtsamConfig:
        return peft_config  # targets are derived from the model itself in `_prepare_model`

    def _prepare_model(self, peft_config: PtsamConfig, model: nn.Module) -> None:
        """Check the model is the SAM 2 the adapter expects, record its widths, and derive the target regex."""
        decoder_width, block_widths, block_stages = sam2_widths(model)
        if peft_config.encoder_prompts and not block_widths:
            family = family_of_model_type(model.config.model_type)
            raise PtsamArchitectureError(
                f"PTSAM encoder prompts need SAM 2's Hiera image encoder; this {family.title if family else 'model'} "
                f"has a {family.encoder if family else 'different'} encoder ({ENCODER_PROMPTS_WHY}). Train decoder "
                "tokens only (--encoder-prompts 0, encoder_prompts=0)."
            )
        expected = {
            "decoder_width": peft_config.decoder_width,
            "encoder_block_widths": peft_config.encoder_block_widths,
        }
        found = {"decoder_width": decoder_width, "encoder_block_widths": block_widths}
        wrong = [
            f"{k}: adapter {v}, base model {found[k]}" for k, v in expected.items() if v is not None and v != found[k]
        ]
        if wrong:
            raise PtsamArchitectureError(
                "This PTSAM adapter was trained for another SAM 2 architecture (" + "; ".join(wrong) + "). Load it "
                "into the base model named in its adapter_config.json (base_model_name_or_path)."
            )
        peft_config.decoder_width, peft_config.encoder_block_widths = decoder_width, block_widths
        stages = sorted(set(block_stages))
        unknown = sorted(set(peft_config.encoder_stages or ()) - set(stages))
        if unknown:
            raise ValueError(f"encoder_stages {unknown} do not exist; this Hiera has stages {stages}.")
        peft_config.target_modules = target_regex(peft_config, block_stages)

    def _create_and_replace(
        self,
        peft_config: PtsamConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        extra = {}
        if current_key.startswith(ENCODER_BLOCKS):
            extra["seed"] = peft_config.init_seed + 1 + int(current_key.split(".")[3])
        if isinstance(target, PtsamLayer):
            target.update_layer(adapter_name, peft_config, **extra)
            return
        if current_key == PROMPT_ENCODER:
            layer_cls = PtsamPromptEncoderLayer
        elif current_key == MASK_DECODER:
            layer_cls = PtsamMaskDecoderLayer
        else:
            layer_cls = PtsamAttentionLayer
        new_module = layer_cls(target, adapter_name, peft_config, **extra)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Put the wrapped SAM 2 modules back. PTSAM adds tokens rather than weight deltas, so nothing can be merged."""
        if merge:
            raise PtsamMergeError()
        layers = [(name, m) for name, m in self.model.named_modules() if isinstance(m, PtsamLayer)]
        for name, module in sorted(layers, key=lambda item: -item[0].count(".")):  # the decoder's LoRAs first
            parent_name, _, child_name = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child_name, module.get_base_layer())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model


def sam2_widths(model: nn.Module) -> tuple[int, list[int], list[int]]:
    """(decoder width, input width of each Hiera block, stage of each Hiera block) of a SAM 2 model.

    Raises:
        PtsamArchitectureError: the model has no SAM 2 prompt encoder, mask decoder and Hiera backbone.
    """
    config = getattr(model, "config", None)
    missing = [name for name in (PROMPT_ENCODER, MASK_DECODER, "vision_encoder") if not hasattr(model, name)]
    if missing or not hasattr(config, "mask_decoder_config"):
        raise PtsamArchitectureError(
            f"PTSAM needs a SAM 2 model (transformers Sam2Model); got {type(model).__name__} without {missing}."
        )
    blocks = getattr(model.vision_encoder.backbone, "blocks", None)
    if blocks is None:  # not Hiera: EdgeTAM's RepViT, SAM 3's ViT
        return int(config.mask_decoder_config.hidden_size), [], []
    backbone = config.vision_config.backbone_config
    stages = [s for s, count in enumerate(backbone.blocks_per_stage) for _ in range(count)]
    widths = [_base(block.attn).qkv.in_features for block in blocks]
    return int(config.mask_decoder_config.hidden_size), widths, stages


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, PtsamLayer) else module


def target_regex(config: PtsamConfig, block_stages: list[int]) -> str:
    """Full-match regex over module names: the prompt encoder, the mask decoder and the prompted Hiera attentions."""
    names = [PROMPT_ENCODER, MASK_DECODER]
    if config.encoder_prompts:
        chosen = set(config.encoder_stages) if config.encoder_stages is not None else set(block_stages)
        indices = [str(i) for i, stage in enumerate(block_stages) if stage in chosen]
        if indices:
            names.append(rf"{re.escape(ENCODER_BLOCKS)}\.({'|'.join(indices)})\.attn")
    return "^(" + "|".join(names) + ")$"
