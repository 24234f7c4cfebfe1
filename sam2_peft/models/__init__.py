"""Loading SAM 2 base models (Hub ids, folders, Meta checkpoints, built-in architectures and test base).

`models.names` is light (the command line reads it before importing torch); the loaders are in `models.loading`."""
