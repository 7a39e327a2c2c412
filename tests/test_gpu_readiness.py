"""Engine correctness and GPU readiness (issue 9): device-independent projection matrices and the store identity
that records them, fast_jl's limits, v-prediction output functions, the kernel's memory bound, the ensemble's
default lambda. Tests marked `cuda` need a GPU and skip cleanly without one (`bench/gpu_check.py` runs the rest of
the GPU checks in one command).
"""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch

from engine_support import subset, tiny_model

from attribution.data import load_dataset
from attribution.engine import Attribution, Attributor
from attribution.errors import CacheMismatchError, ConfigError
from attribution.features.config import FeatureConfig
from attribution.features.gradients import GradientSpec, output_values, per_sample_gradients
from attribution.features.projectors import (FAST_JL_MAX_CHUNK, TrakGaussianProjector, check_fast_jl_dim,
                                             fast_jl_chunks, matrix_identity, pow2_row_scale)
from attribution.features.timesteps import noise_for
from attribution.kernel import Kernel
from attribution.methods import get_method
from attribution.models.checkpoint import DEFAULT_SCHEDULE
from attribution.store import FeatureStore

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, f"error message should be one line: {msg!r}"
    return msg


# -- 1. projection matrices that do not depend on the machine ----------------------------------------------------


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


def test_a_store_projected_on_another_gpu_is_refused_with_how_to_refeaturize(tmp_path):
    identity = {"checkpoint": "abc", "dataset": "digits", "split": "train", "features": {"projector": "trak-cuda"},
                "projection": {"device": "NVIDIA H100 80GB HBM3", "sms": 132}}
    path = tmp_path / "store"
    FeatureStore.open(path, identity, 4, 512)
    before = (path / "config.json").read_text()
    here = {**identity, "projection": {"device": "NVIDIA A100-SXM4-40GB", "sms": 108}}
    with pytest.raises(CacheMismatchError) as exc:
        FeatureStore.open(path, here, 4, 512)
    msg = one_line(exc)
    assert "another matrix" in msg and "sms: 132 there, 108 asked" in msg and "re-featurize" in msg
    # A trak-cuda store written before the matrix was recorded is refused the same way.
    old = {k: v for k, v in identity.items() if k != "projection"}
    FeatureStore.open(tmp_path / "old", old, 4, 512)
    with pytest.raises(CacheMismatchError, match="another matrix"):
        FeatureStore.open(tmp_path / "old", identity, 4, 512)
    assert (path / "config.json").read_text() == before
    assert json.loads(before)["identity"]["projection"]["sms"] == 132


# -- 2. fast_jl limits -------------------------------------------------------------------------------------------


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


# -- 6. v-prediction ----------------------------------------------------------------------------------------------


def test_v_prediction_simple_is_the_training_loss_exactly(digits):
    """For a v-prediction model the Simple output function is the v-MSE it is trained with (diffusers'
    get_velocity target), and its features are that loss's gradient, not the epsilon MSE of a converted eps_hat."""
    from diffusers import DDPMScheduler

    model = tiny_model(1, "v_prediction")
    x0 = digits.tensors(range(3))
    keys = [f"train/{i}" for i in range(3)]
    spec = GradientSpec("simple", (10, 400, 900), 1, 0)
    ts = torch.tensor(spec.timesteps)
    eps = noise_for(keys, ts, tuple(x0.shape[1:]), 0, 1)  # (B, K, C, H, W): the features' noise
    sched = DDPMScheduler.from_config({**DEFAULT_SCHEDULE, "prediction_type": "v_prediction"})
    unet = model.unet
    losses, grads = [], []
    for i in range(3):
        x0s = x0[i].expand_as(eps[i])
        x_t = sched.add_noise(x0s, eps[i], ts)
        with torch.enable_grad():
            ps = [p.requires_grad_(True) for p in unet.parameters()]
            loss = torch.nn.functional.mse_loss(unet(x_t, ts).sample, sched.get_velocity(x0s, eps[i], ts))
            g = torch.autograd.grad(loss, ps)
            for p in ps:
                p.requires_grad_(False)
        losses.append(loss.item())
        grads.append(torch.cat([x.reshape(-1) for x in g]))
    ours = output_values(model, x0, keys, spec)
    np.testing.assert_allclose(ours.numpy(), losses, rtol=1e-5)  # float32 UNet, the same ops: ~1e-7 measured
    feats = per_sample_gradients(model, x0, keys, spec)
    torch.testing.assert_close(feats, torch.stack(grads), rtol=1e-4, atol=1e-6)
    # The epsilon MSE of the converted prediction is another loss (so another feature): it must differ.
    eps_hat = model.predict_eps(model.schedule.add_noise(x0[0].expand_as(eps[0]), eps[0], ts), ts)
    assert abs(torch.nn.functional.mse_loss(eps_hat, eps[0]).item() - losses[0]) > 1e-3 * losses[0]


# -- 9. the kernel at large k with N > k; the ensemble's default lambda ------------------------------------------


@pytest.mark.parametrize("n, k", [(3000, 48), (40, 3000)])
def test_kernel_fit_never_holds_the_features_in_float64(n, k):
    """Kernel.fit reads float32 features in blocks: numpy never allocates a float64 copy of X (N x k x 8 bytes;
    the Gram matrix and the factors are torch tensors, outside tracemalloc's view), and the factors equal the
    dense float64 computation."""
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((n, k)) * np.linspace(3, 0.1, k)).astype(np.float32)
    tracemalloc.start()
    kernel = Kernel.fit(X, block=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.25 * n * k * 8, peak  # one 256-row (or -column) float64 block: <= 256 / 3000 of a full copy
    Xd = X.astype(np.float64)
    np.testing.assert_allclose(kernel.sigma, np.linalg.svd(Xd, compute_uv=False)[:len(kernel.sigma)], rtol=1e-9)
    np.testing.assert_allclose(kernel.U * kernel.sigma @ kernel.V.T, Xd, atol=1e-9 * np.abs(Xd).max())


def test_an_ensembles_default_lambda_comes_from_every_member(digits, tmp_path):
    """Two members whose features differ in scale by 10 (a checkpoint early and late in training): the default
    lambda is the mean of the members' defaults, not the first member's."""
    train = subset(digits, 6)
    cfg = FeatureConfig(fn="simple", timesteps=2, proj_dim=64)
    late = tiny_model(0)
    with torch.no_grad():  # member 2: the same UNet with its output layer scaled (another checkpoint)
        late.unet.conv_out.weight.mul_(10.0)
        late.unet.conv_out.bias.mul_(10.0)
    members = [Attributor(m, train, cfg, cache=tmp_path) for m in (tiny_model(0), late)]
    for att in members:
        att.featurize()
    trak = get_method("trak")
    own = [att.resolve_lambda(trak, None) for att in members]
    assert own[1] > 3 * own[0]  # the scaled member's eigenvalues are larger
    lam = Attribution(trak, members).resolve_lambda(None)
    assert lam == pytest.approx(np.mean(own), rel=1e-12)
    assert Attribution(trak, members).resolve_lambda(2.5) == 2.5


# -- 3. Journey TRAK over several checkpoints ---------------------------------------------------------------------


def test_journey_trak_ensemble_scores_the_target_checkpoints_one_trajectory(tiny_run, digits, tmp_path):
    """An ensemble of epochs 1 and 2: gen:3 is the image epoch 1 (the first member, which generates targets)
    samples; every member's Journey feature is the mean step feature of that one trajectory under the member's
    own gradients, not of the image the member itself would generate."""
    from attribution.journey import JourneyConfig, sampled_trajectory, step_features
    from attribution.models import load_model
    from attribution.targets import resolve_targets

    models = [load_model(str(tiny_run / f"epoch-{e}"), "cpu") for e in (1, 2)]
    train = subset(digits, 8)
    cfg = FeatureConfig(fn="simple", timesteps=1, strategy="cumulative", proj_dim=64)
    members = [Attributor(m, train, cfg, cache=tmp_path) for m in models]
    for att in members:
        att.featurize()
    attribution = Attribution(get_method("journey-trak"), members)
    assert attribution.target_model is models[0]
    steps = 4
    targets = resolve_targets("gen:3", attribution.target_model, "digits", steps=steps)
    G = attribution.target_features(targets, cache=str(tmp_path))
    jcfg = JourneyConfig(seed=3, steps=steps, every=1, resamples=1)
    traj = sampled_trajectory(models[0], jcfg)
    # the target is that trajectory's final image (as 8-bit pixels, like every gen:SEED target)
    from attribution.data import pixels_to_tensor, tensor_to_pixels

    np.testing.assert_array_equal(pixels_to_tensor(tensor_to_pixels(torch.from_numpy(traj.final[:1])))[0].numpy(),
                                  targets.images[0].numpy())
    keys = [f"gen/3/step{int(t)}" for t in traj.timesteps]
    for att, g in zip(members, G):
        expected = step_features(att, traj.x0_pred[:, 0], traj.timesteps, keys, 1).mean(0)
        np.testing.assert_allclose(g[0], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    # What member 2 would get from the image it samples itself (the old behaviour) is another feature.
    own = sampled_trajectory(models[1], jcfg)
    assert np.abs(own.final - traj.final).max() > 0.05
    own_feature = step_features(members[1], own.x0_pred[:, 0], own.timesteps, keys, 1).mean(0)
    assert np.abs(own_feature - G[1][0]).max() > 0.1 * np.abs(G[1][0]).max()
    # The cache keeps the two apart: a member's own journey of gen:3 is not the ensemble's.
    from attribution.journey import run_journey

    alone = run_journey(members[1], JourneyConfig(seed=3, steps=steps, every=1, resamples=1), cache=str(tmp_path))
    np.testing.assert_allclose(alone.features.mean(0), own_feature, rtol=1e-5, atol=1e-6 * np.abs(own_feature).max())


# -- 7. TracInCP and GAS with uniform checkpoint weights ---------------------------------------------------------


def test_uniform_checkpoint_weights_average_with_a_projection_seed_per_checkpoint(tiny_run, npz12, tmp_path):
    """--checkpoint-weights uniform: the mean over the C checkpoints, checkpoint c projected with seed + c (its
    own matrix); lr (the default) keeps the learning-rate weights and one projection. Scores equal the direct
    mean of per-checkpoint dot products / cosines of features projected with each checkpoint's seed."""
    from attribution.engine import open_attribution
    from attribution.methods.over_checkpoints import tracin_weights
    from attribution.features.projectors import make_projector

    opts = dict(dataset=f"npz:{npz12}", timesteps=2, proj_dim=32, projector="sjlt", seed=5, cache=str(tmp_path))
    targets = load_dataset(f"npz:{npz12}").tensors(range(2))
    keys = ["val/0", "val/1"]
    for name, score in (("tracincp", lambda G, X: G @ X.T),
                        ("gas", lambda G, X: (G / np.linalg.norm(G, axis=1, keepdims=True))
                         @ (X / np.linalg.norm(X, axis=1, keepdims=True)).T)):
        uni = open_attribution(str(tiny_run), get_method(name), "cpu", checkpoint_weights="uniform", **opts)
        lr = open_attribution(str(tiny_run), get_method(name), "cpu", **opts)
        assert uni.weights == [0.5, 0.5] and lr.weights == tracin_weights([a.model for a in lr.members])[0]
        assert [a.projector.seed for a in uni.members] == [5, 6]
        assert [a.projector.seed for a in lr.members] == [5, 5]
        assert uni.members[0].store_path == lr.members[0].store_path  # seed 5 either way: one store
        assert uni.members[1].store_path != lr.members[1].store_path
        uni.featurize()
        want = 0.0
        for att in uni.members:
            raw_x = per_sample_gradients(att.model, att.train.tensors(range(12)), [f"train/{i}" for i in range(12)],
                                         att.grad_spec)
            proj = make_projector("sjlt", att.grad_dim, 32, att.projector.seed, CPU)
            X = proj.project(raw_x).double().numpy()
            G = proj.project(per_sample_gradients(att.model, targets, keys, att.grad_spec)).double().numpy()
            want = want + 0.5 * score(G, X)
        got = uni.scores(uni.features_of(targets, keys))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_checkpoint_weights_bad_values_are_one_line_errors(tiny_run, npz12, tmp_path):
    from attribution.engine import open_attribution

    cases = [("tracincp", "cosine", "unknown --checkpoint-weights 'cosine'; use one of: lr, uniform"),
             ("dtrak", "uniform", "applies to the checkpoint methods")]
    for method, value, match in cases:
        with pytest.raises(ConfigError) as exc:
            open_attribution(str(tiny_run), get_method(method), "cpu", checkpoint_weights=value,
                             dataset=f"npz:{npz12}", cache=str(tmp_path))
        assert match in one_line(exc)
    assert not any(tmp_path.rglob("*"))


@pytest.mark.parametrize("extra, match", [
    (["--method", "tracincp", "--checkpoint-weights", "cosine"], "unknown --checkpoint-weights 'cosine'"),
    (["--method", "gas", "--projector", "trak-cuda", "--proj-dim", "1000"], "use --proj-dim 1024"),
])
def test_cli_bad_checkpoint_weights_and_fast_jl_k_are_one_line_exit_2(tiny_run, npz12, tmp_path, capsys, extra,
                                                                      match):
    from attribution.cli import main

    rc = main(["score", "--checkpoint", str(tiny_run), "--dataset", f"npz:{npz12}", "--target", "train:0",
               "--cache", str(tmp_path / "cache"), "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not (tmp_path / "cache").exists()


def test_cli_help_states_the_checkpoint_weights_default_and_difference(capsys):
    from attribution.cli import main

    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--checkpoint-weights lr|uniform" in text
    assert "lr (default)" in text and "learning rate" in text and "uniform is TracInCP/GAS" in text


# -- 4 and 5. sanity checks that can fail; the LDS sign ----------------------------------------------------------


def _sgd_step(model, rows: np.ndarray, lr: float) -> dict[str, torch.Tensor]:
    """theta - lr x sum of the given flattened training gradients (identity features), as a parameter dict."""
    step = torch.from_numpy(np.asarray(rows, dtype=np.float32).sum(0))
    out, off = {}, 0
    for name, p in model.parameters().items():
        out[name] = p - lr * step[off:off + p.numel()].reshape(p.shape)
        off += p.numel()
    return out


def test_sign_one_sgd_step_changes_the_targets_loss_by_minus_lr_times_the_score(tiny_run, digits, tmp_path):
    """The sign test. theta' = theta - lr x phi_i is one SGD step on training image i's Simple loss (at the feature
    timesteps and noises); the target's Simple loss then changes by -lr x <g_target, phi_i> (the grad-dot score)
    to first order. Measured on the tiny epoch-2 model, 24 training images, target val/1 (one negative score):
    ratio 0.991-1.000 at lr = 1e-4 (the second-order term); tolerance 3%. With lambda -> infinity the TRAK kernel
    is gradient similarity: every positive TRAK score lowers the loss, every negative one raises it. A subset's
    step changes it by lr x `predicted_loss_change` (-sum of the subset's scores): the LDS sign."""
    from attribution.analysis.sanity import predicted_loss_change
    from attribution.models import load_model

    model = load_model(str(tiny_run), "cpu")
    train = subset(digits, 24)
    att = Attributor(model, train, FeatureConfig(fn="simple", timesteps=2, projector="identity"), cache=tmp_path)
    att.featurize()
    target, key = load_dataset("digits", "val").tensors([1]), ["val/1"]
    X = np.asarray(att.store.features())
    G = att.features_of(target, key)
    dot = att.scores(get_method("grad-dot"), G)[0]
    assert (dot < 0).any() and (dot > 0).any(), dot  # both signs are tested
    loss0 = output_values(model, target, key, att.grad_spec).item()
    lr = 1e-4
    measured = np.array([output_values(model, target, key, att.grad_spec, params=_sgd_step(model, X[i:i + 1], lr))
                         .item() - loss0 for i in range(len(train))])
    np.testing.assert_allclose(measured, -lr * dot, rtol=0.03, atol=0.01 * lr * np.abs(dot).max())
    # lambda -> infinity: TRAK's scores are grad-dot / lambda, so their sign predicts the loss change
    big = 1e6 * att.train_features().kernel.eigenvalues.mean()
    tau = att.scores(get_method("trak"), G, big)[0]
    assert np.array_equal(np.sign(tau), np.sign(dot))
    assert (measured[tau > 0] < 0).all() and (measured[tau < 0] > 0).all()
    # a subset: the LDS sign
    S = np.array([0, 3, 5, 11, 17])
    change = output_values(model, target, key, att.grad_spec, params=_sgd_step(model, X[S], lr)).item() - loss0
    assert change == pytest.approx(lr * predicted_loss_change(dot, S), rel=0.03)


def test_predicted_loss_change_is_minus_the_subsets_score_sum():
    scores = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, -3.0, 0.0]])
    from attribution.analysis.sanity import predicted_loss_change

    np.testing.assert_array_equal(predicted_loss_change(scores, [0, 2]), [-2.5, 2.0])
    assert predicted_loss_change(scores[0], [1, 3]) == 0.75
    with pytest.raises(ConfigError, match="0..3"):
        predicted_loss_change(scores, [4])


def test_class_agreement_against_chance_with_an_interval():
    from attribution.analysis.sanity import class_agreement

    rng = np.random.default_rng(0)
    train_labels = np.repeat([0, 1, 2, 3], 50)  # chance = 1/4 for any target
    target_labels = rng.integers(0, 4, 40)
    # scores that favour the target's class: agreement well above chance, interval excludes it
    informed = rng.standard_normal((40, 200)) + 2.0 * (train_labels[None] == target_labels[:, None])
    a = class_agreement(informed, train_labels, target_labels, top=10)
    assert a.chance == pytest.approx(0.25) and a.above_chance and a.low > 0.5
    # the interval is the mean over targets +- 1.96 standard errors (a direct computation)
    top = np.argsort(-informed, axis=1, kind="stable")[:, :10]
    per = (train_labels[top] == target_labels[:, None]).mean(1)
    assert a.rate == pytest.approx(per.mean())
    assert a.high - a.rate == pytest.approx(1.96 * per.std(ddof=1) / np.sqrt(40))
    # random scores: the interval covers chance, so nothing is claimed
    r = class_agreement(rng.standard_normal((40, 200)), train_labels, target_labels, top=10)
    assert not r.above_chance and r.low <= 0.25 <= r.high + 1e-12
    assert "not distinguishable from chance" in r.describe()
    with pytest.raises(ConfigError):
        class_agreement(informed, train_labels[:10], target_labels)


def test_score_reports_class_agreement_for_a_range_of_labelled_targets(tiny_run, npz12, tmp_path, capsys):
    from attribution.analysis.sanity import class_agreement
    from attribution.cli import main

    out = tmp_path / "scores.npy"
    rc = main(["score", "--checkpoint", str(tiny_run), "--dataset", f"npz:{npz12}", "--target", "train:0-5",
               "--method", "trak", "--timesteps", "1", "--proj-dim", "64", "--top", "3", "--device", "cpu",
               "--cache", str(tmp_path / "cache"), "--out", str(out), "--json"])
    assert rc == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "class agreement" in x)
    train = load_dataset(f"npz:{npz12}")
    names = np.array([train.label_name(i) for i in range(len(train))])
    want = class_agreement(np.load(out), names, names[:6], 3)
    assert want.describe() in line and want.targets == 6


# -- 10. the GPU check in one command ----------------------------------------------------------------------------


def _gpu_check_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_part_b_passes_and_names_what_it_could_not_check(capsys):
    rc = _gpu_check_module().main(["--part", "b"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    summary = lines[-1]
    assert rc == 0 and summary["summary"] == "ok"
    checks = [x for x in lines if x.get("part") == "b"]
    assert sum(1 for x in checks if x.get("ok")) >= 3  # the Gaussian reference and CPU determinism, both projectors
    if not torch.cuda.is_available():
        assert any("CPU/CUDA agreement" in m for m in summary["not_checked"])
        assert sum(1 for x in checks if x.get("status") == "not checked") == 2


@pytest.mark.cuda
@needs_cuda
def test_cpu_and_cuda_features_agree_for_sjlt_and_gaussian():
    records = _gpu_check_module().part_b(cuda=True)
    agree = [r for r in records if "agree" in r["check"]]
    assert len(agree) == 2 and all(r["ok"] for r in agree), agree
