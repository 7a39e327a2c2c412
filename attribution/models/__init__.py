"""Model adapters (the `DiffusionModel` interface and its implementations), checkpoints, the loader registry and
the UNet presets used for training."""

from .adapter import DiffusionModel
from .checkpoint import SHIPPED, CheckpointInfo, Demo, list_shipped, resolve_checkpoint, save_checkpoint
from .dit import DiT
from .latent_sd import LatentSD
from .pixel_ddpm import PixelDDPM
from .presets import unet_for
from .registry import MODEL_KINDS, load_model
from .schedules import DEFAULT_SCHEDULE, SCHEDULES, DDPMSchedule, FlowMatchingSchedule, Schedule

__all__ = ["DiffusionModel", "PixelDDPM", "LatentSD", "DiT", "MODEL_KINDS", "load_model", "Schedule", "DDPMSchedule",
           "FlowMatchingSchedule", "SCHEDULES", "DEFAULT_SCHEDULE", "SHIPPED", "CheckpointInfo", "Demo", "list_shipped",
           "resolve_checkpoint", "save_checkpoint", "unet_for"]
