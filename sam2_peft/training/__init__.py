"""The trainer (`training.trainer`), the tasks it trains on (`training.tasks`, `training.video`), its settings
(`training.config`, light enough for the command line), losses, checkpoints and the embedding cache."""
