"""Model adapters (the `DiffusionModel` interface and its implementations), checkpoints, the loader registry and
the UNet presets used for training."""

from .adapter import DiffusionModel, NoiseSchedule
from .checkpoint import (DEFAULT_SCHEDULE, SHIPPED, CheckpointInfo, Demo, list_shipped, resolve_checkpoint,
                         save_checkpoint)
from .latent_sd import LatentSD
from .pixel_ddpm import PixelDDPM
from .presets import unet_for
from .registry import MODEL_KINDS, load_model

__all__ = ["DiffusionModel", "NoiseSchedule", "PixelDDPM", "LatentSD", "MODEL_KINDS", "load_model", "DEFAULT_SCHEDULE",
           "SHIPPED",
           "CheckpointInfo", "Demo", "list_shipped", "resolve_checkpoint", "save_checkpoint", "unet_for"]
