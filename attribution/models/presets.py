"""UNet2DModel architectures used by `train` (small enough to train and attribute on a CPU)."""

from __future__ import annotations

from ..errors import ConfigError

PRESETS = {
    # 2 resolution levels, one ResNet block each, one attention layer in the mid block: ~0.65M parameters.
    "small": dict(layers_per_block=1, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8),
    # The retraining recipe of the ground-truth banks: "small" at 3/4 width and without the mid-block attention,
    # ~0.36M parameters, about 1.8x the training throughput of "small" on one CPU thread.
    "eval": dict(layers_per_block=1, block_out_channels=(24, 48), down_block_types=("DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, add_attention=False),
    # For tests: ~30k parameters.
    "tiny": dict(layers_per_block=1, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4),
}


def unet_for(resolution: int, channels: int, preset: str = "small"):
    """A freshly initialised `UNet2DModel` for images of this size."""
    from diffusers import UNet2DModel  # lazy: diffusers takes seconds to import

    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; use one of: {', '.join(PRESETS)}")
    if resolution % 2:
        raise ConfigError(f"resolution must be even for a 2-level UNet, got {resolution}")
    return UNet2DModel(sample_size=resolution, in_channels=channels, out_channels=channels, **PRESETS[preset])
