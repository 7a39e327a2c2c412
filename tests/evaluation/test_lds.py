"""LDS statistics (attribution/evaluation/lds.py) against direct computations.

Every figure is checked against `scipy.stats.spearmanr` on explicitly built arrays (or against a hand computation),
every bootstrap replicate against the same statistic recomputed on the explicitly resampled bank, and the intervals
by their coverage of a known value over repeated synthetic banks. Synthetic banks follow the shared conventions:
scores (T, N), positive = proponent; masks (M, N) bool; F (M, S, R, T), a loss (lower = better fit).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.stats import spearmanr

from attribution.errors import ConfigError
from attribution.evaluation import lds as L


def _linear_bank(rng, m=16, n=40, t=30, seeds=1, noises=1, noise=0.0, common=0.0):
    """F[j, :, :, t] = sum_{i in S_j} effect[t, i] + common * e_j + noise: effect[t, i] is how much image i raises
    target t's loss, so the ideal scores (positive = lowers the loss) are -effect."""
    masks = rng.random((m, n)) < 0.5
    effect = rng.standard_normal((t, n))
    F = (masks.astype(float) @ effect.T)[:, None, None, :] + common * rng.standard_normal((m, 1, 1, 1))
    F = F + noise * rng.standard_normal((m, seeds, noises, t))
    return masks, F, effect


def _direct_lds(scores, masks, F, centered=False):
    """The definition, written out: D-TRAK's mask @ (-scores).T against F averaged over seeds and noise sets."""
    g = masks.astype(float) @ (-scores).T
    fbar = F.mean(axis=(1, 2))
    if centered:
        g, fbar = g - g.mean(axis=1, keepdims=True), fbar - fbar.mean(axis=1, keepdims=True)
    return np.mean([spearmanr(g[:, k], fbar[:, k]).statistic for k in range(g.shape[1])])


def test_hand_computed_example():
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]], bool)  # 3 subsets x 4 images
    scores = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, -1.0, 0.0, 2.0]])  # 2 targets
    # g = masks @ -scores.T: target 0 -> (-3, -5, -8), ranks (3, 2, 1); target 1 -> (-3, 1, -6), ranks (2, 3, 1)
    F = np.zeros((3, 2, 1, 2))
    F[:, 0, 0, 0], F[:, 1, 0, 0] = [1.0, 0.5, 0.2], [1.2, 0.3, 0.4]  # mean (1.1, 0.4, 0.3): ranks (3, 2, 1)
    F[:, 0, 0, 1], F[:, 1, 0, 1] = [0.9, 0.5, 0.3], [0.7, 0.7, 0.5]  # mean (0.8, 0.6, 0.4): ranks (3, 2, 1)
    r = L.lds(scores, masks, F, n_resamples=50)
    # target 0: identical ranks -> 1; target 1: d = (1, -1, 0), rho = 1 - 6 * 2 / (3 * 8) = 0.5
    np.testing.assert_allclose(r.standard.per_target, [1.0, 0.5], atol=1e-12)
    assert r.standard.value == pytest.approx(0.75, abs=1e-12)
    # centered: Fbar rows minus their means -> target 0 (0.15, -0.1, -0.05), g rows -> target 0 (0, -3, -1): same
    # ranks (3, 1, 2); with two targets target 1 is the negative of target 0 on both sides -> 1 as well
    np.testing.assert_allclose(r.centered.per_target, [1.0, 1.0], atol=1e-12)
    assert r.standard.value == pytest.approx(_direct_lds(scores, masks, F), abs=1e-12)


def test_matches_dattri_formulation_and_scipy():
    rng = np.random.default_rng(0)
    masks, F, effect = _linear_bank(rng, seeds=3, noises=2, noise=2.0, common=1.0)
    scores = -effect + rng.standard_normal(effect.shape)
    r = L.lds(scores, masks, F, n_resamples=20)
    # dattri: lds(score (n_train, n_test), (gt (n_subsets, n_test), subset indices)), predictions = sum of score over
    # each subset's indices; our convention passes score = -scores.T
    score_dattri, gt = -scores.T, F.mean(axis=(1, 2))
    sums = np.stack([score_dattri[np.flatnonzero(row)].sum(axis=0) for row in masks])
    dattri = [spearmanr(sums[:, k], gt[:, k]).statistic for k in range(gt.shape[1])]
    np.testing.assert_allclose(r.standard.per_target, dattri, atol=1e-12)
    assert r.centered.value == pytest.approx(_direct_lds(scores, masks, F, centered=True), abs=1e-12)
    assert r.standard.n_undefined == r.centered.n_undefined == 0


def test_sign_convention_true_effects_give_one_negated_minus_one():
    rng = np.random.default_rng(1)
    masks, F, effect = _linear_bank(rng)  # exactly linear, no noise
    assert L.lds(-effect, masks, F, n_resamples=20).standard.value == pytest.approx(1.0, abs=1e-12)
    assert L.lds(effect, masks, F, n_resamples=20).standard.value == pytest.approx(-1.0, abs=1e-12)
    assert L.lds(-effect, masks, F, n_resamples=20).centered.value == pytest.approx(1.0, abs=1e-12)


def test_bootstrap_replicates_equal_direct_recomputation_on_resampled_bank():
    rng = np.random.default_rng(2)
    masks, F, effect = _linear_bank(rng, m=9, t=12, seeds=2, noise=1.0, common=1.0)
    F[4] = F[6]  # tied subsets in the ground truth
    scores = -effect + rng.standard_normal(effect.shape)
    scores[:, 1] = scores[:, 0]
    r = L.lds(scores, masks, F, n_resamples=30, seed=5)
    g, fbar = L.predictions(scores, masks), L.ground_truth(F)
    for b in range(10):
        subsets, targets = r.resamples.indices(b)
        for variant, prep in (("standard", lambda x: x), ("centered", L.center)):
            gb, fb = prep(g)[subsets][:, targets], prep(fbar)[subsets][:, targets]
            direct = np.mean([spearmanr(gb[:, k], fb[:, k]).statistic for k in range(len(targets))])
            assert r[variant].replicates[b] == pytest.approx(direct, abs=1e-9)
        # the target-only replicate keeps all subsets
        assert r.standard.target_replicates[b] == pytest.approx(r.standard.per_target[targets].mean(), abs=1e-12)
    assert sorted(np.unique(r.resamples.subsets.sum(axis=1))) == [9]
    assert ((r.resamples.subsets > 0).sum(axis=1) >= 2).all()


def test_target_bootstrap_covers_the_mean_over_targets():
    """Models fixed, targets drawn at random: the target interval must cover E_target[Spearman] about 95% of the
    time. The known value comes from 20000 targets on the same subsets and models (Monte Carlo error ~0.002)."""
    rng = np.random.default_rng(3)
    m, n = 12, 30
    masks = rng.random((m, n)) < 0.5
    model_offsets = 2.0 * rng.standard_normal((m, 1))  # fixed retrained models: a common mode held fixed

    def targets(t):
        effect = rng.standard_normal((t, n))
        F = masks.astype(float) @ effect.T + model_offsets + rng.standard_normal((m, t))
        return F[:, None, None, :], -effect + rng.standard_normal((t, n))

    F_big, s_big = targets(20000)
    known = L.spearman_per_target(L.predictions(s_big, masks), L.ground_truth(F_big)).mean()
    covered = []
    for k in range(100):
        F, s = targets(40)
        lo, hi = L.lds(s, masks, F, n_resamples=300, seed=k).standard.ci_targets
        covered.append(lo <= known <= hi)
    # 100 intervals at 95% (measured: 0.96): binomial sd 2.2 points; a percentile bootstrap of a mean of 40 values
    # runs a little narrow
    assert 0.87 <= np.mean(covered) <= 1.0


def test_two_way_bootstrap_covers_more_often_than_target_only():
    """Whole banks drawn at random (subsets, a model-level common mode, target effects, noise): targets share the
    retrained models, so the target interval is too narrow for E[LDS]; the two-way one is not."""
    rng = np.random.default_rng(4)
    m, n, t = 12, 30, 60

    def bank():
        masks = rng.random((m, n)) < 0.5
        effect = rng.standard_normal((t, n))
        F = masks.astype(float) @ effect.T + 3.0 * rng.standard_normal((m, 1)) + rng.standard_normal((m, t))
        return masks, F[:, None, None, :], -effect + rng.standard_normal((t, n))

    known = np.mean([L.spearman_per_target(L.predictions(s, mk), L.ground_truth(F)).mean()
                     for mk, F, s in (bank() for _ in range(1000))])  # E[LDS], Monte Carlo error ~0.002
    cover_targets, cover_two_way = [], []
    for k in range(60):
        masks, F, s = bank()
        est = L.lds(s, masks, F, n_resamples=300, seed=k).standard
        cover_targets.append(est.ci_targets[0] <= known <= est.ci_targets[1])
        cover_two_way.append(est.ci_two_way[0] <= known <= est.ci_two_way[1])
    # Measured with these seeds: two-way 1.00, targets 0.73 (binomial sd over 60 draws: <0.03 and ~0.06); the two-way
    # bootstrap of a crossed design counts the subset x target interaction twice, so it errs on the wide side
    assert np.mean(cover_two_way) >= 0.85
    assert np.mean(cover_two_way) - np.mean(cover_targets) >= 0.15


def test_planted_common_mode_target_agnostic_score():
    """Data quality q_i lowers every target's loss: a score that only knows q gets a high standard LDS and a
    centered LDS of exactly 0 (its centered prediction is constant); target-specific scores keep their centered LDS."""
    rng = np.random.default_rng(5)
    m, n, t = 24, 60, 50
    masks = rng.random((m, n)) < 0.5
    quality = rng.standard_normal(n)
    effect = rng.standard_normal((t, n))
    F = -3.0 * (masks @ quality)[:, None] + masks.astype(float) @ effect.T + 0.5 * rng.standard_normal((m, t))
    F = F[:, None, None, :]
    agnostic = L.lds(np.broadcast_to(quality, (t, n)), masks, F, n_resamples=100)
    assert agnostic.standard.value > 0.8
    assert agnostic.centered.value == 0.0 and agnostic.centered.n_undefined == t
    noisy = L.lds(quality + 0.3 * rng.standard_normal((t, n)), masks, F, n_resamples=100)
    assert noisy.standard.value > 0.7
    assert abs(noisy.centered.value) < 0.1
    specific = L.lds(-effect, masks, F, n_resamples=100)
    assert specific.centered.value > 0.8
    assert L.common_mode_share(F) > 0.7


def test_common_mode_share_equals_the_planted_decomposition():
    rng = np.random.default_rng(6)
    m, t = 10, 7
    common = rng.standard_normal(m)
    rest = rng.standard_normal((m, t))
    rest -= rest.mean(axis=0)  # no per-target offset
    rest -= rest.mean(axis=1, keepdims=True)  # nothing shared by all targets
    fbar = 5.0 + common[:, None] + rest + rng.standard_normal(t)  # per-target offsets do not count
    F = np.stack([fbar, fbar], axis=1)[:, :, None, :]
    c = common - common.mean()
    expected = t * (c**2).sum() / (t * (c**2).sum() + (rest**2).sum())
    assert L.common_mode_share(F) == pytest.approx(expected, rel=1e-12)
    assert L.common_mode_share(np.broadcast_to(rest[:, None, None, :], (m, 1, 1, t))) == pytest.approx(0.0, abs=1e-12)


def test_ceilings_identical_runs_give_one_and_independent_noise_gives_zero():
    rng = np.random.default_rng(7)
    m, t = 24, 200
    signal = rng.standard_normal((m, 1, 1, t))
    identical = np.broadcast_to(signal, (m, 3, 2, t))
    c = L.ceilings(identical, n_resamples=50)
    for res in (c.seed, c.noise):
        assert res.standard.value == pytest.approx(1.0) and res.centered.value == pytest.approx(1.0)
    # independent pure noise per seed and noise set: nothing predicts anything (sd of the mean over 200 targets ~0.015)
    c = L.ceilings(rng.standard_normal((m, 2, 2, t)), n_resamples=200)
    for res in (c.seed, c.noise):
        for variant in L.VARIANTS:
            assert abs(res[variant].value) < 0.06
            assert res[variant].ci_two_way[0] < 0 < res[variant].ci_two_way[1]
    # one seed, one noise set: no ceiling to compute
    c = L.ceilings(rng.standard_normal((m, 1, 1, t)), n_resamples=10)
    assert c.seed is None and c.noise is None


def test_seed_ceiling_is_the_direct_leave_one_seed_out_spearman():
    rng = np.random.default_rng(8)
    m, s, t = 12, 3, 20
    F = rng.standard_normal((m, 1, 1, t)) + 0.7 * rng.standard_normal((m, s, 2, t))
    c = L.ceilings(F, n_resamples=20)
    per_seed = F.mean(axis=2)
    direct = np.mean([[spearmanr(per_seed[:, k, j], np.delete(per_seed, k, axis=1).mean(axis=1)[:, j]).statistic
                       for j in range(t)] for k in range(s)])
    assert c.seed.standard.value == pytest.approx(direct, abs=1e-12)
    noisier = L.ceilings(rng.standard_normal((m, 1, 1, t)) + 2.0 * rng.standard_normal((m, s, 2, t)), n_resamples=20)
    assert noisier.seed.standard.value < c.seed.standard.value  # more retraining noise, lower ceiling


def test_random_baseline_matches_explicit_random_scores():
    rng = np.random.default_rng(9)
    masks, F, _ = _linear_bank(rng, m=12, n=30, t=15, noise=0.5)
    base = L.random_baseline(masks, F, n_draws=300, seed=1)
    fbar = L.ground_truth(F)
    explicit = np.array([L.spearman_per_target(L.predictions(rng.standard_normal((15, 30)), masks), fbar).mean()
                         for _ in range(300)])
    # both are means of 15 per-target Spearman values of independent noise: mean 0, sd ~0.3 / sqrt(15) ~0.08
    assert abs(base.standard) < 0.02 and abs(explicit.mean()) < 0.02
    assert base.standard_draws.std() == pytest.approx(explicit.std(), rel=0.25)
    assert np.array_equal(base.standard_draws, L.random_baseline(masks, F, n_draws=300, seed=1).standard_draws)
    lo, hi = L.RandomBaseline.spread(base.standard_draws)
    assert lo < 0 < hi


def test_paired_comparison_uses_the_same_resamples():
    rng = np.random.default_rng(10)
    masks, F, effect = _linear_bank(rng, m=16, t=40, noise=1.0, common=2.0)
    good = L.lds(-effect + rng.standard_normal(effect.shape), masks, F, n_resamples=300, seed=3)
    weak = L.lds(rng.standard_normal(effect.shape), masks, F, n_resamples=300, seed=3)
    diff = L.compare(good, weak, ("good", "weak"))
    for variant in L.VARIANTS:
        d = diff[variant]
        assert d.difference == pytest.approx(good[variant].value - weak[variant].value)
        np.testing.assert_allclose(d.ci_two_way, np.percentile(good[variant].replicates - weak[variant].replicates,
                                                               [2.5, 97.5]))
        assert d.real
    same = L.compare(good, good)["standard"]
    assert same.difference == 0.0 and same.ci_two_way == (0.0, 0.0) and not same.real
    assert L.is_real((0.01, 0.2)) and L.is_real((-0.3, -0.1)) and not L.is_real((-0.1, 0.2))
    other = L.lds(-effect, masks, F, n_resamples=300, seed=4)
    with pytest.raises(ConfigError, match="same resamples"):
        L.compare(good, other)


def test_evaluate_table_rows_match_single_calls():
    rng = np.random.default_rng(11)
    masks, F, effect = _linear_bank(rng, m=12, n=30, t=20, seeds=2, noises=2, noise=1.0, common=1.0)
    named = {"true": -effect, "half": -effect + 2 * rng.standard_normal(effect.shape),
             "random": rng.standard_normal(effect.shape)}
    table = L.evaluate(named, masks, F, n_resamples=200, seed=2, n_random=10)
    for name, scores in named.items():
        single = L.lds(scores, masks, F, n_resamples=200, seed=2)
        for variant in L.VARIANTS:
            assert table.methods[name][variant].value == pytest.approx(single[variant].value, abs=1e-12)
            np.testing.assert_allclose(table.methods[name][variant].ci_two_way, single[variant].ci_two_way)
    ceil = L.ceilings(F, n_resamples=200, seed=2)
    assert table.ceilings.seed.standard.value == pytest.approx(ceil.seed.standard.value)
    assert table.common_mode_share == pytest.approx(L.common_mode_share(F))
    rows = {row["name"]: row for row in table.rows()}
    assert {"true", "half", "random", L.SEED_CEILING, L.REACHABLE, "noise-vs-noise ceiling", "random scores",
            "random target-agnostic scores"} <= set(rows)
    assert rows["true"]["standard"] == pytest.approx(table.methods["true"].standard.value)
    assert table.shape == {"subsets": 12, "seeds": 2, "noise_sets": 2, "targets": 20, "images": 30}
    diffs = table.differences()
    assert len(diffs) == 3 and all(d.difference >= 0 for d in diffs)
    assert any(d.a == "true" and d.b == "random" and d.real for d in diffs)


def test_spearman_brown_hand_values():
    # r = 0.3 with 2 seeds: reliability 0.6 / 1.3; 1 seed: sqrt(r); r <= 0: nothing to predict; r = 1: 1
    np.testing.assert_allclose(L.spearman_brown([0.3, -0.2, 1.0], 2), [np.sqrt(0.6 / 1.3), 0.0, 1.0])
    assert L.spearman_brown(0.25, 1) == pytest.approx(0.5)


@pytest.mark.parametrize("draw", range(3))
def test_reachable_ceiling_is_what_an_oracle_reaches_above_the_seed_ceiling(draw):
    """F = signal + seed noise with S = 2 (one seed predicts the other at r ~ 0.3): the oracle (the true effects)
    is scored against the 2-seed mean, so it exceeds the one-seed figure; the reachable ceiling, from the seed-vs-seed
    r alone, says where it lands."""
    rng = np.random.default_rng(30 + draw)
    masks, F, effect = _linear_bank(rng, m=40, n=60, t=60, seeds=2, noises=1, noise=6.0)
    table = L.evaluate({"oracle": -effect, "random": rng.standard_normal(effect.shape)}, masks, F,
                       n_resamples=300, seed=draw, n_random=5)
    for variant in L.VARIANTS:
        oracle, reach, seed = (table.methods["oracle"][variant], table.ceilings.reachable[variant],
                               table.ceilings.seed[variant])
        assert 0.15 < seed.value < 0.5
        assert oracle.value > seed.ci_two_way[1]  # above the one-seed figure, beyond its interval
        assert reach.ci_two_way[0] <= oracle.value <= reach.ci_two_way[1]
        # reachable from the seed-vs-seed r: Spearman-Brown of the per-target Spearman averaged over targets
        per_seed = F.mean(axis=2)
        prep = L.center if variant == "centered" else (lambda x: x)
        r = L.spearman_per_target(prep(per_seed[:, 0]), prep(per_seed[:, 1]))
        assert reach.value == pytest.approx(L.spearman_brown(r.mean(), 2), abs=1e-12)
        fraction, ci = table.of_reachable("oracle", variant)
        assert fraction == pytest.approx(oracle.value / reach.value) and ci[0] < 1 < ci[1]
        assert table.of_reachable("random", variant)[0] < 0.2


def test_a_single_seed_bank_has_no_seed_or_reachable_ceiling():
    rng = np.random.default_rng(4)
    masks, F, effect = _linear_bank(rng, m=10, n=20, t=5, seeds=1, noises=2, noise=1.0)
    table = L.evaluate({"oracle": -effect}, masks, F, n_resamples=50, n_random=3)
    assert table.ceilings.seed is None and table.ceilings.reachable is None
    assert table.of_reachable("oracle") is None
    assert {row["name"] for row in table.rows()}.isdisjoint({L.SEED_CEILING, L.REACHABLE})
    assert "\n" not in L.SINGLE_SEED and "single" in L.SINGLE_SEED


def test_variance_components_recover_known_components():
    """F = subset effect (var 4) + seed effect shared by all subsets (var 9) + subset-specific seed noise (var 1) +
    a noise-set offset per target (var 5, the same for every model) + model x noise-set noise (var 2 per set, R = 2:
    1 in their mean): the components come back (the measurement noise inside the residual), and a / (a + e)
    predicts the seed-vs-seed Spearman (near-normal data)."""
    rng = np.random.default_rng(3)
    m, s_count, r_count, t = 400, 3, 2, 40
    F = (2 * rng.standard_normal((m, 1, 1, t)) + 3 * rng.standard_normal((1, s_count, 1, t))
         + rng.standard_normal((m, s_count, 1, t)) + np.sqrt(5) * rng.standard_normal((1, 1, r_count, t))
         + np.sqrt(2) * rng.standard_normal((m, s_count, r_count, t)))
    vc = L.variance_components(F)
    assert vc.subset == pytest.approx(4, rel=0.1) and vc.seed == pytest.approx(9, rel=0.35)
    assert vc.residual == pytest.approx(2, rel=0.1) and vc.noise_sets == pytest.approx(1, rel=0.1)
    shares = vc.shares()
    assert shares["subset"] + shares["seed"] + shares["residual"] == pytest.approx(1.0)
    seed_r = L.ceilings(F[:, :2], n_resamples=10).seed.standard.value
    assert vc.predicted_r == pytest.approx(seed_r, abs=0.05)
    with pytest.raises(ConfigError, match="single"):
        L.variance_components(F[:, :1])


def test_bootstrap_p_and_holm_by_hand():
    assert L.bootstrap_p(np.array([1.0, 2.0, 3.0, -1.0])) == pytest.approx(2 * 2 / 5)  # one of 4 below 0, +1
    assert L.bootstrap_p(np.ones(999)) == pytest.approx(2 / 1000)
    assert L.bootstrap_p(np.zeros(9)) == 1.0

    def c(p):
        return L.Comparison("a", "b", "standard", 0.1, (0, 1), (0, 1), p)

    # 4 tests at 0.05: thresholds 0.0125, 0.0167, 0.025, 0.05 for the sorted p-values; the third fails, so it
    # and everything after it stay unconfirmed even though 0.04 < 0.05
    assert L.holm([c(0.03), c(0.001), c(0.012), c(0.04)]) == [False, True, True, False]
    assert L.holm([c(0.01), c(0.02)]) == [True, True] and L.holm([]) == []


def test_held_out_choice_picks_on_one_half_and_reports_the_other():
    a, b = L.target_halves(10, seed=3)
    assert len(a) == len(b) == 5 and not set(a) & set(b) and set(a) | set(b) == set(range(10))
    x, y = np.zeros(10), np.zeros(10)
    x[a], y[a] = 0.9, 0.5  # x best on half A
    x[b], y[b] = 0.1, 0.3  # y best on half B
    choice = L.choose_held_out({"x": x, "y": y}, seed=3)
    assert choice.chosen == ("x", "y") and choice.held_out == (pytest.approx(0.1), pytest.approx(0.5))
    assert choice.value == pytest.approx(0.3) and not choice.agree


def test_choosing_on_the_reported_targets_is_optimistic_and_held_out_is_not():
    """Among 40 methods that are all noise, the best one on the same targets looks good; chosen on one half and
    reported on the other it is at chance."""
    rng = np.random.default_rng(7)
    masks, F, effect = _linear_bank(rng, m=20, n=30, t=40, seeds=2, noise=1.0)
    named = {f"noise{k}": rng.standard_normal(effect.shape) for k in range(40)}
    table = L.evaluate(named, masks, F, n_resamples=20, n_random=2)
    in_sample = max(r.standard.value for r in table.methods.values())
    held = table.best_held_out()
    assert in_sample > 0.05 and abs(held.value) < in_sample / 2, (in_sample, held)


def test_sweep_matches_individual_lds_for_lists_callables_and_spectral_scores():
    rng = np.random.default_rng(12)
    masks, F, _ = _linear_bank(rng, m=12, n=30, t=10, noise=1.0)
    X, G = rng.standard_normal((30, 50)), rng.standard_normal((10, 50))  # training and target features
    U, sigma, Vt = np.linalg.svd(X, full_matrices=False)
    spectral = L.SpectralScores(U, sigma, G @ Vt.T)
    lams = [0.1, 1.0, 10.0, 100.0]

    def explicit(lam):  # tau = G (X^T X + lam I)^{-1} X^T, the TRAK kernel written out
        return G @ np.linalg.solve(X.T @ X + lam * np.eye(50), X.T)

    for lam in lams:
        np.testing.assert_allclose(spectral.scores(lam), explicit(lam), rtol=1e-9, atol=1e-12)
    sweeps = [L.lds_sweep(spectral, masks, F, lams), L.lds_sweep(explicit, masks, F, lams),
              L.lds_sweep([explicit(lam) for lam in lams], masks, F, lams, two_way=True, n_resamples=100)]
    for k, lam in enumerate(lams):
        single = L.lds(explicit(lam), masks, F, n_resamples=100)
        for sweep in sweeps:
            assert sweep.standard[k] == pytest.approx(single.standard.value, abs=1e-9)
            assert sweep.centered[k] == pytest.approx(single.centered.value, abs=1e-9)
            np.testing.assert_allclose(sweep.standard_per_target[k], single.standard.per_target, atol=1e-9)
        np.testing.assert_allclose(sweeps[2].standard_ci_two_way[k], single.standard.ci_two_way)
    assert sweeps[0].best() == int(np.argmax(sweeps[0].standard))
    held = sweeps[0].best_held_out()
    want = L.choose_held_out({lam: L.lds(explicit(lam), masks, F, n_resamples=10).standard.per_target
                              for lam in lams})
    assert held.chosen == want.chosen and held.held_out == pytest.approx(want.held_out)


def test_spectral_scores_follow_the_kernel_module():
    from attribution.kernel import Kernel

    rng = np.random.default_rng(13)
    X, G = rng.standard_normal((20, 35)), rng.standard_normal((4, 35))
    kernel = Kernel.fit(X)
    lam = kernel.default_lambda()
    spectral = L.SpectralScores(kernel.U, kernel.sigma, kernel.coords(G))
    np.testing.assert_allclose(spectral.scores(lam), kernel.scores(G, lam), rtol=1e-10)


def test_fast_enough_for_200_targets_24_subsets_1000_resamples():
    rng = np.random.default_rng(14)
    masks, F, effect = _linear_bank(rng, m=24, n=200, t=200, noise=1.0)
    start = time.perf_counter()
    r = L.lds(-effect, masks, F, n_resamples=1000)
    elapsed = time.perf_counter() - start
    assert r.standard.replicates.shape == (1000,)
    # ~0.5 s for both variants on a busy 2-core machine; the bound only catches a fall back to per-resample sorting
    assert elapsed < 10


@pytest.mark.parametrize("case, match", [
    ("scores shape", "must have shape"),
    ("scores nan", "NaN"),
    ("masks int", "boolean"),
    ("masks width", "must have shape"),
    ("one subset", "at least 2 subsets"),
    ("F 2-D", "F must have shape"),
    ("F nan", "finite"),
    ("F subsets", "subsets but masks"),
    ("resamples", "integer >= 1"),
])
def test_bad_input_is_one_clear_line(case, match):
    rng = np.random.default_rng(15)
    masks, F, effect = _linear_bank(rng, m=6, n=10, t=4)
    scores = -effect
    kwargs = {}
    if case == "scores shape":
        scores = scores.T
    elif case == "scores nan":
        scores = scores.copy()
        scores[1, 2] = np.nan
    elif case == "masks int":
        masks = masks.astype(int)
    elif case == "masks width":
        masks = masks[:, :-1]
    elif case == "one subset":
        masks, F = masks[:1], F[:1]
    elif case == "F 2-D":
        F = F[:, 0, 0]
    elif case == "F nan":
        F = F.copy()
        F[0, 0, 0, 0] = np.nan
    elif case == "F subsets":
        F = F[:-1]
    elif case == "resamples":
        kwargs["n_resamples"] = 0
    with pytest.raises(ConfigError, match=match) as err:
        L.lds(scores, masks, F, **kwargs)
    assert "\n" not in str(err.value)


def test_sweep_bad_input():
    rng = np.random.default_rng(16)
    masks, F, effect = _linear_bank(rng, m=6, n=10, t=4)
    with pytest.raises(ConfigError, match="lambdas"):
        L.lds_sweep(lambda lam: -effect, masks, F)
    with pytest.raises(ConfigError, match="positive"):
        L.lds_sweep(L.SpectralScores(np.eye(10)[:, :3], np.ones(3), np.ones((4, 3))), masks, F, [1.0, -1.0])
    with pytest.raises(ConfigError, match="do not fit"):
        L.lds_sweep(L.SpectralScores(np.eye(9)[:, :3], np.ones(3), np.ones((4, 3))), masks, F, [1.0])
    with pytest.raises(ConfigError, match="2 lambdas for 1"):
        L.lds_sweep([-effect], masks, F, [1.0, 2.0])


def test_constant_scores_on_equal_size_subsets_are_undefined_not_ranked_by_rounding():
    rng = np.random.default_rng(17)
    m, n, t = 10, 40, 6
    masks = np.zeros((m, n), bool)
    for row in masks:
        row[rng.permutation(n)[: n // 2]] = True  # equal-size subsets, as D-TRAK draws them
    F = rng.standard_normal((m, 1, 1, t))
    scores = np.full((t, n), 0.1) + np.arange(t)[:, None]  # one value per target: predicts nothing
    r = L.lds(scores, masks, F, n_resamples=50)
    assert r.standard.value == 0.0 and r.standard.n_undefined == t
    assert np.all(r.standard.replicates == 0.0)
    # the same column with last-bit differences (another summation order) is still constant, not a ranking
    eps = np.finfo(float).eps
    pred = np.array([[1.0], [1.0 + 2 * eps], [1.0 - eps], [1.0 + eps]])
    truth = np.array([[4.0], [3.0], [1.0], [2.0]])
    assert L.spearman_per_target(pred, truth)[0] == 0.0
    assert spearmanr(pred[:, 0], truth[:, 0]).statistic == pytest.approx(0.4)  # what ranking the bits would give
