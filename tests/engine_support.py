"""Helpers shared by the engine-level tests: a randomly initialised tiny pixel model, the first n images of a dataset
as their own dataset, feature-store keys, the relative error of an array against a reference, the check that an error
message is one line, the CPU device and the mark for tests that need a CUDA GPU. Not a test module (pytest collects
only test_*.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.data.datasets import ImageDataset
from attribution.models.adapter import DiffusionModel
from attribution.models.schedules import DDPMSchedule
from attribution.models.schedules import DEFAULT_SCHEDULE
from attribution.models.pixel_ddpm import PixelDDPM
from attribution.models.presets import unet_for

TWO_STEPS = dict(timesteps=2)  # K=2 uniform: t = 0, 500
# The hand-made bank's training set (conftest's `fake_bank_dir`): the digits 0 and 1 of the digits training split,
# 324 images, so a test that featurizes the bank's training set does a fifth of the full split's work.
FAKE_BANK_DATASET = "digits:0,1"
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_model(seed: int = 0, prediction_type: str = "epsilon") -> DiffusionModel:
    """The "tiny" UNet (41,609 parameters) on 16x16 grayscale, random weights from `seed`, DDPM schedule."""
    torch.manual_seed(seed)
    schedule = DDPMSchedule.from_config({**DEFAULT_SCHEDULE, "prediction_type": prediction_type})
    return PixelDDPM(unet_for(16, 1, "tiny"), schedule, None, "cpu")


def subset(d: ImageDataset, n: int) -> ImageDataset:
    """The first n images of `d`, as a dataset of their own (same spec, split and source indices)."""
    return ImageDataset(d.spec, d.split, d.pixels[:n].copy(), d.labels[:n].copy(), list(d.class_names),
                        d.source_index[:n].copy())


def keys_for(split: str, rows) -> list[str]:
    return [f"{split}/{i}" for i in rows]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, f"error message should be one line: {msg!r}"
    return msg


def tiny_dit(schedule: str, train, val=None, seed: int = 0, out_channels: int = 1):
    """A class-conditional DiT (~20k parameters, 16x16 grayscale, patch 4, 2 layers, 10 classes), random weights from
    `seed`, with `train`'s (and `val`'s) labels as its label table."""
    from diffusers import DiTTransformer2DModel

    from attribution.models.dit import DiT
    from attribution.models.latent_sd import PromptTable
    from attribution.models.schedules import new_schedule

    torch.manual_seed(seed)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=out_channels,
                                num_layers=2, sample_size=16, patch_size=4, num_embeds_ada_norm=10, norm_num_groups=1)
    labels = {"train": train.labels.tolist(), **({"val": val.labels.tolist()} if val is not None else {})}
    table = PromptTable("{class}", train.spec, list(train.class_names), labels)
    return DiT(net, new_schedule(schedule), train.class_names, table)
