"""Launched by a test with `accelerate launch` in 2 CPU processes: train a LoRA, then dump each rank's weights."""

import logging
import sys
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from sam2_peft.adapters import LoraMethod
from sam2_peft.recipes.arguments import parse_recipe_arguments
from sam2_peft.recipes.runner import image_task, load_model
from sam2_peft.training.trainer import Trainer
from sam2_peft.tuners.options import LoraOptions

if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_recipe_arguments("ddp test", LoraOptions, argv=sys.argv[1:])
    model, processor = load_model(args.model)
    trainer = Trainer(
        model, LoraMethod(**asdict(args.method)), image_task(args, processor), args.training, args.model.model
    )
    trainer.train()
    weights = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    rank = trainer.accelerator.process_index
    save_file(weights, str(Path(args.training.output_dir) / f"rank{rank}.safetensors"))
    print(f"rank {rank} of {trainer.accelerator.num_processes}: steps {trainer.state.global_step}")
