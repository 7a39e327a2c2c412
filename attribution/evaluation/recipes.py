"""Retraining recipes: everything that determines a retrained model's weights, as a small validated dataclass.

LDS compares an attribution of one model with the outputs of models retrained on subsets of its training data, so
the attributed model and every subset model must come from the same recipe. A recipe is either named (`RECIPES`,
e.g. "digits-eval", chosen so one half-subset retrain takes one to two minutes on one CPU thread) or read from a
training run folder's run.json (`recipe_from_run`). `Recipe.key(dataset_hash)` hashes every field that reaches the
weights plus the training data's content hash; it names the retrained models' cache folder.
`randomness` (crn-slots, crn or
stream, train.py) is one of them; the named recipes are stream recipes (the shipped banks were built with them), and
a bank or study picks the randomness it retrains with (`dataclasses.replace(recipe, randomness="crn-slots")`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import ConfigError
from ..train import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """A training recipe without the data subset and seed (those vary across a bank's retrains)."""

    name: str
    dataset: str
    preset: str = "small"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 1e-6
    flip: bool | None = None
    resolution: int | None = None
    pipeline: str | None = None  # a LoRA finetune of this Stable Diffusion folder (train-lora)
    rank: int = 4
    prompt_template: str = "a {class} painting"
    randomness: str = "stream"  # "crn-slots", "crn" or "stream" (train.py); recorded without it: a stream recipe
    schedule: str = "ddpm"  # the noise process (models/schedules.py); recorded without it: a DDPM recipe

    def __post_init__(self):
        self.train_config("unused", None, 0)  # TrainConfig validates every field (one ConfigError line)

    def train_config(self, out: str | Path, indices: list[int] | None, seed: int, device: str = "cpu",
                     checkpoints: int = 1) -> TrainConfig:
        """The TrainConfig of one retrain: the final checkpoint only, or `checkpoints` evenly spaced epochs (saving
        draws no random numbers: the final weights are the same)."""
        return TrainConfig(dataset=self.dataset, out=str(out), epochs=self.epochs, seed=seed,
                           batch_size=self.batch_size, lr=self.lr, warmup_fraction=self.warmup_fraction,
                           weight_decay=self.weight_decay, checkpoints=checkpoints, flip=self.flip, preset=self.preset,
                           resolution=self.resolution, indices=indices, device=device, pipeline=self.pipeline,
                           rank=self.rank, prompt_template=self.prompt_template, randomness=self.randomness,
                           schedule=self.schedule)

    def identity(self) -> dict:
        """The fields that determine the weights (the name is only a label). LoRA fields are absent for pixel
        recipes, `randomness` for stream recipes and `schedule` for DDPM ones: the keys of recipes made before
        them stay as they were."""
        lora = ("pipeline", "rank", "prompt_template")
        return {k: v for k, v in asdict(self).items() if k != "name" and (self.pipeline is not None or k not in lora)
                and (k != "randomness" or v != "stream") and (k != "schedule" or v != "ddpm")}

    def key(self, dataset_hash: str) -> str:
        """16 hex digits of sha256 over the identity and the training data's content hash."""
        blob = json.dumps({"recipe": self.identity(), "dataset_hash": dataset_hash}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


RECIPES = {
    # 24 epochs of the "eval" UNet (0.36M parameters, no attention), batch 64, lr 2e-3 (final loss 0.035 on the
    # full split, vs 0.038 at lr 1e-3): a half-subset of the 1618 digits trains in about 1.5 minutes on one free
    # CPU thread, the full split in about 3 (BENCHMARKS.md).
    "digits-eval": Recipe("digits-eval", "digits", preset="eval", epochs=24, batch_size=64, lr=2e-3),
    # For tests only: a few seconds per model.
    "tiny-test": Recipe("tiny-test", "digits", preset="tiny", epochs=1, batch_size=64, lr=1e-3),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; use one of: {', '.join(RECIPES)}, or --run RUN_FOLDER")
    return RECIPES[name]


def recipe_from_run(run_dir: str | Path) -> Recipe:
    """The recipe a training run folder was made with (its run.json `config`)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a training run folder (no run.json); give a folder made by "
                          "`python -m attribution train`")
    try:
        cfg = json.loads(path.read_text())["config"]
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{path} has no readable training config ({exc})") from None
    if cfg.get("indices") is not None or cfg.get("index_file"):
        raise ConfigError(f"{run_dir} was trained on a subset ({cfg.get('index_file')}); a bank retrains subsets "
                          "of a model trained on the full training split")
    names = {f.name for f in fields(Recipe)} - {"name"}
    return Recipe(name=f"run:{Path(run_dir).name}", **{k: cfg[k] for k in names if k in cfg})
