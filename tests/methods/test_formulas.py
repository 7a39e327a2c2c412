"""The methods (attribution/methods/) against closed-form formulas in dense float64 linear algebra: the scores and
self-influence of dtrak, trak, grad-dot, grad-cos, relative-if, renorm-if and journey-trak, the default lambda, the
output function each method takes, an ensemble as the mean of its members, and proponents and opponents ranked by
sign. Everything runs on a randomly initialised "tiny" UNet (41,609 parameters) and a few digits images: the checks
are numerical identities that hold for any weights, so no training is needed.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine_support import TWO_STEPS, keys_for, one_line, rel_err, subset, tiny_model

from attribution.engine import Attribution, Attributor
from attribution.report import rank
from attribution.errors import ConfigError
from attribution.features.config import FeatureConfig
from attribution.methods import METHODS, get_method


# -- methods -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def featurized(model, digits, digits_val, tmp_path_factory):
    train = subset(digits, 20)
    att = Attributor(model, train, FeatureConfig(fn="simple", projector="sjlt", proj_dim=256, **TWO_STEPS),
                     cache=tmp_path_factory.mktemp("methods"))
    att.featurize()
    G = att.features_of(digits_val.tensors(range(4)), keys_for("val", range(4)))
    return att, np.asarray(att.store.features(), dtype=np.float64), G.astype(np.float64)


def test_methods_match_their_formulas(featurized):
    att, X, G = featurized
    # the checkpoint methods (tracin, retrac, tracincp, gas) are tested in test_tracin.py, journey-trak in
    # test_journey.py (its target features come from a sampling trajectory), the similarity baselines in
    # test_embeddings.py, DAS and EK-FAC (their own per-row weights and whitened features) in test_das_ekfac.py
    from attribution.methods import SimilarityMethod
    from attribution.methods.over_checkpoints import CheckpointMethod

    assert {n for n, m in METHODS.items()
            if not issubclass(m, (CheckpointMethod, SimilarityMethod))} == {"dtrak", "trak", "grad-dot", "grad-cos",
                                                                             "relative-if", "renorm-if",
                                                                             "journey-trak", "das", "das0", "das-size",
                                                                             "ekfac", "ekfac-elbo"}
    k = X.shape[1]
    lam = 0.05 * np.trace(X @ X.T) / len(X)
    A = np.linalg.solve(X.T @ X + lam * np.eye(k), X.T)  # (k, N), dense float64
    kernel = G @ A
    xnorm = np.linalg.norm(X, axis=1)
    expected = {
        "grad-dot": G @ X.T,
        "grad-cos": (G / np.linalg.norm(G, axis=1, keepdims=True)) @ (X / xnorm[:, None]).T,
        "dtrak": kernel,
        "trak": kernel,
        "relative-if": kernel / np.linalg.norm(A, axis=0)[None, :],
        "renorm-if": kernel / xnorm[None, :],
        "journey-trak": kernel,  # on features G; its trajectory-averaged features: tests/test_journey.py
    }
    for name, want in expected.items():
        got = att.scores(get_method(name), G, lam)
        assert got.shape == (4, 20)
        # float32 features -> float64 on both sides; kernel U, V stored as float32 (~1e-7 relative, amplified by
        # the condition number at this lambda, < 1e2): 1e-5.
        assert rel_err(got, want) < 1e-5, name
    assert np.abs(expected["grad-cos"]).max() <= 1 + 1e-12


def test_self_influence_matches_the_diagonal(featurized):
    att, X, _ = featurized
    k = X.shape[1]
    lam = 0.05 * np.trace(X @ X.T) / len(X)
    A = np.linalg.solve(X.T @ X + lam * np.eye(k), X.T)
    diag = np.einsum("nk,kn->n", X, A)  # tau(x_n)_n = x_n^T (X^T X + lam I)^{-1} x_n
    assert np.all((diag > 0) & (diag < 1))  # leverage scores of a ridge regression
    expected = {"dtrak": diag, "trak": diag, "relative-if": diag / np.linalg.norm(A, axis=0),
                "renorm-if": diag / np.linalg.norm(X, axis=1), "grad-dot": (X**2).sum(1)}
    for name, want in expected.items():
        assert rel_err(att.self_influence(get_method(name), lam), want) < 1e-5, name  # as above
        # and the diagonal of scoring the training rows against themselves
        assert rel_err(np.diag(att.scores(get_method(name), X, lam)), want) < 1e-5, name
    with pytest.raises(ConfigError, match="cosine") as exc:
        att.self_influence(get_method("grad-cos"), None)
    one_line(exc)


def test_default_lambda_is_a_tenth_of_the_mean_eigenvalue(featurized):
    att, X, G = featurized
    lam = att.resolve_lambda(get_method("dtrak"), None)
    assert lam == pytest.approx(0.1 * np.trace(X @ X.T) / len(X), rel=1e-6)  # N=20 < k: all 20 eigenvalues kept
    assert att.resolve_lambda(get_method("grad-dot"), None) is None
    np.testing.assert_allclose(att.scores(get_method("dtrak"), G), att.scores(get_method("dtrak"), G, lam))


def test_method_fn_rules():
    assert get_method("trak").check_fn(None) == "simple" == get_method("trak").check_fn("simple")
    assert get_method("dtrak").check_fn(None) == "square"
    assert get_method("dtrak").check_fn("l2") == "l2"
    for name in ("trak", "grad-dot", "grad-cos", "relative-if", "renorm-if"):
        with pytest.raises(ConfigError, match="--method dtrak --fn square"):
            get_method(name).check_fn("square")


def test_ensemble_is_the_mean_of_its_members(model, digits, digits_val, tmp_path):
    train = subset(digits, 12)
    cfg = FeatureConfig(fn="square", projector="sjlt", proj_dim=128, **TWO_STEPS)
    members = [Attributor(model, train, cfg, cache=tmp_path), Attributor(tiny_model(1), train, cfg, cache=tmp_path)]
    for m in members:
        m.featurize()
    assert members[0].store_path != members[1].store_path  # keyed by checkpoint
    images, keys = digits_val.tensors(range(3)), keys_for("val", range(3))
    method, lam = get_method("dtrak"), 0.5
    each = [m.scores(method, m.features_of(images, keys), lam) for m in members]
    assert rel_err(each[0], each[1]) > 0.1  # two different models: the mean is not trivial
    ensemble = Attribution(method, members)
    ens = ensemble.scores(ensemble.features_of(images, keys), lam)
    np.testing.assert_allclose(ens, (each[0] + each[1]) / 2, rtol=1e-10, atol=1e-12 * np.abs(ens).max())
    single = Attribution(method, members[:1])
    np.testing.assert_allclose(single.scores(single.features_of(images, keys), lam), each[0], rtol=1e-10)


def test_rank_lists_proponents_and_opponents_by_sign(digits):
    data = subset(digits, 6)
    scores = np.array([0.5, -2.0, 3.0, 0.0, -0.1, 3.0])
    pro = rank(scores, data, top=3)
    assert [r.index for r in pro] == [2, 5, 0]  # ties keep dataset order (stable sort)
    assert [r.score for r in pro] == [3.0, 3.0, 0.5]
    assert [r.class_name for r in pro] == [data.label_name(i) for i in (2, 5, 0)]
    opp = rank(scores, data, top=5, sign=-1)
    assert [r.index for r in opp] == [1, 4]  # only negative scores; zero is neither
    assert rank(np.zeros(6), data) == []
