"""DAS and EK-FAC influence against direct computations (issue 15).

- DAS / DAS0 / DAS (residual size) scores equal the formula computed here from scratch: Avg-output gradients by
  plain autograd (one image, one timestep at a time), projected with the store's projector, the ridge kernel by a
  float64 solve, the residual weights from the model's own errors, the leverage as the diagonal of the hat matrix.
- DAS0's leave-one-out factor 1 / (1 - h) is exact: on a toy ridge problem, residual / (1 - h) x the kernel score
  equals the change of each target's prediction when the row is left out and the ridge is refitted.
- EK-FAC on a model that is one linear layer (where K-FAC is exact: the GGN of the MSE is A (x) (2/D) I) gives the
  influence of the explicit damped inverse GGN, built here from the layer's Jacobians.
- EK-FAC with a very large damping is the gradient dot product over the tracked layers divided by lambda.
- The fit resumes from a saved state to the same factors; bad damping is one line; untracked layers are named.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from module_model import ModuleModel

from attribution.engine import open_attribution
from attribution.run_options import RunOptions
from attribution.errors import ConfigError
from attribution.features.curvature import CurvatureSpec, copy_inputs, fit_ekfac, layout
from attribution.features.gradients import GradientSpec, per_sample_gradients
from attribution.features.residuals import residual_timesteps
from attribution.features.timesteps import noise_for, noise_seed
from attribution.kernel import Kernel
from attribution.methods import TrainFeatures, curvature_options, get_method


def _open(name, tiny_run, npz12, cache, **options):
    return open_attribution(RunOptions(str(tiny_run), method=name, device="cpu", dataset=f"npz:{npz12}", timesteps=2,
                                       proj_dim=64, cache=str(cache), **options))


# -- DAS ----------------------------------------------------------------------------------------------------------

def _avg_gradient(model, x0, key, timesteps):
    """mean over the K timesteps of grad_theta mean(eps_hat(x_t, t)), by plain autograd."""
    params = {k: v.clone().requires_grad_(True) for k, v in model.parameters().items()}
    total = None
    for t in timesteps:
        eps = noise_for([key], torch.tensor([t]), tuple(x0.shape), 0)[0]
        tt = torch.tensor([t])
        x_t = model.schedule.add_noise(x0[None], eps, tt)
        out = model.raw(params, x_t, tt).mean() / len(timesteps)
        g = torch.autograd.grad(out, list(params.values()))
        flat = torch.cat([x.reshape(-1) for x in g])
        total = flat if total is None else total + flat
    return total


def _residual_weight(model, x0, key):
    e = _residual_curve(model, x0, key)
    return float((e / (np.linalg.norm(e) + 1e-8)).mean())


def _residual_curve(model, x0, key):
    """e_t = the root-mean-squared training error at each residual timestep, by plain forward passes."""
    errors = []
    for t in residual_timesteps(model.num_timesteps).tolist():
        gen = torch.Generator().manual_seed(noise_seed(0, f"das-residual/{key}", t))
        eps = torch.randn(tuple(x0.shape), generator=gen)[None]
        tt = torch.tensor([t])
        with torch.no_grad():
            pred = model.raw(model.parameters(), model.schedule.add_noise(x0[None], eps, tt), tt)
        errors.append(float(((pred - eps).double() ** 2).mean().sqrt()))
    return np.array(errors)


def test_das_scores_equal_a_direct_computation(tiny_run, npz12, tmp_path):
    att = _open("das", tiny_run, npz12, tmp_path)
    att.featurize()
    member = att.members[0]
    model, train = member.model, member.train
    ts = list(member.featurizer.grad_spec.timesteps)
    imgs = train.tensors(list(range(12)))
    X = torch.stack([_avg_gradient(model, imgs[i], f"train/{i}", ts) for i in range(12)])
    X = member.featurizer.projector.project(X).double().numpy()
    target_rows = [3, 7]
    G = X[target_rows]  # training images as targets: same keys, same features
    lam = att.resolve_lambda(None)
    K = X.T @ X + lam * np.eye(X.shape[1])
    kernel_scores = G @ np.linalg.solve(K, X.T)
    w = np.array([_residual_weight(model, imgs[i], f"train/{i}") for i in range(12)])
    got = att.scores(att.features_of(imgs[target_rows], [f"train/{i}" for i in target_rows]), lam)
    expected = kernel_scores * w[None, :]
    # float32 features and kernel factors (relative ~1e-6) against a float64 solve
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_allclose(att.self_influence(lam), np.diag(X @ np.linalg.solve(K, X.T)) * w, rtol=2e-4)

    lev = _open("das0", tiny_run, npz12, tmp_path)  # the same features and weights (one cache)
    h = np.diag(X @ np.linalg.solve(K, X.T))
    got0 = lev.scores(lev.features_of(imgs[target_rows], [f"train/{i}" for i in target_rows]), lam)
    np.testing.assert_allclose(got0, kernel_scores * (w / (1 - h))[None, :], rtol=2e-4,
                               atol=1e-6 * np.abs(got0).max())
    assert not np.allclose(got0 / got0.max(), got / got.max())  # the correction changes the scores

    size = _open("das-size", tiny_run, npz12, tmp_path)  # the same features, the residual's size as the weight
    size.featurize()
    e_mean = np.array([_residual_curve(model, imgs[i], f"train/{i}").mean() for i in range(12)])
    got_size = size.scores(size.features_of(imgs[target_rows], [f"train/{i}" for i in target_rows]), lam)
    np.testing.assert_allclose(got_size, kernel_scores * e_mean[None, :], rtol=2e-4,
                               atol=1e-6 * np.abs(got_size).max())


def test_das0_leave_one_out_factor_is_exact_on_a_toy_ridge_problem():
    """das0's weight residual / (1 - h) times the kernel score is the change in a target's ridge prediction when
    the training row is left out: compared with refitting the ridge problem without each row, one at a time."""
    rng = np.random.default_rng(0)
    n, k, lam = 10, 6, 0.3  # few rows per dimension: leverages ~0.5, where 1/(1-h) and 1/(1-h)^2 differ by 2x
    X = rng.normal(size=(n, k))
    y = X @ rng.normal(size=k) + 0.5 * rng.normal(size=n)
    G = rng.normal(size=(3, k))  # three targets' features
    beta = np.linalg.solve(X.T @ X + lam * np.eye(k), X.T @ y)
    residual = y - X @ beta
    exact = np.empty((len(G), n))
    for i in range(n):  # the leave-one-out refits
        keep = np.arange(n) != i
        beta_i = np.linalg.solve(X[keep].T @ X[keep] + lam * np.eye(k), X[keep].T @ y[keep])
        exact[:, i] = G @ (beta - beta_i)  # what including row i adds to each target's prediction
    train = TrainFeatures(X.astype(np.float32), lambda: Kernel.fit(X), lambda name: residual)
    leverage = train.kernel.self_influence(lam)
    assert 0.3 < leverage.mean() < 0.8  # the regime where the factor matters
    got = get_method("das0").score(train, G, lam)
    np.testing.assert_allclose(got, exact, rtol=1e-8, atol=1e-10 * np.abs(exact).max())


# -- EK-FAC: exact where K-FAC is exact -----------------------------------------------------------------------------

class _LinearNet(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x, t, return_dict=False):
        return (self.lin(x.flatten(1)).view_as(x),)


def _linear_model():
    """A 'diffusion model' whose noise predictor is one linear layer on 2x2 one-channel images."""
    torch.manual_seed(0)
    return ModuleModel(_LinearNet(4), 2)


def test_ekfac_matches_the_explicit_inverse_ggn_on_a_linear_layer():
    model = _linear_model()
    rng = np.random.default_rng(0)
    x0 = torch.from_numpy(rng.uniform(-1, 1, (6, 1, 2, 2)).astype(np.float32))
    keys = [f"train/{i}" for i in range(6)]
    spec = CurvatureSpec(samples=8, fisher="ggn")
    ekfac = fit_ekfac(model, lambda rows: x0[rows], keys, spec, batch_size=4)
    # the explicit GGN of the mean training loss: mean over copies of J^T (2/D) J, J = d eps_hat / d theta
    x_t, t, _, _ = copy_inputs(model, x0, keys, spec)
    params = model.parameters()
    names = list(params)

    def out(*flat):
        return model.raw(dict(zip(names, flat)), x_t, t).flatten(1)

    jac = torch.autograd.functional.jacobian(out, tuple(params.values()))
    J = torch.cat([j.reshape(len(x_t), 4, -1) for j in jac], 2).double()  # (copies, D, P)
    H = torch.einsum("cdp,cdq->pq", J, J) * (2 / 4) / len(x_t)
    gspec = GradientSpec("simple", (0, 10, 25, 49))
    g = per_sample_gradients(model, x0, keys, gspec).double()  # training gradients (6, P)
    q = per_sample_gradients(model, -x0.flip(0), ["val/0", "val/1", "val/2", "val/3", "val/4", "val/5"],
                             gspec).double()
    for damping in (0.01, 0.1, 1.0):
        lam = ekfac.damping_values(damping)[0]
        explicit = (q @ torch.linalg.solve(H + lam * torch.eye(len(H), dtype=H.dtype), g.T)).numpy()
        via_ekfac = (ekfac.whiten(q, damping).double() @ ekfac.whiten(g, damping).double().T).numpy()
        # float32 whitened features (relative 1e-7) through a condition number of at most ~1/damping
        np.testing.assert_allclose(via_ekfac, explicit, rtol=1e-4, atol=1e-5 * np.abs(explicit).max())


def test_ekfac_fit_resumes_to_the_same_factors():
    model = _linear_model()
    x0 = torch.linspace(-1, 1, 5 * 4).reshape(5, 1, 2, 2)
    keys = [f"train/{i}" for i in range(5)]
    spec = CurvatureSpec(samples=3)
    saved = []
    full = fit_ekfac(model, lambda rows: x0[rows], keys, spec, batch_size=2,
                     save=lambda s: saved.append(copy.deepcopy(s)), save_every=0)
    in_covariance = [s for s in saved if "stage" not in s and s["covariance_rows"] < 5]
    in_eigenvalues = [s for s in saved if s.get("stage") == "eigenvalues" and 0 < s.get("eigenvalues_rows", 0) < 5]
    assert in_covariance and in_eigenvalues
    for state in (in_covariance[0], in_eigenvalues[0]):  # a kill in the covariance pass, one in the eigenvalues
        again = fit_ekfac(model, lambda rows: x0[rows], keys, spec, batch_size=2, state=copy.deepcopy(state))
        for a, b in zip(again.eigenvalues, full.eigenvalues):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)


# -- EK-FAC on the tiny UNet -----------------------------------------------------------------------------------------

def test_ekfac_with_large_damping_is_the_gradient_dot_product(tiny_run, npz12, tmp_path):
    att = _open("ekfac", tiny_run, npz12, tmp_path, damping=1e8, projector="identity")
    att.featurize()
    member = att.members[0]
    imgs = member.train.tensors(list(range(12)))
    keys = [f"train/{i}" for i in range(12)]
    lam = member.featurizer.ekfac().damping_values(1e8)[0]
    got = att.scores(att.features_of(imgs[:4], keys[:4])) * lam
    g = per_sample_gradients(member.model, imgs, keys, member.featurizer.grad_spec).double()
    lay = layout(member.model)
    cols = torch.cat([torch.arange(s, s + n) for layer in lay.layers
                      for name in (layer.weight, layer.bias) if name for s, n in [lay.offsets[name]]])
    direct = (g[:4, cols] @ g[:, cols].T).numpy()
    assert np.corrcoef(got.ravel(), direct.ravel())[0, 1] > 0.99
    # deviation ~ eigenvalue / lambda = 1e-9 relative, plus float32 features
    np.testing.assert_allclose(got, direct, rtol=1e-3, atol=1e-4 * np.abs(direct).max())
    assert any("GroupNorm" in s for s in lay.skipped)  # the untracked layers are named


def test_ekfac_damping_changes_scores_and_bad_damping_is_one_line(tiny_run, npz12, tmp_path):
    with pytest.raises(ConfigError) as exc:
        _open("ekfac", tiny_run, npz12, tmp_path, damping=0.0)
    assert "damping" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        _open("ekfac", tiny_run, npz12, tmp_path, damping=-1.0)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError) as exc:  # damping means nothing to a kernel method
        _open("dtrak", tiny_run, npz12, tmp_path, damping=0.1)
    assert "ekfac" in str(exc.value)
    for bad in ({"damping_rule": "layerwise"}, {"curvature_samples": 0}):
        with pytest.raises(ConfigError) as exc:
            _open("ekfac", tiny_run, npz12, tmp_path, **bad)
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        _open("dtrak", tiny_run, npz12, tmp_path, damping_rule="module")
    assert "ekfac" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError) as exc:  # the command line's and the app's check, before anything is computed
        curvature_options(["dtrak", "trak"], curvature_samples=8)
    assert "--curvature-samples" in str(exc.value) and "\n" not in str(exc.value)


def test_another_damping_reuses_the_fitted_factors(tiny_run, npz12, tmp_path, monkeypatch):
    first = _open("ekfac", tiny_run, npz12, tmp_path)
    first.featurize()
    import attribution.features.curvature

    def refit(*args, **kwargs):
        raise AssertionError("the EK-FAC factors were fitted again")

    monkeypatch.setattr(attribution.features.curvature, "fit_ekfac", refit)
    imgs = first.members[0].train.tensors([0, 1])
    scores = {}
    for options in ({"damping": 1.0}, {"damping_rule": "module"}, {"damping": 1.0, "damping_rule": "module"}):
        att = _open("ekfac", tiny_run, npz12, tmp_path, **options)
        assert att.members[0].store_path != first.members[0].store_path  # its own whitened features
        att.featurize()  # no refit (the factors are cached without the damping)
        scores[tuple(options.items())] = att.scores(att.features_of(imgs, ["train/0", "train/1"]))
    first_scores = first.scores(first.features_of(imgs, ["train/0", "train/1"]))
    for s in scores.values():
        assert not np.allclose(s / np.abs(s).max(), first_scores / np.abs(first_scores).max(), rtol=1e-3)
    with pytest.raises(AssertionError, match="fitted again"):  # more copies per image: another fit
        _open("ekfac", tiny_run, npz12, tmp_path, curvature_samples=3).featurize()
