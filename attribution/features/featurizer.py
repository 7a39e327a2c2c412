"""The interface every kind of feature implements, and their registry.

A feature kind is how an image becomes one row of a feature store: projected gradients of an output function
(`gradients.GradientFeatures`), the same gradients whitened by the EK-FAC curvature first
(`curvature.WhitenedGradients`), gradient features with a per-row residual statistic beside them
(`residuals.ResidualFeatures`), or model-free embeddings (`embeddings.PixelFeatures`, `embeddings.ClipFeatures`). A
method names the kind it scores (`Method.features`), the `engine.Attributor` asks it for everything else, so a
method that needs a new kind of feature adds one file here (a subclass of `Featurizer` with its `kind`) and its
method file, which imports it.

Each kind owns, from the `FeatureConfig` (the class methods: no model needed):

- its part of the configuration: which of the config's own options it takes (`options`, refused for the other
  kinds), their validation (`validate`), the identity entry the cache is keyed by (`config_dict`), the readable
  cache folder name (`slug`) and what its speed depends on (`cost_kind`);

and, on one checkpoint and training set (an instance):

- its dimensions (`grad_dim` before the projection, `proj_dim` stored), the extra entries of the store identity
  (`identity`) and provenance (`provenance`);
- the training-set step: what it needs before any row (`prepare`: the EK-FAC factors), the features of training
  rows (`train_rows`), what it computes after the rows (`finish`: per-row statistics) and reads back
  (`statistic`); and how many (image, timestep) samples a row costs (`samples_per_row`);
- the target step: the features of any images with their noise keys (`rows`), optionally under another output
  function (a measurement other than the training function: EK-FAC's ELBO queries).

Registration is by subclassing: a class that sets `kind` is entered in `FEATURIZERS` when its module is imported
(`config.py` imports the built-in kinds; a new kind's method file imports its kind).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import ConfigError

Progress = Callable[[int, int, str], None]

FEATURIZERS: dict[str, type[Featurizer]] = {}


def featurizer_class(kind: str) -> type[Featurizer]:
    """The registered feature kind called `kind` (one line naming the known kinds otherwise)."""
    if kind not in FEATURIZERS:
        raise ConfigError(f"unknown kind of features {kind!r}; use one of: {', '.join(FEATURIZERS)}")
    return FEATURIZERS[kind]


class Featurizer:
    """One kind of feature (see the module docstring). Subclasses set the class attributes and implement `rows`
    and the configuration methods; the defaults suit a kind without preparation, statistics or per-row timesteps."""

    kind: ClassVar[str]  # its name in `FeatureConfig.kind` and `FEATURIZERS`
    description: ClassVar[str]  # what a refusal calls these features ("EK-FAC-whitened gradient features")
    # `FeatureConfig` options (default None) only this kind takes, and the end of the line that refuses one of them
    # set for another kind ("applies to ... only: use ...").
    options: ClassVar[tuple[str, ...]] = ()
    refusal: ClassVar[str] = ""
    # The kinds of user options (`run_options.RunOptions`, `opt(applies=...)`) that apply to these features.
    option_groups: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            if cls.kind in FEATURIZERS and FEATURIZERS[cls.kind] is not cls:
                raise ValueError(f"two feature kinds are called {cls.kind!r}")
            FEATURIZERS[cls.kind] = cls

    # -- the configuration's side ----------------------------------------------------------------------------------

    @classmethod
    def validate(cls, cfg) -> None:
        """Refuse values of this kind's options that cannot be used (one line each); called by `FeatureConfig`."""

    @classmethod
    def config_dict(cls, cfg) -> dict:
        """The `features` entry of the store identity: exactly the settings these features depend on."""
        raise NotImplementedError

    @classmethod
    def slug(cls, cfg) -> str:
        """A readable name for the cache folder (the identity's hash follows it)."""
        raise NotImplementedError

    @classmethod
    def cost_kind(cls, cfg) -> str:
        """What featurizing one (image, timestep) costs depends on beside the checkpoint and the device (timesteps,
        noises and seeds only scale or reorder the work); the key of the recorded throughput."""
        raise NotImplementedError

    # -- one checkpoint and training set ---------------------------------------------------------------------------

    def __init__(self, model, train, cfg, cache_dir: Path, batch_size: int = 16):
        self.model, self.train, self.cfg, self.cache_dir, self.batch_size = model, train, cfg, cache_dir, batch_size
        self.grad_dim = self.proj_dim = 0  # set by the subclass

    def identity(self) -> dict[str, Any]:
        """Entries the store identity holds beside the common ones (checkpoint, dataset, features, dimensions)."""
        return {}

    def provenance(self) -> dict[str, Any]:
        """What the store's config records for people (not compared): how the rows were made."""
        return {}

    def samples_per_row(self) -> int:
        """(image, timestep) samples one training row costs (the throughput's unit)."""
        return 1

    def samples_per_target(self) -> int:
        """(image, timestep) samples one target costs."""
        return 1

    def prepare(self, progress: Progress | None = None) -> None:
        """What the training rows need first (cached; resumable), called when rows are missing."""

    def train_keys(self, rows: Sequence[int]) -> list[str]:
        """The noise keys of training rows."""
        return [f"{self.train.split}/{i}" for i in rows]

    def train_rows(self, rows: np.ndarray) -> np.ndarray:
        """Features (len(rows), proj_dim) of these training rows."""
        return self.rows(self.train.tensors(rows), self.train_keys(rows))

    def rows(self, images: torch.Tensor, keys: Sequence[str], fn: str | None = None) -> np.ndarray:
        """Features (M, proj_dim) float32 of images (M, C, H, W) in [-1, 1] with their noise keys; `fn` another
        output function (gradient kinds only)."""
        raise NotImplementedError

    def finish(self, progress: Progress | None = None) -> None:
        """What is computed after the training rows (per-row statistics; cached, resumable)."""

    def fit_memory(self, budget_bytes: int) -> tuple[int, int]:
        """Choose how many images (and noisy copies) a call computes so that featurizing fits `budget_bytes`
        (gradient kinds: `GradientFeatures.fit_memory`); (batch size, noisy images per call). Default: nothing to
        fit (an embedding's memory does not grow with a model's parameters)."""
        return self.batch_size, 0

    def statistic(self, name: str) -> np.ndarray:
        """One number per training row beside the features (`finish`), by name."""
        raise ConfigError(f"these training features carry no {name!r} statistic")
