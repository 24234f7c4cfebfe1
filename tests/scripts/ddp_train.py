"""Launched by a test with `accelerate launch` in 2 CPU processes: train a LoRA, then dump each rank's weights."""

import logging
import sys
from pathlib import Path

from safetensors.torch import save_file

from sam2_peft.models.loading import load_base_model
from sam2_peft.training.arguments import (
    build_datasets,
    dataset_config_from_args,
    recipe_parser,
    training_config_from_args,
)
from sam2_peft.training.trainer import Trainer
from sam2_peft.tuners.methods import LoraMethod

if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args, _ = recipe_parser("ddp test").parse_known_args(sys.argv[1:])
    model, processor = load_base_model(args.model)
    train_dataset, val_dataset = build_datasets(args, processor, dataset_config_from_args(args))
    trainer = Trainer(
        model, processor, LoraMethod(r=4), train_dataset, val_dataset, training_config_from_args(args), args.model
    )
    trainer.train()
    weights = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    rank = trainer.accelerator.process_index
    save_file(weights, str(Path(args.output_dir) / f"rank{rank}.safetensors"))
    print(f"rank {rank} of {trainer.accelerator.num_processes}: steps {trainer.state.global_step}")
