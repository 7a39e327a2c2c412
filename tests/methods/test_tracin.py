"""The timestep analysis and the checkpoint methods: gradient norms against a plain autograd computation,
ReTrac's normalisation, Diffusion-TracIn / ReTrac / TracInCP / GAS against direct sums over checkpoints, the
learning-rate weights against the run's recorded schedule, the top-k statistics, bad input, and the timestep bias
of the shipped digits model measured from data.

The method checks use the `tiny_run` fixture (two checkpoints of a tiny UNet), exact gradients (identity
projector) and a few training images, so every score has an independent float64 reference.
"""

from __future__ import annotations

import copy
import re
import json

import numpy as np
import pytest
import torch

from attribution.analysis.influential import top_k_stats
from attribution.analysis.norms import NormConfig, TrainingNorms, grid_timesteps, sample_curve, training_norms
from attribution.data import load_dataset
from attribution.data.datasets import ImageDataset
from attribution.engine import Attribution, Attributor
from attribution.features.timesteps import training_timesteps
from attribution.methods.over_checkpoints import tracin_weights
from attribution.errors import ConfigError
from attribution.features.config import FeatureConfig
from attribution.features.gradients import GradientSpec, gradient_norms, per_sample_gradients
from attribution.features.timesteps import noise_for
from attribution.methods import get_method
from attribution.models import load_model
from attribution.train import lr_lambda

T_TARGET = (0, 500)  # K=2 uniform target timesteps


def subset(d: ImageDataset, n: int) -> ImageDataset:
    return ImageDataset(d.spec, d.split, d.pixels[:n].copy(), d.labels[:n].copy(), list(d.class_names),
                        d.source_index[:n].copy())


_UNETS: dict[int, torch.nn.Module] = {}


def direct_gradient(model, x0, eps, t) -> torch.Tensor:
    """The training-loss gradient of one image by plain autograd on a copy of the UNet: no vmap, no
    functional_call; parameters in the adapter's order."""
    if id(model) not in _UNETS:
        _UNETS[id(model)] = copy.deepcopy(model.unet).requires_grad_(True)
    unet = _UNETS[id(model)]
    named = dict(unet.named_parameters())
    tt = torch.tensor([t])
    x_t = model.schedule.add_noise(x0[None], eps[None], tt)
    loss = ((unet(x_t, tt).sample - eps[None]) ** 2).mean()
    grads = torch.autograd.grad(loss, [named[n] for n in model.parameters()])
    return torch.cat([g.reshape(-1) for g in grads]).double()


@pytest.fixture(scope="module")
def run_models(tiny_run):
    return [load_model(f"{tiny_run}@epoch-1", "cpu"), load_model(f"{tiny_run}@epoch-2", "cpu")]


# -- gradient norms ----------------------------------------------------------------------------------------------


def test_gradient_norms_equal_a_direct_per_sample_computation(run_models, digits):
    model = run_models[-1]
    x0, keys = digits.tensors([3, 7]), ["train/3", "train/7"]
    ts = torch.tensor([[5, 400, 990], [50, 500, 700]])
    norms = gradient_norms(model, x0, keys, GradientSpec("simple", (0,)), ts)
    for i in range(2):
        for j in range(3):
            eps = noise_for([keys[i]], ts[i, j:j + 1], (1, 16, 16), 0)[0, 0]
            want = direct_gradient(model, x0[i], eps, int(ts[i, j])).norm().item()
            # float32 gradients of a 41k-parameter model summed two ways: agree to ~1e-6 relative
            assert norms[i, j].item() == pytest.approx(want, rel=1e-4)


def test_sample_curve_uses_the_same_noise_at_every_timestep(run_models, digits):
    model = run_models[-1]
    ts, norms = sample_curve(model, digits.tensors([0])[0], "train/0", NormConfig(grid=5))
    np.testing.assert_array_equal(ts, grid_timesteps(1000, 5))
    assert ts[0] == 1 and ts[-1] == 999
    eps = noise_for(["train/0"], torch.tensor([ts[0]]), (1, 16, 16), 0)[0, 0]  # keyed to the first timestep
    want = [direct_gradient(model, digits.tensors([0])[0], eps, int(t)).norm().item() for t in ts]
    np.testing.assert_allclose(norms, want, rtol=1e-4)


def test_normalised_gradient_is_the_mean_of_unit_per_timestep_gradients(run_models, digits):
    model = run_models[-1]
    x0, keys = digits.tensors([1, 2]), ["val/1", "val/2"]
    g = per_sample_gradients(model, x0, keys, GradientSpec("simple", T_TARGET, normalize=True)).double()
    for i in range(2):
        units = []
        for t in T_TARGET:
            eps = noise_for([keys[i]], torch.tensor([t]), (1, 16, 16), 0)[0, 0]
            d = direct_gradient(model, x0[i], eps, t)
            units.append(d / d.norm())
        want = torch.stack(units).mean(0)
        assert ((g[i] - want).norm() / want.norm()).item() < 1e-4
    plain = per_sample_gradients(model, x0, keys, GradientSpec("simple", T_TARGET)).double()
    assert ((plain - g).norm() / plain.norm()).item() > 0.1  # normalisation changes the feature


def test_training_timesteps_are_the_recorded_ones_when_the_dataset_matches(run_models, tiny_run, digits):
    model = run_models[0]
    recorded = np.load(tiny_run / "epoch-1" / "training_timesteps.npy")
    ts, source = training_timesteps(model, digits, 0)
    assert source == "recorded"
    np.testing.assert_array_equal(ts, recorded)
    assert not np.array_equal(ts, training_timesteps(run_models[1], digits, 0)[0])  # another epoch, other draws
    small = subset(digits, 30)  # not the training set the run recorded: one keyed draw per image instead
    ts_s, source_s = training_timesteps(model, small, 0)
    assert source_s == "sampled" and ts_s.shape == (30,) and ts_s.min() >= 0 and ts_s.max() < 1000
    np.testing.assert_array_equal(ts_s, training_timesteps(model, small, 0)[0])
    assert len(np.unique(ts_s)) > 20  # spread over [0, T), not one value


# -- the learning-rate weights -----------------------------------------------------------------------------------


def test_tracin_weights_follow_the_recorded_learning_rate_schedule(run_models, tiny_run):
    meta = json.loads((tiny_run / "run.json").read_text())
    weights, note = tracin_weights(run_models)
    assert "run.json" in note
    steps = [c["step"] for c in meta["checkpoints"]]
    per_epoch = steps[0]  # epoch 1
    total = meta["config"]["epochs"] * per_epoch
    sched = lr_lambda(total, max(1, int(meta["config"]["warmup_fraction"] * total)))
    # the reconstructed schedule reproduces the learning rate the run recorded at each checkpoint
    for c in meta["checkpoints"]:
        assert meta["config"]["lr"] * sched(c["step"]) == pytest.approx(c["lr"], rel=1e-9, abs=1e-15)
    want = [sum(meta["config"]["lr"] * sched(s) for s in range(a, b)) / per_epoch
            for a, b in zip([0] + steps[:-1], steps)]
    assert weights == pytest.approx(want, rel=1e-12)
    assert all(w > 0 for w in weights)
    with pytest.raises(ConfigError, match="training order"):
        tracin_weights(run_models[::-1])


# -- the checkpoint methods against direct sums ------------------------------------------------------------------


@pytest.fixture(scope="module")
def exact(run_models, digits, tmp_path_factory):
    """Per checkpoint: exact training gradients at each image's (sampled) training timestep and exact
    per-timestep target gradients, float64, computed by plain autograd."""
    train = subset(digits, 8)
    val = load_dataset("digits", "val")
    targets, tkeys = val.tensors([0, 1, 2]), ["val/0", "val/1", "val/2"]
    out = []
    for model in run_models:
        ts, _ = training_timesteps(model, train, 0)
        X = torch.stack([direct_gradient(model, train.tensors([n])[0],
                                         noise_for([f"train/{n}"], torch.tensor([ts[n]]), (1, 16, 16), 0)[0, 0],
                                         int(ts[n])) for n in range(len(train))])
        G = torch.stack([torch.stack([direct_gradient(model, targets[m],
                                                      noise_for([tkeys[m]], torch.tensor([t]), (1, 16, 16), 0)[0, 0],
                                                      t) for t in T_TARGET]) for m in range(3)])  # (M, K, P)
        out.append((X, G))
    return train, targets, tkeys, out, tmp_path_factory.mktemp("tracin-cache")


def attribution_for(name, run_models, train, cache, **cfg) -> Attribution:
    method = get_method(name)
    fc = FeatureConfig(fn="simple", timesteps=2, projector="identity", strategy=method.strategy or "uniform",
                       normalize=method.normalize, **cfg)
    members = [Attributor(m, train, fc, cache=cache) for m in run_models]
    weights, note = tracin_weights(run_models)
    att = Attribution(method, members, weights, note)
    att.featurize()
    return att


def test_diffusion_tracin_and_retrac_equal_their_direct_sums(run_models, exact):
    train, targets, tkeys, per_ckpt, cache = exact
    weights, _ = tracin_weights(run_models)
    tracin = attribution_for("tracin", run_models, train, cache)
    retrac = attribution_for("retrac", run_models, train, cache)
    assert tracin.members[0].featurizer.train_timesteps_source == "sampled"
    want_tracin = sum(w * (G.mean(1) @ X.T).numpy() for w, (X, G) in zip(weights, per_ckpt))
    # ReTrac = cosine-weighted TracIn: sum_c eta_c mean_k cos(g_train, g_target,k)
    want_retrac = sum(w * np.mean([(Xu @ (G[:, k] / G[:, k].norm(dim=1, keepdim=True)).T).numpy().T
                                   for k in range(G.shape[1])], 0)
                      for w, (X, G) in zip(weights, per_ckpt) for Xu in [X / X.norm(dim=1, keepdim=True)])
    got_tracin = tracin.scores(tracin.features_of(targets, tkeys))
    got_retrac = retrac.scores(retrac.features_of(targets, tkeys))
    # float32 vmap gradients against float64-accumulated autograd ones: ~1e-6 relative; 1e-4 leaves margin
    np.testing.assert_allclose(got_tracin, want_tracin, rtol=1e-4, atol=1e-4 * np.abs(want_tracin).max())
    np.testing.assert_allclose(got_retrac, want_retrac, rtol=1e-4, atol=1e-4 * np.abs(want_retrac).max())
    assert np.abs(got_retrac).max() <= sum(weights) * (1 + 1e-5)  # a weighted mean of cosines
    # self-influence of TracIn: sum_c eta_c ||g_c(x_n, t_n)||^2
    want_self = sum(w * (X**2).sum(1).numpy() for w, (X, _) in zip(weights, per_ckpt))
    np.testing.assert_allclose(tracin.self_influence(), want_self, rtol=1e-4)
    with pytest.raises(ConfigError, match="use tracin"):
        retrac.self_influence()


def test_tracincp_and_gas_sum_dot_and_cosine_of_the_trak_features(run_models, exact, digits):
    train, targets, tkeys, _, cache = exact
    weights, _ = tracin_weights(run_models)
    spec = GradientSpec("simple", T_TARGET)
    cp = attribution_for("tracincp", run_models, train, cache)
    gas = attribution_for("gas", run_models, train, cache)
    want_cp, want_gas = 0.0, 0.0
    for w, m in zip(weights, run_models):
        X = per_sample_gradients(m, train.tensors(range(len(train))), [f"train/{i}" for i in range(len(train))],
                                 spec).double().numpy()
        G = per_sample_gradients(m, targets, tkeys, spec).double().numpy()
        want_cp = want_cp + w * G @ X.T
        Xn, Gn = X / np.linalg.norm(X, axis=1, keepdims=True), G / np.linalg.norm(G, axis=1, keepdims=True)
        want_gas = want_gas + w * Gn @ Xn.T
    np.testing.assert_allclose(cp.scores(cp.features_of(targets, tkeys)), want_cp, rtol=1e-5,
                               atol=1e-6 * np.abs(want_cp).max())
    np.testing.assert_allclose(gas.scores(gas.features_of(targets, tkeys)), want_gas, rtol=1e-5, atol=1e-6)


def test_checkpoint_methods_need_several_checkpoints(tiny_run, run_models, digits):
    method = get_method("tracin")
    assert method.checkpoints(str(tiny_run)) == [f"{tiny_run}@epoch-1", f"{tiny_run}@epoch-2"]
    assert get_method("dtrak").checkpoints(f"{tiny_run}@epoch-2") == [f"{tiny_run}@epoch-2"]
    with pytest.raises(ConfigError, match="needs at least two.*first checkpoint of its run") as exc:
        method.checkpoints(f"{tiny_run}@epoch-1")
    assert "\n" not in str(exc.value)
    one = Attributor(run_models[0], subset(digits, 4), FeatureConfig(fn="simple", strategy="training",
                                                                      projector="identity"))
    with pytest.raises(ConfigError, match="needs at least two"):
        Attribution(method, [one])


# -- analyses ----------------------------------------------------------------------------------------------------


def test_top_k_stats_count_distinct_proponents():
    scores = np.array([[5.0, 4.0, 0.0, 1.0], [5.0, 0.0, 4.0, 1.0], [5.0, 4.0, 1.0, 0.0]])
    s = top_k_stats("x", scores, 2)
    assert s.unique == 3  # {0, 1}, {0, 2}, {0, 1}
    assert s.recurring[0] == (0, 3) and s.recurring[1] == (1, 2)
    assert s.unique_share == pytest.approx(3 / 6)
    with pytest.raises(ConfigError, match="--top"):
        top_k_stats("x", scores, 5)


def test_training_norms_are_cached_and_resume(run_models, digits, tmp_path, monkeypatch):
    from attribution.analysis import norms as norms_mod

    model, cfg = run_models[-1], NormConfig(samples=12)
    first = training_norms(model, digits, cfg, cache=tmp_path, batch_size=4)
    assert first.source == "recorded" and len(first.norms) == 12
    np.testing.assert_array_equal(first.timesteps, training_timesteps(model, digits, 0)[0][first.indices])
    calls = []
    monkeypatch.setattr(norms_mod, "gradient_norms", lambda *a, **k: calls.append(1))
    again = training_norms(model, digits, cfg, cache=tmp_path, batch_size=4)  # all rows done: no gradients
    assert calls == []
    np.testing.assert_array_equal(again.norms, first.norms)


def test_timestep_bias_on_the_shipped_digits_model():
    """A timestep bias of the opposite direction to the Diffusion-ReTrac paper's: the paper reports gradient norms
    rising toward noise (large t); on the shipped epsilon-prediction digits model training images drawn at small t
    have much larger loss gradients than those drawn at large t. The epsilon-MSE gradient is proportional to the
    prediction error, which is largest at small t (the Simple loss falls from ~0.17 at t = 10 to ~0.0004 at
    t = 900 on this model): recovering faint noise from a nearly clean image is hard, x_t ~ eps at large t is easy."""
    model, train = load_model("digits", "cpu"), load_dataset("digits")
    res = training_norms(model, train, NormConfig(samples=120), cache=None)
    assert isinstance(res, TrainingNorms) and res.source == "recorded"
    bins = res.binned(5, model.num_timesteps)
    rho = res.spearman()
    # measured -0.90 over 500 images (BENCHMARKS.md); a monotone decrease of the bin medians and rho < -0.5
    # would fail for a model without the bias
    assert rho < -0.5, rho
    assert bins[0]["median"] > 3 * bins[-1]["median"], bins


# -- the CLI -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_norms_command_writes_table_curve_and_figure(tiny_run, tmp_path):
    import csv

    from attribution.cli import main

    out = tmp_path / "norms"
    assert main(["norms", "--checkpoint", str(tiny_run), "--all-checkpoints", "--dataset", "digits", "--samples",
                 "20", "--grid", "5", "--index", "7", "--out", str(out), "--cache", str(tmp_path / "c"),
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "training_norms.csv")))
    assert len(rows) == 40 and {r["checkpoint"] for r in rows} == {f"{tiny_run}@epoch-1", f"{tiny_run}@epoch-2"}
    summary = json.loads((out / "summary.json").read_text())
    from scipy.stats import spearmanr

    for ck in summary["checkpoints"]:
        mine = [r for r in rows if r["checkpoint"] == ck["checkpoint"]]
        rho = spearmanr([float(r["norm"]) for r in mine], [int(r["timestep"]) for r in mine]).statistic
        assert ck["spearman_norm_vs_t"] == pytest.approx(rho, abs=1e-4)
        assert ck["timesteps"] == "recorded"
        recorded = np.load(tiny_run / ck["checkpoint"].split("@")[1] / "training_timesteps.npy")
        assert all(int(r["timestep"]) == recorded[int(r["index"])] for r in mine)
        assert ck["sample"] == {"index": 7, "training_timestep": int(recorded[7])}
    curve = list(csv.DictReader(open(out / "sample_curve.csv")))
    assert [int(r["timestep"]) for r in curve[:5]] == grid_timesteps(1000, 5).tolist() and len(curve) == 10
    assert "plotly" in (out / "norms.html").read_text()[:200000].lower()


@pytest.mark.parametrize("args, message", [
    (["norms", "--timesteps", "5,1000"], r"timestep 1000 is outside \[0, 1000\)"),
    (["norms", "--timesteps", "5,x"], "comma-separated integers"),
    (["norms", "--index", "5000"], "index 5000"),
    (["norms", "--samples", "0"], "--samples must be at least 1"),
    (["score", "--method", "tracin", "--target", "val:0"], "needs at least two"),
    (["influential", "--top", "0"], "--top must be at least 1"),
    (["influential", "--methods", "tracin,nope"], "unknown method 'nope'"),
])
def test_analysis_bad_input_is_one_line(tiny_run, tmp_path, capsys, args, message):
    from attribution.cli import main

    ckpt = f"{tiny_run}@epoch-1" if args[0] == "score" else str(tiny_run)
    rc = main([*args, "--checkpoint", ckpt, "--dataset", "digits", "--device", "cpu",
               *(["--out", str(tmp_path / "o")] if args[0] != "score" else [])])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written


# -- figures and plot selections ---------------------------------------------------------------------------------


def test_scatter_customdata_and_selection_mapping():
    from attribution.figures import norm_scatter_figure, selected_points

    res = TrainingNorms("ck", np.array([4, 9, 2, 7]), np.array([10, 900, 15, 950]), np.array([2.0, 0.1, 4.0, 0.2]),
                        np.array([1, 1, 0, 0]), "recorded")
    fig = norm_scatter_figure(res, lambda i: {4: "1", 9: "1", 2: "0", 7: "0"}[i], normalize_per_bin=True, bins=2)
    points = {(int(c[0]), int(c[1])): y for tr in fig.data for c, y in zip(tr.customdata, tr.y)}
    assert set(points) == {(4, 10), (9, 900), (2, 15), (7, 950)}
    # per-bin normalisation: each norm over the median of its timestep bin ([0, 500) -> 3.0, [500, 1000) -> 0.15)
    assert points[(2, 15)] == pytest.approx(4.0 / 3.0) and points[(9, 900)] == pytest.approx(0.1 / 0.15)
    # Streamlit returns customdata as a list or as a dict with string keys; duplicates are dropped
    event = {"points": [{"customdata": [9, 900]}, {"customdata": {"1": 15, "0": 2}}, {"customdata": [9, 900]},
                        {"x": 3}]}
    assert selected_points(event) == [(9, 900), (2, 15)]
    assert selected_points(None) == [] and selected_points({}) == []


def test_trajectory_methods_refuse_image_features(run_models, digits):
    """Journey TRAK's target features come from a sampling trajectory: scoring plain image features through it
    would silently be TRAK, so `features_of` (images without a trajectory) refuses in one line."""
    att = Attribution(get_method("journey-trak"),
                      [Attributor(run_models[-1], subset(digits, 4), FeatureConfig(fn="simple", projector="identity"))])
    with pytest.raises(ConfigError, match="needs a generated target with a sampling trajectory"):
        att.features_of(digits.tensors([0]), ["train/0"])
