"""The model registry: which `DiffusionModel` implementation loads a checkpoint.

`load_model(spec)` resolves the spec to a folder (checkpoint.py) and asks each registered implementation, in order,
whether it `accepts` the folder (from its files: `model_index.json`'s pipeline class, the UNet config's class name
and class embeddings). A new kind of model (latent, conditional, LoRA) is one file beside pixel_ddpm.py and one
entry in `MODEL_KINDS`; no method, feature or page changes.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from .adapter import DiffusionModel, check_predicts_noise
from .checkpoint import CheckpointInfo, resolve_checkpoint
from .schedules import states_prediction_type
from .dit import DiT
from .latent_sd import LatentSD
from .pixel_ddpm import PixelDDPM
from .sd3 import LatentSD3

MODEL_KINDS: dict[str, type[DiffusionModel]] = {m.kind: m for m in (PixelDDPM, LatentSD, DiT, LatentSD3)}


def implementation_for(info: CheckpointInfo) -> type[DiffusionModel]:
    """The first registered implementation that accepts the checkpoint; `CheckpointError` (one line) if none."""
    for cls in MODEL_KINDS.values():
        if cls.accepts(info):
            return cls
    unet = info.unet_config()
    found = f"pipeline {info.pipeline_class() or '(none)'}, UNet {unet.get('_class_name', '(unnamed)')}"
    if unet.get("num_class_embeds") is not None or unet.get("class_embed_type") is not None:
        found += " with class embeddings"
    raise CheckpointError(f"no model implementation loads {info.pipeline_dir} ({found}); "
                          f"supported: {', '.join(MODEL_KINDS)} (attribution/models/registry.py)")


def load_model(spec: str, device: str | torch.device = "auto") -> DiffusionModel:
    """Resolve a checkpoint spec and load it with the implementation that accepts its folder.

    A checkpoint whose scheduler config does not say what its network predicts is taken as epsilon-prediction (the
    diffusers default) only if the network's output on pure noise is that noise (`check_predicts_noise`): a
    v-prediction model read as epsilon would sample and attribute silently wrong."""
    info = resolve_checkpoint(spec)
    model = implementation_for(info).load(info, device)
    if not states_prediction_type(info):
        check_predicts_noise(model, info.scheduler_config or info.unet_dir / "scheduler_config.json")
    return model


def training_kind(cfg) -> type[DiffusionModel]:
    """The implementation that `train` builds for a training config (a `train.TrainConfig`)."""
    for cls in MODEL_KINDS.values():
        if cls.trains(cfg):
            return cls
    raise CheckpointError("no model implementation trains this configuration")
