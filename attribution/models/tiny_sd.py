"""A tiny Stable-Diffusion-shaped pipeline folder, built offline from small configs (random weights).

Used by the tests (a latent, text-conditional model that runs end to end on a CPU in seconds) and as the starting
point of the shipped tiny latent model. Same layout as a downloaded Stable Diffusion folder: `model_index.json`,
`unet/` (UNet2DConditionModel), `vae/` (AutoencoderKL), `text_encoder/` (CLIPTextModel), `tokenizer/`
(CLIPTokenizer with a small byte-pair vocabulary: letters, digits and merges that make each given word one token)
and `scheduler/` (Stable Diffusion's scaled-linear DDPM schedule).
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..fileio import atomic_dir

SD_SCHEDULE = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
               "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
               "clip_sample": False}
MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class TinySDConfig:
    """Sizes of the tiny pipeline.

    Attributes:
        resolution: image side in pixels; the latent side is resolution / 2 ** (len(vae_channels) - 1).
        vae_channels: the VAE's block widths (two blocks: one 2x downsampling).
        latent_channels: channels of the latent.
        unet_channels: the UNet's block widths (a plain down block, then a cross-attention block).
        text_dim: the text encoder's width (= the UNet's cross-attention width).
        text_layers: transformer layers of the text encoder.
        max_tokens: the tokenizer's (and text encoder's) sequence length.
    """

    resolution: int = 16
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (16, 32)
    text_dim: int = 32
    text_layers: int = 2
    max_tokens: int = 16


def tiny_tokenizer(words: Sequence[str], max_tokens: int = 16):
    """A CLIPTokenizer whose vocabulary has every lower-case letter and digit (alone and word-final) and merges
    that make each of `words` a single token."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for c in string.ascii_lowercase + string.digits:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        for w in word.lower().replace("_", " ").split():
            pieces = list(w[:-1]) + [w[-1] + "</w>"]
            cur = pieces[0]
            for nxt in pieces[1:]:
                if (cur, nxt) not in merges:
                    merges.append((cur, nxt))
                cur += nxt
                vocab.setdefault(cur, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_tokens)


def build_tiny_pipeline(folder: str | Path, words: Sequence[str], cfg: TinySDConfig = TinySDConfig(),
                        seed: int = 0) -> Path:
    """Write a tiny Stable Diffusion folder with random weights (seeded) and a tokenizer for `words`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tokenizer = tiny_tokenizer(words, cfg.max_tokens)
    torch.manual_seed(seed)
    groups = min(8, *cfg.vae_channels, *cfg.unet_channels)
    n_vae = len(cfg.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=groups,
                        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
                        sample_size=cfg.resolution)
    latent = cfg.resolution // 2 ** (n_vae - 1)
    unet = UNet2DConditionModel(sample_size=latent, in_channels=cfg.latent_channels,
                                out_channels=cfg.latent_channels, block_out_channels=cfg.unet_channels,
                                layers_per_block=1, norm_num_groups=groups, cross_attention_dim=cfg.text_dim,
                                attention_head_dim=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=cfg.text_dim,
                                        intermediate_size=2 * cfg.text_dim, num_attention_heads=4,
                                        num_hidden_layers=cfg.text_layers, max_position_embeddings=cfg.max_tokens,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    with atomic_dir(folder) as tmp:
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
        text.save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULE, indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return folder


SD3_SCHEDULE = {"num_train_timesteps": 1000, "shift": 3.0}  # Stable Diffusion 3's


def build_tiny_sd3(folder: str | Path, words: Sequence[str], seed: int = 0, resolution: int = 16,
                   latent_channels: int = 4, text_dim: int = 32, max_tokens: int = 16) -> Path:
    """Write a tiny `StableDiffusion3Pipeline` folder with random weights (seeded): an SD3Transformer2DModel (2
    layers, 2 heads of 8), a 2-block VAE with a shift factor, two CLIP text encoders with projections and
    tokenizers for `words`, no T5 (the pipeline uses zeros there) and SD3's flow-matching scheduler (shift 3)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 32),
                        layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=resolution, scaling_factor=1.5,
                        shift_factor=0.1)
    proj = text_dim // 2
    encoders, tokenizers = [], []
    for _ in range(2):
        tok = tiny_tokenizer(words, max_tokens)
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=text_dim, intermediate_size=2 * text_dim, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=max_tokens, projection_dim=proj,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)))
        tokenizers.append(tok)
    transformer = SD3Transformer2DModel(sample_size=resolution // 2, patch_size=2, in_channels=latent_channels,
                                        out_channels=latent_channels, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=2 * text_dim,
                                        caption_projection_dim=16, pooled_projection_dim=2 * proj,
                                        pos_embed_max_size=resolution // 2)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE),
                                    vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0],
                                    text_encoder_2=encoders[1], tokenizer_2=tokenizers[1], text_encoder_3=None,
                                    tokenizer_3=None)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return folder
