"""Projectors (attribution/features/projectors.py): inner products preserved in expectation with the spread the
estimator's variance predicts, the Gaussian projector as traker's BasicProjector over sqrt(k), the sparse JL
projector deterministic and linear, and projected scores approaching the exact ones as k grows; then GPU readiness
(issue 9): projection matrices drawn on the CPU whatever the device (so sjlt and gaussian stores carry no device in
their identity, and trak-cuda without a GPU is refused before anything is written), fast_jl's limits on k and on its
chunks, and power-of-two prescaling before the fp16 cast. Tests marked `cuda` need a GPU and skip cleanly without one
(`bench/gpu_check.py` runs the rest of the GPU checks in one command).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from engine_support import CPU, TWO_STEPS, keys_for, needs_cuda, one_line, subset, tiny_model

from attribution.engine import Attributor
from attribution.errors import ConfigError
from attribution.features.config import FeatureConfig
from attribution.features.gradients import per_sample_gradients
from attribution.features.projectors import (FAST_JL_MAX_CHUNK, SparseJLProjector, TrakGaussianProjector,
                                             check_fast_jl_dim, fast_jl_chunks, make_projector, matrix_identity,
                                             pow2_row_scale)
from attribution.kernel import Kernel


# -- exact gradients to project (model, digits, digits_val: conftest.py) -----------------------------------------


@pytest.fixture(scope="module")
def raw(model, digits, digits_val):
    """Exact (unprojected) Square gradients, K=2: 40 training rows and 5 validation targets, float64."""
    spec = FeatureConfig(fn="square", **TWO_STEPS).gradient_spec(model.num_timesteps)
    X = per_sample_gradients(model, digits.tensors(range(40)), keys_for("train", range(40)), spec)
    G = per_sample_gradients(model, digits_val.tensors(range(5)), keys_for("val", range(5)), spec)
    return X.double().numpy(), G.double().numpy()


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


def test_grass_is_a_scaled_random_mask_then_sjlt_and_unbiased(raw):
    """GraSS's compressor: m = 8k coordinates kept (a seed-determined set, the same for every row), scaled by
    sqrt(P/m), then the sparse JL sketch; inner products unbiased over the seeds (mask and sketch)."""
    from attribution.features.projectors import GRASS_MASK_FACTOR, MaskedSJLTProjector

    X, _ = raw
    P, k = X.shape[1], 64
    p = MaskedSJLTProjector(P, k, seed=3, device=CPU)
    assert p.mask_dim == GRASS_MASK_FACTOR * k and len(set(p.keep.tolist())) == p.mask_dim
    rows = torch.from_numpy(X[:3]).float()
    direct = SparseJLProjector(p.mask_dim, k, 3, CPU).project(rows[:, p.keep] * (P / p.mask_dim) ** 0.5)
    torch.testing.assert_close(p.project(rows), direct, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(MaskedSJLTProjector(P, k, seed=4, device=CPU).project(rows), p.project(rows))
    assert MaskedSJLTProjector(100, 64, 0, CPU).mask_dim == 100  # never more than P
    g, h = rows[0], rows[1]
    dot = float(g.double() @ h.double())
    est = np.array([float(pr.double() @ qr.double()) for pr, qr in
                    (make_projector("grass", P, k, seed, CPU).project(torch.stack([g, h])) for seed in range(300))])
    # no bias: the mean of 300 seeds within 4.5 standard errors of the exact inner product (a missing sqrt(P/m)
    # would put it at m/P ~ 1% of it)
    assert abs(est.mean() - dot) < 4.5 * est.std(ddof=1) / np.sqrt(300), (est.mean(), dot)


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


# -- projection matrices that do not depend on the machine (GPU readiness, issue 9, item 1) ----------------------


def test_gaussian_blocks_come_from_a_cpu_generator_and_equal_trakers_cpu_matrix():
    """Block b is N(0, 1) from a CPU generator seeded with seed + 1000 b (traker's CPU BasicProjector), whatever
    device the projector is built for; k = 250 has blocks of 100, 100 and a partial 50."""
    from trak.projectors import BasicProjector, ProjectionType

    p = TrakGaussianProjector(3000, 250, 7, CPU)
    for b, width in enumerate((100, 100, 50)):
        ref = torch.empty(3000, 100).normal_(generator=torch.Generator(device="cpu").manual_seed(7 + 1000 * b))
        assert torch.equal(p.block(b), ref[:, :width])
    # The matrix does not depend on the device the model sits on: a projector made for another device
    # (never used for matmuls here) builds bit-identical blocks, drawn on the CPU.
    assert torch.equal(TrakGaussianProjector(3000, 250, 7, torch.device("meta")).block(1, CPU), p.block(1))
    grads = torch.randn(4, 3000, generator=torch.Generator().manual_seed(0))
    theirs = BasicProjector(grad_dim=3000, proj_dim=250, seed=7, proj_type=ProjectionType.normal, device="cpu",
                            block_size=100, dtype=torch.float32).project(grads, model_id=0)
    torch.testing.assert_close(p.project(grads), theirs / 250**0.5, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@needs_cuda
def test_gaussian_projection_on_cuda_equals_the_cpu_projection():
    grads = torch.randn(4, 3000, generator=torch.Generator().manual_seed(0))
    cpu = TrakGaussianProjector(3000, 250, 7, CPU).project(grads)
    cuda = TrakGaussianProjector(3000, 250, 7, torch.device("cuda")).project(grads.cuda()).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-5)  # same matrix; float32 matmul order differs


def test_cpu_generated_matrices_keep_the_store_identity(digits, tmp_path):
    """sjlt and gaussian stores carry no device in their identity (their folders are those made before);
    trak-cuda names the GPU, and without one it is refused before anything is written."""
    model, train = tiny_model(), subset(digits, 3)
    for name in ("sjlt", "gaussian"):
        assert matrix_identity(name, CPU) is None
        att = Attributor(model, train, FeatureConfig(projector=name, timesteps=2, proj_dim=512), cache=tmp_path)
        assert "projection" not in att.identity
    with pytest.raises(ConfigError) as exc:
        Attributor(model, train, FeatureConfig(projector="trak-cuda", timesteps=2, proj_dim=512), cache=tmp_path)
    assert "CUDA" in one_line(exc)
    assert not any(tmp_path.rglob("config.json"))


# -- fast_jl limits (GPU readiness, issue 9, item 2) -------------------------------------------------------------


def test_fast_jl_needs_k_a_multiple_of_512_and_names_the_nearest():
    for k in (512, 4096, 32768):
        check_fast_jl_dim(k)
        FeatureConfig(projector="trak-cuda", proj_dim=k)
    for k, near in ((1000, 1024), (700, 512), (100, 512), (5000, 5120), (4095, 4096)):
        with pytest.raises(ConfigError) as exc:
            FeatureConfig(projector="trak-cuda", proj_dim=k)
        assert f"--proj-dim {near}" in one_line(exc)
    FeatureConfig(projector="sjlt", proj_dim=1000)  # other projectors take any k


def test_fast_jl_chunks_stay_under_trakers_single_kernel_limit():
    assert FAST_JL_MAX_CHUNK == (2**32 - 1) // 32  # traker's get_parameter_chunk_sizes at batch 32: ~134M
    assert fast_jl_chunks(35_746_307) == [35_746_307]  # the D-TRAK CIFAR UNet: one kernel
    sizes = fast_jl_chunks(300_000_000)
    assert sizes == [FAST_JL_MAX_CHUNK, FAST_JL_MAX_CHUNK, 300_000_000 - 2 * FAST_JL_MAX_CHUNK]


def test_power_of_two_prescaling_survives_the_fp16_cast():
    """A gradient whose entries sit near fp16's subnormal range (~1e-6: a unit-normalised gradient spread over
    many coordinates, or a late-training loss gradient) loses several per cent in a plain fp16 cast (subnormal
    spacing 6e-8) and far less when scaled by a power of two first; the scale is undone exactly."""
    g = torch.randn(3, 200_000, generator=torch.Generator().manual_seed(0)) * 1e-6
    g[1] *= 1e-3  # a row a thousand times smaller: plain fp16 flushes it to zero
    scale = pow2_row_scale(g)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())  # powers of two: lossless to undo
    back = (g * scale).half().float() / scale

    def rel(y):
        return ((y - g).norm(dim=1) / g.norm(dim=1)).max().item()

    plain = ((g.half().float() - g).norm(dim=1) / g.norm(dim=1))
    assert plain[1] > 0.5 and plain[0] > 0.01  # measured: 1.0 (the small row vanishes) and 0.017
    assert rel(back) < 1e-3  # measured 2e-4 on every row: fp16's 11-bit mantissa


def test_sessions_sharing_a_featurizer_build_its_projector_once(digits, tmp_path, monkeypatch):
    """The app's sessions share one attributor: threads asking for the projector at once get one build, the same
    object (building SJLT's indices at paper size costs seconds and memory)."""
    import threading
    import time

    from attribution.features import gradients

    built = []

    def slow_make(*args):
        built.append(args)
        time.sleep(0.2)  # long enough for every thread to arrive while the first builds
        return SparseJLProjector(*args[1:])

    monkeypatch.setattr(gradients, "make_projector", slow_make)
    att = Attributor(tiny_model(), subset(digits, 3), FeatureConfig(timesteps=2, proj_dim=512), cache=tmp_path)
    got = []
    threads = [threading.Thread(target=lambda: got.append(att.featurizer.projector)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(got) == 4 and all(p is got[0] for p in got)
