"""The attribution engine: one object per (checkpoint, training set, feature config).

    attributor = Attributor(model, train_set, FeatureConfig(fn="square", timesteps=10, proj_dim=4096))
    attributor.featurize(progress)                    # cached in cache/, resumable
    G = attributor.features_of(images, keys)          # target features (M, k)
    S = attributor.scores(get_method("dtrak"), G, lam)

Several attributors form an `Attribution`: a weighted sum of their scores. Independently trained models or
checkpoints averaged (the TRAK ensemble of the D-TRAK paper, Table 7), or, for the checkpoint methods (TracInCP,
GAS, Diffusion-TracIn/ReTrac), the checkpoints of one training run weighted by the learning rate they were
trained at (`Method.member_weights`). `open_attribution` builds either from the user's options (`RunOptions`), for
the CLI, the app and the evaluation.

The lifecycle is one call, made by the CLI, every page and the evaluation:

    attribution = open_attribution(RunOptions("digits", method="dtrak", timesteps=10, proj_dim=4096))
    result = attribution.run(targets, lam=None, progress=lambda member: callback)
    result.scores, result.ranking, result.lam     # (M, N), (M, N) strongest first, the lambda used (resolved once)
    result.at(0.5)                                # the same targets at another lambda, in milliseconds

(open → featurize with progress → target features → default lambda → scores at lambda → ranking.) Self-influence
is `attribution.featurize(progress)` then `attribution.self_influence(lam)`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .data import ImageDataset, training_dataset_of
from .errors import ConfigError
from .fileio import save_npy
from .features.config import FeatureConfig
from .features.featurizer import Featurizer
from .features.projectors import SCALING, default_projector
from .kernel import Kernel, check_lambda
from .lambda_choice import gcv_lambda
from .methods import Method, TrainFeatures, get_method
from .models import load_model
from .models.adapter import DiffusionModel
from .run_options import RunOptions
from .store import (
    FeatureStore,
    cache_root,
    compute_slot,
    load_array,
    record_throughput,
    recorded_throughput,
    saved_targets_path,
)
from .targets import Targets

Progress = Callable[[int, int, str], None]


def lock_messages(store: FeatureStore, n: int, progress: Progress | None) -> tuple[Callable[[], None],
                                                                                 Callable[[], None]]:
    """(waiting, queued): what a featurization of `store` reports while another one holds the store (a session, a
    command, another cluster's driver: this one then computes only the rows still missing) or this machine's
    compute slot."""

    def waiting() -> None:
        if progress:
            progress(int(store.done().sum()), n, "another featurization (a session, a command or a Ray driver) is "
                                                 "computing these features; waiting for it, its rows are kept")

    def queued() -> None:
        if progress:
            progress(int(store.done().sum()), n, "queued: another featurization is running on this machine; they "
                                                 "take turns, each with every core")

    return waiting, queued


class Attributor:
    """One checkpoint's features of one training set (of the configuration's kind: `features.featurizer`), their
    store, kernel and scores."""

    def __init__(self, model: DiffusionModel, train: ImageDataset, features: FeatureConfig,
                 cache: str | None = None, store_dir: str | None = None, batch_size: int = 16):
        if (train.resolution, train.channels) != (model.resolution, model.channels):
            raise ConfigError(f"dataset {train.spec} is {train.resolution}x{train.resolution}x{train.channels} but "
                              f"{model.spec} expects {model.resolution}x{model.resolution}x{model.channels}; "
                              "load the dataset at the model's resolution")
        model.check_training_set(train)  # also for a set not chosen by `training_dataset_of`
        self.model, self.train, self.cfg, self.batch_size = model, train, features, batch_size
        # Another attributor whose measured speed stands in for this one's until this one is timed (a checkpoint of
        # the same run: the same network, so the same speed); see `estimate_for`.
        self.rate_like: Attributor | None = None
        self.options: RunOptions | None = None  # what opened it (`open_attributor`): a Ray task opens it again
        root = self.cache_dir = cache_root(cache)
        self.featurizer: Featurizer = features.featurizer(model, train, features, root, batch_size)
        self.grad_dim, self.proj_dim = self.featurizer.grad_dim, self.featurizer.proj_dim
        self.identity = {"checkpoint": model.identity(), "dataset": train.spec, "dataset_hash": train.content_hash,
                         "split": train.split, "n": len(train), "features": features.to_dict(),
                         "grad_dim": self.grad_dim, "proj_dim": self.proj_dim, "scaling": SCALING,
                         **self.featurizer.identity()}
        self.store_path = (FeatureStore.default_path(root, self.identity, features.slug()) if store_dir is None
                           else Path(store_dir))
        self._store = None
        self._train_features = None

    # -- features ----------------------------------------------------------------------------------------------

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            provenance = {"checkpoint_spec": self.model.spec, **self.featurizer.provenance(),
                          "created": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__}
            self._store = FeatureStore.open(self.store_path, self.identity, len(self.train), self.proj_dim,
                                            provenance)
        return self._store

    def features_of(self, images: torch.Tensor, keys: Sequence[str], fn: str | None = None) -> np.ndarray:
        """Features of images (M, C, H, W) in [-1, 1] with noise keys, of this configuration's kind; shape (M, k)
        float32. `fn`: another output function for these images (a measurement other than the training features'
        function: EK-FAC's ELBO queries)."""
        return self.featurizer.rows(images, keys, fn=fn)

    def featurize(self, progress: Progress | None = None) -> FeatureStore:
        """Compute the training features that are not cached yet; resumes after an interruption.

        One featurization per store: while another session (thread or process) featurizes it, this one waits,
        reporting that session's progress, and then computes only what is still missing (nothing, normally).
        """
        store = self.store
        n = len(self.train)
        waiting, queued = lock_messages(store, n, progress)
        with store.exclusive(waiting), contextlib.ExitStack() as stack:
            todo = np.flatnonzero(~store.done())
            if len(todo):  # work to do: wait for a compute slot of this cache (a cached store never waits)
                stack.enter_context(compute_slot(self.cache_dir, queued))
            if len(todo):
                self.featurizer.prepare(progress)  # what the rows need first (the EK-FAC factors; own cache)
            done_before = n - len(todo)
            per_row = self.featurizer.samples_per_row()
            start = time.perf_counter()
            for s in range(0, len(todo), self.batch_size):
                rows = todo[s:s + self.batch_size]
                store.write_rows(rows, self.featurizer.train_rows(rows))
                elapsed = time.perf_counter() - start
                finished = s + len(rows)
                if progress:
                    progress(done_before + finished, n, progress_message(done_before + finished, n, finished,
                                                                         elapsed))
                if finished == len(todo) or elapsed > 20:
                    record_throughput(self.cache_dir, self.throughput_key, finished * per_row / elapsed, elapsed)
            if progress and not len(todo):
                progress(n, n, "cached")
        self.featurizer.finish(progress)  # what the scores use beside the features (DAS's residual statistics)
        return store

    def featurize_estimate(self, probe: bool = False) -> tuple[float | None, str]:
        """(seconds, basis) that featurizing the missing rows will take: 0 when cached; from the throughput
        recorded on this machine for this checkpoint, parameter set and kind of features; else, with `probe`, from
        timing three training images now, after one untimed call that pays the set-up (a rough upper bound: larger
        batches are faster per image); else (None, why)."""
        store_done = FeatureStore.peek_done(self.store_path)
        missing = len(self.train) if store_done is None else int((~store_done).sum())
        if missing == 0:
            return 0.0, "cached"
        return self.estimate_for(missing * self.featurizer.samples_per_row(), f"{missing} images", probe)

    def targets_estimate(self, n: int, probe: bool = False) -> tuple[float | None, str]:
        """(seconds, basis) that the features of `n` targets will take (each at the configured timesteps and
        noises), from the same measured throughput as `featurize_estimate`."""
        return self.estimate_for(n * self.featurizer.samples_per_target(), f"{n} targets", probe)

    def estimate_for(self, sample_timesteps: int, what: str, probe: bool = False) -> tuple[float | None, str]:
        """(seconds, basis) for `sample_timesteps` gradients (`what` names them in the basis) at this machine's
        measured throughput for these features; with `probe` and no measurement, three images are timed first."""
        entry = recorded_throughput(self.cache_dir, self.throughput_key)
        like = None if entry is not None or self.rate_like is None else recorded_throughput(
            self.rate_like.cache_dir, self.rate_like.throughput_key)
        if like is not None:
            return sample_timesteps / like["sample_timesteps_per_s"], (
                f"{what} at {like['sample_timesteps_per_s']:.3g} sample-timesteps/s, measured here for "
                f"{self.rate_like.model.spec.rsplit('@', 1)[-1]} (the same network)")
        if entry is None and probe:
            per_row = self.featurizer.samples_per_row()
            rows = np.arange(min(3, len(self.train)))
            self.featurizer.train_rows(rows[:1])  # warm-up: the first call's set-up (projector, buffers) took
            start = time.perf_counter()  # ~4 s of a 5 s timing
            self.featurizer.train_rows(rows)
            elapsed = time.perf_counter() - start
            record_throughput(self.cache_dir, self.throughput_key, len(rows) * per_row / elapsed, elapsed, rough=True)
            entry = recorded_throughput(self.cache_dir, self.throughput_key)
        if entry is None:
            return None, f"no featurization of these features ({self.cfg.cost_kind()}) has been timed here yet"
        rate = entry["sample_timesteps_per_s"]
        how = ("timed on three images (a rough upper bound until the first featurization)" if entry.get("rough")
               else f"measured here {entry['measured']}")
        return sample_timesteps / rate, f"{what} at {rate:.3g} sample-timesteps/s, {how}"

    @property
    def throughput_key(self) -> str:
        """What a recorded featurization speed is for: this checkpoint, parameter set, device type and kind of
        features (`FeatureConfig.cost_kind`: TRAK's Simple-loss features are not timed by D-TRAK's)."""
        return (f"{self.identity['checkpoint']}|{self.cfg.params or 'all'}|{self.model.device.type}|"
                f"{self.cfg.cost_kind()}")

    # -- scoring -----------------------------------------------------------------------------------------------

    def kernel(self) -> Kernel:
        arrays = self.store.load_kernel_arrays()
        if arrays is not None:
            return Kernel.from_arrays(arrays)
        with self.store.exclusive():  # one decomposition per store; the others wait and load it
            arrays = self.store.load_kernel_arrays()
            if arrays is None:
                arrays = Kernel.fit(self.store.features()).arrays()
                self.store.save_kernel_arrays(**arrays)
        return Kernel.from_arrays(arrays)

    def train_features(self) -> TrainFeatures:
        if self._train_features is None:
            if not self.store.complete:
                done = int(self.store.done().sum())
                raise ConfigError(f"training features are incomplete ({done}/{len(self.train)} rows); "
                                  "run featurize first (it resumes where it stopped)")
            self._train_features = TrainFeatures(self.store.features(), self.kernel, self.featurizer.statistic)
        return self._train_features

    def resolve_lambda(self, method: Method, lam: float | None) -> float | None:
        if not method.uses_lambda:
            return None
        if lam is None:
            return self.train_features().kernel.default_lambda()
        check_lambda(lam)
        return float(lam)

    def check_method(self, method: Method) -> None:
        """Refuse scoring these features with a method that cannot use them (`Method.check_features`)."""
        method.check_features(self.cfg)

    def scores(self, method: Method, G: np.ndarray, lam: float | None = None) -> np.ndarray:
        self.check_method(method)
        return method.score(self.train_features(), G, self.resolve_lambda(method, lam))

    def self_influence(self, method: Method, lam: float | None = None) -> np.ndarray:
        self.check_method(method)
        return method.self_influence(self.train_features(), self.resolve_lambda(method, lam))


class Attribution:
    """A method over one or more attributors: scores are the weighted sum of each member's scores.

    One member with weight 1 is the plain case; an ensemble averages (weights 1/C); the checkpoint methods weight
    each checkpoint of a training run by its learning rate (`Method.member_weights`).
    """

    def __init__(self, method: Method, members: Sequence[Attributor], weights: Sequence[float] | None = None,
                 weights_note: str = ""):
        if not members:
            raise ConfigError("an attribution needs at least one checkpoint")
        method.check_members([att.model.spec for att in members])
        for att in members:
            att.check_method(method)
        self.method, self.members = method, list(members)
        self.weights = [1.0 / len(members)] * len(members) if weights is None else [float(w) for w in weights]
        self.weights_note = weights_note or ("" if len(members) == 1 else "mean over the checkpoints")

    @property
    def train(self) -> ImageDataset:
        return self.members[0].train

    @property
    def cfg(self) -> FeatureConfig:
        return self.members[0].cfg

    @property
    def target_model(self) -> DiffusionModel:
        """The model that generates `gen:SEED` targets: the checkpoint named (`Method.target_member`)."""
        return self.members[self.method.target_member(len(self.members))].model

    def featurize(self, progress: Callable[[Attributor], Progress | None] | None = None) -> None:
        """Featurize every member; `progress(member)` returns that member's progress callback. Every member's
        feature folder is opened (or refused: CacheMismatchError) before any work."""
        for att in self.members:
            _ = att.store
        for att in self.members:
            att.featurize(progress(att) if progress else None)

    def estimate(self, n_targets: int = 1, probe: bool = False) -> tuple[float | None, list[str]]:
        """(seconds, bases): about how long `run` on `n_targets` targets will take here, from each member's
        measured throughput: its missing training features plus the targets' features (None when a member has no
        measurement and `probe` is off). The bases say, per member, what was measured; cached features add
        nothing."""
        total, bases = 0.0, []
        for att in self.members:
            parts = [att.featurize_estimate(probe), att.targets_estimate(n_targets, probe) if n_targets else (0, "")]
            for seconds, basis in parts:
                if seconds is None:
                    return None, [basis]
                total += seconds
                if seconds and basis:
                    bases.append(basis)
        return total, bases

    def features_of(self, images: torch.Tensor, keys: Sequence[str]) -> list[np.ndarray]:
        """Per-member features of images (with their noise keys) by the method's recipe, as targets without a
        sampling trajectory: a method that needs one (Journey TRAK) refuses them instead of silently scoring the
        plain image features."""
        return self.target_features(Targets(images, list(keys), list(keys), [None] * len(keys)))

    def target_features(self, targets, cache: str | None = None, saved_as: str | None = None,
                        partial: bool = False) -> list[np.ndarray]:
        """Per-member features of resolved `Targets` by this method's recipe (`Method.target_features`; for
        Journey TRAK the trajectory `target_model` samples for gen:SEED, sampled once and scored with every
        member). `saved_as`: each member's features of these targets are read from (or saved to, once all are
        computed) its feature folder under that name (`store.saved_targets_path`), so a fixed target set such as
        a bank's costs no gradients the second time. `partial`: targets a generated-only method cannot attribute
        (those without a trajectory) get NaN rows instead of a refusal."""
        paths = [saved_targets_path(att.store_path, saved_as) for att in self.members] if saved_as else []
        cached = [load_array(p) for p in paths]  # a damaged file is recomputed and saved over
        if paths and all(g is not None and g.shape[0] == len(targets) for g in cached):
            return cached
        if partial and self.method.generated_only:
            rows = [i for i, g in enumerate(targets.generated or [None] * len(targets)) if g is not None]
            G = []
            for g in self.target_features(targets.select(rows), cache=cache):
                full = np.full((len(targets), *np.shape(g)[1:]), np.nan, dtype=np.float32)
                full[rows] = g
                G.append(full)
        else:
            self.method.check_targets(targets)
            G = [self.method.target_features(att, targets, cache=cache, sampler_model=self.target_model)
                 for att in self.members]
        for path, g in zip(paths, G):
            save_npy(path, np.asarray(g, dtype=np.float32))
        return G

    def resolve_lambda(self, lam: float | None) -> float | None:
        """`lam`, checked; by default the mean of every member's default (each 0.1 x its mean eigenvalue), so an
        ensemble's lambda is not set by its first member alone."""
        if lam is not None or not self.method.uses_lambda:
            return self.members[0].resolve_lambda(self.method, lam)
        return float(np.mean([att.resolve_lambda(self.method, None) for att in self.members]))

    def scores(self, G: Sequence[np.ndarray], lam: float | None = None) -> np.ndarray:
        """(M, N) scores of targets whose per-member features are G (from `target_features`)."""
        return self._scores_at(G, self.resolve_lambda(lam))

    def _scores_at(self, G: Sequence[np.ndarray], lam: float | None) -> np.ndarray:
        """The weighted sum of the members' scores at an already resolved `lam` (resolved once, not per member)."""
        return sum(w * self.method.score(att.train_features(), g, lam)
                   for w, att, g in zip(self.weights, self.members, G))

    def self_influence(self, lam: float | None = None) -> np.ndarray:
        lam = self.resolve_lambda(lam)
        return sum(w * self.method.self_influence(att.train_features(), lam)
                   for w, att in zip(self.weights, self.members))

    def run(self, targets: Targets, lam: float | None = None,
            progress: Callable[[Attributor], Progress | None] | None = None, cache: str | None = None,
            saved_as: str | None = None, partial: bool = False) -> Result:
        """The whole lifecycle, the one call the CLI, the pages and the evaluation make: check `targets` and
        `lam` (before any work), featurize every member (cached, resumable; `progress(member)` returns that
        member's progress callback), the targets' features by the method's recipe (`saved_as`, `partial`: see
        `target_features`), the default lambda (once), and the scores at `lam` (default: that default) with their
        ranking. `Result.at(lam)` re-scores at another lambda in milliseconds."""
        if not (partial and self.method.generated_only):
            self.method.check_targets(targets)
        if lam is not None and self.method.uses_lambda:
            check_lambda(lam)
        self.featurize(progress)
        G = self.target_features(targets, cache=cache, saved_as=saved_as, partial=partial)
        return self.result(targets, G, lam)

    def result(self, targets: Targets, G: Sequence[np.ndarray], lam: float | None = None) -> Result:
        """The lifecycle's last steps on per-member target features `G` (from `target_features`, or computed
        elsewhere: a Journey's per-step features, `journey.Journey.result`): the default lambda (once) and the
        scores at `lam` (default: that default). The training features must be cached (`featurize`)."""
        return Result(self, targets, list(G), self.resolve_lambda(None)).at(lam)


@dataclass(frozen=True)
class Result:
    """What `Attribution.run` returns: the targets' per-member features, the default lambda, and the scores at
    one lambda (`lam`, resolved) with their ranking. `at(lam)` is the same result at another lambda."""

    attribution: Attribution
    targets: Targets
    G: list[np.ndarray] = field(repr=False)
    default_lambda: float | None
    lam: float | None = None
    scores: np.ndarray | None = field(default=None, repr=False)  # (M, N)

    def at(self, lam: float | None = None) -> Result:
        """The scores at `lam` (None: the default lambda; ignored by methods without one)."""
        if not self.attribution.method.uses_lambda:
            lam = None
        elif lam is None:
            lam = self.default_lambda
        else:
            check_lambda(lam)
            lam = float(lam)
        return replace(self, lam=lam, scores=self.attribution._scores_at(self.G, lam))

    @property
    def ranking(self) -> np.ndarray:
        """(M, N) training indices per target, strongest proponent first (ties in index order)."""
        return np.argsort(-self.scores, axis=1, kind="stable")

    @property
    def uses_lambda(self) -> bool:
        return self.default_lambda is not None

    def covers(self, split: str) -> bool:
        """Whether the method attributes every target of a split ("val", "gen" or "all"; Journey TRAK: generated
        targets only)."""
        return split == "gen" or not self.attribution.method.generated_only

    def lambda_grid(self, per_decade: int = 4) -> np.ndarray:
        """The lambdas worth trying: log-spaced over the first member's kernel spectrum (`Kernel.lambda_grid`)."""
        return self.attribution.members[0].train_features().kernel.lambda_grid(per_decade=per_decade)

    def gcv(self, rows: np.ndarray | None = None) -> float:
        """The retraining-free lambda (GCV over the feature dimensions; `lambda_choice.py`) from the targets' own
        features (`rows`: a subset of the targets; validation or generated images, never training ones)."""
        G = self.G[0] if rows is None else self.G[0][rows]
        return gcv_lambda(self.attribution.members[0].train_features().kernel, G).best


def format_duration(seconds: float) -> str:
    """A rough duration: "40 s", "3 min", "1.5 h"."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def progress_message(done: int, total: int, finished_now: int, elapsed: float) -> str:
    """"n / N images, R images/s, about M min left" from the rows this run finished in `elapsed` seconds."""
    rate = finished_now / max(elapsed, 1e-9)
    left = (total - done) / rate if rate > 0 else float("inf")
    shown_rate = f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"
    return (f"{done} / {total} images, {shown_rate} images/s"
            + (f", about {format_duration(left)} left" if done < total else ""))



def open_attributor(model: DiffusionModel, options: RunOptions, proj_seed: int | None = None) -> Attributor:
    """One checkpoint's Attributor with `options` (their checkpoint and device are what loaded `model`); validates
    before touching disk. `proj_seed`: another projection seed for this member (`Method.member_weights`)."""
    method = get_method(options.method)
    train = training_dataset_of(model, options.dataset)
    projector = default_projector(model.device) if options.projector == "auto" else options.projector
    cfg = method.feature_config(**options.feature_options(), projector=projector, proj_seed=proj_seed)
    cfg.gradient_spec(model.num_timesteps)  # K against T
    att = Attributor(model, train, cfg, cache=options.cache, store_dir=options.store, batch_size=options.batch_size)
    att.options = options
    if options.memory_budget is not None:
        if not options.memory_budget > 0:
            raise ConfigError(f"--memory-budget must be a positive number of GiB, got {options.memory_budget}")
        att.batch_size, _ = att.featurizer.fit_memory(int(options.memory_budget * 2**30))
    return att


def open_attribution(options: RunOptions, load: Callable[[str], DiffusionModel] | None = None) -> Attribution:
    """The Attribution `options` define: `options.checkpoint` is one spec or several, comma-separated (an ensemble;
    a checkpoint method expands one run checkpoint to the run's checkpoints up to it, see `Method.checkpoints`);
    `load(spec)` loads a model (default `load_model(spec, options.device)`; the app passes its cached loader).

    `options.checkpoint_weights` (checkpoint methods): "lr" weights checkpoint c by the learning rate it was trained
    at (`methods.over_checkpoints.tracin_weights`), every checkpoint projected with one seed; "uniform" is TracInCP /
    GAS as the D-TRAK paper runs them (appendix A.3): the mean over the C checkpoints, checkpoint c projected with
    seed + c."""
    method = get_method(options.method)
    specs = method.checkpoints(options.checkpoint)
    if options.store and len(specs) > 1:
        raise ConfigError("--store names one feature folder; it cannot be used with several checkpoints")
    models = [(load or (lambda s: load_model(s, options.device)))(spec) for spec in specs]
    weights, note, proj_seeds = method.member_weights(models, options.checkpoint_weights, options.seed)
    members = [open_attributor(m, options, proj_seed=ps) for m, ps in zip(models, proj_seeds)]
    return Attribution(method, members, weights, note)
