"""`PtsamMethod`: PTSAM as a tuning method of the foundation `Trainer` (prepare, save)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from peft import get_peft_model
from torch import nn

from ...io import atomic_adapter_dir
from ..methods import ADAPTER_FILE_NAMES, TuningMethod, write_sidecar
from .config import PtsamConfig


@dataclass
class PtsamMethod(TuningMethod):
    """Train only PTSAM prompt tokens (decoder tokens, optionally encoder prompts); see `PtsamConfig` for each knob."""

    num_tokens: int = 8
    encoder_prompts: int = 0
    encoder_stages: list[int] | None = None
    token_init: str = "normal"
    token_init_std: float = 1.0
    output_mask: str = "single"
    init_seed: int = 0
    name: str = field(default="ptsam", init=False)

    def peft_config(self, base_name: str | None) -> PtsamConfig:
        return PtsamConfig(
            num_tokens=self.num_tokens,
            encoder_prompts=self.encoder_prompts,
            encoder_stages=self.encoder_stages,
            token_init=self.token_init,
            token_init_std=self.token_init_std,
            output_mask=self.output_mask,
            init_seed=self.init_seed,
            base_model_name_or_path=base_name,
        )

    def prepare(self, model: nn.Module, base_name: str | None) -> nn.Module:
        model.name_or_path = base_name  # peft copies it into the adapter config
        return get_peft_model(model, self.peft_config(base_name))

    def save(self, model: nn.Module, directory: str | os.PathLike, base_name: str | None) -> None:
        model.peft_config["default"].base_model_name_or_path = base_name
        with atomic_adapter_dir(directory, replaces=ADAPTER_FILE_NAMES) as staging:
            model.save_pretrained(staging, save_embedding_layers=False)
            write_sidecar(model, staging, self.name, base_name, {"ptsam": asdict(self)})
