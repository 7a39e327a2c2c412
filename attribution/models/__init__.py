"""Model adapters, checkpoints and the UNet presets used for training."""

from .adapter import DiffusionModel, NoiseSchedule, load_model
from .checkpoint import (DEFAULT_SCHEDULE, SHIPPED, CheckpointInfo, list_shipped, resolve_checkpoint,
                         save_checkpoint)
from .presets import unet_for

__all__ = ["DiffusionModel", "NoiseSchedule", "load_model", "DEFAULT_SCHEDULE", "SHIPPED", "CheckpointInfo",
           "list_shipped", "resolve_checkpoint", "save_checkpoint", "unet_for"]
