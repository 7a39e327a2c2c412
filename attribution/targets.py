"""Targets: the images whose training-data origins we ask about.

A target spec is one of
- `train:I` / `val:I`: image I of the dataset's training or validation split; `train:A-B` / `val:A-B` the images
  A..B (inclusive);
- `gen:SEED`: the image the checkpoint generates from SEED (the default sampler, DDPM with 50 steps), as 8-bit
  pixels: the image people see, the PNG `generate` writes and the app shows, so the CLI, the app and that PNG
  attribute exactly the same pixels (scores of the unrounded sample differ by several percent);
  `gen:A-B` the images of seeds A..B (inclusive);
- a PATH to an image file (converted to the model's resolution and channels: centre crop, resize, mode), or to an
  .npz whose `images` array (uint8, N x H x W [x C]) must already match the model's resolution and channels.

Each target gets a noise key ("train/I", "val/I", "gen/SEED", "file/<hash>") so its feature is reproducible, and a
training image used as a target gets exactly the noise of its own training row.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import ImageDataset, load_dataset
from .data.images import (enlarged_note, image_to_pixels, load_npz_images, open_image, pixels_to_tensor,
                          tensor_to_pixels)
from .errors import ImageError
from .models.adapter import DiffusionModel, prompt_key
from .sampling import Prompt, check_prompt, gen_key, sample


@dataclass(frozen=True)
class Generated:
    """How a generated target was sampled (its trajectory can be recomputed: Journey TRAK needs it)."""

    seed: int
    steps: int = 50
    sampler: str = "ddpm"  # (a flow-matching model's are "euler": the schedule's default sampler)
    prompt: Prompt | None = None  # a text-conditional model's prompt, negative prompt and guidance


@dataclass
class Targets:
    images: torch.Tensor  # (M, C, H, W) in [-1, 1]
    keys: list[str]
    names: list[str]
    labels: list[str | None]
    notes: list[str] = field(default_factory=list)
    generated: list[Generated | None] = field(default_factory=list)  # per target; empty: none generated

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, rows) -> Targets:
        """The targets at `rows` (integer positions), in that order."""
        rows = [int(r) for r in rows]
        return Targets(self.images[rows], [self.keys[r] for r in rows], [self.names[r] for r in rows],
                       [self.labels[r] for r in rows], list(self.notes),
                       [self.generated[r] for r in rows] if self.generated else [])


def pixels_key(pixels: np.ndarray) -> str:
    return "file/" + hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:16]


def from_pixels(pixels: np.ndarray, names: list[str] | None = None, labels=None) -> Targets:
    """Targets from model-view uint8 pixels (M, R, R, C), e.g. an upload in the app."""
    keys = [pixels_key(p) for p in pixels]
    return Targets(pixels_to_tensor(pixels), keys, names or [k for k in keys], list(labels or [None] * len(keys)))


def _as_8bit(images: np.ndarray) -> torch.Tensor:
    """Generated images (N, C, H, W) in [-1, 1] rounded to 8-bit pixels and back (see the module docstring)."""
    return pixels_to_tensor(tensor_to_pixels(torch.from_numpy(images)))


def generated_label(model: DiffusionModel, prompt: Prompt | None) -> str | None:
    """The label of an image `model` generates under `prompt`: a class-conditional model's image belongs to the
    class it was asked for (so its proponents' class agreement can be checked); a text-conditional or
    unconditional model's has none."""
    return prompt.text if prompt is not None and model.conditioned_on == "class" else None


def resolve_targets(spec: str, model: DiffusionModel, dataset: str, steps: int = 50, prompt: Prompt | None = None,
                    ) -> Targets:
    """The targets of a spec (module docstring). `prompt`: what a text-conditional model generates gen:SEED
    targets from, and the prompt an image file is attributed under (training images keep their own prompts)."""
    spec = spec.strip()
    if prompt is not None:
        check_prompt(model, prompt)
    targets = _resolve(spec, model, dataset, steps, prompt)
    if prompt is not None:
        targets.keys = [prompt_key(k, prompt.text) if k.startswith("file/") else k for k in targets.keys]
        targets.notes.append(f"prompt {prompt.text!r}")
    return targets


def _resolve(spec: str, model: DiffusionModel, dataset: str, steps: int, prompt: Prompt | None) -> Targets:
    kind, _, arg = spec.partition(":")
    if kind in ("train", "val") and arg.lstrip("-").isdigit():
        data: ImageDataset = load_dataset(dataset, kind, model.resolution, model.channels)
        i = data.check_index(int(arg))
        return Targets(data.tensors([i]), [f"{kind}/{i}"], [spec], [data.label_name(i)])
    rows = re.fullmatch(r"(\d+)-(\d+)", arg) if kind in ("train", "val") else None
    if rows:  # train:A-B / val:A-B, inclusive: labelled targets (class agreement is reported for them)
        data = load_dataset(dataset, kind, model.resolution, model.channels)
        first, last = data.check_index(int(rows.group(1))), data.check_index(int(rows.group(2)))
        if last < first:
            raise ImageError(f"target {spec!r}: the index range must go upwards ({kind}:A-B with A <= B)")
        idx = list(range(first, last + 1))
        return Targets(data.tensors(idx), [f"{kind}/{i}" for i in idx], [f"{kind}:{i}" for i in idx],
                       [data.label_name(i) for i in idx])
    if kind == "gen" and arg.lstrip("-").isdigit():
        traj = sample(model, 1, int(arg), steps=steps, prompt=prompt)
        return Targets(_as_8bit(traj.final), [gen_key(int(arg), prompt)], [spec], [generated_label(model, prompt)],
                       generated=[Generated(int(arg), steps, traj.sampler, prompt)])
    seeds = re.fullmatch(r"(\d+)-(\d+)", arg) if kind == "gen" else None
    if seeds:
        first, last = int(seeds.group(1)), int(seeds.group(2))
        if last < first:
            raise ImageError(f"target {spec!r}: the seed range must go upwards (gen:A-B with A <= B)")
        traj = sample(model, last - first + 1, first, steps=steps, prompt=prompt)
        return Targets(_as_8bit(traj.final), [gen_key(s, prompt) for s in traj.seeds],
                       [f"gen:{s}" for s in traj.seeds], [generated_label(model, prompt)] * len(traj.seeds),
                       generated=[Generated(int(s), steps, traj.sampler, prompt) for s in traj.seeds])
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".npz":
        images, labels = load_npz_images(path)
        want = (model.resolution, model.resolution, model.channels)
        if images.shape[1:] != want:
            raise ImageError(f"{path.name} holds {'x'.join(map(str, images.shape[1:]))} images but {model.spec} "
                             f"expects {'x'.join(map(str, want))} (H x W x C)")
        t = from_pixels(images, [f"{path.name}[{i}]" for i in range(len(images))],
                        [str(v) for v in labels] if labels is not None else None)
        return t
    if not path.exists():
        raise ImageError(f"target {spec!r} is neither train:I, val:I (or A-B), gen:SEED, gen:A-B nor an existing "
                         "image or .npz file")
    img = open_image(path)
    t = from_pixels(image_to_pixels(img, model.resolution, model.channels)[None], [path.name])
    t.notes.append(f"{path.name} converted to {model.resolution}x{model.resolution}, {model.channels} channel(s)")
    note = enlarged_note(path.name, img.size, model.resolution)
    if note:
        t.notes.append(note)  # the command line prints it
    return t
