"""Retraining-based attribution (D-TRAK paper, Tables 7-8): estimators fitted on a bank's own subset models.

Both read the bank's ground truth: masks (M, N) and Fbar (M, T), the Simple loss of each target under each subset
model averaged over seeds and noise sets (`lds.ground_truth`). Scores follow the project's sign convention
(positive = proponent: the image lowers the target's loss).

- **Empirical Influence** (Feldman & Zhang 2020, the paper's appendix A.3): the difference in means
  ``E[F | image out] - E[F | image in]`` over the fitting subsets (the paper writes in - out for a loss, whose
  proponents are negative; the sign is flipped here). An image that is in every fitting subset, or in none, has no
  estimate and scores 0 (`n_undefined`).
- **Datamodels** (Ilyas et al. 2022): a regularised linear regression ``F ~ b + masks @ w`` per target, fitted on
  the fitting subsets; the score is ``-w``. Ilyas et al. use an L1 penalty; here the penalty is ridge (L2), solved
  in closed form in the (M x M) dual with an unpenalised intercept, and lambda is chosen per target from a grid by
  exact leave-one-out cross-validation on the fitting subsets (the hat matrix is ``J/M + Kc (Kc + lambda I)^-1``
  with Kc the centred mask kernel, so the LOO residuals are ``r_i / (1 - H_ii)``). Never tuned on held-out subsets.

Evaluated by LDS on the **held-out** subsets only (`holdout_split`, `heldout_lds_table`): the subsets used to fit an
estimator are never used to score it, and every other method compared with it is scored on the same held-out
subsets. With M subsets in a bank, both estimators see about M/2 models: the paper's Tables 7-8 use 64-512.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import ConfigError
from .evaluate import split_rows
from .lds import LdsTable, evaluate, ground_truth

ESTIMATORS = {"ei": "Empirical Influence", "datamodels": "Datamodels"}
LAMBDA_GRID = np.logspace(-3, 4, 29)  # relative to the mean diagonal of the centred mask kernel
SPLIT_SEED = 0


def empirical_influence(masks: np.ndarray, fbar: np.ndarray) -> tuple[np.ndarray, int]:
    """(T, N) scores mean_out - mean_in of `fbar` (M, T) over `masks` (M, N), and the number of images without an
    estimate (always in or always out: score 0)."""
    masks = np.asarray(masks, dtype=bool)
    fbar = np.asarray(fbar, dtype=np.float64)
    n_in = masks.sum(0).astype(np.float64)
    n_out = masks.shape[0] - n_in
    sum_in = masks.T.astype(np.float64) @ fbar  # (N, T)
    sum_out = fbar.sum(0)[None, :] - sum_in
    ok = (n_in > 0) & (n_out > 0)
    scores = np.zeros((masks.shape[1], fbar.shape[1]))
    scores[ok] = sum_out[ok] / n_out[ok, None] - sum_in[ok] / n_in[ok, None]
    return scores.T, int((~ok).sum())


def _dual(masks: np.ndarray, fbar: np.ndarray):
    X = np.asarray(masks, dtype=np.float64)
    y = np.asarray(fbar, dtype=np.float64)
    Xc, yc = X - X.mean(0), y - y.mean(0)
    K = Xc @ Xc.T
    evals, evecs = np.linalg.eigh(K)
    scale = max(float(np.trace(K)) / X.shape[0], 1e-12)
    return Xc, yc, np.clip(evals, 0, None), evecs, evecs.T @ yc, scale


def ridge_loo_errors(masks: np.ndarray, fbar: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """(L, T) mean squared leave-one-out residuals of the ridge datamodel at each absolute lambda (closed form)."""
    _, yc, evals, evecs, uy, _ = _dual(masks, fbar)
    m = yc.shape[0]
    out = []
    for lam in np.atleast_1d(lambdas):
        shrink = evals / (evals + lam)
        h = ((evecs * shrink) * evecs).sum(1) + 1.0 / m  # diag of the hat matrix, intercept included
        resid = yc - evecs @ (shrink[:, None] * uy)
        out.append(((resid / (1.0 - h)[:, None]) ** 2).mean(0))
    return np.array(out)


def datamodels(masks: np.ndarray, fbar: np.ndarray, grid: np.ndarray = LAMBDA_GRID,
               ) -> tuple[np.ndarray, np.ndarray]:
    """(T, N) ridge datamodel scores (-w) and the (T,) lambda chosen per target by exact leave-one-out CV over
    `grid` (relative to the mean diagonal of the centred mask kernel)."""
    if np.asarray(masks).shape[0] < 3:
        raise ConfigError(f"Datamodels need at least 3 fitting subsets (leave-one-out CV), got {len(masks)}")
    Xc, _, evals, evecs, uy, scale = _dual(masks, fbar)
    lambdas = np.asarray(grid, dtype=np.float64) * scale
    best = lambdas[np.argmin(ridge_loo_errors(masks, fbar, lambdas), axis=0)]  # (T,)
    alpha = np.stack([evecs @ (uy[:, t] / (evals + best[t])) for t in range(uy.shape[1])], axis=1)  # (M, T)
    return -(Xc.T @ alpha).T, best


def holdout_split(n_subsets: int, fit_fraction: float = 0.5, seed: int = SPLIT_SEED,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows) of a bank's finished subsets: a seeded random split, both sorted."""
    if not 0 < fit_fraction < 1:
        raise ConfigError(f"the fitting fraction must be within (0, 1), got {fit_fraction}")
    n_fit = int(round(fit_fraction * n_subsets))
    if n_fit < 3 or n_subsets - n_fit < 2:
        raise ConfigError(f"{n_subsets} finished subsets are too few to fit retraining estimators on "
                          f"{n_fit} and evaluate them on {n_subsets - n_fit} held-out ones (need at least 3 and 2); "
                          "grow the bank (`python -m attribution bank build --subsets ...`)")
    perm = np.random.default_rng(seed).permutation(n_subsets)
    return np.sort(perm[:n_fit]), np.sort(perm[n_fit:])


def estimator_scores(masks: np.ndarray, F: np.ndarray, fit_rows: np.ndarray,
                     names: tuple[str, ...] = tuple(ESTIMATORS)) -> dict[str, np.ndarray]:
    """{name: (T, N) scores} fitted on rows `fit_rows` of a bank's (masks (M, N), F (M, S, R, T))."""
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown:
        raise ConfigError(f"unknown retraining estimator {unknown[0]!r}; use: {', '.join(ESTIMATORS)}")
    fit_rows = np.asarray(fit_rows)
    fbar = ground_truth(F[fit_rows])
    out = {}
    if "ei" in names:
        out["ei"] = empirical_influence(masks[fit_rows], fbar)[0]
    if "datamodels" in names:
        out["datamodels"] = datamodels(masks[fit_rows], fbar)[0]
    return out


def heldout_lds_table(bank, named_scores: Mapping[str, np.ndarray], split: str = "val",
                      fit_fraction: float = 0.5, seed: int = SPLIT_SEED, estimators: tuple[str, ...] =
                      tuple(ESTIMATORS), n_resamples: int = 1000) -> tuple[LdsTable, dict]:
    """LDS of the retraining estimators (fitted on one part of the bank's finished subsets) beside any other
    (T, N) scores, all on the held-out subsets only; returns the table and a note of the split."""

    done = bank.finished()
    fit, held = holdout_split(len(done.masks), fit_fraction, seed)
    rows = split_rows(bank, split)
    fitted = estimator_scores(done.masks, done.F, fit, estimators)
    named = {ESTIMATORS[k]: v for k, v in fitted.items()} | dict(named_scores)
    table = evaluate({k: np.asarray(v)[rows] for k, v in named.items()}, done.masks[held], done.F[held][..., rows],
                     n_resamples=n_resamples)
    ei_undefined = empirical_influence(done.masks[fit], ground_truth(done.F[fit]))[1] if "ei" in estimators else 0
    return table, {"fit_subsets": fit.tolist(), "heldout_subsets": held.tolist(), "ei_undefined": ei_undefined}
