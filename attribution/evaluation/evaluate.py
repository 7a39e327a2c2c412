"""Any method of the engine against a ground-truth bank: scores of the bank's targets, then the LDS statistics.

    bank = Bank.load("digits")
    run = score_bank(bank, "dtrak", progress=...)                   # featurizes (cached), target features once
    table = lds_table(bank, {"D-TRAK": run.scores}, split="val")     # LDS, centered LDS, ceilings, CIs
    sweep = lambda_sweep(bank, run, split="gen")                    # LDS at every lambda, milliseconds each

The attributed model is the bank's full model (trained by the bank's recipe on the whole training split), the
training set is the bank's dataset, and the targets are the bank's validation and generated images with their
noise keys ("val/3", "gen/17"), exactly the images whose F the retrained models measured. Scores from other tools
enter through `check_external_scores` (targets x training images, in the bank's order).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..engine import Attribution, Result, open_attribution
from ..errors import ConfigError
from ..methods import get_method, parse_method_entry
from ..models.adapter import key_prompt
from ..run_options import RunOptions
from ..sampling import Prompt
from ..store import saved_targets_path
from ..targets import Generated, Targets
from .bank import Bank
from .lds import Ceilings, HeldOutChoice, LdsResult, LdsTable, Sweep, evaluate, lds, lds_sweep

SPLITS = ("val", "gen", "all")
Progress = Callable[[int, int, str], None]


def bank_targets(bank: Bank) -> Targets:
    """The bank's targets as engine targets (generated ones keep their seed, so Journey TRAK can re-sample them)."""
    keys = list(bank.target_keys)
    steps = int(bank.meta.get("identity", {}).get("gen_steps", 50))
    sampler = bank.meta.get("identity", {}).get("sampler", "ddpm")
    generated = [Generated(int(k.split("/")[1]), steps, sampler, None if key_prompt(k) is None
                           else Prompt(key_prompt(k), guidance=bank.gen_guidance)) if k.startswith("gen/") else None
                 for k in keys]
    return Targets(torch.from_numpy(np.asarray(bank.target_images, dtype=np.float32)), keys,
                   [k.replace("/", ":") for k in keys], [None] * len(keys), generated=generated)


def method_options(method: str, options: dict) -> tuple[str, dict]:
    """(method name, options) of an entry METHOD or METHOD:FN (`methods.parse_method_entry`): the entry's output
    function joins the options; another one given there too is one line."""
    name, fn = parse_method_entry(method)
    if fn is not None:
        if options.get("fn") not in (None, fn):
            raise ConfigError(f"{method} names the output function {fn}, but fn={options['fn']} was given too")
        options = {**options, "fn": fn}
    return name, options


def open_on_bank(bank: Bank, method: str, device: str = "auto", load: Callable | None = None,
                 checkpoint: str | None = None, **options) -> Attribution:
    """`method` (METHOD or METHOD:FN, e.g. dtrak:avg) on the bank's model (or `checkpoint`, another checkpoint of
    its run: the checkpoint sweep) and training set; `options` are fields of `RunOptions` (fn, timesteps,
    proj_dim, projector, seed, cache, ...) meant for the methods of a comparison: those of a kind this method does
    not use are left out (`RunOptions.for_method`). `load(spec)` loads a model (the app's cached loader).
    Validates; computes nothing."""
    method, options = method_options(method, options)
    m = get_method(method)
    run = RunOptions.for_method(method, checkpoint=checkpoint or bank.model_spec_for(bool(m.weightings)),
                                device=device, dataset=bank.dataset, **options)
    attribution = open_attribution(run, load)
    check_training_set(bank, attribution)
    return attribution


def check_training_set(bank: Bank, attribution: Attribution) -> None:
    """One line when `attribution` is against another training set than the one the bank's subsets are of."""
    n = len(attribution.train)
    if n != bank.masks.shape[1]:
        raise ConfigError(f"the {bank.meta['name']} bank was retrained on subsets of {bank.dataset} "
                          f"({bank.masks.shape[1]:,} images); this attribution is against {attribution.train.spec} "
                          f"({n:,} images): attribute against {bank.dataset} to measure it on this bank")


def run_on_bank(bank: Bank, attribution: Attribution, progress: Progress | None = None) -> Result:
    """`Attribution.run` on every bank target (see `open_on_bank`): featurizes (cached, resumable), then the
    targets' features, read from (or saved to) each member's feature folder (`bank_features_name`): the targets
    are fixed by the bank, so a second LDS of the same method costs no gradients. A generated-only method (Journey
    TRAK) gets NaN rows for the validation targets, which it cannot attribute (`Result.covers`). An attribution
    against another training set than the bank's is refused in one line, before any work."""
    check_training_set(bank, attribution)
    return attribution.run(bank_targets(bank), progress=(lambda member: progress) if progress else None,
                           saved_as=bank_features_name(bank, attribution), partial=True)


def score_bank(bank: Bank, method: str, progress: Progress | None = None, device: str = "auto",
               **options) -> Result:
    """Open `method` on the bank and run it on every bank target (`run_on_bank`): scores at the default lambda,
    `Result.at(lam)` at any other."""
    return run_on_bank(bank, open_on_bank(bank, method, device, **options), progress)


def bank_features_name(bank: Bank, attribution: Attribution) -> str:
    """The name the bank targets' features are saved under in each member's feature folder."""
    return f"{attribution.method.name}-{bank.meta['targets_hash']}"


def bank_targets_cached(bank: Bank, attribution: Attribution) -> bool:
    """Whether `run_on_bank` would read every member's target features from the cache (no target gradients)."""
    name = bank_features_name(bank, attribution)
    return all(saved_targets_path(member.store_path, name).exists() for member in attribution.members)


SWEEPS = {"K": "timesteps", "k": "proj_dim", "checkpoint": "checkpoint"}
SWEEP_DEFAULTS = {"K": (1, 2, 5, 10, 20), "k": (512, 1024, 2048, 4096, 8192)}


@dataclass
class SweepPoint:
    """LDS of one method at one value of a swept option (K, k or a checkpoint), per split."""

    value: int | str
    tables: dict[str, LdsTable]
    lam: float | None
    seconds: float


def option_sweep(bank: Bank, method: str, sweep: str, values=None, splits=("val", "gen"),
                 progress: Callable[[str], Progress | None] | None = None, n_resamples: int = 1000,
                 device: str = "auto", **options) -> list[SweepPoint]:
    """LDS of `method` (METHOD or METHOD:FN; at its default lambda) as one option varies: "K" (timesteps of the
    features), "k" (projection dimension) or "checkpoint" (attributions from each checkpoint of the bank's run,
    judged against the final model's bank: the D-TRAK paper's checkpoint study). Each point featurizes once
    (cached); the tables name the method by the entry as given."""
    if sweep not in SWEEPS:
        raise ConfigError(f"unknown sweep {sweep!r}; use lambda or one of: {', '.join(SWEEPS)}")
    entry = method
    method, options = method_options(method, options)
    m = get_method(method)
    if sweep == "checkpoint":
        if m.weightings:
            raise ConfigError(f"{method} already sums over the run's checkpoints; sweep a single-checkpoint method")
        values = list(values or bank.checkpoint_specs())
    else:
        values = [int(v) for v in (values or SWEEP_DEFAULTS[sweep])]
    points = []
    for v in values:
        start = time.time()
        opts = dict(options)
        if sweep == "checkpoint":
            attribution = open_on_bank(bank, method, device, checkpoint=str(v), **opts)
        else:
            opts[SWEEPS[sweep]] = v
            attribution = open_on_bank(bank, method, device, **opts)
        run = run_on_bank(bank, attribution, progress(f"{entry} {sweep}={v}") if progress else None)
        tables = {split: lds_table(bank, {entry: run.scores}, split, n_resamples=n_resamples) for split in splits}
        label = str(v).rsplit("@", 1)[-1] if sweep == "checkpoint" else v
        points.append(SweepPoint(label, tables, run.default_lambda, time.time() - start))
    return points


def split_rows(bank: Bank, split: str) -> np.ndarray:
    """Target indices of a split: "val", "gen" or "all"."""
    if split not in SPLITS:
        raise ConfigError(f"unknown target split {split!r}; use one of: {', '.join(SPLITS)}")
    rows = np.arange(len(bank.target_keys)) if split == "all" else np.flatnonzero(bank.split(split))
    if not len(rows):
        raise ConfigError(f"bank {bank.meta['name']} has no {split} targets")
    return rows


def finished_bank(bank: Bank) -> Bank:
    """The subsets whose every seed is done (a bank still building is evaluated on what it has)."""
    done = bank.finished()
    if done.masks.shape[0] < 2:
        raise ConfigError(f"bank {bank.meta['name']} has {done.masks.shape[0]} finished subsets; LDS needs at "
                          "least 2 (rerun `python -m attribution bank build` to continue it)")
    return done


def lds_table(bank: Bank, named_scores: dict[str, np.ndarray], split: str = "val", n_resamples: int = 1000,
              seed: int = 0) -> LdsTable:
    """LDS (standard and centered, with target and two-way CIs), ceilings, random baselines and the common-mode
    share for full (T, N) score arrays restricted to one target split."""
    done = finished_bank(bank)
    rows = split_rows(bank, split)
    named = {k: np.asarray(v)[rows] for k, v in named_scores.items()}
    named = {k: v for k, v in named.items() if not np.isnan(v).all()}  # no targets of this split (Journey TRAK)
    for k, v in named.items():
        if np.isnan(v).all(axis=1).any():
            raise ConfigError(f"{k} has no scores for some {split} targets (it attributes generated images only); "
                              "evaluate it on the generated targets (--split gen)")
    return evaluate(named, done.masks, done.F[..., rows], n_resamples=n_resamples, seed=seed)


def lambda_sweep(bank: Bank, run: Result, split: str = "val", lambdas: np.ndarray | None = None,
                 n_resamples: int = 1000) -> Sweep:
    """LDS of `run` at every lambda (default: the kernel's grid, 4 per decade), one split."""
    if not run.uses_lambda:
        raise ConfigError(f"{run.attribution.method.name} has no lambda to sweep")
    done = finished_bank(bank)
    rows = split_rows(bank, split)
    if not run.covers(split):
        raise ConfigError(f"{run.attribution.method.name} attributes generated targets only: it has no LDS on "
                          f"{split} targets")
    lambdas = run.lambda_grid() if lambdas is None else np.asarray(lambdas, dtype=np.float64)
    return lds_sweep(lambda lam: run.at(lam).scores[rows], done.masks, done.F[..., rows], lambdas=lambdas,
                     n_resamples=n_resamples)


@dataclass
class LambdaReport:
    """LDS along lambda for one method and split, with the default, the retraining-free (GCV) and the LDS-optimal
    lambda marked, the split's seed-vs-seed (lower) and reachable ceilings, and the λ chosen on one half of the
    targets with its LDS on the other half (`held_out`: the honest figure for "the best λ"; `best` is chosen on the
    targets it is reported on, so its LDS is optimistic)."""

    sweep: Sweep
    default: float
    gcv: float
    best: float
    ceiling: float | None
    reachable: float | None = None
    held_out: HeldOutChoice | None = None

    def at(self, lam: float, variant: str = "standard") -> float:
        """LDS at the grid value nearest to `lam` (on a log scale)."""
        i = int(np.argmin(np.abs(np.log(self.sweep.lambdas / lam))))
        return float(getattr(self.sweep, variant)[i])

    @property
    def gcv_within(self) -> float:
        """LDS at the GCV lambda as a fraction of the LDS at the optimal one (1.0: as good)."""
        best = self.at(self.best)
        return self.at(self.gcv) / best if best > 0 else float("nan")


def lambda_report(bank: Bank, run: Result, split: str = "val", n_resamples: int = 200) -> LambdaReport:
    """`lambda_sweep` over the kernel's grid plus the default and GCV lambdas themselves."""
    rows = split_rows(bank, split)
    default, gcv = run.default_lambda, run.gcv(rows)
    lambdas = np.unique(np.r_[run.lambda_grid(), default, gcv])
    sweep = lambda_sweep(bank, run, split, lambdas, n_resamples=n_resamples)
    ceil = lds_table(bank, {}, split, n_resamples=50).ceilings
    return LambdaReport(sweep, float(default), float(gcv), float(lambdas[sweep.best()]),
                        ceil.seed.standard.value if ceil.seed is not None else None,
                        ceil.reachable.standard.value if ceil.reachable is not None else None,
                        sweep.best_held_out())


def lds_at(bank: Bank, run: Result, lam: float | None, split: str = "val", n_resamples: int = 200) -> LdsResult:
    """Standard and centered LDS (with CIs) of `run` at one lambda on one split: what the app shows beside a λ
    slider (a few milliseconds once the run's target features exist)."""
    done = finished_bank(bank)
    rows = split_rows(bank, split)
    return lds(run.at(lam).scores[rows], done.masks, done.F[..., rows], n_resamples=n_resamples)


def bank_ceilings(bank: Bank, split: str = "val", n_resamples: int = 200) -> Ceilings:
    """The split's seed-vs-seed (lower: how well one retrain predicts another), reachable (a perfect method against
    the mean of the bank's seeds) and noise-vs-noise ceilings; the first two are None with a single seed."""
    return lds_table(bank, {}, split, n_resamples=n_resamples).ceilings


def check_external_scores(bank: Bank, scores: np.ndarray, source: str = "scores") -> np.ndarray:
    """A score array from another tool: (targets x training images) in the bank's target and dataset order."""
    scores = np.asarray(scores)
    want = (len(bank.target_keys), bank.masks.shape[1])
    if scores.ndim != 2 or scores.shape != want:
        raise ConfigError(f"{source} has shape {scores.shape}; bank {bank.meta['name']} needs {want[0]} targets x "
                          f"{want[1]} training images (targets in the order of `bank info`)")
    if not np.issubdtype(scores.dtype, np.number) or not np.isfinite(scores).all():
        raise ConfigError(f"{source} holds NaN, infinite or non-numeric values")
    return scores.astype(np.float64)
