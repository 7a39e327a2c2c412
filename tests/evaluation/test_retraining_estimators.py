"""Empirical Influence and Datamodels (evaluation/retraining_estimators.py) on synthetic linear problems, against
direct computations, and their held-out LDS on a hand-made bank."""

from __future__ import annotations

import numpy as np
import pytest

from attribution.errors import ConfigError
from attribution.evaluation.retraining_estimators import (datamodels, empirical_influence, estimator_scores,
                                                          heldout_lds_table, holdout_split, ridge_loo_errors)


def linear_problem(m=600, n=12, t=3, noise=0.05, seed=0):
    """Independent Bernoulli(1/2) masks and F = b + masks @ w + noise: the true per-image effect on the loss is w."""
    rng = np.random.default_rng(seed)
    masks = rng.random((m, n)) < 0.5
    w = rng.normal(size=(n, t))
    F = 3.0 + masks @ w + rng.normal(scale=noise, size=(m, t))
    return masks, w, F


def test_empirical_influence_is_the_difference_in_means_and_recovers_the_effects():
    masks, w, F = linear_problem()
    ei, undefined = empirical_influence(masks, F)
    assert undefined == 0 and ei.shape == (3, 12)
    for i in range(12):  # a direct computation, one image at a time
        for t in range(3):
            expected = F[~masks[:, i], t].mean() - F[masks[:, i], t].mean()
            assert ei[t, i] == pytest.approx(expected, abs=1e-12)
    # With independent masks E[F | in] - E[F | out] = w exactly, so -EI estimates w with the standard error of a
    # difference of two means; 4.5 standard errors bound all 36 errors with probability > 0.9997.
    se = np.array([[np.sqrt(F[masks[:, i], t].var(ddof=1) / masks[:, i].sum()
                            + F[~masks[:, i], t].var(ddof=1) / (~masks[:, i]).sum()) for i in range(12)]
                   for t in range(3)])
    assert np.all(np.abs(-ei - w.T) < 4.5 * se)
    assert np.corrcoef(-ei.ravel(), w.T.ravel())[0, 1] > 0.97


def test_empirical_influence_scores_zero_where_an_image_is_always_in():
    masks, _, F = linear_problem(m=20)
    masks[:, 4] = True
    ei, undefined = empirical_influence(masks, F)
    assert undefined == 1 and np.all(ei[:, 4] == 0)


def test_datamodels_recover_the_coefficients():
    masks, w, F = linear_problem()
    dm, lam = datamodels(masks, F)
    # OLS error here is noise / sqrt(M / 4) ~ 0.004 per coefficient; ridge at the LOO-chosen lambda adds a small
    # shrinkage: 0.03 is ~7 standard errors.
    assert np.max(np.abs(-dm - w.T)) < 0.03
    assert lam.shape == (3,) and np.all(lam > 0)


def test_ridge_leave_one_out_formula_matches_explicit_refits():
    masks, _, F = linear_problem(m=25, n=8, t=2, noise=0.5, seed=1)
    lam = 3.0
    closed = ridge_loo_errors(masks, F, np.array([lam]))[0]
    X = masks.astype(float)
    errs = np.zeros(2)
    for i in range(len(X)):  # refit without subset i: intercept unpenalised, ridge on the mask coefficients
        keep = np.arange(len(X)) != i
        A = np.c_[np.ones(keep.sum()), X[keep]]
        P = np.diag([0.0] + [lam] * X.shape[1])
        theta = np.linalg.solve(A.T @ A + P, A.T @ F[keep])
        errs += (F[i] - np.r_[1.0, X[i]] @ theta) ** 2
    np.testing.assert_allclose(closed, errs / len(X), rtol=1e-8)


def test_holdout_split_and_bad_input():
    fit, held = holdout_split(10)
    assert len(fit) == 5 and len(held) == 5 and not set(fit) & set(held)
    assert set(fit) | set(held) == set(range(10))
    with pytest.raises(ConfigError, match="too few"):
        holdout_split(4)
    with pytest.raises(ConfigError, match="within"):
        holdout_split(10, 1.0)
    masks, _, F = linear_problem(m=10)
    with pytest.raises(ConfigError, match="unknown retraining estimator"):
        estimator_scores(masks, F[:, None, None, :], np.arange(5), ("nope",))


def test_heldout_lds_uses_only_the_held_out_subsets(fake_bank_dir):
    """On the hand-made bank (F linear in the masks plus noise) both estimators predict the held-out subsets, and
    the table is the LDS computed directly on those subsets."""
    from attribution.evaluation.bank import Bank
    from attribution.evaluation.lds import lds

    bank = Bank.load(fake_bank_dir)
    table, note = heldout_lds_table(bank, {}, "val", n_resamples=20)
    fit, held = np.array(note["fit_subsets"]), np.array(note["heldout_subsets"])
    assert len(fit) == 8 and len(held) == 8 and not set(fit) & set(held)
    scores = estimator_scores(bank.masks, bank.F, fit)
    rows = np.flatnonzero(bank.split("val"))
    direct = lds(scores["ei"][rows], bank.masks[held], bank.F[held][..., rows], n_resamples=20)
    assert table.methods["Empirical Influence"].standard.value == pytest.approx(direct.standard.value)
    assert set(table.methods) == {"Empirical Influence", "Datamodels"}
