"""Per-sample gradients (attribution/features/gradients.py), each checked against an independent computation: the
vmap gradients against a plain per-sample autograd loop (every output function, and over a parameter subset), the
same features whatever the batching or chunking, and a v-prediction model's Simple features against the gradient of
the v-MSE it is trained with (diffusers' get_velocity target). Everything runs on a randomly initialised "tiny" UNet
(41,609 parameters) and a few digits images: the checks are numerical identities that hold for any weights, so no
training is needed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from engine_support import TWO_STEPS, keys_for, one_line, rel_err, subset, tiny_model

from attribution.engine import Attributor
from attribution.errors import ConfigError
from attribution.features import gradients as gradients_mod
from attribution.features.config import FeatureConfig
from attribution.features.gradients import GradientSpec, output_values, param_count, per_sample_gradients
from attribution.features.outputs import OUTPUT_FUNCTIONS, output_value
from attribution.features.timesteps import noise_for
from attribution.models.adapter import DiffusionModel
from attribution.models.schedules import DEFAULT_SCHEDULE


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


def test_a_memory_budget_picks_smaller_chunks_and_refuses_what_cannot_fit(model, digits):
    """--memory-budget: the estimate (gradients.memory_estimate: process, weights, projector hash, 12 P B, noisy
    images per call x their activations) with its margin decides the batch and the noisy copies per call; the
    features do not change; a budget below one image at a time is one line."""
    from attribution.features.gradients import MEMORY_MARGIN, PROCESS_BYTES, activation_bytes

    rows = list(range(6))
    cfg = FeatureConfig(fn="square", noises=2, projector="sjlt", proj_dim=256, **TWO_STEPS)
    train = subset(digits, 6)
    x0, keys = train.tensors(rows), keys_for("train", rows)
    free = Attributor(model, train, cfg, batch_size=16)
    want = free.features_of(x0, keys)
    fz = Attributor(model, train, cfg, batch_size=16).featurizer
    A, P = activation_bytes(model), fz.gradient_dim()
    assert A > 0 and fz.memory_estimate(2, 8, A) == PROCESS_BYTES + 4 * P + 20 * P + 24 * P + 2 * 4 * A  # K D = 4
    one = MEMORY_MARGIN * fz.memory_estimate(1, 1, A)
    batch, per_call = fz.fit_memory(int(one + 1))  # room for one image and one noisy copy at a time, no more
    assert (batch, per_call) == (1, 1) and fz.batch_size == 1
    assert rel_err(fz.rows(x0, keys), want) < 1e-5  # the same features, computed a copy at a time
    with pytest.raises(ConfigError, match="even one image and one noisy copy at a time") as exc:
        fz.fit_memory(int(one - 1))
    one_line(exc)
    roomy = Attributor(model, train, cfg, batch_size=16).featurizer
    assert roomy.fit_memory(2**40) == (16, gradients_mod.IMAGES_PER_CALL)  # a large budget changes nothing


# -- v-prediction (GPU readiness, issue 9, item 6) ---------------------------------------------------------------


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
    eps_hat = model.eps(model.parameters(), model.schedule.add_noise(x0[0].expand_as(eps[0]), eps[0], ts), ts)
    assert abs(torch.nn.functional.mse_loss(eps_hat, eps[0]).item() - losses[0]) > 1e-3 * losses[0]
