"""The attribution engine: one object per (checkpoint, training set, feature config).

    attributor = Attributor(model, train_set, FeatureConfig(fn="square", timesteps=10, proj_dim=4096))
    attributor.featurize(progress)                    # cached in cache/, resumable
    G = attributor.features_of(images, keys)          # target features (M, k)
    S = attributor.scores(get_method("dtrak"), G, lam)

Several attributors (checkpoints or independently trained models) form an ensemble: `ensemble_scores` averages
their scores (the TRAK ensemble of the D-TRAK paper, Table 7).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import ImageDataset
from .errors import ConfigError
from .features.config import FeatureConfig
from .features.gradients import param_count, per_sample_gradients
from .features.projectors import SCALING, make_projector
from .kernel import Kernel, check_lambda
from .methods import Method, TrainFeatures
from .models.adapter import DiffusionModel
from .store import FeatureStore, cache_root

Progress = Callable[[int, int, str], None]


class Attributor:
    def __init__(self, model: DiffusionModel, train: ImageDataset, features: FeatureConfig,
                 cache: str | None = None, store_dir: str | None = None, batch_size: int = 16):
        if (train.resolution, train.channels) != (model.resolution, model.channels):
            raise ConfigError(f"dataset {train.spec} is {train.resolution}x{train.resolution}x{train.channels} but "
                              f"{model.spec} expects {model.resolution}x{model.resolution}x{model.channels}; "
                              "load the dataset at the model's resolution")
        self.model, self.train, self.cfg, self.batch_size = model, train, features, batch_size
        self.grad_spec = features.gradient_spec(model.num_timesteps)
        self.grad_dim = param_count(model, features.params)
        self.proj_dim = self.grad_dim if features.projector == "identity" else features.proj_dim
        self.identity = {"checkpoint": model.identity(), "dataset": train.spec, "dataset_hash": train.content_hash,
                         "split": train.split, "n": len(train), "features": features.to_dict(),
                         "grad_dim": self.grad_dim, "proj_dim": self.proj_dim, "scaling": SCALING}
        root = cache_root(cache)
        self.store_path = (FeatureStore.default_path(root, self.identity, features.slug()) if store_dir is None
                           else Path(store_dir))
        self._projector = None
        self._store = None
        self._train_features = None

    # -- features ----------------------------------------------------------------------------------------------

    @property
    def projector(self):
        if self._projector is None:
            self._projector = make_projector(self.cfg.projector, self.grad_dim, self.proj_dim, self.cfg.seed,
                                             self.model.device)
        return self._projector

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            provenance = {"checkpoint_spec": self.model.spec, "projector": self.projector.describe(),
                          "timesteps": list(self.grad_spec.timesteps), "created": time.strftime("%Y-%m-%d %H:%M"),
                          "torch": torch.__version__}
            self._store = FeatureStore.open(self.store_path, self.identity, len(self.train), self.proj_dim,
                                            provenance)
        return self._store

    def features_of(self, images: torch.Tensor, keys: Sequence[str]) -> np.ndarray:
        """Projected features of images (M, C, H, W) in [-1, 1] with noise keys; shape (M, k) float32."""
        out = []
        for s in range(0, len(images), self.batch_size):
            g = per_sample_gradients(self.model, images[s:s + self.batch_size], list(keys[s:s + self.batch_size]),
                                     self.grad_spec)
            out.append(self.projector.project(g).cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def featurize(self, progress: Progress | None = None) -> FeatureStore:
        """Compute the training features that are not cached yet; resumes after an interruption."""
        store = self.store
        todo = np.flatnonzero(~store.done())
        n, done_before = len(self.train), len(self.train) - len(todo)
        start = time.perf_counter()
        for s in range(0, len(todo), self.batch_size):
            rows = todo[s:s + self.batch_size]
            keys = [f"{self.train.split}/{i}" for i in rows]
            store.write_rows(rows, self.features_of(self.train.tensors(rows), keys))
            if progress:
                done = done_before + s + len(rows)
                rate = (s + len(rows)) * len(self.grad_spec.timesteps) / (time.perf_counter() - start)
                progress(done, n, f"{rate:.0f} sample-timesteps/s")
        if progress and not len(todo):
            progress(n, n, "cached")
        return store

    # -- scoring -----------------------------------------------------------------------------------------------

    def kernel(self) -> Kernel:
        arrays = self.store.load_kernel_arrays()
        if arrays is not None:
            return Kernel.from_arrays(arrays)
        kernel = Kernel.fit(self.store.features())
        self.store.save_kernel_arrays(**kernel.arrays())
        return Kernel.from_arrays(kernel.arrays())

    def train_features(self) -> TrainFeatures:
        if self._train_features is None:
            if not self.store.complete:
                done = int(self.store.done().sum())
                raise ConfigError(f"training features are incomplete ({done}/{len(self.train)} rows); "
                                  "run featurize first (it resumes where it stopped)")
            self._train_features = TrainFeatures(self.store.features(), self.kernel)
        return self._train_features

    def resolve_lambda(self, method: Method, lam: float | None) -> float | None:
        if not method.uses_lambda:
            return None
        if lam is None:
            return self.train_features().kernel.default_lambda()
        check_lambda(lam)
        return float(lam)

    def check_method(self, method: Method) -> None:
        """A method with a fixed output function (TRAK, the gradient baselines) needs features of that function."""
        if method.fixed_fn and self.cfg.fn != method.default_fn:
            raise ConfigError(f"{method.title} needs {method.default_fn} features, these are {self.cfg.fn} features")

    def scores(self, method: Method, G: np.ndarray, lam: float | None = None) -> np.ndarray:
        self.check_method(method)
        return method.score(self.train_features(), G, self.resolve_lambda(method, lam))

    def self_influence(self, method: Method, lam: float | None = None) -> np.ndarray:
        self.check_method(method)
        return method.self_influence(self.train_features(), self.resolve_lambda(method, lam))


def ensemble_scores(attributors: Sequence[Attributor], method: Method, images: torch.Tensor, keys: Sequence[str],
                    lam: float | None = None) -> np.ndarray:
    """Mean of the scores of several attributors (checkpoints or independently trained models)."""
    total = None
    for att in attributors:
        s = att.scores(method, att.features_of(images, keys), lam)
        total = s if total is None else total + s
    return total / len(attributors)


def target_features(att: Attributor, method: Method, targets, progress: Progress | None = None,
                    cache: str | None = None) -> np.ndarray:
    """Features (M, k) of `targets` for `method`: of the images themselves, or, for a method that needs a sampling
    trajectory (Journey TRAK), averaged over the trajectory of each generated target (ConfigError for others)."""
    if method.needs_trajectory:
        from .journey import trajectory_features

        return trajectory_features(att, targets, progress, cache)
    return att.features_of(targets.images, targets.keys)


@dataclass
class Ranked:
    index: int
    label: int | None
    class_name: str
    score: float


def rank(scores: np.ndarray, data: ImageDataset, top: int = 5, sign: int = 1) -> list[Ranked]:
    """The `top` training images with the largest positive (sign=1: proponents) or most negative (sign=-1:
    opponents) scores, strongest first. Only scores of that sign are listed."""
    order = np.argsort(-sign * scores, kind="stable")[:top]
    return [Ranked(int(i), int(data.labels[i]) if data.labels[i] >= 0 else None, data.label_name(int(i)),
                   float(scores[i])) for i in order if sign * scores[i] > 0]


def training_dataset_of(model: DiffusionModel, dataset: str | None = None) -> ImageDataset:
    """The training split a model is attributed against: `dataset`, else the one its training run recorded."""
    from .data import load_dataset

    spec = dataset or (model.info.run_metadata().get("config", {}).get("dataset") if model.info else None)
    if not spec:
        raise ConfigError(f"{model.spec} does not record its training set; name the dataset (--dataset)")
    return load_dataset(spec, "train", model.resolution, model.channels)


def open_attributor(model: DiffusionModel, method: Method, dataset: str | None = None, fn: str | None = None,
                    eta: float | None = None, timesteps: int = 10, strategy: str = "uniform", noises: int = 1,
                    proj_dim: int = 4096, projector: str = "auto", seed: int = 0, params: str | None = None,
                    cache: str | None = None, store_dir: str | None = None, batch_size: int = 16) -> Attributor:
    """An Attributor from user-facing options (shared by the CLI and the app); validates before touching disk."""
    from .features.projectors import default_projector

    fn = method.check_fn("interp" if eta is not None and fn is None else fn)
    train = training_dataset_of(model, dataset)
    cfg = FeatureConfig(fn=fn, eta=1.0 if eta is None else eta, timesteps=timesteps, strategy=strategy,
                        noises=noises, proj_dim=proj_dim,
                        projector=default_projector(model.device) if projector == "auto" else projector,
                        seed=seed, params=params)
    cfg.gradient_spec(model.num_timesteps)  # K against T
    return Attributor(model, train, cfg, cache=cache, store_dir=store_dir, batch_size=batch_size)
