"""The interface every attribution method implements.

A method is (1) the kind of features it scores (`Method.features`, a `features.featurizer.Featurizer`: plain
gradients, EK-FAC-whitened gradients, gradients with DAS's residual statistics, pixel or CLIP embeddings) and the
output function they are built from, and (2) a scoring rule over those features. Features, the kernel and caching
live elsewhere (features/, kernel.py, store.py); the `engine.Attributor` wires them together, so the CLI, the app
and the evaluations reach every method the same way:

    method = get_method("dtrak")
    scores = method.score(train, G, lam)          # (M, N): targets x training images
    self_inf = method.self_influence(train, lam)  # (N,)

Sign convention (all methods): a positive score means the training image pushes the model toward the target
(a proponent); a negative score pushes it away (an opponent). Proponents are the largest scores, opponents the
most negative.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import ConfigError
from ..features.config import FeatureConfig
from ..features.featurizer import Featurizer
from ..features.gradients import GradientFeatures
from ..features.outputs import OUTPUT_FUNCTIONS
from ..kernel import Kernel


@dataclass
class TrainFeatures:
    """Training-set features and what is derived from them (computed lazily, once)."""

    X: np.ndarray  # (N, k) float32, possibly a read-only memmap
    kernel_loader: Callable[[], Kernel]  # loads (or fits and caches) the decomposition
    stat_loader: Callable[[str], np.ndarray] | None = None  # a per-row statistic by name (`Featurizer.statistic`)

    def stat(self, name: str) -> np.ndarray:
        """One number per training row beside the features (DAS's residual statistics), computed once and cached."""
        if self.stat_loader is None:
            raise ConfigError(f"these training features carry no {name!r} statistic")
        return np.asarray(self.stat_loader(name), dtype=np.float64)

    @functools.cached_property
    def kernel(self) -> Kernel:
        return self.kernel_loader()

    @functools.cached_property
    def norms(self) -> np.ndarray:
        return np.linalg.norm(np.asarray(self.X, dtype=np.float64), axis=1)


class Method(ABC):
    """One attribution method: its recipe (the hooks below, which the engine, the CLI and the pages ask; nothing
    outside methods/ reads a method's name or class attributes) and its scoring rule (`score`, `self_influence`).

    The class attributes are how a method file declares its recipe; the defaults are TRAK's."""

    name: ClassVar[str]  # CLI / registry name
    title: ClassVar[str]  # display name
    summary: ClassVar[str]
    default_fn: ClassVar[str] = "simple"  # output function of its features
    fixed_fn: ClassVar[bool] = True  # False: the user may choose another output function
    uses_lambda: ClassVar[bool] = True  # scores depend on the ridge lambda of the kernel
    strategy: ClassVar[str | None] = None  # a timestep strategy the features must use (None: the user's choice)
    normalize: ClassVar[bool] = False  # unit-normalised per-timestep gradients (Diffusion-ReTrac)
    has_self_influence: ClassVar[bool] = True
    generated_only: ClassVar[bool] = False  # attributes generated targets only (those with a sampling trajectory)
    per_step: ClassVar[bool] = False  # can score each denoising step of a journey (the Journey page and command)
    weightings: ClassVar[tuple[str, ...]] = ()  # how its checkpoints may be weighted (checkpoint methods)
    # The kind of features it scores (`features.featurizer`): plain gradients, EK-FAC-whitened gradients, gradients
    # with a residual statistic, pixel or CLIP embeddings.
    features: ClassVar[type[Featurizer]] = GradientFeatures

    @classmethod
    def option_groups(cls) -> set[str]:
        """The kinds of options this method uses (`opt(applies=...)` in run_options.py): those of its features
        (gradients, CLIP, EK-FAC curvature) and checkpoint weights; an option of another kind, set, is refused."""
        return set(cls.features.option_groups) | ({"checkpoints"} if cls.weightings else set())

    @abstractmethod
    def score(self, train: TrainFeatures, G: np.ndarray, lam: float | None) -> np.ndarray:
        """Scores of targets G (M, k) against the N training rows: shape (M, N), float64."""

    @abstractmethod
    def self_influence(self, train: TrainFeatures, lam: float | None) -> np.ndarray:
        """tau(x_n)_n for every training image, shape (N,)."""

    # -- the recipe ------------------------------------------------------------------------------------------------

    def feature_config(self, fn: str | None = None, eta: float | None = None, strategy: str | None = None,
                       clip_model: str | None = None, clip_weights: str | None = None, **options) -> FeatureConfig:
        """The features this method scores with, from the user's options (None: `FeatureConfig`'s default):
        their output function checked against the method's, the method's timestep strategy and normalisation
        where it has them. `options` are the remaining `FeatureConfig` fields (timesteps, noises, proj_dim,
        projector, seed, params, proj_seed, the EK-FAC options)."""
        fn = self.check_fn("interp" if eta is not None and fn is None else fn)
        return FeatureConfig(kind=self.features.kind, fn=fn, eta=FeatureConfig.eta if eta is None else eta,
                             strategy=self.strategy or strategy or FeatureConfig.strategy, normalize=self.normalize,
                             **options)

    def fn_choices(self) -> tuple[str, ...]:
        """The output functions the user may pick for this method (one: it has a fixed function)."""
        return OUTPUT_FUNCTIONS if not self.fixed_fn else (self.default_fn,)

    def check_features(self, cfg: FeatureConfig) -> None:
        """Refuse features this method cannot score: another kind (`features`), or another output function than its
        fixed one (e.g. TRAK needs features of the Simple loss)."""
        if cfg.kind != self.features.kind:
            raise ConfigError(f"{self.title} scores {self.features.description}, these are "
                              f"{cfg.featurizer.description}")
        if self.fixed_fn and "gradients" in self.features.option_groups and cfg.fn != self.default_fn:
            raise ConfigError(f"{self.title} needs {self.default_fn} features, these are {cfg.fn} features")

    def checkpoints(self, spec: str) -> list[str]:
        """The checkpoints it runs over: the comma-separated specs as given (several: an ensemble)."""
        specs = [s.strip() for s in spec.split(",") if s.strip()]
        if not specs:
            raise ConfigError("no checkpoint given")
        return specs

    def member_weights(self, models: list, weighting: str | None = None, seed: int = 0,
                       ) -> tuple[list[float], str, list[int | None]]:
        """(weight of each checkpoint's scores, a note saying why, the projection seed of each (None: the
        features' seed)). Default: the mean over the checkpoints (the TRAK ensemble)."""
        if weighting not in (None, "lr"):
            raise ConfigError(f"--checkpoint-weights applies to the checkpoint methods, not {self.name}")
        n = len(models)
        return [1.0 / n] * n, "" if n == 1 else "mean over the checkpoints", [None] * n

    def check_members(self, specs: list[str]) -> None:  # noqa: B027 (a hook; the default accepts any set)
        """Refuse a set of checkpoints this method cannot use (default: any set)."""

    def target_member(self, n_members: int) -> int:
        """Which member's model generates `gen:SEED` targets (the checkpoint named)."""
        return 0

    def check_targets(self, targets) -> None:  # noqa: B027 (a hook; the default accepts any target)
        """Refuse targets this method cannot attribute, before any featurizing (default: any target)."""

    def target_features(self, member, targets, progress=None, cache: str | None = None,
                        sampler_model=None) -> np.ndarray:
        """Features (M, k) of resolved `targets` under one member (an `engine.Attributor`): of the images
        themselves by default. `sampler_model` generates trajectories where a method needs them."""
        self.check_targets(targets)
        return member.features_of(targets.images, targets.keys)

    def check_fn(self, fn: str | None) -> str:
        if fn is None or fn == self.default_fn:
            return self.default_fn
        if self.fixed_fn:
            raise ConfigError(f"{self.title} uses the {self.default_fn} output function; for another one "
                              f"use --method dtrak --fn {fn}")
        return fn


def dot_scores(train: TrainFeatures, G: np.ndarray) -> np.ndarray:
    """<g_target, g_train> for every pair: (M, N) float64."""
    return np.asarray(G, dtype=np.float64) @ np.asarray(train.X, dtype=np.float64).T


def cosine_scores(train: TrainFeatures, G: np.ndarray) -> np.ndarray:
    """cos(g_target, g_train) for every pair: (M, N) float64."""
    g_norm = np.linalg.norm(np.asarray(G, dtype=np.float64), axis=1, keepdims=True)
    return dot_scores(train, G) / np.maximum(g_norm, 1e-30) / np.maximum(train.norms, 1e-30)[None, :]


class KernelMethod(Method):
    """tau(g) = g^T (X^T X + lambda I)^{-1} X^T (TRAK with Q = I, as the D-TRAK paper does for diffusion)."""

    def score(self, train, G, lam):
        return train.kernel.scores(G, lam)

    def self_influence(self, train, lam):
        return train.kernel.self_influence(lam)


class SimilarityMethod(Method):
    """The model-free baselines of the D-TRAK paper (Table 7): similarity of the target's and each training
    image's embedding (flattened pixels, or a CLIP image embedding), by dot product or cosine. No gradients, no
    kernel, no lambda; the checkpoint only fixes the resolution the images are compared at."""

    cosine: ClassVar[bool]
    uses_lambda = False
    fixed_fn = False
    has_self_influence = False

    def feature_config(self, clip_model: str | None = None, clip_weights: str | None = None, **_) -> FeatureConfig:
        return FeatureConfig(kind=self.features.kind, clip_model=clip_model or FeatureConfig.clip_model,
                             clip_weights=clip_weights)

    def fn_choices(self) -> tuple[str, ...]:
        return ()  # no output function: no gradients

    def score(self, train, G, lam):
        return cosine_scores(train, G) if self.cosine else dot_scores(train, G)

    def self_influence(self, train, lam):
        raise ConfigError(f"{self.title} has no self-influence: every image is most similar to itself")
