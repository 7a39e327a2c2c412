"""The pixel-space, unconditional diffusion model: a diffusers `UNet2DModel` on images in [-1, 1] (the shipped models,
training runs made by `train`, DDPMPipeline folders such as google/ddpm-cifar10-32, bare UNet2DModel folders), with
the noise process its scheduler config names: DDPM, or flow matching (`train --schedule flow-matching`: the folder's
scheduler is a `FlowMatchEulerDiscreteScheduler`; diffusers has no pixel flow-matching pipeline class, so the folder
keeps the DDPMPipeline layout)."""

from __future__ import annotations

from pathlib import Path

import torch

from .adapter import DiffusionModel, sample_side, use_classic_attention
from .checkpoint import CheckpointInfo, load_unet, save_checkpoint
from .presets import unet_for
from .schedules import Schedule, load_schedule, new_schedule

PIPELINES = (None, "DDPMPipeline", "DDIMPipeline")


class PixelDDPM(DiffusionModel):
    """A pixel-space DDPM around a diffusers `UNet2DModel`; encode/decode are the identity, no conditions.

    `trainable=False` (attribution, sampling): eval mode, frozen, and the classic attention processor
    (`use_classic_attention`: vmap and higher-order autograd). `trainable=True` (training): train mode, gradients
    on, diffusers' default attention, exactly as the shipped models were trained.
    """

    kind = "pixel-ddpm"

    def __init__(self, unet, schedule: Schedule, info: CheckpointInfo | None = None,
                 device: torch.device | str = "cpu", trainable: bool = False):
        super().__init__(schedule, info, device)
        if trainable:
            self.unet = unet.to(self.device).train()
            return
        use_classic_attention(unet)
        self.unet = unet.to(self.device).eval().requires_grad_(False)

    @classmethod
    def accepts(cls, info: CheckpointInfo) -> bool:
        """A UNet2DModel without class embeddings, alone or in a DDPM/DDIM pipeline folder."""
        unet = info.unet_config()
        return (info.pipeline_class() in PIPELINES and unet.get("_class_name", "UNet2DModel") == "UNet2DModel"
                and unet.get("num_class_embeds") is None and unet.get("class_embed_type") is None)

    @classmethod
    def load(cls, info: CheckpointInfo, device: str | torch.device = "auto") -> PixelDDPM:
        return cls(load_unet(info), load_schedule(info), info, device)

    @classmethod
    def trains(cls, cfg) -> bool:
        return cfg.pipeline is None

    @classmethod
    def for_training(cls, cfg, load, device):
        """A fresh UNet of `cfg.preset` at the data's size, with a fresh schedule of `cfg.schedule`."""
        data = load("train", cfg.resolution, None)
        return cls.initialise(data.resolution, data.channels, cfg.preset, new_schedule(cfg.schedule), device), data

    @classmethod
    def initialise(cls, resolution: int, channels: int, preset: str, schedule: Schedule,
                   device: str | torch.device = "cpu") -> PixelDDPM:
        """A freshly initialised, trainable model (weights from torch's global generator: seed it first)."""
        return cls(unet_for(resolution, channels, preset), schedule, None, device, trainable=True)

    def save(self, target: Path, extra: dict | None = None) -> None:
        save_checkpoint(target, self.unet, self.schedule.config, extra, self.schedule.scheduler_class)

    @property
    def module(self) -> torch.nn.Module:
        return self.unet

    @property
    def resolution(self) -> int:
        return sample_side(self.unet.config)

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.channels, self.resolution, self.resolution)
