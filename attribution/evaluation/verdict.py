"""A plain verdict beside a ranking, from the model's ground-truth bank, and the λ chosen on held-out targets.

    run = run_on_bank(bank, attribution)                     # the bank's targets scored with the ranking's options
    v = verdict(bank, run, lam, target_split(targets), pixels)   # pixels: pixel similarity's run, when cached
    v.sentence()   # "On this model's benchmark, rankings like this match retraining at LDS +0.23 (42% of …"
    choice = held_out_lambda(bank, run, "val", exclude="val/3")
    choice.lam, choice.lds                                   # the λ to use, and its honest held-out LDS

"Rankings like this one" are the bank's targets of the same kind as the target attributed: its generated images
for a generated target, its validation images for any other (a training, validation or uploaded image). Pixel
similarity (`BASELINE_SIMILARITY`) is the comparison a student can picture: a ranking that agrees with retraining no
better than "the training images that look most alike" has not shown what the gradients add.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine import Result
from ..errors import ConfigError
from ..targets import Targets
from .bank import Bank
from .evaluate import bank_ceilings, lambda_sweep, lds_at, split_rows
from .lds import Comparison, LdsResult, compare

BASELINE_SIMILARITY = "pixel-cos"  # what a verdict compares a ranking with: the training images that look alike
SPLIT_LABELS = {"val": "validation", "gen": "generated"}


def target_split(targets: Targets, row: int = 0) -> str:
    """The bank split whose targets are like target `row`: "gen" for a generated image, else "val"."""
    made = targets.generated[row] if len(targets.generated) > row else None
    return "gen" if made is not None else "val"


@dataclass(frozen=True, eq=False)  # holds LDS results: compare fields, not objects
class Verdict:
    """The LDS of a ranking's method and options on one split of the model's bank at one λ, its share of what a
    perfect method reaches there, and pixel similarity's LDS on the same resamples (a paired comparison)."""

    bank: str
    split: str
    result: LdsResult
    reachable: float | None  # None: the bank has a single seed
    seed: float | None  # one retrain against another (lower)
    baseline: LdsResult | None = None  # pixel similarity's, when its scores of the bank exist

    @property
    def value(self) -> float:
        return self.result.standard.value

    @property
    def share(self) -> float | None:
        """The LDS as a fraction of the reachable ceiling (None without a positive one)."""
        return self.value / self.reachable if self.reachable and self.reachable > 0 else None

    @property
    def versus_baseline(self) -> Comparison | None:
        if self.baseline is None:
            return None
        return compare(self.result, self.baseline, ("ranking", "pixel similarity"))["standard"]

    def sentence(self) -> str:
        """One sentence a student can read (at most 140 characters: it sits in a result column)."""
        text = f"On this model's benchmark, rankings like this match retraining at LDS {self.value:+.2f}"
        if self.share is not None:
            text += f" ({self.share:.0%} of reachable)"
        elif self.reachable is None:
            text += " (no ceiling: one seed)"
        c = self.versus_baseline
        if c is None:
            return text + "."
        pixels = f"pixel similarity ({self.baseline.standard.value:+.2f})"
        if not c.real:
            return text + f", about as well as {pixels}."
        return text + (f", better than {pixels}." if c.difference > 0 else f", worse than {pixels}.")

    def details(self) -> str:
        """The figures behind the sentence: bank, split, two-way interval, ceilings, and the paired difference."""
        r = self.result.standard
        text = (f"Bank `{self.bank}`, its {SPLIT_LABELS.get(self.split, self.split)} targets: LDS {r.value:+.3f} "
                f"[{r.ci_two_way[0]:+.3f}, {r.ci_two_way[1]:+.3f}]")
        if self.reachable is not None:
            text += f"; reachable {self.reachable:+.3f}, one retrain predicts another at {self.seed:+.3f}"
        c = self.versus_baseline
        if c is not None:
            text += (f"; minus pixel similarity: {c.difference:+.3f} [{c.ci_two_way[0]:+.3f}, {c.ci_two_way[1]:+.3f}]"
                     f" ({'a real difference' if c.real else 'within the benchmark noise'})")
        return text + ". 95% intervals: bootstrap over retrained models and targets."


def verdict(bank: Bank, run: Result, lam: float | None, split: str = "val", baseline: Result | None = None,
            n_resamples: int = 200) -> Verdict:
    """The verdict of `run` (a method and options on the bank) at `lam` on `split`; a method that attributes
    generated targets only is judged on those. `baseline`: pixel similarity's run on the same bank."""
    if not run.covers(split):
        split = "gen"
    split_rows(bank, split)  # one line when the bank has no targets of this split
    result = lds_at(bank, run, lam, split, n_resamples)
    ceilings = bank_ceilings(bank, split, n_resamples)
    other = (lds_at(bank, baseline, None, split, n_resamples) if baseline is not None and baseline.covers(split)
             else None)
    return Verdict(bank.meta["name"], split, result,
                   None if ceilings.reachable is None else ceilings.reachable.standard.value,
                   None if ceilings.seed is None else ceilings.seed.standard.value, other)


@dataclass(frozen=True)
class HeldOutLambda:
    """The λ to use for a ranking: the one with the highest LDS on the bank's targets of its split other than the
    target attributed (`excluded`, when it is one of them), so it is never chosen on the target it is used for;
    and the honest figure for a λ chosen that way (`lds`): chosen on one half of the targets, the LDS on the
    other half, both ways (`halves`)."""

    lam: float
    lds: float
    halves: tuple[float, float]  # the λ chosen on each half
    split: str
    n_targets: int  # the targets it was chosen on
    excluded: str | None = None

    def describe(self) -> str:
        """One line for a button's help."""
        label = SPLIT_LABELS.get(self.split, self.split)
        other = " other than this one" if self.excluded else ""
        return (f"λ = {self.lam:.3g} has the highest LDS on the bank's {self.n_targets} {label} targets{other}. A λ "
                f"chosen that way on half of them scores LDS {self.lds:+.3f} on the other half (chosen: "
                f"{self.halves[0]:.3g} / {self.halves[1]:.3g}), the honest figure for it.")


def held_out_lambda(bank: Bank, run: Result, split: str = "val", exclude: str | None = None,
                    n_resamples: int = 20) -> HeldOutLambda:
    """`HeldOutLambda` over the kernel's λ grid (and the default λ) on `split`; `exclude`: the attributed target's
    key ("val/3"), left out of the choice when the bank has it."""
    if not run.uses_lambda:
        raise ConfigError(f"{run.attribution.method.name} has no λ to choose")
    if not run.covers(split):
        split = "gen"
    rows = split_rows(bank, split)
    lambdas = np.unique(np.r_[run.lambda_grid(), run.default_lambda])
    sweep = lambda_sweep(bank, run, split, lambdas, n_resamples=n_resamples)
    keep = np.array([bank.target_keys[r] != exclude for r in rows])
    best = int(np.argmax(sweep.standard_per_target[:, keep].mean(axis=1)))
    held = sweep.best_held_out()
    return HeldOutLambda(float(lambdas[best]), held.value, tuple(float(v) for v in held.chosen), split,
                         int(keep.sum()), None if keep.all() else exclude)
