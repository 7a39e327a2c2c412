"""Latent text-to-image flow-matching transformers shaped like Stable Diffusion 3: a local diffusers
`StableDiffusion3Pipeline` folder (`model_index.json`; `transformer/` SD3Transformer2DModel; `vae/` AutoencoderKL;
`text_encoder/` and `text_encoder_2/` CLIPTextModelWithProjection with their tokenizers; optionally
`text_encoder_3/` T5 (without it the pipeline uses zeros there, as diffusers does); `scheduler/`
FlowMatchEulerDiscreteScheduler), loaded offline with diffusers' own pipeline class, plus an optional
`prompts.json` (each training and validation image's prompt, as for `latent_sd.LatentSD`).

As the adapter sees it:
- `encode` = (the VAE's latent mode - shift_factor) x scaling_factor, `decode` the inverse (as the SD3 pipeline);
- `condition(keys)` = the pipeline's own `encode_prompt` of each key's prompt (CLIP hidden states padded and joined
  with the T5 tokens, and the pooled CLIP projections): {"encoder_hidden_states": (L, D), "pooled_projections":
  (P,)} per key, cached per prompt;
- the transformer is called with keywords (its forward takes the text states second, the time last);
- the noise process is the folder's scheduler (flow matching, with its shift; SD3 uses 3.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .adapter import Condition, DiffusionModel, sample_side
from .checkpoint import CheckpointInfo
from .latent_sd import PROMPTS_FILE, PromptKeys, PromptTable, read_prompt_table
from .schedules import load_schedule, schedule_for_class

PIPELINE_CLASS = "StableDiffusion3Pipeline"
OPTIONAL_COMPONENTS = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
MAX_SEQUENCE = 256  # the T5 tokens of the SD3 pipeline's default call


class LatentSD3(PromptKeys, DiffusionModel):
    """An SD3-shaped latent flow-matching transformer (see the module docstring)."""

    kind = "sd3"
    conditional = True
    missing_table = "add the prompt of each image of the set it was trained on"

    def __init__(self, pipe, info: CheckpointInfo | None, device: torch.device | str = "cpu",
                 prompts: PromptTable | None = None):
        super().__init__(load_schedule(info) if info is not None else _schedule_of(pipe), info, device)
        self.pipe = pipe
        # (its joint text-image attention keeps its own processor: the classic one has no text stream)
        self.transformer = pipe.transformer.to(self.device).eval().requires_grad_(False)
        self.vae = pipe.vae.to(self.device).eval().requires_grad_(False)
        for enc in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if enc is not None:
                enc.to(self.device).eval().requires_grad_(False)
        self.prompts = prompts
        self._embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def accepts(cls, info: CheckpointInfo) -> bool:
        return info.pipeline_class() == PIPELINE_CLASS or info.unet_config().get("_class_name") == \
            "SD3Transformer2DModel"

    @classmethod
    def load(cls, info: CheckpointInfo, device: str | torch.device = "auto") -> LatentSD3:
        from diffusers import StableDiffusion3Pipeline  # lazy: diffusers takes seconds to import

        folder = info.pipeline_dir
        if info.pipeline_class() != PIPELINE_CLASS:
            raise CheckpointError(f"{folder} has an SD3 transformer but no {PIPELINE_CLASS} model_index.json; give "
                                  "the whole pipeline folder (transformer/, vae/, text encoders, scheduler/)")
        absent = {name: None for name in OPTIONAL_COMPONENTS if not (folder / name).is_dir()}
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                                            **absent)
        except Exception as exc:  # a missing component, a config of another class, weights of another shape
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{folder} could not be loaded as a {PIPELINE_CLASS} ({first[:200]})") from None
        return cls(pipe, info, device, read_prompt_table(folder / PROMPTS_FILE))

    def save(self, target: Path, extra: dict | None = None) -> None:
        raise ConfigError("SD3-shaped pipelines are not written by this tool; save them with diffusers")

    # -- shapes --

    @property
    def module(self) -> torch.nn.Module:
        return self.transformer

    @property
    def resolution(self) -> int:
        return sample_side(self.transformer.config) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def channels(self) -> int:
        return int(self.vae.config.in_channels)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        with self._lock:
            z = self.vae.encode(x.to(self.device)).latent_dist.mode()
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        with self._lock:
            return self.vae.decode(z.to(self.device) / cfg.scaling_factor + (cfg.shift_factor or 0.0)).sample

    # -- the network: keywords, text states before the time --

    def network_inputs(self, x_t, time, cond):
        return (), {"hidden_states": x_t, "timestep": time, **(cond or {})}

    # -- conditions (prompt_for, class_prompts, condition: PromptKeys) --

    def prompt_condition(self, prompts: Sequence[str]) -> Condition:
        pairs = [self._embed(p) for p in prompts]
        return {"encoder_hidden_states": torch.stack([h for h, _ in pairs]),
                "pooled_projections": torch.stack([p for _, p in pairs])}

    @torch.no_grad()
    def _embed(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's `encode_prompt` of one prompt (one image, no guidance): its (L, D) states and (P,) pooled
        projection, cached."""
        if prompt not in self._embeddings:
            with self._lock:
                states, _, pooled, _ = self.pipe.encode_prompt(prompt, prompt, prompt, device=self.device,
                                                               do_classifier_free_guidance=False,
                                                               max_sequence_length=MAX_SEQUENCE)
            self._embeddings[prompt] = (states[0].float(), pooled[0].float())
        return self._embeddings[prompt]

    def check_training_set(self, train) -> None:
        if self.prompts is None or train.split != "train":
            return
        recorded = len(self.prompts.class_names_of("train"))
        if recorded != len(train):
            raise ConfigError(f"{self.spec}'s {PROMPTS_FILE} has prompts for {recorded} training images, not the "
                              f"{len(train)} of {train.spec}: attribute it against --dataset {self.prompts.dataset}")


def _schedule_of(pipe):
    """The schedule of an in-memory pipeline (no folder): its scheduler's config."""
    cfg = dict(pipe.scheduler.config)
    return schedule_for_class(cfg.get("_class_name", type(pipe.scheduler).__name__)).from_config(cfg)
