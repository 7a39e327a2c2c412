"""A class-conditional diffusion transformer (DiT, Peebles & Xie 2023): diffusers' `DiTTransformer2DModel` on pixels,
or on a VAE's latents when the folder has `vae/`, with any noise process the schedule seam drives (DDPM or flow
matching).

The folder is a diffusers `DiTPipeline` folder: `model_index.json` (its `id2label`: the class names by label),
`transformer/` (config + weights), `scheduler/`, optionally `vae/` (AutoencoderKL), plus `labels.json`: the class of
each training and validation image of the set it was trained on (a `latent_sd.PromptTable` with template
"{class}"), which is what a training image is conditioned on when it is attributed. A DiT that learns its variance
(out_channels = 2 x in_channels, as the public DiT-XL/2) predicts the noise in its first half, which is what is
attributed and sampled.

The class goes where a text model's prompt goes (`conditional`, `conditioned_on = "class"`): a class name is the
"prompt" ("--prompt 7", the key "gen/3/p=7"), the empty prompt is the null class that classifier-free guidance
pushes away from, and a name that is not one of the model's classes is one line naming them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .adapter import Condition, DiffusionModel, key_prompt, sample_side, use_classic_attention
from .checkpoint import CheckpointInfo, load_unet, read_config, save_checkpoint
from .latent_sd import PromptTable, _load_component, read_prompt_table
from .schedules import Schedule, load_schedule

LABELS_FILE = "labels.json"
NETWORK_CLASS = "DiTTransformer2DModel"


class DiT(DiffusionModel):
    """A class-conditional DiT (see the module docstring)."""

    kind = "dit"
    conditional = True
    conditioned_on = "class"

    def __init__(self, transformer, schedule: Schedule, classes: Sequence[str], labels: PromptTable | None = None,
                 info: CheckpointInfo | None = None, device: torch.device | str = "cpu", vae=None):
        super().__init__(schedule, info, device)
        use_classic_attention(transformer)
        self.transformer = transformer.to(self.device).eval().requires_grad_(False)
        self.vae = None if vae is None else vae.to(self.device).eval().requires_grad_(False)
        self.classes = [str(c) for c in classes]
        self.labels = labels
        n = int(transformer.config.num_embeds_ada_norm)
        if len(self.classes) != n:
            raise CheckpointError(f"{self.spec}: id2label names {len(self.classes)} classes, the transformer has {n}")

    # -- loading and saving --

    @classmethod
    def accepts(cls, info: CheckpointInfo) -> bool:
        return info.unet_config().get("_class_name") == NETWORK_CLASS

    @classmethod
    def load(cls, info: CheckpointInfo, device: str | torch.device = "auto") -> DiT:
        folder = info.pipeline_dir
        index = read_config(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
        transformer = load_unet(info, NETWORK_CLASS)
        n = int(transformer.config.num_embeds_ada_norm)
        id2label = index.get("id2label") or {}
        classes = [str(id2label.get(str(i), i)) for i in range(n)]
        labels = read_prompt_table(folder / LABELS_FILE)
        vae = _load_component(folder, "vae") if (folder / "vae").is_dir() else None
        return cls(transformer, load_schedule(info), classes, labels, info, device, vae)

    def save(self, target: Path, extra: dict | None = None) -> None:
        if self.vae is not None:
            raise ConfigError("saving a latent DiT is not supported; save its pipeline with diffusers")
        files = {} if self.labels is None else {LABELS_FILE: json.dumps(asdict(self.labels)) + "\n"}
        save_checkpoint(target, self.transformer, self.schedule.config, extra, self.schedule.scheduler_class,
                        "DiTPipeline", "transformer", {"id2label": dict(enumerate(self.classes))}, files)

    # -- shapes --

    @property
    def module(self) -> torch.nn.Module:
        return self.transformer

    @property
    def resolution(self) -> int:
        scale = 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)
        return sample_side(self.transformer.config) * scale

    @property
    def channels(self) -> int:
        return int(self.transformer.config.in_channels if self.vae is None else self.vae.config.in_channels)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x
        with self._lock:
            return self.vae.encode(x.to(self.device)).latent_dist.mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return z
        with self._lock:
            return self.vae.decode(z.to(self.device) / self.vae.config.scaling_factor).sample

    # -- the network: the prediction, without a learned variance --

    def _call(self, x_t, t, cond):
        return super()._call(x_t, t, cond)[:, : self.latent_shape[0]]

    def raw(self, params, x_t, t, cond=None):
        return super().raw(params, x_t, t, cond)[:, : self.latent_shape[0]]

    # -- conditions --

    def class_prompts(self) -> list[str]:
        return list(self.classes)

    def _label(self, name: str) -> int:
        if name == "":
            if int(self.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings) \
                    <= len(self.classes):
                raise ConfigError(f"{self.spec} has no null class (it was trained without label dropout), so it "
                                  "cannot be guided; use guidance 1")
            return len(self.classes)
        if name not in self.classes:
            shown = ", ".join(self.classes[:12]) + (", ..." if len(self.classes) > 12 else "")
            raise ConfigError(f"class {name!r} is not one of {self.spec}'s {len(self.classes)} classes: {shown}")
        return self.classes.index(name)

    def prompt_for(self, key: str) -> str:
        """The class name a noise key is conditioned on: its own ("/p=NAME"), else a dataset image's recorded
        class."""
        name = key_prompt(key)
        if name is not None:
            return name
        kind, _, rest = key.partition("/")
        if kind in ("train", "val"):
            if self.labels is None:
                raise ConfigError(f"{self.spec} records no class for its {kind} images ({LABELS_FILE}); give the "
                                  "label table of the set it was trained on")
            return self.labels.prompt(kind, int(rest.split("/")[0]))
        raise ConfigError(f"{self.spec} is class-conditional: give a class for {kind} images (--prompt CLASS, one "
                          f"of {', '.join(self.classes[:12])})")

    def condition(self, keys: Sequence[str]) -> Condition:
        return self.prompt_condition([self.prompt_for(k) for k in keys])

    def prompt_condition(self, prompts: Sequence[str]) -> Condition:
        return {"class_labels": torch.tensor([self._label(p) for p in prompts], dtype=torch.long, device=self.device)}

    def check_training_set(self, train) -> None:
        """The label table gives each training image's class by index: the set attributed must be the one it was
        recorded for (as `LatentSD.check_training_set`)."""
        if self.labels is None or train.split != "train":
            return
        recorded = self.labels.class_names_of("train")
        given = [train.class_names[int(v)] if 0 <= int(v) < len(train.class_names) else "" for v in train.labels]
        if len(recorded) != len(train) or any(a != b for a, b in zip(recorded, given)):
            raise ConfigError(f"{self.spec} was trained on {self.labels.dataset}, not on {train.spec}: its "
                              f"{LABELS_FILE} gives each training image's class by index, so attribute it against "
                              f"--dataset {self.labels.dataset}")
