"""`cartridge train`: settings, datasets, replay, the training loop, checkpoints, store runs, the report."""
