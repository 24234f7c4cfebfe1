"""The knobs of this package's peft methods as plain dataclasses (no torch or peft import).

The recipes parse them from the command line (`HfArgumentParser`: each field's help is its flag's help), the
training methods hold them, and `lora.sam2_lora_config` / `ptsam.PtsamConfig` (which inherits `PtsamOptions`) turn
them into peft configs, so each knob is declared once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_ATTENTION = r"(q_proj|k_proj|v_proj|o_proj)"

LORA_PRESETS: dict[str, list[str]] = {
    "decoder": [rf"mask_decoder\.transformer\..*\.{_ATTENTION}"],
    "encoder": [r"vision_encoder\.backbone\.blocks\.\d+\.attn\.(qkv|proj)"],
    "memory": [rf"memory_attention\.layers\.\d+\.(self_attn|cross_attn_image)\.{_ATTENTION}"],
    "memory-encoder": [
        r"memory_encoder\.(memory_fuser\.layers\.\d+\.pointwise_conv[12]|feature_projection|projection)"
    ],
    "object-pointer": [r"object_pointer_proj\.(proj_in|proj_out|layers\.\d+)"],
}
"""Named groups of target modules (regexes over full module names). Combine with '+' (or ','), e.g. `decoder+encoder`."""

IMAGE_TOKEN_INPUTS = (
    r"mask_decoder\.transformer\.(?:layers\.\d+\.)?(?:(?:cross_attn_token_to_image|final_attn_token_to_image)\."
    r"(?:k_proj|v_proj)|cross_attn_image_to_token\.(?:q_proj|o_proj))"
)
"""The mask decoder's 10 projections whose inputs are the image's tokens (4096 per prompt at 1024 px); the other 18 of
its 28 take the prompt tokens (a handful per prompt)."""
DROPOUT_INPUTS = ("tokens", "all")
"""Where LoRA dropout applies: the decoder's projections of prompt tokens only, or every target (as peft does)."""

TOKEN_INITS = ("padding", "normal", "box", "point")
OUTPUT_MASKS = ("single", "multi1", "multi2", "multi3", "best", "dynamic")


def preset_regex(preset: str) -> str:
    """One regex matching every module of a preset such as `decoder` or `decoder+encoder` (',' joins too)."""
    parts = []
    for name in preset.replace(",", "+").split("+"):
        if name not in LORA_PRESETS:
            raise ValueError(f"Unknown LoRA preset '{name}'; known: {', '.join(LORA_PRESETS)} (combine with '+').")
        parts.extend(LORA_PRESETS[name])
    return "|".join(f"(?:{p})" for p in parts)


@dataclass
class LoraOptions:
    """LoRA on chosen modules of SAM 2."""

    _argument_group_name = "LoRA"

    targets: str = field(
        default="decoder",
        metadata={"help": f"Preset(s) joined by '+': {', '.join(LORA_PRESETS)}."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha / r)."}
    )
    lora_dropout: float = field(
        default=0.1,
        metadata={"help": "Dropout on the LoRA branch's input, where --lora-dropout-inputs says."},
    )
    lora_dropout_inputs: str = field(
        default="tokens",
        metadata={
            "help": "Where --lora-dropout applies: tokens (the default: only the mask decoder's projections of the "
            "prompt tokens, not those of the 4096 image tokens per prompt, nor encoder targets) or all (every "
            "target, as peft does).",
            "choices": DROPOUT_INPUTS,
        },
    )
    target_regex: str | None = field(
        default=None, metadata={"help": "Full-match regex over module names (overrides --targets)."}
    )

    def __post_init__(self) -> None:
        if self.target_regex is None:
            preset_regex(self.targets)  # an unknown preset fails here, naming the known ones
        if self.lora_dropout_inputs not in DROPOUT_INPUTS:
            raise ValueError(f"lora_dropout_inputs must be one of {DROPOUT_INPUTS}, got '{self.lora_dropout_inputs}'.")

    @property
    def target_modules(self) -> str:
        """The regex peft matches against module names."""
        return self.target_regex or preset_regex(self.targets)


@dataclass
class PtsamOptions:
    """PTSAM (Piater et al., CVPRW 2025, arXiv 2504.16739): SAM 2 becomes a task specialist by training prompt tokens.

    Decoder tokens: `num_tokens` learned vectors of the mask decoder's width join the decoder's token stream as sparse
    prompt embeddings (8 x 256 = 2,048 parameters for the sam2.1 models). Without a user prompt (prompt-free, the PTSAM
    setting) they replace the "not-a-point" padding SAM 2 would use, and the dense no-mask embedding is kept; with boxes
    or points they are appended after the user's prompt embeddings.

    Encoder prompts (optional, deep visual prompt tuning): `encoder_prompts` learned tokens per Hiera block, attended by
    every image token of the block through the block's own frozen attention projections (see `PtsamAttentionLayer`).
    Zero prompts leave the encoder exactly unchanged.

    Upscaling (optional, `tune_upscaling`; not in the PTSAM paper): a learned change to the weights of the mask
    decoder's upscaling layers, which turn the decoder's image embedding into the per-pixel features every mask is read
    from. Shared by all classes of a multi-class adapter, and on by default there: on a base whose frozen upscaling
    keeps no trace of the classes, tokens alone cannot tell them apart (docs/guides/multiclass.md).
    """

    _argument_group_name = "PTSAM"

    num_tokens: int = field(default=8, metadata={"help": "Learned decoder prompt tokens (each of the decoder width)."})
    token_init: str = field(
        default="padding",
        metadata={
            "help": "How decoder tokens start: padding (SAM 2's own not-a-point embedding, what the base uses "
            "prompt-free, plus N(0, (token_init_std * 1e-2)^2) noise, so step 0 is the base), normal (N(0, "
            "token_init_std^2)), box (the corner embeddings of random boxes from the base prompt encoder) or point "
            "(embeddings of random positive points).",
            "choices": TOKEN_INITS,
        },
    )
    token_init_std: float = field(
        default=1.0,
        metadata={
            "help": "Std of the normal token init. 1.0 is the scale of SAM's own sparse prompt embeddings "
            "(random-Fourier sin/cos features plus unit-scale point-type embeddings)."
        },
    )
    output_mask: str = field(
        default="single",
        metadata={
            "help": "Which decoder output is the prediction when one mask is asked for: single (the single-mask "
            "token, also in eval), multi1/multi2/multi3 (one of the three multimask tokens), best (the multimask "
            "output with the highest predicted IoU) or dynamic (SAM 2's default: single unless unstable at eval).",
            "choices": OUTPUT_MASKS,
        },
    )
    encoder_prompts: int = field(
        default=0, metadata={"help": "Learned prompt tokens per Hiera block (0 = no encoder prompts)."}
    )
    encoder_stages: list[int] | None = field(
        default=None, metadata={"help": "Hiera stages (0-3) whose blocks get prompts (default: every stage)."}
    )
    tune_upscaling: bool = field(
        default=False,
        metadata={
            "help": "Also train the mask decoder's upscaling layers (two transposed convolutions and a layer norm: "
            "74 K parameters on sam2.1), shared by every class. The prompt-free multi-class default is on."
        },
    )
    encoder_init_std: float = field(
        default=0.02,
        metadata={
            "help": "Std of the encoder prompts' normal init. 0 starts exactly at the base model, but then all prompts "
            "of a block get identical gradients and stay equal, so a small non-zero value is the default."
        },
    )

    def check_options(self) -> None:
        """Raise `ValueError` naming the first knob out of range."""
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {self.num_tokens}.")
        if self.token_init not in TOKEN_INITS:
            raise ValueError(f"token_init must be one of {TOKEN_INITS}, got '{self.token_init}'.")
        if self.output_mask not in OUTPUT_MASKS:
            raise ValueError(f"output_mask must be one of {OUTPUT_MASKS}, got '{self.output_mask}'.")
        if self.encoder_prompts < 0:
            raise ValueError(f"encoder_prompts must be 0 (off) or more, got {self.encoder_prompts}.")
        if self.token_init_std < 0 or self.encoder_init_std < 0:
            raise ValueError("token_init_std and encoder_init_std must not be negative.")
        if self.encoder_stages is not None:
            self.encoder_stages = sorted({int(s) for s in self.encoder_stages})

    def __post_init__(self) -> None:
        self.check_options()
