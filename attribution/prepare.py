"""Prepare for class: compute ahead of time what the app's Tour, the Attribute page's defaults and the Evaluation
page's defaults use, so that a class's first clicks take seconds instead of minutes.

    tasks = plan("digits")                  # opens models and banks, computes nothing
    for t in tasks:
        seconds, bases = t.estimate()       # from the throughput measured on this machine (0: already cached)
    run(tasks, progress)                    # featurizes (cached, resumable, one featurization per store)

The defaults the pages open on are declared here, once: the Tour's image and feature settings (`TOUR`, its journey
`TOUR_JOURNEY`), and the Evaluation page's methods, K and k (`EVALUATION`). The Attribute page's defaults are
`RunOptions`' own, which are the Tour's features (D-TRAK, K = 10, k = 4096), so one featurization serves both.
Everything is written to the feature cache (cache/ or $ATTRIBUTION_CACHE), where every page and session finds it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .engine import Attribution, Progress, format_duration, open_attribution
from .errors import ConfigError
from .features.config import DEFAULT_PROJ_DIM, DEFAULT_TIMESTEPS
from .evaluation.bank import Bank, list_banks
from .evaluation.evaluate import bank_targets_cached, method_options, open_on_bank, run_on_bank
from .evaluation.ray_featurize import featurize_on_cluster
from .journey import JourneyConfig, journey_cached, run_journey
from .methods import BASELINE_METHOD, DEFAULT_METHOD, get_method
from .run_options import RunOptions
from .store import recorded_throughput


@dataclass(frozen=True)
class TourSettings:
    """What the Tour opens on: the generated image gen:`seed` and D-TRAK with `timesteps` and `proj_dim`."""

    seed: int = 0
    timesteps: int = DEFAULT_TIMESTEPS
    proj_dim: int = DEFAULT_PROJ_DIM

    def options(self, checkpoint: str, dataset: str | None) -> RunOptions:
        return RunOptions(checkpoint, dataset, DEFAULT_METHOD, timesteps=self.timesteps, proj_dim=self.proj_dim)

    def journey(self, seed: int | None = None) -> JourneyConfig:
        """The Tour's journey (step 4): every 10th of 50 sampling steps (the model's default sampler), 5
        re-noisings each."""
        return JourneyConfig(seed=self.seed if seed is None else seed, steps=50, every=10,
                             resamples=5)


@dataclass(frozen=True)
class EvaluationSettings:
    """What the Evaluation page scores when first opened: these methods with K and k."""

    methods: tuple[str, ...] = (DEFAULT_METHOD, BASELINE_METHOD)
    timesteps: int = DEFAULT_TIMESTEPS
    proj_dim: int = DEFAULT_PROJ_DIM


TOUR = TourSettings()
EVALUATION = EvaluationSettings()


@dataclass
class Task:
    """One piece of preparation: an attribution's training features, and then either the targets of a bank (the
    Evaluation page) or a journey (the Tour's step 4)."""

    title: str
    attribution: Attribution
    bank: Bank | None = None
    journey: JourneyConfig | None = field(default=None)
    image: torch.Tensor | None = field(default=None, repr=False)  # a journey's image noised forward (not sampled)

    def estimate(self, probe: bool = False) -> tuple[float | None, list[str]]:
        """(seconds, bases) still to compute here (0 when everything is cached), from the measured throughput;
        None when these features have never been timed here and `probe` is off."""
        n = 0
        if self.bank is not None and not bank_targets_cached(self.bank, self.attribution):
            n = len(self.bank.target_keys)
        seconds, bases = self.attribution.estimate(n, probe)
        if seconds is None or self.journey is None or journey_cached(self.attribution.members[0], self.journey,
                                                                      image=self.image):
            return seconds, bases
        cfg = self.journey
        what = "a journey" + (f" of gen:{cfg.seed}" if self.image is None else "")
        extra, basis = self.attribution.members[0].estimate_for(len(cfg.step_indices()) * cfg.resamples, what,
                                                                 probe)
        return (None, [basis]) if extra is None else (seconds + extra, [*bases, basis])

    def run(self, progress: Progress | None = None, ray_address: str | None = None) -> None:
        """Compute what is missing; the training features on the Ray cluster at `ray_address` when one is named
        (`evaluation.ray_featurize.featurize_on_cluster`), else in this process."""
        if ray_address:
            for member in self.attribution.members:
                featurize_on_cluster(member, ray_address, progress)
        else:
            self.attribution.featurize((lambda member: progress) if progress else None)
        if self.bank is not None:
            if progress:
                progress(0, 1, f"features of the {len(self.bank.target_keys)} targets of bank "
                               f"{self.bank.meta['name']}")
            run_on_bank(self.bank, self.attribution)
        if self.journey is not None:
            run_journey(self.attribution.members[0], self.journey, progress, image=self.image,
                        name=f"gen:{self.journey.seed}" if self.image is None else None)


def checkpoint_tasks(bank: Bank, method: str, load: Callable | None = None, **options) -> list[Task]:
    """What the LDS per checkpoint (`option_sweep(bank, method, "checkpoint")`) computes: one task per checkpoint
    of the bank's run, `method` on it (`options`: those of `open_attribution`) with the bank's targets. Every
    checkpoint is the same network, so one that has not been timed here is estimated at the speed measured for
    the run's last checkpoint (the bank's model, which the Evaluation page featurizes first), else for any other."""
    method, options = method_options(method, options)  # METHOD or METHOD:FN
    method_cls = get_method(method)
    if method_cls.weightings:
        raise ConfigError(f"{method} already sums over the run's checkpoints; pick a single-checkpoint method")
    tasks = [Task(spec.rsplit("@", 1)[-1], open_on_bank(bank, method, load=load, checkpoint=spec, **options),
                  bank=bank) for spec in bank.checkpoint_specs()]
    share_measured_rate(tasks)
    return tasks


def share_measured_rate(tasks: Sequence[Task]) -> None:
    """Let tasks on checkpoints of one run (one network) that have not been timed here be estimated at the speed
    measured for the last timed one (call again after a featurization: it may have timed one)."""
    members = [t.attribution.members[0] for t in tasks]
    timed = [m for m in reversed(members) if recorded_throughput(m.cache_dir, m.throughput_key) is not None]
    for m in members:
        m.rate_like = timed[0] if timed else None


def plan(checkpoint: str = "digits", dataset: str | None = None, banks: Sequence[str] | None = None,
         load: Callable | None = None, tour: TourSettings = TOUR) -> list[Task]:
    """What the Tour, the Attribute page's defaults (the Tour's features) and the Evaluation page's defaults use
    for `checkpoint`: one task for the Tour's features and journey (`tour`: the Tour's settings, by default what
    it opens on), one per (bank, method) of `EVALUATION`. `banks` default: the bank the Evaluation page opens on
    (the first `list_banks` gives); [] for none. `load(spec)` loads a model (the app passes its cached loader)."""
    tour = Task(f"Tour and Attribute defaults: D-TRAK, K = {tour.timesteps}, k = {tour.proj_dim} on {checkpoint}",
                open_attribution(tour.options(checkpoint, dataset), load), journey=tour.journey())
    names = list_banks()[:1] if banks is None else list(banks)
    tasks = [tour]
    for name in names:
        bank = Bank.load(name)
        for method in EVALUATION.methods:
            tasks.append(Task(f"Evaluation on bank {bank.meta['name']}: {method}, K = {EVALUATION.timesteps}, "
                              f"k = {EVALUATION.proj_dim}",
                              open_on_bank(bank, method, load=load, timesteps=EVALUATION.timesteps,
                                           proj_dim=EVALUATION.proj_dim),
                              bank=bank))
    return tasks


def estimates(tasks: Sequence[Task], probe: bool = True) -> tuple[float | None, list[tuple[str, str]]]:
    """(seconds in all, [(task title, "about 4 min (1618 images at 77 sample-timesteps/s, measured here …)" or
    "cached")]); the total is None when a task has no measurement (and `probe` is off)."""
    total, rows = 0.0, []
    for t in tasks:
        seconds, bases = t.estimate(probe)
        if seconds is None:
            total = None
            rows.append((t.title, f"no estimate ({'; '.join(bases)})"))
        else:
            total = None if total is None else total + seconds
            rows.append((t.title, f"about {format_duration(seconds)} ({'; '.join(bases)})" if seconds else "cached"))
    return total, rows


def estimate_text(tasks: Sequence[Task], probe: bool = True) -> tuple[float | None, str]:
    """(seconds, one line per task): "Tour …: about 4 min (1618 images at 77 sample-timesteps/s, measured here …)"
    or "…: cached"; the total is None when a task has no measurement (and `probe` is off)."""
    total, rows = estimates(tasks, probe)
    return total, "\n".join(f"{title}: {text}" for title, text in rows)


def run(tasks: Sequence[Task], progress: Progress | None = None, ray_address: str | None = None) -> None:
    """Compute every task in turn; `progress(done, total, message)` is prefixed with the task's title; training
    features on the Ray cluster at `ray_address` when one is named."""
    for i, t in enumerate(tasks):
        prefix = f"{i + 1}/{len(tasks)} {t.title}"

        def step(done: int, total: int, message: str = "", prefix=prefix) -> None:
            if progress:
                progress(done, total, f"{prefix}: {message}" if message else prefix)

        t.run(step, ray_address)
    if not tasks:
        raise ConfigError("nothing to prepare")
