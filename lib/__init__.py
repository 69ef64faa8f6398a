"""Shared code of the four training scripts: config, data, models, losses, metrics, checkpoints, logging."""
