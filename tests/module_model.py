"""A `DiffusionModel` around any small `nn.Module` noise predictor on one-channel square images (50 timesteps, no
checkpoint): the test double of the EK-FAC tests, whose curvature is checked against quantities built by hand."""

from __future__ import annotations

import torch

from attribution.models.adapter import DiffusionModel
from attribution.models.schedules import DDPMSchedule


class ModuleModel(DiffusionModel):
    kind = "test-module"
    channels = 1

    def __init__(self, net: torch.nn.Module, side: int):
        super().__init__(DDPMSchedule.from_config({"num_train_timesteps": 50}), None, "cpu")
        self.net = net.requires_grad_(False)
        self.side = side

    @property
    def resolution(self):
        return self.side

    @property
    def latent_shape(self):
        return (1, self.side, self.side)

    @classmethod
    def accepts(cls, info):
        return False

    @classmethod
    def load(cls, info, device="auto"):
        raise NotImplementedError

    def save(self, target, extra=None):
        raise NotImplementedError

    @property
    def module(self):
        return self.net
