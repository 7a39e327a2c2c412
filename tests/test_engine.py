"""The attribution engine: output functions, timesteps and noise, per-sample gradients, projectors, the feature
store (caching, resume, refusal), the Attributor and the six methods, each checked against an independent
computation (a plain autograd loop, dense float64 linear algebra, closed-form formulas, traker's scheduler).

Everything runs on a randomly initialised "tiny" UNet (41,609 parameters) and a few digits images: the checks are
numerical identities that hold for any weights, so no training is needed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from engine_support import TWO_STEPS, keys_for, subset, tiny_model

from attribution.data.datasets import ImageDataset
from attribution.engine import Attribution, Attributor, open_attributor
from attribution.report import rank
from attribution.errors import AttributionError, CacheMismatchError, ConfigError
from attribution.features import gradients as gradients_mod
from attribution.features.config import FeatureConfig
from attribution.features.gradients import GradientSpec, param_count, per_sample_gradients
from attribution.features.outputs import OUTPUT_FUNCTIONS, output_value
from attribution.features.projectors import SparseJLProjector, TrakGaussianProjector, make_projector
from attribution.features.timesteps import noise_for, select_timesteps
from attribution.kernel import Kernel
from attribution.methods import METHODS, get_method
from attribution.models.adapter import DiffusionModel, NoiseSchedule
from attribution.models.checkpoint import DEFAULT_SCHEDULE

CPU = torch.device("cpu")


# -- shared fixtures (model, digits, digits_val: conftest.py) -----------------------------------------------------


@pytest.fixture(scope="module")
def raw(model, digits, digits_val):
    """Exact (unprojected) Square gradients, K=2: 40 training rows and 5 validation targets, float64."""
    spec = FeatureConfig(fn="square", **TWO_STEPS).gradient_spec(model.num_timesteps)
    X = per_sample_gradients(model, digits.tensors(range(40)), keys_for("train", range(40)), spec)
    G = per_sample_gradients(model, digits_val.tensors(range(5)), keys_for("val", range(5)), spec)
    return X.double().numpy(), G.double().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, f"error message should be one line: {msg!r}"
    return msg


def files_under(root) -> list:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


# -- output functions ------------------------------------------------------------------------------------------


def test_output_functions_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    # float64, so the identities below hold to ~1e-15 and any formula slip (a missing mean, a wrong sign) shows.
    eps_hat = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    w = torch.rand(5, generator=g, dtype=torch.float64)
    a, e = eps_hat.reshape(5, -1).numpy(), eps.reshape(5, -1).numpy()
    simple = ((a - e) ** 2).mean(1)
    square = (a**2).mean(1)
    expected = {
        "simple": simple.sum(),
        "elbo": (w.numpy() * simple).sum(),
        "square": square.sum(),
        "avg": a.mean(1).sum(),
        "l1": np.abs(a).sum(1).sum(),
        "l2": np.sqrt((a**2).sum(1)).sum(),
        "linf": np.abs(a).max(1).sum(),
        "interp": (0.3 * square + 0.7 * (simple - square)).sum(),
    }
    assert set(expected) == set(OUTPUT_FUNCTIONS)
    for fn, value in expected.items():
        got = output_value(fn, eps_hat, eps, w, eta=0.3 if fn == "interp" else 1.0)
        assert got.shape == ()
        assert got.item() == pytest.approx(value, rel=1e-12), fn
    # the interpolation's anchors (D-TRAK Sec. 3.2): eta = 1 is Square, eta = 0.5 is Simple / 2.
    assert output_value("interp", eps_hat, eps, w, 1.0).item() == pytest.approx(square.sum(), rel=1e-12)
    assert output_value("interp", eps_hat, eps, w, 0.5).item() == pytest.approx(simple.sum() / 2, rel=1e-12)
    with pytest.raises(ConfigError, match="unknown output function"):
        output_value("bogus", eps_hat, eps, w)


def test_schedule_matches_diffusers_ddpm():
    from diffusers import DDPMScheduler

    sched = NoiseSchedule.from_config(DEFAULT_SCHEDULE)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    betas = ref.betas.double().numpy()
    abar = np.cumprod(1 - betas)
    t = torch.tensor([0, 1, 10, 250, 500, 999])
    tn = t.numpy()
    # ELBO weight w_t = beta_t / (2 alpha_t (1 - abar_t)), alpha_t = 1 - beta_t (the per-step alpha, not abar).
    w_ref = betas[tn] / (2 * (1 - betas[tn]) * (1 - abar[tn]))
    # float32 output of a float64 computation: relative 6e-8.
    np.testing.assert_allclose(sched.elbo_weight(t).numpy(), w_ref, rtol=1e-6)
    # at t = 0, 1 - abar_0 = beta_0, so w_0 = 1 / (2 (1 - beta_0)) ~ 0.5.
    assert sched.elbo_weight(torch.tensor([0])).item() == pytest.approx(1 / (2 * (1 - 1e-4)), rel=1e-6)
    # the forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, against float64 arithmetic and against
    # diffusers' add_noise. Both implementations form 1 - abar_t from a float32 abar_t; near t = 0, 1 - abar ~ 1e-4,
    # so its relative error is ~3e-4 and x_t is off by up to ~1e-5 for |eps| ~ 3 (measured 2e-6 and 5e-6): atol 3e-5.
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    a = torch.from_numpy(abar[tn]).view(-1, 1, 1, 1)
    exact = a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()
    torch.testing.assert_close(sched.add_noise(x0, eps, t).double(), exact, rtol=0, atol=3e-5)
    torch.testing.assert_close(sched.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=0, atol=3e-5)


# -- timesteps and noise ---------------------------------------------------------------------------------------


def test_timestep_strategies():
    assert select_timesteps("uniform", 10, 1000).tolist() == list(range(0, 1000, 100))
    assert select_timesteps("uniform", 3, 1000).tolist() == [0, 333, 666]  # range(0, 1000, 333)[:3]
    assert select_timesteps("uniform", 1000, 1000).tolist() == list(range(1000))
    assert select_timesteps("cumulative", 7, 1000).tolist() == list(range(7))
    assert select_timesteps("uniform", 10, 1000).dtype == torch.long
    for k in (0, -1, 1001):
        for strategy in ("uniform", "cumulative"):
            with pytest.raises(ConfigError, match="timesteps K") as exc:
                select_timesteps(strategy, k, 1000)
            one_line(exc)
    with pytest.raises(ConfigError, match="strategy"):
        select_timesteps("random", 10, 1000)
    # through the feature config: K is checked against the model's T when the gradient spec is made.
    assert FeatureConfig(timesteps=10).gradient_spec(1000).timesteps == tuple(range(0, 1000, 100))
    with pytest.raises(ConfigError, match="within 1..1000"):
        FeatureConfig(timesteps=5000).gradient_spec(1000)


def test_noise_is_keyed_per_sample_timestep_and_draw():
    ts = torch.tensor([0, 500])
    a = noise_for(["train/1", "train/2", "val/1"], ts, (1, 4, 4), seed=0, draws=2)
    assert a.shape == (3, 4, 1, 4, 4)
    # a sample's noise does not depend on what else is in the batch, or where.
    b = noise_for(["val/1", "train/1"], ts, (1, 4, 4), seed=0, draws=2)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    # different keys, timesteps, draws and seeds give different (independent) noise.
    flat = a.reshape(12, -1)
    corr = torch.corrcoef(flat)
    off = corr[~torch.eye(12, dtype=bool)]
    # 16 standard normals per entry: independent correlations have sd 1/sqrt(15) ~ 0.26; identical would be 1.
    assert off.abs().max() < 0.99
    assert not torch.equal(noise_for(["train/1"], ts, (1, 4, 4), seed=1), a[:1, ::2])
    assert torch.equal(noise_for(["train/1"], ts, (1, 4, 4), seed=0), a[:1, ::2])  # draw 0 of each t
    # standard normal: over 4096 values the mean is within 4 sd (4/64) of 0 and the variance within ~0.1 of 1.
    big = noise_for(["x"], torch.tensor([3]), (4096,), seed=0)
    assert abs(big.mean().item()) < 4 / 64 and abs(big.var().item() - 1) < 0.1


# -- per-sample gradients ----------------------------------------------------------------------------------------


def loop_gradients(model: DiffusionModel, x0: torch.Tensor, keys: list[str], spec: GradientSpec) -> torch.Tensor:
    """The reference: one sample at a time, the UNet's own forward (no functional_call, no vmap), autograd.grad."""
    unet = copy.deepcopy(model.unet).requires_grad_(True)
    named = dict(unet.named_parameters())
    names = list(model.parameters(spec.params))
    ts = torch.tensor(spec.timesteps)
    t_all = ts.repeat_interleave(spec.draws)
    w = model.schedule.elbo_weight(t_all)
    noise = noise_for(keys, ts, tuple(x0.shape[1:]), spec.seed, spec.draws)
    rows = []
    for i in range(len(x0)):
        eps = noise[i]
        x_t = model.schedule.add_noise(x0[i].expand_as(eps), eps, t_all)
        eps_hat = unet(x_t, t_all).sample
        value = output_value(spec.fn, eps_hat, eps, w, spec.eta) / len(t_all)
        grads = torch.autograd.grad(value, [named[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("fn", OUTPUT_FUNCTIONS)
def test_vmap_gradients_equal_a_per_sample_autograd_loop(model, digits, fn):
    x0, keys = digits.tensors([0, 7, 11]), keys_for("train", [0, 7, 11])
    spec = GradientSpec(fn, (0, 500), draws=2, seed=3, eta=0.3 if fn == "interp" else 1.0)
    fast = per_sample_gradients(model, x0, keys, spec)
    slow = loop_gradients(model, x0, keys, spec)
    assert fast.shape == (3, param_count(model)) == slow.shape
    assert fast.dtype == torch.float32
    # Same float32 arithmetic in another batching (vmap over 3 samples x 4 noisy copies vs 4 at a time), so the
    # two differ by rounding only: measured 4e-7..1.2e-6 of the largest entry; 1e-4 allows for other CPU kernels.
    assert rel_err(fast, slow) < 1e-4, fn
    assert slow.abs().max() > 0 and (fast[0] - fast[1]).abs().max() > 1e-3 * fast.abs().max()  # not trivial


def test_vmap_gradients_over_a_parameter_subset(model, digits):
    x0, keys = digits.tensors([2, 3]), keys_for("train", [2, 3])
    spec = GradientSpec("simple", (0, 500), draws=2, seed=0, params="conv_in,time_embedding")
    fast = per_sample_gradients(model, x0, keys, spec)
    names = [n for n, _ in model.unet.named_parameters() if n.startswith(("conv_in", "time_embedding"))]
    n_sub = sum(dict(model.unet.named_parameters())[n].numel() for n in names)
    assert fast.shape == (2, n_sub) and n_sub == param_count(model, "conv_in,time_embedding") < param_count(model)
    assert rel_err(fast, loop_gradients(model, x0, keys, spec)) < 1e-4  # as in the full-parameter test
    # the subset is exactly those coordinates of the full gradient (named_parameters order, both contiguous
    # at the front of the UNet).
    full = per_sample_gradients(model, x0, keys, GradientSpec("simple", (0, 500), draws=2, seed=0))
    assert rel_err(full[:, :n_sub], fast) < 1e-5
    with pytest.raises(ConfigError, match="no parameters match"):
        per_sample_gradients(model, x0, keys, GradientSpec("simple", (0,), params="nonexistent"))


def test_gradients_do_not_depend_on_batching_or_chunking(model, digits, monkeypatch):
    rows = list(range(10))
    cfg = FeatureConfig(fn="square", noises=2, projector="sjlt", proj_dim=256, **TWO_STEPS)
    train = subset(digits, 10)
    x0, keys = train.tensors(rows), keys_for("train", rows)
    big = Attributor(model, train, cfg, batch_size=16).features_of(x0, keys)
    small = Attributor(model, train, cfg, batch_size=3).features_of(x0, keys)
    # Each feature depends only on its own image and key; batching changes float32 rounding only (conv kernels
    # block differently per batch size): measured 6e-7 relative, bound 1e-5.
    assert big.shape == (10, 256)
    assert rel_err(small, big) < 1e-5
    # One noisy copy per vmap call (4 chunks of the K x D = 4 copies) accumulates to the same gradient.
    monkeypatch.setattr(gradients_mod, "IMAGES_PER_CALL", 1)
    chunked = Attributor(model, train, cfg, batch_size=3).features_of(x0, keys)
    assert rel_err(chunked, big) < 1e-5


# -- projectors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sjlt", "gaussian"])
def test_projection_preserves_inner_products_in_expectation(raw, name):
    """Mean over seeds of <Pg, Pg'> -> <g, g'>, with the spread the estimator's known variance predicts.

    For k outputs, Var <Pg, Pg'> = (|g|^2 |g'|^2 + <g, g'>^2 - c sum_i g_i^2 g'_i^2) / k, with c = 2 for the sparse
    JL block construction (s blocks of independent count-sketches) and c = 0 for a Gaussian matrix / sqrt(k).
    """
    X, _ = raw
    dim = 2000 if name == "gaussian" else X.shape[1]  # a dense Gaussian over all 41k coordinates x 300 seeds is slow
    g, h = torch.from_numpy(X[0, :dim]).float(), torch.from_numpy(X[1, :dim]).float()
    g64, h64 = g.double(), h.double()
    dot, k, seeds = float(g64 @ h64), 64, 300
    c = 2.0 if name == "sjlt" else 0.0
    var = (float(g64 @ g64) * float(h64 @ h64) + dot**2 - c * float((g64**2 * h64**2).sum())) / k
    est, sq = [], []
    for seed in range(seeds):
        p = make_projector(name, dim, k, seed, CPU)
        pg, ph = p.project(torch.stack([g, h])).double()
        est.append(float(pg @ ph))
        sq.append(float(pg @ pg))
    est = np.array(est)
    # The mean of 300 draws has sd sqrt(var / 300); 4.5 sd bounds it (two-sided tail ~7e-6; the seeds are fixed,
    # so the outcome is deterministic, and a biased or wrongly scaled projector misses by far more).
    assert abs(est.mean() - dot) < 4.5 * np.sqrt(var / seeds), (est.mean(), dot)
    assert abs(np.mean(sq) - float(g64 @ g64)) < 4.5 * np.sqrt(2 * float(g64 @ g64) ** 2 / k / seeds)
    # The sample variance of 300 draws is within +-35% of the true one (its relative sd is ~sqrt(2/299) ~ 8%, more
    # with heavier tails): this pins the 1/sqrt(k) scaling (sqrt(k) off would be 64x).
    assert 0.65 < est.var(ddof=1) / var < 1.35


def test_gaussian_projector_is_traker_basic_projector_over_sqrt_k():
    from trak.projectors import BasicProjector, ProjectionType

    grads = torch.randn(4, 3000, generator=torch.Generator().manual_seed(0))
    ours = TrakGaussianProjector(3000, 128, 7, CPU).project(grads)
    theirs = BasicProjector(grad_dim=3000, proj_dim=128, seed=7, proj_type=ProjectionType.normal, device="cpu",
                            block_size=100, dtype=torch.float32).project(grads, model_id=0)
    torch.testing.assert_close(ours, theirs / 128**0.5, rtol=1e-6, atol=1e-6)  # same matrix, same float32 matmul


def test_sjlt_is_deterministic_and_linear():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5000, generator=g), torch.randn(3, 5000, generator=g)
    p = SparseJLProjector(5000, 96, seed=4, device=CPU, chunk=777)  # chunked application (7 chunks, last partial)
    q = SparseJLProjector(5000, 96, seed=4, device=CPU)
    torch.testing.assert_close(p.project(a), q.project(a), rtol=1e-6, atol=1e-6)
    # linear up to float32 rounding: each bucket sums ~5000 x 4 / 96 ~ 200 terms of size ~3, so rounding can reach
    # ~200 x 6e-8 x 3 ~ 4e-5 (measured 2e-5); atol 1e-4.
    torch.testing.assert_close(p.project(2 * a - b), 2 * p.project(a) - p.project(b), rtol=0, atol=1e-4)
    assert not torch.allclose(SparseJLProjector(5000, 96, seed=5, device=CPU).project(a), p.project(a))
    # Each coordinate lands in exactly one bucket of each of s blocks, with weight +-1/sqrt(s): column norms are 1.
    e = torch.eye(5000)[:50]
    np.testing.assert_allclose(p.project(e).norm(dim=1).numpy(), 1.0, rtol=1e-6)
    assert p.sparsity == 4 and SparseJLProjector(10, 6, 0, CPU).sparsity == 3  # s divides k


def test_random_projection_approximates_exact_scores_better_with_larger_k(raw):
    """Scores from projected features converge to the exact ones as k grows (JL distortion ~ 1/sqrt(k)).

    Measured (40 training rows, 5 targets, lambda = 0.1 x mean eigenvalue; correlations averaged over targets and
    seeds 0 and 1): Pearson sjlt 0.79 / 0.94 / 0.98, gaussian 0.82 / 0.94 / 0.98 and Spearman ~0.71 / 0.88 / 0.96 at
    k = 128 / 512 / 2048. Over 6 seeds, one seed's average varies by sd <= 0.03 (Pearson) / 0.045 (Spearman) at
    k = 128 and <= 0.02 at k >= 512, far below the gaps between consecutive k (>= 0.04).
    """
    X, G = raw
    lam = 0.1 * np.linalg.eigvalsh(X @ X.T).mean()
    exact = (G @ X.T) @ np.linalg.inv(X @ X.T + lam * np.eye(len(X)))  # push-through, float64
    Xt, Gt = torch.from_numpy(X).float(), torch.from_numpy(G).float()
    for name in ("sjlt", "gaussian"):
        pearson, spear = [], []
        for k in (128, 512, 2048):
            ps, ss = [], []
            for seed in (0, 1):
                p = make_projector(name, X.shape[1], k, seed, CPU)
                S = Kernel.fit(p.project(Xt).numpy()).scores(p.project(Gt).numpy(), lam)
                for j in range(len(G)):
                    ps.append(np.corrcoef(S[j], exact[j])[0, 1])
                    ss.append(spearmanr(S[j], exact[j])[0])
            pearson.append(np.mean(ps))
            spear.append(np.mean(ss))
        # Monotone in k (see the docstring for the margins), and close at k = 2048: 1/sqrt(2048) ~ 2% distortion
        # per inner product, measured Pearson 0.98 / Spearman 0.96, so 0.9 / 0.85 are safe floors.
        assert pearson[0] < pearson[1] < pearson[2], (name, pearson)
        assert spear[0] < spear[1] < spear[2], (name, spear)
        assert pearson[2] > 0.9 and spear[2] > 0.85, (name, pearson, spear)


# -- the Attributor: exactness, caching, resume, refusal -------------------------------------------------------


def test_identity_projection_scores_equal_the_direct_formula(model, digits, digits_val, tmp_path):
    train = subset(digits, 24)
    att = Attributor(model, train, FeatureConfig(fn="square", projector="identity", **TWO_STEPS), cache=tmp_path)
    att.featurize()
    P = param_count(model)
    X = per_sample_gradients(model, train.tensors(), keys_for("train", range(24)), att.grad_spec)
    stored = np.asarray(att.store.features())
    assert stored.shape == (24, P) and att.proj_dim == P
    assert rel_err(stored, X) < 1e-6  # the very same float32 computation
    Gt = att.features_of(digits_val.tensors(range(4)), keys_for("val", range(4)))
    G = per_sample_gradients(model, digits_val.tensors(range(4)), keys_for("val", range(4)), att.grad_spec)
    assert rel_err(Gt, G) < 1e-6
    X, G = X.double().numpy(), G.double().numpy()
    gram = X @ X.T
    mean_eig = np.trace(gram) / 24  # N < P: the 24 non-zero eigenvalues of X^T X are those of X X^T
    method = get_method("dtrak")
    for factor in (1e-3, 1e-1, 10.0):
        lam = factor * mean_eig
        # (X^T X + lam I)^{-1} X^T = X^T (X X^T + lam I)^{-1} (push-through; the P x P system would need 14 GB).
        direct = G @ X.T @ np.linalg.solve(gram + lam * np.eye(24), np.eye(24))
        # The kernel is stored with float32 U and V (relative 6e-8), amplified by at most the condition number of
        # X X^T + lam I at the smallest lambda (~1e4 here): measured ~3e-8; bound 1e-4.
        assert rel_err(att.scores(method, Gt, lam), direct) < 1e-4, factor
        assert rel_err(att.self_influence(method, lam), np.diag(gram @ np.linalg.inv(gram + lam * np.eye(24)))) < 1e-4


def test_identity_projection_over_a_parameter_subset_equals_the_textbook_formula(model, digits, digits_val,
                                                                                 tmp_path):
    """With few parameters (1,424) the k x k system itself is small: G (X^T X + lam I)^{-1} X^T literally."""
    train = subset(digits, 24)
    cfg = FeatureConfig(fn="simple", projector="identity", params="conv_in,time_embedding", **TWO_STEPS)
    att = Attributor(model, train, cfg, cache=tmp_path)
    att.featurize()
    X = np.asarray(att.store.features(), dtype=np.float64)
    P = param_count(model, "conv_in,time_embedding")
    assert X.shape == (24, P) and P < 2000
    G = att.features_of(digits_val.tensors(range(3)), keys_for("val", range(3))).astype(np.float64)
    mean_eig = np.trace(X @ X.T) / 24
    for factor in (1e-3, 1e-1, 10.0):
        lam = factor * mean_eig
        direct = G @ np.linalg.solve(X.T @ X + lam * np.eye(P), X.T)
        assert rel_err(att.scores(get_method("trak"), G, lam), direct) < 1e-4, factor  # as above


def test_each_training_image_is_its_own_top_proponent(model, digits, tmp_path):
    train = subset(digits, 24)
    att = Attributor(model, train, FeatureConfig(fn="square", projector="identity", **TWO_STEPS), cache=tmp_path)
    att.featurize()
    rows = [0, 5, 9, 17, 23]
    # Targets recomputed from pixels with their training keys: the same noise as their training rows.
    G = att.features_of(train.tensors(rows), keys_for("train", rows))
    lam = 1e-6 * att.train_features().kernel.eigenvalues.mean()
    S = att.scores(get_method("dtrak"), G, lam)
    # With N < P and lambda -> 0, X (X^T X + lam I)^{-1} X^T is the projection onto the row space: S -> identity.
    assert S.argmax(1).tolist() == rows
    for m, i in enumerate(rows):
        assert S[m, i] > 0.99
        assert np.abs(np.delete(S[m], i)).max() < 0.05
    top = rank(S[0], train, top=3)
    assert top[0].index == 0 and top[0].label == int(train.labels[0]) and top[0].score == pytest.approx(S[0, 0])


def test_featurize_is_deterministic_and_cached_and_the_seed_matters(model, digits, tmp_path, monkeypatch):
    train = subset(digits, 8)
    cfg = FeatureConfig(fn="square", projector="sjlt", proj_dim=128, **TWO_STEPS)
    a = Attributor(model, train, cfg, cache=tmp_path / "a")
    b = Attributor(model, train, cfg, cache=tmp_path / "b")
    fa = np.array(a.featurize().features())
    fb = np.array(b.featurize().features())
    np.testing.assert_array_equal(fa, fb)  # same inputs, same single-threaded CPU kernels: bitwise equal
    assert a.store_path.relative_to(tmp_path / "a") == b.store_path.relative_to(tmp_path / "b")
    # A training image used as a target gets exactly the noise of its row (batching differs: rounding only).
    assert rel_err(a.features_of(train.tensors([3, 5]), ["train/3", "train/5"]), fa[[3, 5]]) < 1e-5
    # Another seed: other noise and another projection.
    c = Attributor(model, train, FeatureConfig(fn="square", projector="sjlt", proj_dim=128, seed=1, **TWO_STEPS),
                   cache=tmp_path / "a")
    fc = np.array(c.featurize().features())
    assert c.store_path != a.store_path
    assert rel_err(fc, fa) > 0.5
    # A fresh attributor on the same cache computes nothing and reports "cached".
    monkeypatch.setattr(Attributor, "features_of", lambda *args: pytest.fail("recomputed cached features"))
    seen = []
    again = Attributor(model, train, cfg, cache=tmp_path / "a")
    np.testing.assert_array_equal(np.array(again.featurize(progress=lambda *x: seen.append(x)).features()), fa)
    assert seen == [(8, 8, "cached")]
    cfg_json = again.store.config()
    assert cfg_json["identity"]["features"]["proj_dim"] == 128 and "scaling" in cfg_json["identity"]
    assert cfg_json["provenance"]["timesteps"] == [0, 500]


def test_featurize_resumes_after_an_interruption(model, digits, tmp_path, monkeypatch):
    train = subset(digits, 10)
    cfg = FeatureConfig(fn="square", projector="sjlt", proj_dim=64, **TWO_STEPS)
    reference = np.array(Attributor(model, train, cfg, cache=tmp_path / "ref", batch_size=3).featurize().features())

    original = Attributor.features_of
    calls: list[list[str]] = []

    def killed_after_two_batches(self, images, keys, timesteps=None):
        if len(calls) == 2:
            raise RuntimeError("simulated kill")
        calls.append(list(keys))
        return original(self, images, keys, timesteps)

    monkeypatch.setattr(Attributor, "features_of", killed_after_two_batches)
    att = Attributor(model, train, cfg, cache=tmp_path / "run", batch_size=3)
    with pytest.raises(RuntimeError, match="simulated kill"):
        att.featurize()
    done = att.store.done()
    assert done.tolist() == [True] * 6 + [False] * 4  # exactly the two finished batches
    np.testing.assert_array_equal(np.array(att.store.features())[:6], reference[:6])
    with pytest.raises(ConfigError, match=r"incomplete \(6/10 rows\)") as exc:
        att.scores(get_method("dtrak"), reference[:1], 1.0)
    one_line(exc)

    calls.clear()

    def counting(self, images, keys, timesteps=None):
        calls.append(list(keys))
        return original(self, images, keys, timesteps)

    monkeypatch.setattr(Attributor, "features_of", counting)
    progress = []
    resumed = Attributor(model, train, cfg, cache=tmp_path / "run", batch_size=3)
    store = resumed.featurize(progress=lambda done, n, msg: progress.append((done, n)))
    assert calls == [["train/6", "train/7", "train/8"], ["train/9"]]  # only the missing rows
    assert progress == [(9, 10), (10, 10)]
    assert store.complete
    # Same rows in the same batches as the uninterrupted run: bitwise equal.
    np.testing.assert_array_equal(np.array(store.features()), reference)


def test_store_made_for_another_checkpoint_is_refused(model, digits, tmp_path):
    train = subset(digits, 4)
    cfg = FeatureConfig(fn="square", projector="sjlt", proj_dim=64, **TWO_STEPS)
    folder = tmp_path / "store"
    Attributor(model, train, cfg, store_dir=folder).featurize()
    before = (folder / "features.npy").read_bytes(), (folder / "config.json").read_text()
    other = Attributor(tiny_model(1), train, cfg, store_dir=folder)
    with pytest.raises(CacheMismatchError) as exc:
        other.featurize()
    assert "checkpoint" in one_line(exc)
    # and another training set, or another feature config, in the same folder
    with pytest.raises(CacheMismatchError, match="dataset_hash"):
        Attributor(model, subset(digits, 5), cfg, store_dir=folder).featurize()
    with pytest.raises(CacheMismatchError, match="fn"):
        Attributor(model, train, FeatureConfig(fn="simple", projector="sjlt", proj_dim=64, **TWO_STEPS),
                   store_dir=folder).featurize()
    assert ((folder / "features.npy").read_bytes(), (folder / "config.json").read_text()) == before  # untouched
    # a non-empty folder that is not a store is refused too
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(CacheMismatchError, match="not a feature store"):
        Attributor(model, train, cfg, store_dir=stranger).featurize()


@pytest.mark.parametrize("make, match", [
    (lambda: FeatureConfig(fn="bogus"), "unknown output function"),
    (lambda: FeatureConfig(projector="bogus"), "unknown projector"),
    (lambda: FeatureConfig(strategy="bogus"), "unknown timestep strategy"),
    (lambda: FeatureConfig(timesteps=0), "timesteps K must be positive"),
    (lambda: FeatureConfig(timesteps=-3), "timesteps K must be positive"),
    (lambda: FeatureConfig(noises=0), "noises"),
    (lambda: FeatureConfig(proj_dim=0), "projection dimension k must be positive"),
    (lambda: FeatureConfig(proj_dim=-5, projector="gaussian"), "projection dimension k must be positive"),
    (lambda: FeatureConfig(fn="square", eta=0.5), "eta applies only"),
    (lambda: FeatureConfig(fn="interp", eta=1.5), "eta must be within"),
    (lambda: FeatureConfig(timesteps=5000).gradient_spec(1000), "within 1..1000"),
    (lambda: make_projector("bogus", 10, 4, 0, CPU), "unknown projector"),
    (lambda: make_projector("sjlt", 10, 0, 0, CPU), "projection dimension"),
    (lambda: get_method("bogus"), "unknown method"),
    (lambda: get_method("trak").check_fn("square"), "TRAK uses the simple output function"),
])
def test_bad_feature_options_raise_one_line_config_errors(make, match):
    with pytest.raises(ConfigError, match=match) as exc:
        make()
    one_line(exc)


def test_failed_configs_leave_nothing_in_the_cache(model, digits, tmp_path):
    root = tmp_path / "cache"
    train = subset(digits, 4)
    bad = [
        lambda: Attributor(model, train, FeatureConfig(timesteps=5000), cache=root),
        lambda: Attributor(model, train, FeatureConfig(params="nonexistent", **TWO_STEPS), cache=root),
        # trak-cuda needs CUDA and fast_jl: refused when the projector is built, before the store is created.
        lambda: Attributor(model, train, FeatureConfig(projector="trak-cuda", **TWO_STEPS), cache=root).featurize(),
        # a dataset at another resolution than the model's
        lambda: Attributor(model, ImageDataset("x", "train", np.zeros((2, 8, 8, 1), np.uint8), np.zeros(2, np.int64),
                                               ["a"], np.arange(2)), FeatureConfig(**TWO_STEPS), cache=root),
        lambda: open_attributor(model, get_method("trak"), "digits", fn="square", cache=str(root)),
        lambda: open_attributor(model, get_method("dtrak"), "digits", timesteps=1001, cache=str(root)),
        lambda: open_attributor(model, get_method("dtrak"), "digits", eta=2.0, cache=str(root)),
        lambda: open_attributor(model, get_method("dtrak"), None, cache=str(root)),  # no recorded training set
    ]
    for make in bad:
        with pytest.raises(AttributionError) as exc:
            make()
        one_line(exc)
        assert files_under(root) == [], exc.value
    # lambda <= 0 on a featurized attributor: refused, nothing new written.
    att = Attributor(model, train, FeatureConfig(projector="sjlt", proj_dim=64, **TWO_STEPS), cache=root)
    att.featurize()
    att_simple = Attributor(model, train, FeatureConfig(fn="simple", projector="sjlt", proj_dim=64, **TWO_STEPS),
                            cache=root)
    att_simple.featurize()
    before = files_under(root)
    G = np.ones((1, 64), np.float32)
    for lam in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="lambda must be a positive number") as exc:
            att.scores(get_method("dtrak"), G, lam)
        one_line(exc)
    # Methods with a fixed output function refuse features of another one (these are Square features).
    for method in ("trak", "relative-if", "renorm-if", "grad-dot"):
        with pytest.raises(ConfigError, match="needs simple features") as exc:
            att.scores(get_method(method), G, 1.0)
        one_line(exc)
    for lam in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="lambda"):
            att.self_influence(get_method("dtrak"), lam)
    # methods without lambda ignore it
    assert att_simple.scores(get_method("grad-dot"), G, -1.0).shape == (1, 4)
    assert files_under(root) == before


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
