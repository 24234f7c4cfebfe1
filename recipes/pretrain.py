"""Pre-train SAM 2 from a config (every parameter trains), on synthetic scenes by default, with SAM-style
interactive correction rounds.

    accelerate launch recipes/pretrain.py --model compact-random --data synthetic:20000 --max-steps 20000
    accelerate launch recipes/pretrain.py --model path/to/config.json ...   # any Sam2Config, random weights
    accelerate launch recipes/pretrain.py --model path/to/model ...         # continue training a saved model

The result is a whole model folder (`config.json` + `model.safetensors`) that `--model` accepts as a base;
`--save-dtype float16` halves its size (training itself stays in float32 or --mixed-precision).
"""

import torch

from sam2_peft.training.arguments import recipe_parser, run_from_command_line, run_recipe
from sam2_peft.tuners.methods import FullMethod


def main(argv: list[str] | None = None) -> dict:
    parser = recipe_parser(__doc__.splitlines()[0], default_lr=3e-4)
    parser.set_defaults(
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
    )
    parser.add_argument(
        "--save-dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="Dtype of saved weights."
    )
    args = parser.parse_args(argv)
    return run_recipe(args, FullMethod(save_dtype=getattr(torch, args.save_dtype)))


if __name__ == "__main__":
    run_from_command_line(main)
