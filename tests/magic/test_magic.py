"""MAGIC: metagradients through a deterministic weighted run, and the exact-divergence bits/dim they differentiate.

Every check compares against an independent computation: finite differences of whole retrains, an explicit
Jacobian, the closed-form likelihood of a Gaussian, the plain (non-checkpointed) reverse sweep.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution.errors import CheckpointError, ConfigError, ImageError
from attribution.magic.likelihood import bits_per_dim, exact_divergence, ode_log_likelihood
from attribution.magic.metagrad import metagradient
from attribution.magic.score_model import ScoreModel, ScoreModelConfig, marginal_std
from attribution.magic.smoothness import metasmoothness
from attribution.magic.validate import check_fraction, removed_sets, spearman
from attribution.magic.weighted_train import TrainConfig, WeightedRun


def tiny_problem(steps=6, schedule="linear"):
    g = torch.Generator().manual_seed(0)
    data = torch.rand(10, 4, generator=g, dtype=torch.float64)
    model = ScoreModel(ScoreModelConfig(dim=4, hidden=8, fourier=2))
    run = WeightedRun(data, model, TrainConfig(steps=steps, batch_size=4, lr=1e-2, dtype="float64",
                                               schedule=schedule))
    q = torch.rand(1, 4, generator=g, dtype=torch.float64)

    def objective(theta):
        return bits_per_dim(lambda x, t: model.score(theta, x, t), q, steps=4)[0]

    return run, objective


def test_metagradient_equals_finite_differences_of_retraining():
    run, objective = tiny_problem()
    res = metagradient(run, objective, policy="all")
    h = 1e-5
    fd = []
    for i in range(run.n):
        vals = []
        for s in (1, -1):
            w = torch.ones(run.n, dtype=torch.float64)
            w[i] += s * h
            with torch.no_grad():
                vals.append(float(objective(run.train(w))))
        fd.append((vals[0] - vals[1]) / (2 * h))
    fd = torch.tensor(fd, dtype=torch.float64)
    # float64 central differences with h = 1e-5: truncation ~h^2 and rounding ~1e-16/h, so ~1e-8 relative;
    # measured 3e-8. 1e-6 leaves room and still fails for any missing term (e.g. dropping Adam's state: ~1e-1).
    rel = float((fd - res.grad).norm() / fd.norm())
    assert rel < 1e-6, rel
    assert float(fd.abs().max()) > 1e-4          # the weights do matter: not a trivially zero comparison
    with torch.no_grad():
        assert res.value == pytest.approx(float(objective(run.train())), rel=1e-12)


def test_checkpointed_and_plain_reverse_mode_agree():
    run, objective = tiny_problem(steps=10)
    plain = metagradient(run, objective, policy="all")
    ckpt = metagradient(run, objective, policy="sqrt")
    assert plain.policy == "all" and ckpt.policy == "sqrt"
    assert ckpt.stored_states < plain.stored_states
    # the replay recomputes the same float64 operations in the same order: agreement to rounding
    torch.testing.assert_close(ckpt.grad, plain.grad, rtol=1e-10, atol=1e-14)


def test_exact_divergence_is_trace_of_explicit_jacobian():
    model = ScoreModel(ScoreModelConfig(dim=5, hidden=16, fourier=3))
    theta = model.init(torch.float64) + 0.1
    x = torch.rand(3, 5, dtype=torch.float64)
    t = torch.tensor(0.37, dtype=torch.float64)

    def fn(xs, ts):
        return model.score(theta, xs, ts)

    s, div = exact_divergence(fn, x, t, create_graph=False)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: fn(v[None], t[None])[0], x[b])
        assert float(div[b]) == pytest.approx(float(torch.trace(jac)), rel=1e-12, abs=1e-12)
        torch.testing.assert_close(s[b], fn(x[b:b + 1], t[None])[0])


def test_gaussian_ode_log_likelihood_matches_closed_form():
    # data ~ N(0, s0^2 I): under dx = 25^t dw the marginal at t is N(0, (s0^2 + std_t^2) I), score -x / var_t
    s0, d, eps = 0.5, 6, 1e-3

    def var(t):
        return s0 ** 2 + marginal_std(t) ** 2

    def score(x, t):
        return -x / var(t).unsqueeze(-1)

    x = torch.randn(4, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.7
    v_eps = float(var(torch.tensor(eps, dtype=torch.float64)))
    exact = -0.5 * d * math.log(2 * math.pi * v_eps) - 0.5 * (x ** 2).sum(-1) / v_eps
    prior_var = float(var(torch.tensor(1.0, dtype=torch.float64)))
    errors = {}
    for solver, steps, tol in (("heun", 128, 3e-3), ("heun", 64, None), ("rk4", 32, 1e-4), ("rk4", 16, None)):
        with torch.no_grad():
            got = ode_log_likelihood(score, x, steps=steps, eps=eps, solver=solver, prior_var=prior_var)
        errors[solver, steps] = float(((got - exact) / exact).abs().max())
        if tol:  # measured relative errors: heun-128 1.3e-3, rk4-32 2.5e-5
            torch.testing.assert_close(got, exact, rtol=tol, atol=0)
    # and the error falls at the solver's order when the steps double (Heun 2: x4, RK4 4: x16; measured 3.9, 14)
    assert 3.0 < errors["heun", 64] / errors["heun", 128] < 5.0
    assert 10.0 < errors["rk4", 16] / errors["rk4", 32] < 20.0


def test_bits_per_dim_is_differentiable_twice():
    model = ScoreModel(ScoreModelConfig(dim=4, hidden=8, fourier=2))
    theta = model.init(torch.float64).requires_grad_(True)
    x = torch.rand(1, 4, dtype=torch.float64)
    b = bits_per_dim(lambda xs, ts: model.score(theta, xs, ts), x, steps=3)[0]
    (g,) = torch.autograd.grad(b, theta, create_graph=True)
    (hv,) = torch.autograd.grad(g @ torch.ones_like(g), theta)
    assert torch.isfinite(hv).all() and float(hv.abs().sum()) > 0


def test_training_is_deterministic_and_weight_zero_removes_the_example():
    run, _ = tiny_problem()
    torch.testing.assert_close(run.train(), run.train(), rtol=0, atol=0)
    w = torch.ones(run.n, dtype=torch.float64)
    w[3] = 0
    assert not torch.equal(run.train(w), run.train())
    # weight 0 means the example contributes nothing to any batch loss it appears in
    theta = run.initial_state()[0]
    k = next(k for k in range(run.config.steps) if 3 in run.order[k].tolist())
    idx, t, z = run.batch(k)
    from attribution.magic.score_model import dsm_losses
    per = dsm_losses(run.model, theta, run.data[idx], t, z)
    expect = (per * (idx != 3).double()).sum() / run.config.batch_size
    assert float(run.weighted_loss(theta, w, k)) == pytest.approx(float(expect), rel=1e-12)


def test_metasmoothness_is_one_for_a_linear_response():
    run, _ = tiny_problem(steps=1)
    # one plain step from the same start: the update is a smooth function of w, so the score is close to 1
    assert metasmoothness(run, h=1e-3) > 0.99


def test_removed_sets_and_spearman():
    sets = removed_sets(1000, 0.01, 5, seed=3)
    assert sets.shape == (5, 10) and all(len(set(s)) == 10 for s in sets)
    np.testing.assert_array_equal(sets, removed_sets(1000, 0.01, 5, seed=3))
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


@pytest.mark.parametrize("bad", [0, -0.1, 1, 1.5])
def test_removal_fraction_outside_unit_interval(bad):
    with pytest.raises(ConfigError, match="between 0 and 1"):
        check_fraction(bad)


@pytest.mark.parametrize("steps", [0, -3])
def test_ode_steps_below_one(steps):
    with pytest.raises(ConfigError, match=">= 1"):
        bits_per_dim(lambda x, t: -x, torch.zeros(1, 4), steps=steps)


# -- CLI end to end on a tiny recipe (digits 8x8, 3 training steps) --------------------------------------------

TINY = ["--hidden", "8", "--steps", "3", "--batch-size", "32", "--ode-steps", "2", "--dtype", "float64"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from attribution.cli.main import main

    root = tmp_path_factory.mktemp("magic-cache")
    assert main(["magic", "train", "--cache", str(root), *TINY]) == 0
    (run_dir,) = [p.parent for p in root.glob("magic/*/run.json")]
    return run_dir


def test_cli_query_validate(tiny_run, tmp_path, capsys):
    from attribution.cli.main import main
    from attribution.magic.runs import open_run

    out = tmp_path / "q.json"
    assert main(["magic", "query", "--run", str(tiny_run), "--train-index", "5", "--top", "3",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    scores = np.array(res["scores"])
    run = open_run(tiny_run)
    assert scores.shape == (run.run.n,)
    assert [r["index"] for r in res["most_helpful"]] == list(np.argsort(scores)[:3])
    # the recorded bpd is the bpd of the saved run's parameters
    x = run.query_vector(run.dataset.pixels[5])
    assert res["bpd"] == pytest.approx(float(run.bpd(run.theta(), x[None])[0]), rel=1e-9)
    capsys.readouterr()
    assert main(["magic", "query", "--run", str(tiny_run), "--train-index", "5"]) == 0   # from the cache
    assert json.loads(capsys.readouterr().out)["cached"] is True
    vout = tmp_path / "v.json"
    assert main(["magic", "validate", "--run", str(tiny_run), "--sets", "4", "--out", str(vout)]) == 0
    (r,) = json.loads(vout.read_text())["results"]
    assert r["n_sets"] == 4
    sets = json.loads((tiny_run / "validation" / "0.01-seed0" / "sets.json").read_text())["sets"]
    assert r["predicted"][0] == pytest.approx(-scores[sets[0]].sum(), rel=1e-9)
    assert len(list((tiny_run / "validation" / "0.01-seed0").glob("retrain-*.safetensors"))) == 4


def test_cli_bad_inputs(tiny_run, tmp_path, capsys):
    from PIL import Image

    from attribution.cli.main import main

    def one_line_error(argv, pattern):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and pattern in err, err

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(big)
    one_line_error(["magic", "query", "--run", str(tiny_run), "--image", str(big)], "8x8 grayscale")
    rgb = tmp_path / "rgb.png"
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[..., 0] = 200
    Image.fromarray(arr).save(rgb)
    one_line_error(["magic", "query", "--run", str(tiny_run), "--image", str(rgb)], "3 channels")
    one_line_error(["magic", "validate", "--run", str(tiny_run), "--fraction", "1.5"], "between 0 and 1")
    one_line_error(["magic", "train", "--cache", str(tmp_path), *TINY[:-4], "--ode-steps", "0"], ">= 1")
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text("{}")
    one_line_error(["magic", "query", "--run", str(other), "--seed", "0"], "magic train")
    with pytest.raises(ImageError, match="8x8 grayscale"):
        from attribution.magic.runs import open_run
        open_run(tiny_run).query_vector(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(CheckpointError, match="one weight per training example"):
        from attribution.magic.runs import open_run
        open_run(other)
    shipped = Path(__file__).resolve().parents[2] / "models" / "digits"
    if shipped.is_dir():   # an ordinary diffusion checkpoint (it has a run.json of its own)
        one_line_error(["magic", "query", "--run", str(shipped), "--seed", "0"], "magic train")


def test_trak_baselines_match_a_direct_computation(tiny_run):
    from attribution.magic.baselines import _draws, features, scores
    from attribution.magic.runs import open_run
    from attribution.magic.score_model import dsm_losses

    run = open_run(tiny_run)
    theta = run.theta()
    phi = features(run, theta, run.data[:3], "loss", k=4)
    t, z = _draws(run, 4, 0)
    for i in range(3):   # per-example gradient of the mean loss over the same K draws, by plain autograd
        th = theta.clone().requires_grad_(True)
        loss = dsm_losses(run.model, th, run.data[i].expand(4, -1), t, z).mean()
        torch.testing.assert_close(phi[i], torch.autograd.grad(loss, th)[0], rtol=1e-10, atol=1e-12)
    xq = run.data[10:12]
    tau = scores(run, theta, xq, "dtrak", k=4)
    # primal form: phi_i^T (Phi^T Phi + lam I)^-1 phi_q, with lam = 0.1 * trace(Phi Phi^T) / N
    big = features(run, theta, run.data, "square", k=4)
    q = features(run, theta, xq, "square", k=4)
    lam = 0.1 * float((big ** 2).sum()) / len(big)
    direct = big @ torch.linalg.solve(big.T @ big + lam * torch.eye(big.shape[1], dtype=big.dtype), q.T)
    np.testing.assert_allclose(tau, direct.T.numpy(), rtol=1e-6, atol=1e-10)   # float64 solves, two forms
    assert np.abs(tau).max() > 1e-6
    # TRAK with the bits/dim output: the query side is the gradient of the query's bits/dim
    tau = scores(run, theta, xq[:1], "trak", k=4)
    big = features(run, theta, run.data, "loss", k=4)
    th = theta.clone().requires_grad_(True)
    (gq,) = torch.autograd.grad(run.bpd(th, xq[:1], create_graph=True)[0], th)
    lam = 0.1 * float((big ** 2).sum()) / len(big)
    direct = big @ torch.linalg.solve(big.T @ big + lam * torch.eye(big.shape[1], dtype=big.dtype), gq)
    np.testing.assert_allclose(tau[0], direct.numpy(), rtol=1e-6, atol=1e-10)
