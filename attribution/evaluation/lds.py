"""Linear datamodeling score (LDS) with the statistics a small benchmark needs. Pure numpy/scipy: no torch, no I/O.

Conventions (shared by everything in `attribution/evaluation`):

- ``scores``: (T targets, N training images), float; positive = proponent (the image lowers the target's loss).
- ``masks``: (M subsets, N) bool, True = the image is in the subset.
- ``F``: (M subsets, S seeds, R noise sets, T targets), the model output (Simple loss: lower = better fit) of each
  retrained model on each target. The ground truth is ``Fbar = F.mean(axis=(1, 2))``, shape (M, T).
- Prediction (D-TRAK's ``mask @ (-scores).T``): ``g[j, m] = sum_{i in S_j} tau[m, i]`` with ``tau = -scores``, so a
  subset full of proponents predicts a low loss.
- ``LDS = mean_m Spearman_j(g[j, m], Fbar[j, m])`` (D-TRAK section 2.2, Definition 2; appendix A.2). This equals the
  mean of dattri's ``metric.lds(-scores.T, (Fbar, subset_indices))`` correlations, except that a target whose
  prediction or ground truth is constant across subsets counts here as 0 (no ranking information; scipy says NaN);
  ``Estimate.n_undefined`` counts such targets.

Beyond the paper's figure (issues 11 and 16):

- **Centered LDS**: remove from ``Fbar`` each retrained model's mean over targets, and from ``g`` each subset's mean
  over targets, then the same per-target Spearman. It ignores the *common mode* (one retrained model has a lower or
  higher loss on every target) that dominates F on small benchmarks, and with it the part of a method's LDS that comes
  from target-agnostic "this image lowers every loss" scores. A target-agnostic score has a centered LDS of exactly 0.
- **Ceilings**: seed-vs-seed (DInf's "exact retraining": each seed's F, averaged over noise sets, against the mean of
  the other seeds, per-target Spearman, averaged over targets and then seeds: how well one retrain predicts another)
  and noise-vs-noise (the same across noise sets, F averaged over seeds: F's own sampling noise), each standard and
  centered. The seed ceiling compares one seed with S - 1 others: it is a *lower* ceiling, since methods are scored
  against the mean of all S seeds, which is less noisy than one seed, and a method can exceed it.
- **Reachable ceiling**: the LDS a perfect predictor (the expected F over retraining seeds, known exactly) would reach
  against the S-seed mean. If one seed's F correlates with another's at r per target, the S-seed mean's reliability
  is S r / (1 + (S - 1) r) (Spearman-Brown) and a perfect predictor correlates with it at the square root of that:
  ``reachable = sqrt(S r / (1 + (S - 1) r))`` with r the seed-vs-seed Spearman averaged over seed pairs and targets
  (clipped to [0, 1]), with the same intervals (the transform is applied inside every resample). Transforming each
  target's own r instead and averaging is biased low, since each target's r is noisy and the square root is concave
  (on synthetic banks with r ~ 0.1-0.25 per target: 0.39 / 0.59 against the oracle's 0.44 / 0.64; the mean's
  transform gives 0.44 / 0.64); where targets truly differ in r, the mean's transform is the higher of the two, so
  the ceiling errs on the side of a ceiling. "x% of reachable" is a method's LDS over it (paired, on the same
  resamples). It treats Spearman like Pearson correlation (for normal F the difference is below 0.01 here); on
  synthetic banks of F = signal + seed noise an oracle method lands inside its interval (tests/evaluation/test_lds.py).
- **Random baseline**: several seeded draws of i.i.d. normal scores (standard and centered LDS, mean and spread over
  draws) and of *target-agnostic* random scores (one random value per image, the same for every target): its spread
  shows how far a score with no target-specific content can move the standard LDS through the common mode.
- **Common-mode share** of F's across-subset variance (`common_mode_share`).
- **Confidence intervals**, percentile bootstrap, 95%: over targets (the retrained models held fixed: "another set of
  targets, same bank"), and two-way over subsets and targets (each resample draws M subsets and T targets with
  replacement and recomputes the LDS: "another bank built the same way"). Targets share the retrained models, so
  only the two-way interval is evidence that a figure or a difference between methods is not an accident of the M
  retrained models. Paired comparisons use the same resamples for both methods. Resampling both ways counts the
  subset x target interaction twice, so the two-way interval errs on the wide (conservative) side; on synthetic banks
  with a common mode (tests/evaluation/test_lds.py) it covered the true mean LDS in 60 of 60 draws where the target
  interval covered it in 44.

Resampled Spearman correlations are computed without re-sorting: a subset resample is a vector of counts c (how often
each subset was drawn), and the average rank of subset j within it is ``(#drawn below) + (#drawn tied + 1) / 2``,
which is ``c @ K + 1/2`` for a comparison matrix K built once per bank (`_rank_kernel`); the correlation over the
resample is the count-weighted Pearson correlation of those ranks (their weighted mean is (M + 1) / 2). This equals
`scipy.stats.spearmanr` on the explicitly resampled bank. For the centered LDS the per-model mean over targets is
estimated once from all targets and the centered bank is resampled (the O(1/T) error of that estimate is not
propagated into the interval).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
from scipy.stats import rankdata

from ..errors import ConfigError

CI_LEVEL = 0.95
DEFAULT_RESAMPLES = 1000
DEFAULT_RANDOM_DRAWS = 20
# Resamples are processed in chunks of at most this many (resample, subset, target) cells (~8 MB per float32 array),
# targets in blocks whose (M, M * block) rank kernel has at most KERNEL_CELLS cells (~32 MB).
CHUNK_CELLS = 2_000_000
KERNEL_CELLS = 8_000_000
# Matrix products up to this many multiply-adds skip BLAS (see `_matmul`).
SMALL_PRODUCT = 20_000_000
VARIANTS = ("standard", "centered")

# ----------------------------------------------------------------------------------------------------------------
# Validation


def check_outputs(F: np.ndarray) -> np.ndarray:
    """Validate the (M, S, R, T) model outputs of a bank; return them as float64."""
    F = np.asarray(F)
    if F.ndim != 4:
        raise ConfigError(f"F must have shape (subsets, seeds, noise sets, targets), got shape {F.shape}")
    if F.shape[0] < 2:
        raise ConfigError(f"LDS needs at least 2 subsets (M >= 2), got M = {F.shape[0]}")
    if min(F.shape) < 1:
        raise ConfigError(f"F must have at least one seed, noise set and target, got shape {F.shape}")
    if not np.issubdtype(F.dtype, np.number) or np.iscomplexobj(F) or not np.isfinite(F).all():
        raise ConfigError("F must be finite real numbers (found NaN, inf or a non-numeric dtype)")
    return F.astype(np.float64)


def check_bank(masks: np.ndarray, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a bank's subsets and model outputs; return them as (bool masks, float64 F)."""
    masks = np.asarray(masks)
    if masks.dtype != np.bool_:
        raise ConfigError(f"masks must be a boolean array (True = image in the subset), got dtype {masks.dtype}")
    if masks.ndim != 2:
        raise ConfigError(f"masks must have shape (subsets, training images), got shape {masks.shape}")
    if masks.shape[0] < 2:
        raise ConfigError(f"LDS needs at least 2 subsets (M >= 2), got M = {masks.shape[0]}")
    F = check_outputs(F)
    if F.shape[0] != masks.shape[0]:
        raise ConfigError(f"F has {F.shape[0]} subsets but masks has {masks.shape[0]}")
    return masks, F


def check_scores(scores: np.ndarray, n_targets: int, n_images: int, name: str = "scores") -> np.ndarray:
    """Validate a (targets, training images) score array for a bank; return it as float64."""
    scores = np.asarray(scores)
    if scores.shape != (n_targets, n_images):
        raise ConfigError(f"{name} must have shape (targets, training images) = ({n_targets}, {n_images}) for this "
                          f"bank, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise ConfigError(f"{name} must be real numbers, got dtype {scores.dtype}")
    if not np.isfinite(scores).all():
        raise ConfigError(f"{name} contain {int((~np.isfinite(scores)).sum())} NaN or infinite values")
    return scores.astype(np.float64)


def _check_count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """g = masks @ (-scores).T: the (M, T) predicted output of each subset's model on each target (float64)."""
    return _matmul(masks.astype(np.float64), -np.asarray(scores, dtype=np.float64).T)


def ground_truth(F: np.ndarray) -> np.ndarray:
    """Fbar = F averaged over seeds and noise sets, shape (M, T)."""
    return np.asarray(F, dtype=np.float64).mean(axis=(1, 2))


# Relative size (to the row's largest magnitude) below which a centered value is rounding error, not signal.
CENTER_TOL = 1e-10


def center(x: np.ndarray) -> np.ndarray:
    """Remove each row's (subset's / retrained model's) mean over targets from an (M, T) array.

    Where a row is the same for every target (a target-agnostic score), subtracting its mean leaves rounding errors
    of ~1e-16 of its size that a rank correlation would treat as signal; values below CENTER_TOL of the row's largest
    magnitude are set to exactly 0 (scores carry at most float32 precision, ~1e-7)."""
    c = x - x.mean(axis=1, keepdims=True)
    c[np.abs(c) <= CENTER_TOL * np.abs(x).max(axis=1, keepdims=True)] = 0.0
    return c


def _flatten_constant_columns(x: np.ndarray) -> np.ndarray:
    """Make columns that are constant up to rounding (range below CENTER_TOL of their largest magnitude) exactly
    constant: e.g. the sums of equal scores over equal-size subsets, which a rank correlation would otherwise rank
    by their last bits."""
    flat = np.ptp(x, axis=0) <= CENTER_TOL * np.abs(x).max(axis=0)
    if not flat.any():
        return x
    x = x.copy()
    x[:, flat] = x[0, flat]
    return x


def _zranks(x: np.ndarray) -> np.ndarray:
    """Average ranks down each column of (M, T), centered and scaled to unit norm (zero for a constant column)."""
    r = rankdata(_flatten_constant_columns(x), axis=0)
    r -= r.mean(axis=0)
    norm = np.sqrt((r * r).sum(axis=0))
    return np.divide(r, norm, out=np.zeros_like(r), where=norm > 0)


def spearman_per_target(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman correlation across subsets for every target: (M, T), (M, T) -> (T,); 0 where either is constant."""
    return (_zranks(pred) * _zranks(truth)).sum(axis=0)


def common_mode_share(F: np.ndarray) -> float:
    """Fraction of the across-subset variance of Fbar that all targets share (F: (M, S, R, T), or Fbar itself).

    With D = Fbar minus each target's mean over subsets (a per-target offset does not change any Spearman across
    subsets) and c_j = mean_m D[j, m] (retrained model j's mean over targets, relative to the average model), D splits
    orthogonally into the common mode c_j (the same for every target) and a target-specific rest, and

        share = T * sum_j c_j^2 / sum_{j,m} D[j, m]^2   in [0, 1].

    It is the two-way ANOVA share of the subset (model) effect. Without any common mode, with T independent target
    columns of equal variance, it is about 1/T; near 1, every target ranks the retrained models alike.
    """
    fbar = ground_truth(check_outputs(F)) if np.ndim(F) != 2 else np.asarray(F, dtype=np.float64)
    d = fbar - fbar.mean(axis=0)
    total = float((d * d).sum())
    if total == 0.0:
        return 0.0
    c = d.mean(axis=1)
    return float(d.shape[1] * (c * c).sum() / total)


@dataclass(frozen=True)
class VarianceComponents:
    """Per-target two-way random-effects ANOVA of a bank's F averaged over noise sets, F[j, s] = mu + a_j + b_s +
    e_js, averaged over targets: the variance of the subset effect a (the signal an attribution can predict), of the
    seed effect b (retraining noise every subset shares at one seed: common random numbers put it there, and a
    correlation across subsets at one seed ignores it), and of the subset-specific seed noise e (what caps the
    seed-vs-seed correlation). `noise_sets` is the part of e that is F's measurement: the model x noise-set
    interaction's variance in the mean over the R noise sets (every model is measured on the same noise draws, so
    the noise sets' own spread is a per-target offset, not a difference between models). `predicted_r` =
    a / (a + e), the seed-vs-seed correlation these components imply."""

    subset: float
    seed: float
    residual: float
    noise_sets: float  # included in `residual`

    @property
    def predicted_r(self) -> float:
        total = self.subset + self.residual
        return self.subset / total if total > 0 else 0.0

    def shares(self) -> dict[str, float]:
        """subset, seed and residual as shares of their sum (the across-model variance of F); noise_sets likewise
        (a part of the residual)."""
        total = self.subset + self.seed + self.residual
        return {k: (getattr(self, k) / total if total > 0 else 0.0)
                for k in ("subset", "seed", "residual", "noise_sets")}


def variance_components(F: np.ndarray, centered: bool = False) -> VarianceComponents:
    """`VarianceComponents` of a bank's (M, S, R, T) F (S >= 2); `centered` first removes each retrained model's
    (and noise set's) mean over targets, as the centered LDS does. Method-of-moments estimates, floored at 0."""
    F = check_outputs(F)
    m, n_seeds, r_count, t = F.shape
    if n_seeds < 2:
        raise ConfigError(SINGLE_SEED)
    if centered:
        F = F - F.mean(axis=3, keepdims=True)
    x = F.mean(axis=2)  # (M, S, T)
    noise = 0.0
    if r_count > 1:  # model x noise-set interaction, its variance in the mean over R sets
        inter = F - x[:, :, None] - (F.mean(axis=(0, 1)) - F.mean(axis=(0, 1, 2)))[None, None]
        noise = float(((inter ** 2).sum(axis=(0, 1, 2)) / ((m * n_seeds - 1) * (r_count - 1))).mean() / r_count)
    grand = x.mean(axis=(0, 1))
    a = x.mean(axis=1) - grand  # (M, T)
    b = x.mean(axis=0) - grand  # (S, T)
    e = x - grand - a[:, None, :] - b[None, :, :]
    ms_e = (e ** 2).sum(axis=(0, 1)) / ((m - 1) * (n_seeds - 1))
    ms_a = n_seeds * (a ** 2).sum(axis=0) / (m - 1)
    ms_b = m * (b ** 2).sum(axis=0) / (n_seeds - 1)
    return VarianceComponents(float(np.maximum((ms_a - ms_e) / n_seeds, 0).mean()),
                              float(np.maximum((ms_b - ms_e) / m, 0).mean()), float(ms_e.mean()), noise)


# ----------------------------------------------------------------------------------------------------------------
# Resampling


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not objects
class Resamples:
    """Bootstrap resamples of a bank as counts: ``subsets[b, j]`` = how often subset j is drawn in resample b (each
    row sums to M, at least 2 distinct subsets), ``targets[b, m]`` likewise for targets (rows sum to T)."""

    subsets: np.ndarray  # (B, M) int
    targets: np.ndarray  # (B, T) int

    @classmethod
    def draw(cls, n_subsets: int, n_targets: int, n: int = DEFAULT_RESAMPLES, seed: int = 0) -> Resamples:
        n_subsets = _check_count(n_subsets, "the number of subsets", 2)
        n_targets = _check_count(n_targets, "the number of targets", 1)
        n = _check_count(n, "the number of bootstrap resamples", 1)
        rng = np.random.default_rng(seed)
        subsets = rng.multinomial(n_subsets, np.full(n_subsets, 1.0 / n_subsets), size=n)
        # A resample of one repeated subset has no ranking at all: redraw those (probability M^(1-M)).
        while (bad := np.flatnonzero((subsets > 0).sum(axis=1) < 2)).size:
            subsets[bad] = rng.multinomial(n_subsets, np.full(n_subsets, 1.0 / n_subsets), size=bad.size)
        targets = rng.multinomial(n_targets, np.full(n_targets, 1.0 / n_targets), size=n)
        return cls(subsets, targets)

    @property
    def n(self) -> int:
        return self.subsets.shape[0]

    def indices(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Resample b as explicit (subset indices, target indices), e.g. to recompute it directly."""
        return (np.repeat(np.arange(self.subsets.shape[1]), self.subsets[b]),
                np.repeat(np.arange(self.targets.shape[1]), self.targets[b]))

    def check(self, n_subsets: int, n_targets: int) -> None:
        if self.subsets.shape[1] != n_subsets or self.targets.shape[1] != n_targets:
            raise ConfigError(f"these resamples were drawn for {self.subsets.shape[1]} subsets and "
                              f"{self.targets.shape[1]} targets, the bank has {n_subsets} and {n_targets}")


def _rank_kernel(x: np.ndarray) -> np.ndarray:
    """K[k, j*T + m] = [x[k, m] < x[j, m]] + [x[k, m] == x[j, m]] / 2, float32, shape (M, M*T).

    For subset counts c (b, M), ``c @ K + 1/2`` is the average rank (1-based) of every original subset j within each
    resample: (number of drawn subsets below it) + (number drawn tied with it, itself included, + 1) / 2. All values
    are multiples of 1/2 far below 2^23, so float32 holds them exactly."""
    x = _flatten_constant_columns(x)
    less = x[:, None, :] < x[None, :, :]
    equal = x[:, None, :] == x[None, :, :]
    return (less + np.float32(0.5) * equal).astype(np.float32).reshape(x.shape[0], -1)


def _matmul(a: np.ndarray, b: np.ndarray, force_loop: bool = False) -> np.ndarray:
    """a @ b. Small products, and the resampling's short ones (inner size M), go through einsum's own loop: a
    multithreaded BLAS call on them costs 10-100x its arithmetic when the cores are busy with other work."""
    if force_loop or a.shape[0] * a.shape[1] * b.shape[1] <= SMALL_PRODUCT:
        return np.einsum("ik,kn->in", a, b)
    return a @ b


def _resampled_lds(preds: Sequence[np.ndarray], truth: np.ndarray, res: Resamples,
                   per_target: bool = False) -> np.ndarray:
    """Two-way bootstrap replicates of the LDS of each (M, T) prediction against one (M, T) truth: (P, B); with
    `per_target`, each target's resampled Spearman instead, (P, B, T) (the subsets resampled, not the targets).

    Per resample b and target m this is the count-weighted Pearson correlation of the resampled ranks (their weighted
    mean is (M + 1) / 2), i.e. scipy's Spearman on the explicitly resampled bank; 0 where a side is constant. The
    truth's ranks are computed once per chunk of resamples and shared by all predictions."""
    m, t = truth.shape
    out = np.zeros((len(preds), res.n, t) if per_target else (len(preds), res.n))
    block = max(1, KERNEL_CELLS // (m * m))  # targets per block: bounds the (M, M*block) rank kernels
    for t0 in range(0, t, block):
        cols = slice(t0, min(t, t0 + block))
        width = cols.stop - cols.start
        k_truth = _rank_kernel(truth[:, cols])
        k_preds = [_rank_kernel(p[:, cols]) for p in preds]
        step = max(1, CHUNK_CELLS // (m * width))
        for lo in range(0, res.n, step):
            counts = res.subsets[lo:lo + step].astype(np.float32)
            b = counts.shape[0]
            weights = counts[:, :, None]
            w_targets = res.targets[lo:lo + step, cols] / t
            # rank - (M + 1) / 2 = c @ K - M / 2: deviations from the weighted mean rank, exact in float32
            dev = _matmul(counts, k_truth, force_loop=True).reshape(b, m, width) - np.float32(m / 2)
            wdev = dev * weights
            sd_truth = np.sqrt(np.einsum("bjt,bjt->bt", dev, wdev, dtype=np.float64))
            for k, kp in enumerate(k_preds):
                dev_p = _matmul(counts, kp, force_loop=True).reshape(b, m, width) - np.float32(m / 2)
                cov = np.einsum("bjt,bjt->bt", dev_p, wdev, dtype=np.float64)
                sd = np.sqrt(np.einsum("bjt,bjt->bt", dev_p * weights, dev_p, dtype=np.float64))
                denom = sd * sd_truth
                rho = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)
                if per_target:
                    out[k, lo:lo + step, cols] = rho
                else:
                    out[k, lo:lo + step] += (rho * w_targets).sum(axis=1)
    return out


def _percentile_ci(replicates: np.ndarray) -> tuple[float, float]:
    alpha = 100 * (1 - CI_LEVEL) / 2
    lo, hi = np.percentile(replicates, [alpha, 100 - alpha])
    return float(lo), float(hi)


def is_real(ci: tuple[float, float]) -> bool:
    """A difference (or figure) is "real" when its 95% interval excludes 0."""
    return bool(ci[0] > 0 or ci[1] < 0)


def target_halves(n_targets: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the targets (sorted indices), drawn by a seeded permutation."""
    perm = np.random.default_rng([seed, n_targets]).permutation(n_targets)
    return np.sort(perm[::2]), np.sort(perm[1::2])


@dataclass(frozen=True)
class HeldOutChoice:
    """A choice (the best method, or a λ) made on one half of the targets and reported on the other half, both
    ways, so the figure is not inflated by having been picked on the targets it reports."""

    chosen: tuple  # (the choice on half A, the choice on half B)
    held_out: tuple[float, float]  # LDS of A's choice on half B, of B's choice on half A

    @property
    def value(self) -> float:
        """The mean of the two held-out figures."""
        return float(np.mean(self.held_out))

    @property
    def agree(self) -> bool:
        return self.chosen[0] == self.chosen[1]


def choose_held_out(per_target: Mapping, seed: int = 0) -> HeldOutChoice:
    """From candidate -> (T,) per-target Spearman, the candidate with the highest mean on each half of the targets
    and its mean on the other half."""
    names = list(per_target)
    values = np.array([np.asarray(per_target[k], dtype=np.float64) for k in names])  # (C, T)
    if values.ndim != 2 or values.shape[1] < 2:
        raise ConfigError("a held-out choice needs at least 2 targets")
    a, b = target_halves(values.shape[1], seed)
    pick_a, pick_b = int(np.argmax(values[:, a].mean(axis=1))), int(np.argmax(values[:, b].mean(axis=1)))
    return HeldOutChoice((names[pick_a], names[pick_b]),
                         (float(values[pick_a, b].mean()), float(values[pick_b, a].mean())))


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not objects
class Estimate:
    """One LDS-type figure: the mean over targets of per-target Spearman correlations, with its intervals.

    ``replicates`` (two-way) and ``target_replicates`` (targets only) are the bootstrap values behind the intervals,
    kept for paired comparisons on the same resamples."""

    value: float
    per_target: np.ndarray = field(repr=False)  # (T,)
    ci_targets: tuple[float, float]
    ci_two_way: tuple[float, float]
    replicates: np.ndarray = field(repr=False)  # (B,)
    target_replicates: np.ndarray = field(repr=False)  # (B,)
    n_undefined: int = 0  # targets with a constant prediction or ground truth (counted as 0)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not objects
class LdsResult:
    """Standard (the headline, comparable with the paper) and centered LDS of one score array on one bank."""

    standard: Estimate
    centered: Estimate
    resamples: Resamples = field(repr=False)

    def __getitem__(self, variant: str) -> Estimate:
        if variant not in VARIANTS:
            raise ConfigError(f"unknown LDS variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        return getattr(self, variant)


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of two methods on the same bank and resamples: LDS(a) - LDS(b) with its intervals and the
    two-way bootstrap p-value of "no difference"."""

    a: str
    b: str
    variant: str
    difference: float
    ci_targets: tuple[float, float]
    ci_two_way: tuple[float, float]
    p_two_way: float = 1.0

    @property
    def real(self) -> bool:
        """The two-way (model-aware) interval of the difference excludes 0."""
        return is_real(self.ci_two_way)


def bootstrap_p(replicates: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the difference is 0": twice the share of replicates on the far side of 0 (with
    the usual +1 so that it is never exactly 0), at most 1."""
    b = replicates.size
    tail = min(int((replicates <= 0).sum()), int((replicates >= 0).sum()))
    return min(1.0, 2 * (tail + 1) / (b + 1))


def holm(comparisons: Sequence[Comparison], alpha: float = 1 - CI_LEVEL) -> list[bool]:
    """Which comparisons are real after Holm's correction for testing them all (family-wise error `alpha`): sorted
    by p-value, the i-th smallest (from 0) must have p <= alpha / (n - i), and every one before it too."""
    order = np.argsort([c.p_two_way for c in comparisons], kind="stable")
    out = [False] * len(comparisons)
    for i, k in enumerate(order):
        if comparisons[k].p_two_way > alpha / (len(comparisons) - i):
            break
        out[k] = True
    return out


def _n_undefined(pred: np.ndarray, truth: np.ndarray) -> int:
    """Targets whose prediction or ground truth is constant across subsets (their Spearman counts as 0)."""
    pred, truth = _flatten_constant_columns(pred), _flatten_constant_columns(truth)
    return int(((np.ptp(pred, axis=0) == 0) | (np.ptp(truth, axis=0) == 0)).sum())


def _estimate(per_target_runs: Sequence[np.ndarray], replicate_runs: np.ndarray, res: Resamples,
              undefined: int) -> Estimate:
    """Average over runs (one run for a method; one per seed or noise set for a ceiling) of per-target Spearman."""
    per_target = np.mean(per_target_runs, axis=0)
    target_reps = _matmul(res.targets.astype(np.float64), per_target[:, None])[:, 0] / per_target.size
    replicates = np.mean(replicate_runs, axis=0)
    return Estimate(float(per_target.mean()), per_target, _percentile_ci(target_reps), _percentile_ci(replicates),
                    replicates, target_reps, undefined)


def _pairs_result(pairs: Sequence[tuple[np.ndarray, np.ndarray]], res: Resamples) -> LdsResult:
    """LDS-type result averaged over (prediction, truth) pairs, standard and centered."""
    out = {}
    for variant in VARIANTS:
        prep = center if variant == "centered" else (lambda x: x)
        runs = [(prep(p), prep(t)) for p, t in pairs]
        per_target = [spearman_per_target(p, t) for p, t in runs]
        reps = np.concatenate([_resampled_lds([p], t, res) for p, t in runs])
        out[variant] = _estimate(per_target, reps, res, max(_n_undefined(p, t) for p, t in runs))
    return LdsResult(out["standard"], out["centered"], res)


def _methods_results(preds: Sequence[np.ndarray], fbar: np.ndarray, res: Resamples) -> list[LdsResult]:
    """LDS of several predictions against one ground truth, sharing the truth's resampled ranks."""
    per_variant = {}
    for variant in VARIANTS:
        prep = center if variant == "centered" else (lambda x: x)
        ps, truth = [prep(p) for p in preds], prep(fbar)
        reps = _resampled_lds(ps, truth, res)
        per_variant[variant] = [_estimate([spearman_per_target(p, truth)], reps[k:k + 1], res,
                                          _n_undefined(p, truth)) for k, p in enumerate(ps)]
    return [LdsResult(s, c, res) for s, c in zip(per_variant["standard"], per_variant["centered"])]


# ----------------------------------------------------------------------------------------------------------------
# Public API


def _prepare(masks, F, n_resamples, seed, resamples):
    masks, F = check_bank(masks, F)
    m, t = masks.shape[0], F.shape[3]
    if resamples is None:
        resamples = Resamples.draw(m, t, n_resamples, seed)
    resamples.check(m, t)
    return masks, F, resamples


def lds(scores: np.ndarray, masks: np.ndarray, F: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
        resamples: Resamples | None = None) -> LdsResult:
    """Standard and centered LDS of one (T, N) score array on a bank, with target and two-way 95% intervals.

    Pass the same ``resamples`` (or seed) to several calls to compare their replicates pairwise (`compare`)."""
    masks, F, res = _prepare(masks, F, n_resamples, seed, resamples)
    scores = check_scores(scores, F.shape[3], masks.shape[1])
    return _methods_results([predictions(scores, masks)], ground_truth(F), res)[0]


def compare(a: LdsResult, b: LdsResult, names: tuple[str, str] = ("a", "b")) -> dict[str, Comparison]:
    """Paired difference a - b for both variants, from the replicates of the same resamples."""
    ra, rb = a.resamples, b.resamples
    if ra is not rb and not (np.array_equal(ra.subsets, rb.subsets) and np.array_equal(ra.targets, rb.targets)):
        raise ConfigError("a paired comparison needs both LDS results computed on the same resamples "
                          "(pass the same seed or Resamples)")
    out = {}
    for variant in VARIANTS:
        ea, eb = a[variant], b[variant]
        out[variant] = Comparison(names[0], names[1], variant, ea.value - eb.value,
                                  _percentile_ci(ea.target_replicates - eb.target_replicates),
                                  _percentile_ci(ea.replicates - eb.replicates),
                                  bootstrap_p(ea.replicates - eb.replicates))
    return out


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not objects
class Ceilings:
    """Noise ceilings of a bank (None where the bank has a single seed / noise set)."""

    seed: LdsResult | None  # one seed's F vs the mean of the others (needs S >= 2): a lower ceiling
    noise: LdsResult | None  # one noise set's F vs the mean of the others (needs R >= 2)
    reachable: LdsResult | None = None  # a perfect predictor vs the S-seed mean (Spearman-Brown; needs S >= 2)


REACHABLE = "reachable (perfect predictor)"
SEED_CEILING = "seed-vs-seed ceiling (lower)"
SINGLE_SEED = ("the bank has a single retraining seed, so it has no seed ceiling and no reachable LDS (how well a "
               "perfect method could do); grow it with --seeds 2")


def spearman_brown(r: np.ndarray, n_seeds: int) -> np.ndarray:
    """The correlation of a perfect predictor with the mean of `n_seeds` replicates whose pairwise correlation is
    r: sqrt(S r / (1 + (S - 1) r)), r clipped to [0, 1] (a negative seed-vs-seed correlation leaves nothing to
    predict)."""
    r = np.clip(np.asarray(r, dtype=np.float64), 0.0, 1.0)
    return np.sqrt(n_seeds * r / (1.0 + (n_seeds - 1) * r))


def _reachable(per_seed: np.ndarray, res: Resamples) -> LdsResult:
    """The reachable ceiling of a bank's (M, S, T) per-seed F: Spearman-Brown of the seed-vs-seed Spearman averaged
    over seed pairs and targets; inside every two-way resample likewise (targets resampled by their counts). The
    per-target values are each target's r through the same transform (for the per-target figure only)."""
    n_seeds, t = per_seed.shape[1], per_seed.shape[2]
    pairs = list(combinations(range(n_seeds), 2))
    out = {}
    for variant in VARIANTS:
        prep = center if variant == "centered" else (lambda x: x)
        runs = [(prep(per_seed[:, a]), prep(per_seed[:, b])) for a, b in pairs]
        r = np.mean([spearman_per_target(x, y) for x, y in runs], axis=0)  # (T,)
        rho = np.mean([_resampled_lds([x], y, res, per_target=True)[0] for x, y in runs], axis=0)  # (B, T)
        replicates = spearman_brown((rho * res.targets).sum(axis=1) / t, n_seeds)
        target_replicates = spearman_brown(_matmul(res.targets.astype(np.float64), r[:, None])[:, 0] / t, n_seeds)
        out[variant] = Estimate(float(spearman_brown(r.mean(), n_seeds)), spearman_brown(r, n_seeds),
                                _percentile_ci(target_replicates), _percentile_ci(replicates), replicates,
                                target_replicates)
    return LdsResult(out["standard"], out["centered"], res)


def ceilings(F: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
             resamples: Resamples | None = None) -> Ceilings:
    """Seed-vs-seed (lower), reachable and noise-vs-noise ceilings, standard and centered, with the same intervals
    as a method."""
    F = check_outputs(F)
    if resamples is None:
        resamples = Resamples.draw(F.shape[0], F.shape[3], n_resamples, seed)
    resamples.check(F.shape[0], F.shape[3])
    _, s_count, r_count, _ = F.shape
    seed_result = noise_result = reachable = None
    if s_count >= 2:
        per_seed = F.mean(axis=2)  # (M, S, T)
        pairs = [(per_seed[:, s], np.delete(per_seed, s, axis=1).mean(axis=1)) for s in range(s_count)]
        pairs = pairs[:1] if s_count == 2 else pairs  # with two runs the second pair is the first one swapped
        seed_result = _pairs_result(pairs, resamples)
        reachable = _reachable(per_seed, resamples)
    if r_count >= 2:
        per_noise = F.mean(axis=1)  # (M, R, T)
        pairs = [(per_noise[:, r], np.delete(per_noise, r, axis=1).mean(axis=1)) for r in range(r_count)]
        pairs = pairs[:1] if r_count == 2 else pairs
        noise_result = _pairs_result(pairs, resamples)
    return Ceilings(seed_result, noise_result, reachable)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not objects
class RandomBaseline:
    """LDS of seeded random scores: i.i.d. normal per (target, image), and target-agnostic (one normal value per
    image shared by all targets; its centered LDS is 0 by construction, so only the standard one is kept)."""

    standard_draws: np.ndarray  # (n_draws,)
    centered_draws: np.ndarray  # (n_draws,)
    shared_standard_draws: np.ndarray  # (n_draws,)

    @property
    def standard(self) -> float:
        return float(self.standard_draws.mean())

    @property
    def centered(self) -> float:
        return float(self.centered_draws.mean())

    @staticmethod
    def spread(draws: np.ndarray) -> tuple[float, float]:
        """Central 95% of the draws: the LDS range a method with no information reaches by chance on this bank."""
        return _percentile_ci(draws)


def random_baseline(masks: np.ndarray, F: np.ndarray, n_draws: int = DEFAULT_RANDOM_DRAWS,
                    seed: int = 0) -> RandomBaseline:
    """Point LDS (standard and centered) of ``n_draws`` random score arrays, seeded.

    The predictions are drawn directly from their exact distribution instead of through (T, N) score arrays: for
    i.i.d. N(0, 1) scores each target's prediction column ``masks @ -z`` is N(0, C) with C = masks masks^T (the subset
    overlaps), independently across targets; for target-agnostic scores one such column serves every target. Drawing
    A w with A A^T = C and w standard normal costs O(M^2 T) instead of O(M N T) per draw."""
    masks, F = check_bank(masks, F)
    n_draws = _check_count(n_draws, "the number of random draws", 1)
    rng = np.random.default_rng(seed)
    m, t = masks.shape[0], F.shape[3]
    overlap = masks.astype(np.float64) @ masks.T.astype(np.float64)
    evals, evecs = np.linalg.eigh(overlap)
    root = evecs * np.sqrt(np.clip(evals, 0.0, None))  # root @ root.T = overlap
    fbar = ground_truth(F)
    z_std, z_cen = _zranks(fbar), _zranks(center(fbar))
    std, cen, shared = np.empty(n_draws), np.empty(n_draws), np.empty(n_draws)
    for k in range(n_draws):
        g = _matmul(root, rng.standard_normal((m, t)))
        std[k] = (_zranks(g) * z_std).sum(axis=0).mean()
        cen[k] = (_zranks(center(g)) * z_cen).sum(axis=0).mean()
        g_shared = np.repeat(_matmul(root, rng.standard_normal((m, 1))), t, axis=1)
        shared[k] = (_zranks(g_shared) * z_std).sum(axis=0).mean()
    return RandomBaseline(std, cen, shared)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not objects
class LdsTable:
    """Every method's standard and centered LDS on one bank, with the bank's ceilings, random baseline and
    common-mode share; all methods share one set of resamples, so any two can be compared pairwise."""

    methods: dict[str, LdsResult]
    ceilings: Ceilings
    random: RandomBaseline
    common_mode_share: float
    shape: dict[str, int]  # subsets, seeds, noise_sets, targets, images

    def compare(self, a: str, b: str) -> dict[str, Comparison]:
        for name in (a, b):
            if name not in self.methods:
                raise ConfigError(f"no method {name!r} in this table; it has {', '.join(self.methods)}")
        return compare(self.methods[a], self.methods[b], (a, b))

    def of_reachable(self, name: str, variant: str = "standard") -> tuple[float, tuple[float, float]] | None:
        """A method's LDS as a fraction of the reachable ceiling, with its two-way interval (the ratio in every
        resample: both share them); None when the bank has no reachable ceiling (a single seed) or it is not
        positive."""
        reach = self.ceilings.reachable
        if reach is None or reach[variant].value <= 0:
            return None
        est = self.methods[name][variant]
        ratio = np.divide(est.replicates, reach[variant].replicates, out=np.full(est.replicates.shape, np.nan),
                          where=reach[variant].replicates > 0)
        return est.value / reach[variant].value, _percentile_ci(ratio[np.isfinite(ratio)])

    def best_held_out(self, variant: str = "standard", seed: int = 0) -> HeldOutChoice:
        """The best method chosen on one half of the targets, its LDS reported on the other half (both ways)."""
        return choose_held_out({k: r[variant].per_target for k, r in self.methods.items()}, seed)

    def differences(self, variant: str = "standard") -> list[Comparison]:
        """Paired comparisons of every pair of methods, the higher-scoring one first."""
        out = []
        for a, b in combinations(self.methods, 2):
            if self.methods[b][variant].value > self.methods[a][variant].value:
                a, b = b, a
            out.append(self.compare(a, b)[variant])
        return out

    def rows(self) -> list[dict]:
        """Plain rows for display and CSV: the methods, the ceilings, the random baselines. Columns: ``name``,
        ``kind`` (method / ceiling / random), and per variant its value and interval bounds
        (``standard_ci_targets_low`` ... ``centered_ci_two_way_high``). For random rows the two-way columns hold the
        central 95% of the random draws (chance level) and the target columns are NaN."""
        nan2 = (float("nan"), float("nan"))

        def cols(variant: str, value: float, ci_targets: tuple[float, float], ci_two_way: tuple[float, float]) -> dict:
            return {variant: value, f"{variant}_ci_targets_low": ci_targets[0],
                    f"{variant}_ci_targets_high": ci_targets[1], f"{variant}_ci_two_way_low": ci_two_way[0],
                    f"{variant}_ci_two_way_high": ci_two_way[1]}

        def result_row(name: str, kind: str, r: LdsResult) -> dict:
            return {"name": name, "kind": kind,
                    **{k: v for variant in VARIANTS for k, v in cols(variant, r[variant].value, r[variant].ci_targets,
                                                                     r[variant].ci_two_way).items()}}

        rows = [result_row(name, "method", r) for name, r in self.methods.items()]
        for name, r in ((REACHABLE, self.ceilings.reachable), (SEED_CEILING, self.ceilings.seed),
                        ("noise-vs-noise ceiling", self.ceilings.noise)):
            if r is not None:
                rows.append(result_row(name, "ceiling", r))
        rnd, spread = self.random, RandomBaseline.spread
        rows.append({"name": "random scores", "kind": "random",
                     **cols("standard", rnd.standard, nan2, spread(rnd.standard_draws)),
                     **cols("centered", rnd.centered, nan2, spread(rnd.centered_draws))})
        rows.append({"name": "random target-agnostic scores", "kind": "random",
                     **cols("standard", float(rnd.shared_standard_draws.mean()), nan2,
                            spread(rnd.shared_standard_draws)),
                     **cols("centered", 0.0, nan2, (0.0, 0.0))})
        return rows


def evaluate(named_scores: Mapping[str, np.ndarray], masks: np.ndarray, F: np.ndarray,
             n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, n_random: int = DEFAULT_RANDOM_DRAWS) -> LdsTable:
    """The whole LDS table of a bank: each named (T, N) score array, the ceilings, random and common-mode share.

    For random rows the interval columns hold the central 95% of the random draws' LDS (chance level spread)."""
    masks, F, res = _prepare(masks, F, n_resamples, seed, None)
    t, n = F.shape[3], masks.shape[1]
    preds = [predictions(check_scores(s, t, n, name=f"scores of {name!r}"), masks) for name, s in named_scores.items()]
    results = _methods_results(preds, ground_truth(F), res) if preds else []
    m, s_count, r_count, _ = F.shape
    return LdsTable(dict(zip(named_scores, results)), ceilings(F, resamples=res),
                    random_baseline(masks, F, n_random, seed), common_mode_share(F),
                    {"subsets": m, "seeds": s_count, "noise_sets": r_count, "targets": t, "images": n})


# ----------------------------------------------------------------------------------------------------------------
# LDS at many lambdas (or any family of score arrays)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not objects
class SpectralScores:
    """Scores in the TRAK kernel's eigenbasis (attribution/kernel.py): scores(lam) = (coords * w) @ U.T with
    w = sigma / (sigma^2 + lam). Build it from a `Kernel` and target features G as
    ``SpectralScores(kernel.U, kernel.sigma, kernel.coords(G))``. The predictions at any lambda then cost one
    (M, r) @ (r, T) product, since masks @ U is computed once."""

    U: np.ndarray  # (N, r)
    sigma: np.ndarray  # (r,)
    coords: np.ndarray  # (T, r)

    def check(self, n_targets: int, n_images: int) -> None:
        r = self.sigma.shape[0]
        if self.U.shape != (n_images, r) or self.coords.shape != (n_targets, r):
            raise ConfigError(f"spectral scores of shape U {self.U.shape}, sigma {self.sigma.shape}, coords "
                              f"{self.coords.shape} do not fit a bank of {n_targets} targets x {n_images} images")
        if not all(np.isfinite(a).all() for a in (self.U, self.sigma, self.coords)):
            raise ConfigError("spectral scores contain NaN or infinite values")

    def weights(self, lam: float) -> np.ndarray:
        if not (np.isscalar(lam) and np.isfinite(lam) and lam > 0):
            raise ConfigError(f"lambda must be a positive number, got {lam}")
        return self.sigma / (self.sigma**2 + lam)

    def scores(self, lam: float) -> np.ndarray:
        return (self.coords * self.weights(lam)) @ self.U.T


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not objects
class Sweep:
    """LDS along a family of score arrays (e.g. over lambda). Intervals are over targets; two-way ones only when
    asked for (they cost a bootstrap per point)."""

    lambdas: np.ndarray | None  # (L,), None for an unlabelled list of score arrays
    standard: np.ndarray  # (L,)
    centered: np.ndarray  # (L,)
    standard_ci_targets: np.ndarray  # (L, 2)
    centered_ci_targets: np.ndarray  # (L, 2)
    standard_ci_two_way: np.ndarray | None = None  # (L, 2)
    centered_ci_two_way: np.ndarray | None = None  # (L, 2)
    standard_per_target: np.ndarray | None = field(default=None, repr=False)  # (L, T)
    centered_per_target: np.ndarray | None = field(default=None, repr=False)  # (L, T)

    def best_held_out(self, variant: str = "standard", seed: int = 0) -> HeldOutChoice:
        """The point (λ) chosen on one half of the targets, its LDS reported on the other half (both ways)."""
        per_target = getattr(self, f"{variant}_per_target")
        labels = range(len(per_target)) if self.lambdas is None else self.lambdas.tolist()
        return choose_held_out(dict(zip(labels, per_target)), seed)

    def best(self, variant: str = "standard") -> int:
        """Index of the highest LDS."""
        if variant not in VARIANTS:
            raise ConfigError(f"unknown LDS variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        return int(np.argmax(getattr(self, variant)))


def lds_sweep(source: Sequence[np.ndarray] | Callable[[float], np.ndarray] | SpectralScores, masks: np.ndarray,
              F: np.ndarray, lambdas: Sequence[float] | None = None, n_resamples: int = DEFAULT_RESAMPLES,
              seed: int = 0, two_way: bool = False) -> Sweep:
    """LDS at many points of a family of scores, reusing the ground truth's ranks (and, for `SpectralScores`, the
    mask-projected eigenvectors). ``source`` is a list of (T, N) score arrays (``lambdas`` optional labels), a
    callable lam -> scores, or `SpectralScores`; the last two need ``lambdas``."""
    masks, F, res = _prepare(masks, F, n_resamples, seed, None)
    t, n = F.shape[3], masks.shape[1]
    if callable(source) or isinstance(source, SpectralScores):
        if lambdas is None or len(lambdas) == 0:
            raise ConfigError("a sweep over a score function needs a non-empty list of lambdas")
        if isinstance(source, SpectralScores):
            source.check(t, n)
            projected = -_matmul(masks.astype(np.float64), source.U)  # (M, r): masks @ (-U), once
            preds = (_matmul(projected * source.weights(lam), source.coords.T) for lam in lambdas)
        else:
            preds = (predictions(check_scores(source(lam), t, n, name=f"scores at lambda={lam}"), masks)
                     for lam in lambdas)
    else:
        if len(source) == 0:
            raise ConfigError("a sweep needs at least one score array")
        if lambdas is not None and len(lambdas) != len(source):
            raise ConfigError(f"{len(lambdas)} lambdas for {len(source)} score arrays")
        preds = (predictions(check_scores(s, t, n, name=f"scores #{k}"), masks) for k, s in enumerate(source))
    fbar = ground_truth(F)
    z = {"standard": _zranks(fbar), "centered": _zranks(center(fbar))}
    per_target = {v: [] for v in VARIANTS}
    kept = []
    for g in preds:
        if not np.isfinite(g).all():
            raise ConfigError("the scores give non-finite predictions (NaN or overflow)")
        per_target["standard"].append((_zranks(g) * z["standard"]).sum(axis=0))
        per_target["centered"].append((_zranks(center(g)) * z["centered"]).sum(axis=0))
        if two_way:
            kept.append(g)
    values = {v: np.array([p.mean() for p in per_target[v]]) for v in VARIANTS}
    targets = res.targets.astype(np.float64)
    ci_t = {v: np.array([_percentile_ci(_matmul(targets, p[:, None])[:, 0] / t) for p in per_target[v]])
            for v in VARIANTS}
    ci_w = {v: None for v in VARIANTS}
    if two_way:
        fb = {"standard": fbar, "centered": center(fbar)}
        for v in VARIANTS:
            ps = kept if v == "standard" else [center(g) for g in kept]
            ci_w[v] = np.array([_percentile_ci(r) for r in _resampled_lds(ps, fb[v], res)])
    lam_arr = None if lambdas is None else np.asarray(lambdas, dtype=np.float64)
    return Sweep(lam_arr, values["standard"], values["centered"], ci_t["standard"], ci_t["centered"],
                 ci_w["standard"], ci_w["centered"], np.array(per_target["standard"]),
                 np.array(per_target["centered"]))
