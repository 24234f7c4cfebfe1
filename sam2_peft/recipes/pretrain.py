"""Pre-train SAM 2 from a config (every parameter trains), on synthetic scenes by default, with SAM-style
interactive correction rounds.

    sam2-peft train pretrain --model compact-random --data synthetic:20000 --max-steps 20000
    sam2-peft train pretrain --model path/to/config.json ...   # any Sam2Config, random weights
    sam2-peft train pretrain --model path/to/model ...         # continue training a saved model

The result is a whole model folder (`config.json` + `model.safetensors`) that `--model` accepts as a base;
`--save-dtype float16` halves its size (training itself stays in float32 or --mixed-precision).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..commandline import run_from_command_line
from ..models.names import BASE_DTYPES
from .arguments import image_rules, parse_recipe_arguments

PRETRAIN_DEFAULTS = dict(
    model="compact-random",
    data="synthetic:20000:0",
    val_data="synthetic:64:1000000",
    prompt="mixed",
    num_negative_points=0,
    max_objects=8,
    mask_loss="bce",
    correction_rounds=2,
    max_steps=20000,
    eval_every=1000,
    weight_decay=0.01,
    lr=3e-4,
)
"""Pre-training's settings where they differ from fine-tuning's."""


@dataclass
class PretrainArguments:
    """The saved model."""

    _argument_group_name = "pre-training"

    save_dtype: str = field(default="float32", metadata={"help": "Dtype of saved weights.", "choices": BASE_DTYPES})


def main(argv: Sequence[str] | None = None, **defaults) -> dict:
    defaults = {**PRETRAIN_DEFAULTS, **defaults}
    rules = image_rules(lambda a: False, "pre-training trains the image encoder")
    args = parse_recipe_arguments(__doc__.splitlines()[0], PretrainArguments, argv=argv, rules=rules, **defaults)
    from ..adapters.methods import FullMethod
    from .runner import run_recipe

    return run_recipe(args, FullMethod(save_dtype=args.method.save_dtype))


if __name__ == "__main__":
    run_from_command_line(main)
