"""The interface every attribution method implements.

A method is (1) the output function its features are built from and (2) a scoring rule over those features.
Features, the kernel and caching live elsewhere (features/, kernel.py, store.py); the `engine.Attributor` wires
them together, so the CLI, the app and the evaluations reach every method the same way:

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
from ..kernel import Kernel


@dataclass
class TrainFeatures:
    """Training-set features and what is derived from them (computed lazily, once)."""

    X: np.ndarray  # (N, k) float32, possibly a read-only memmap
    kernel_loader: Callable[[], Kernel]  # loads (or fits and caches) the decomposition

    @functools.cached_property
    def kernel(self) -> Kernel:
        return self.kernel_loader()

    @functools.cached_property
    def norms(self) -> np.ndarray:
        return np.linalg.norm(np.asarray(self.X, dtype=np.float64), axis=1)


class Method(ABC):
    name: ClassVar[str]  # CLI / registry name
    title: ClassVar[str]  # display name
    summary: ClassVar[str]
    default_fn: ClassVar[str] = "simple"  # output function of its features
    fixed_fn: ClassVar[bool] = True  # False: the user may choose another output function
    uses_lambda: ClassVar[bool] = True
    across_checkpoints: ClassVar[bool] = False  # True: scores sum over a run's checkpoints (needs two or more)
    strategy: ClassVar[str | None] = None  # a timestep strategy the features must use (None: the user's choice)
    normalize: ClassVar[bool] = False  # unit-normalised per-timestep gradients (Diffusion-ReTrac)
    needs_trajectory: ClassVar[bool] = False  # True: target features come from a sampling trajectory (gen:SEED)

    @abstractmethod
    def score(self, train: TrainFeatures, G: np.ndarray, lam: float | None) -> np.ndarray:
        """Scores of targets G (M, k) against the N training rows: shape (M, N), float64."""

    @abstractmethod
    def self_influence(self, train: TrainFeatures, lam: float | None) -> np.ndarray:
        """tau(x_n)_n for every training image, shape (N,)."""

    def feature_config(self, fn: str | None = None, eta: float | None = None, strategy: str = "uniform",
                       clip_model: str = "ViT-B-32", clip_weights: str | None = None, **options) -> FeatureConfig:
        """The features this method scores with, from the user's options: their output function checked against
        the method's, the method's timestep strategy and normalisation where it has them. `options` are the
        remaining `FeatureConfig` fields (timesteps, noises, proj_dim, projector, seed, params, proj_seed)."""
        fn = self.check_fn("interp" if eta is not None and fn is None else fn)
        return FeatureConfig(fn=fn, eta=1.0 if eta is None else eta, strategy=self.strategy or strategy,
                             normalize=self.normalize, **options)

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

    embedding: ClassVar[str]  # "pixels" or "clip"
    cosine: ClassVar[bool]
    uses_lambda = False
    fixed_fn = False

    def feature_config(self, clip_model: str = "ViT-B-32", clip_weights: str | None = None, **_) -> FeatureConfig:
        return FeatureConfig(embedding=self.embedding, clip_model=clip_model, clip_weights=clip_weights)

    def score(self, train, G, lam):
        return cosine_scores(train, G) if self.cosine else dot_scores(train, G)

    def self_influence(self, train, lam):
        raise ConfigError(f"{self.title} has no self-influence: every image is most similar to itself")
