"""`PtsamConfig`: every knob of PTSAM (learned prompt tokens for SAM 2), serialised to `adapter_config.json`."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

TOKEN_INITS = ("normal", "box", "point")
OUTPUT_MASKS = ("single", "multi1", "multi2", "multi3", "best", "dynamic")


@dataclass
class PtsamConfig(PeftConfig):
    """PTSAM (Piater et al., CVPRW 2025, arXiv 2504.16739): SAM 2 becomes a task specialist by training prompt tokens.

    Decoder tokens: `num_tokens` learned vectors of the mask decoder's width join the decoder's token stream as sparse
    prompt embeddings (8 x 256 = 2,048 parameters for the sam2.1 models). Without a user prompt (prompt-free, the PTSAM
    setting) they replace the "not-a-point" padding SAM 2 would use, and the dense no-mask embedding is kept; with boxes
    or points they are appended after the user's prompt embeddings.

    Encoder prompts (optional, deep visual prompt tuning): `encoder_prompts` learned tokens per Hiera block, attended by
    every image token of the block through the block's own frozen attention projections (see `PtsamAttentionLayer`).
    Zero prompts leave the encoder exactly unchanged.
    """

    num_tokens: int = field(default=8, metadata={"help": "Learned decoder prompt tokens (each of the decoder width)."})
    token_init: str = field(
        default="normal",
        metadata={
            "help": "How decoder tokens start: `normal` (N(0, token_init_std^2)), `box` (the corner embeddings of "
            "random boxes from the base prompt encoder) or `point` (embeddings of random positive points)."
        },
    )
    token_init_std: float = field(
        default=1.0,
        metadata={
            "help": "Std of `normal` token init. 1.0 is the scale of SAM's own sparse prompt embeddings (random-Fourier "
            "sin/cos features plus unit-scale point-type embeddings)."
        },
    )
    init_seed: int = field(default=0, metadata={"help": "Seed of every random initialisation of this adapter."})
    output_mask: str = field(
        default="single",
        metadata={
            "help": "Which decoder output is the prediction when one mask is asked for: `single` (the single-mask token, "
            "also in eval), `multi1`/`multi2`/`multi3` (one of the three multimask tokens), `best` (the multimask "
            "output with the highest predicted IoU) or `dynamic` (SAM 2's default: `single` unless unstable at eval)."
        },
    )
    encoder_prompts: int = field(
        default=0, metadata={"help": "Learned prompt tokens per Hiera block (0 = no encoder prompts)."}
    )
    encoder_stages: list[int] | None = field(
        default=None, metadata={"help": "Hiera stages (0-3) whose blocks get prompts; None = every stage."}
    )
    encoder_init_std: float = field(
        default=0.02,
        metadata={
            "help": "Std of the encoder prompts' normal init. 0 starts exactly at the base model, but then all prompts "
            "of a block get identical gradients and stay equal, so a small non-zero value is the default."
        },
    )
    decoder_width: int | None = field(
        default=None, metadata={"help": "Filled in from the base model; loading checks the new base against it."}
    )
    encoder_block_widths: list[int] | None = field(
        default=None, metadata={"help": "Filled in from the base model: input width of each Hiera block."}
    )
    target_modules: str | None = field(
        default=None, metadata={"help": "Derived when the adapter is injected (a regex over module names); leave None."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PTSAM
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {self.num_tokens}.")
        if self.token_init not in TOKEN_INITS:
            raise ValueError(f"token_init must be one of {TOKEN_INITS}, got '{self.token_init}'.")
        if self.output_mask not in OUTPUT_MASKS:
            raise ValueError(f"output_mask must be one of {OUTPUT_MASKS}, got '{self.output_mask}'.")
        if self.encoder_prompts < 0:
            raise ValueError(f"encoder_prompts must be 0 (off) or more, got {self.encoder_prompts}.")
        if self.encoder_stages is not None:
            self.encoder_stages = sorted({int(s) for s in self.encoder_stages})
        if self.token_init_std < 0 or self.encoder_init_std < 0:
            raise ValueError("token_init_std and encoder_init_std must not be negative.")
