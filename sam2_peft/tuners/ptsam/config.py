"""`PtsamConfig`: PTSAM's peft config, serialised to `adapter_config.json`. Its knobs are `PtsamOptions`' (declared
once, in `tuners.options`); this class adds what peft and loading need."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

from ..options import OUTPUT_MASKS, TOKEN_INITS, PtsamOptions

__all__ = ["OUTPUT_MASKS", "TOKEN_INITS", "PtsamConfig"]


@dataclass
class PtsamConfig(PeftConfig, PtsamOptions):
    """PTSAM's peft config: the knobs of `PtsamOptions` (see there) plus the facts filled in from the base model."""

    init_seed: int = field(default=0, metadata={"help": "Seed of every random initialisation of this adapter."})
    decoder_width: int | None = field(
        default=None, metadata={"help": "Filled in from the base model; loading checks the new base against it."}
    )
    encoder_block_widths: list[int] | None = field(
        default=None, metadata={"help": "Filled in from the base model: input width of each Hiera block."}
    )
    id2label: dict[str, str] | None = field(
        default=None,
        metadata={"help": "Multi-class: the trained classes, mask value -> name (`{\"1\": \"scratch\"}`); each "
                  "has its own `num_tokens` decoder tokens. None: one class (the task's foreground)."},
    )  # fmt: skip
    target_modules: str | None = field(
        default=None, metadata={"help": "Derived when the adapter is injected (a regex over module names); leave None."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PTSAM
        self.check_options()
        if self.id2label is not None:
            if not self.id2label or not all(str(key).isdigit() and int(key) > 0 for key in self.id2label):
                raise ValueError(f"id2label must map class ids 1 and up to names; got {self.id2label}.")
            self.id2label = {str(key): str(value) for key, value in self.id2label.items()}

    @property
    def num_classes(self) -> int | None:
        """Classes with their own tokens (None: a single-class adapter, tokens `(num_tokens, width)`)."""
        return None if self.id2label is None else len(self.id2label)
