"""Which part of a frozen SAM 2 decoder stops multi-class PTSAM from telling classes apart? A diagnostic, not a method.

Runs `sam2-peft train ptsam` (every flag after `--` is the recipe's) with more of the mask decoder trainable than
PTSAM trains: `--unfreeze-decoder REGEX` unfreezes the decoder parameters whose name matches (`.` every one: the
decoder as a partial fine-tune would train it), `--attention-rank R` adds a rank-R update to its 28 attention
projections (LoRA's `decoder` preset). The run's metrics.json holds the per-class Dice, base and adapted; the
adapter it saves holds only PTSAM's parameters, so it is for reading the numbers, not for use.

    python benchmarks/multiclass_capacity.py --unfreeze-decoder . -- --model compact-synthetic --data dev/ \
        --mask-type semantic --val-fraction 0.2 --max-steps 400 --tune-upscaling false --output-dir runs/whole
"""

from __future__ import annotations

import argparse
import re

import torch
from torch import nn

from sam2_peft.adapters import methods
from sam2_peft.recipes import ptsam
from sam2_peft.tuners.options import preset_regex


class LowRankUpdate(nn.Module):
    """`base(x) + x A^T B^T`, `B` zero at the start."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.T) @ self.up.T


def widen(model: nn.Module, unfreeze: str | None, rank: int) -> None:
    """Unfreeze the decoder parameters matching `unfreeze` and give the attention projections rank-`rank` updates."""
    sam = model.base_model.model
    if unfreeze:
        for name, parameter in sam.mask_decoder.named_parameters():
            if re.search(unfreeze, name.replace("base_layer.", "")) and "ptsam_" not in name:
                parameter.requires_grad_(True)
    if rank:
        pattern = preset_regex("decoder")
        for name, module in list(sam.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}".replace("base_layer.", "")
                if isinstance(child, nn.Linear) and re.fullmatch(pattern, full):
                    setattr(module, child_name, LowRankUpdate(child, rank))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unfreeze-decoder", help="regex over the mask decoder's parameter names")
    parser.add_argument("--attention-rank", type=int, default=0, help="rank of the attention projections' update")
    parser.add_argument("recipe", nargs=argparse.REMAINDER, help="-- then the flags of `sam2-peft train ptsam`")
    args = parser.parse_args()
    prepare = methods.PtsamMethod.prepare

    def wider(self, model, base_name):
        model = prepare(self, model, base_name)
        widen(model, args.unfreeze_decoder, args.attention_rank)
        return model

    methods.PtsamMethod.prepare = wider
    ptsam.main([flag for flag in args.recipe if flag != "--"])


if __name__ == "__main__":
    main()
