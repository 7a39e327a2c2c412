"""Flow-matching (rectified-flow) models through the schedule seam (attribution/models/schedules.py), each piece
against an independent computation: the schedule's formulas against their definitions, the Euler sampler against
diffusers' `FlowMatchEulerDiscreteScheduler` step by step, both ODE samplers against the exact flow of one data
point, per-sample gradients against a plain autograd loop over the flow-matching loss, a Journey step's x̂0 and the
banks' F against x_t - s v̂ and the velocity MSE, and training (`--schedule flow-matching`) against the loss it
minimises. All on randomly initialised tiny UNets (the identities hold for any weights)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine_support import keys_for, one_line

from attribution.errors import ConfigError
from attribution.evaluation.bank import simple_loss_outputs
from attribution.features.gradients import GradientSpec, output_values, per_sample_gradients
from attribution.features.outputs import output_value
from attribution.features.timesteps import noise_for
from attribution.journey import JourneyConfig, forward_trajectory
from attribution.models import load_model
from attribution.models.pixel_ddpm import PixelDDPM
from attribution.models.presets import unet_for
from attribution.models.schedules import DEFAULT_FLOW_SCHEDULE, FlowMatchingSchedule
from attribution.sampling import sample
from attribution.train import TrainConfig, train


def flow_model(seed: int = 0, **config) -> PixelDDPM:
    torch.manual_seed(seed)
    schedule = FlowMatchingSchedule.from_config({**DEFAULT_FLOW_SCHEDULE, **config})
    return PixelDDPM(unet_for(16, 1, "tiny"), schedule, None, "cpu")


@pytest.fixture(scope="module")
def fm():
    return flow_model(0)


# -- the schedule's formulas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_schedule_is_its_definition(shift):
    sched = FlowMatchingSchedule.from_config({"num_train_timesteps": 1000, "shift": shift})
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    u = (t.double() + 1) / 1000
    s = (shift * u / (1 + (shift - 1) * u)).float().reshape(-1, 1, 1, 1)
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
    v = sched.prediction_target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(sched.x0_from_raw(v, x_t, t), x0, rtol=0, atol=2e-6)  # exact velocity -> x0
    torch.testing.assert_close(sched.eps_from_raw(v, x_t, t), eps, rtol=0, atol=2e-6)
    torch.testing.assert_close(sched.model_time(t), s.flatten() * 1000)
    assert float(sched.sigmas()[-1]) == 1.0  # the last grid time is pure noise
    # the ELBO weight (1 - s) / (s T) on the velocity MSE: 0 at pure noise, ~1 at the least noisy time
    w = sched.elbo_weight(t)
    np.testing.assert_allclose(w.numpy(), ((1 - s.flatten()) / (s.flatten() * 1000)).numpy(), rtol=1e-6)
    assert float(w[-1]) == 0 and float(w[0]) == pytest.approx((1 - s.flatten()[0]) / (s.flatten()[0] * 1000))


def test_diffusers_training_sigmas_are_the_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchingSchedule.from_config({"num_train_timesteps": 1000, "shift": 3.0})
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    torch.testing.assert_close(sched.sigmas(), ref.sigmas.flip(0))  # diffusers lists them noisiest first


# -- sampling ------------------------------------------------------------------------------------------------------


def test_euler_equals_diffusers_flow_match_euler_step_by_step():
    """On a grid where diffusers' sampling sigmas are grid times (T = 100, 12 steps: 1, 0.91, ..., 0.01), every
    Euler step of `sample` equals `FlowMatchEulerDiscreteScheduler.step` on the same network outputs."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = flow_model(1, num_train_timesteps=100)
    traj = sample(model, 2, seed=3, steps=12, sampler="euler")
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=100)
    ref.set_timesteps(12)
    x = torch.from_numpy(traj.xt[0])
    assert traj.timesteps.tolist() == (ref.sigmas[:-1] * 100).round().long().sub(1).tolist()
    with torch.no_grad():
        for i, t in enumerate(ref.timesteps):
            torch.testing.assert_close(x, torch.from_numpy(traj.xt[i]), rtol=0, atol=1e-5)
            v = model.unet(x, t.expand(len(x))).sample  # diffusers hands the network sigma * T
            torch.testing.assert_close(torch.from_numpy(traj.x0_pred[i]), x - ref.sigmas[i] * v, rtol=0, atol=1e-5)
            x = ref.step(v, t, x).prev_sample
    torch.testing.assert_close(torch.from_numpy(traj.final), x.clamp(-1, 1), rtol=0, atol=1e-5)


class OnePoint(torch.nn.Module):
    """The exact velocity field of a single data point x0: v(x, s) = (x - x0) / s."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(in_channels=x0.shape[1], sample_size=x0.shape[-1])

    def forward(self, x, time, return_dict=False):
        s = (time / 1000).reshape(-1, 1, 1, 1)
        return ((x - self.x0) / s + self.w,)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_both_ode_samplers_follow_the_straight_path_of_one_point(sampler):
    """With the exact velocity of one data point the path is a straight line, which Euler and Heun integrate
    exactly: every x_t lies on (1 - s) x0 + s eps and x̂0 is x0 at every step."""
    x0 = torch.linspace(-0.9, 0.9, 64).reshape(1, 1, 8, 8)
    model = flow_model(0)
    model.unet = OnePoint(x0)
    traj = sample(model, 1, seed=0, steps=7, sampler=sampler)
    eps = torch.from_numpy(traj.xt[0])
    for i, t in enumerate(traj.timesteps.tolist()):
        s = float(model.schedule.sigmas()[t])
        torch.testing.assert_close(torch.from_numpy(traj.xt[i]), (1 - s) * x0 + s * eps, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(traj.x0_pred[i]), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(traj.final), x0, rtol=0, atol=1e-5)


def test_heun_differs_from_euler_on_a_curved_field(fm):
    euler, heun = (sample(fm, 1, seed=2, steps=5, sampler=s) for s in ("euler", "heun"))
    assert np.abs(euler.final - heun.final).max() > 1e-3
    np.testing.assert_array_equal(euler.xt[0], heun.xt[0])  # same starting noise


@pytest.mark.parametrize("kwargs, match", [
    ({"sampler": "ddpm"}, "a flow-matching model samples with euler or heun, not 'ddpm'"),
    ({"steps": 1001}, r"--steps must be within 1..1000"),
])
def test_bad_sampling_options_are_one_line(fm, kwargs, match):
    with pytest.raises(ConfigError, match=match) as exc:
        sample(fm, 1, **kwargs)
    one_line(exc)


def test_shifted_sampling_snaps_diffusers_sigmas_to_the_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchingSchedule.from_config({"num_train_timesteps": 1000, "shift": 3.0})
    ts = sched.sampling_timesteps(28)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(28)
    gaps = (sched.sigmas()[ts] - ref.sigmas[:-1]).abs()
    assert len(set(ts.tolist())) == 28 and float(gaps.max()) < 2e-3  # grid spacing at s ~ 1 is ~1e-3 / 3


# -- features, Journey and the banks' F -----------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["simple", "square", "avg", "elbo"])
def test_per_sample_gradients_equal_a_loop_over_the_flow_loss(fm, digits, fn):
    """vmap per-sample gradients of an output function of the velocity against one sample at a time through the
    UNet's own forward at time s T, with x_t = (1 - s) x0 + s eps and target eps - x0 written out here."""
    x0, keys = digits.tensors([0, 5]), keys_for("train", [0, 5])
    spec = GradientSpec(fn, (0, 500, 999), draws=1, seed=1)
    ts = torch.tensor(spec.timesteps)
    s = fm.schedule.sigmas()[ts].reshape(-1, 1, 1, 1)
    noise = noise_for(keys, ts, tuple(x0.shape[1:]), spec.seed, 1)
    unet = fm.unet
    rows = []
    for i in range(len(x0)):
        x_t = (1 - s) * x0[i] + s * noise[i]
        with torch.enable_grad():
            ps = [p.requires_grad_(True) for p in unet.parameters()]
            v_hat = unet(x_t, s.flatten() * 1000).sample
            w = (1 - s.flatten()) / (s.flatten() * 1000)
            value = output_value(fn, v_hat, noise[i] - x0[i], w) / len(ts)
            grads = torch.autograd.grad(value, ps)
            for p in ps:
                p.requires_grad_(False)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    fast = per_sample_gradients(fm, x0, keys, spec)
    torch.testing.assert_close(fast, torch.stack(rows), rtol=1e-4, atol=1e-6)
    if fn == "simple":  # the output value is the flow-matching training loss
        loss = [float(((unet(((1 - s) * x0[i] + s * noise[i]), s.flatten() * 1000).sample
                        - (noise[i] - x0[i])) ** 2).mean()) for i in range(len(x0))]
        np.testing.assert_allclose(output_values(fm, x0, keys, spec).numpy(), loss, rtol=1e-5)


def test_a_journey_steps_x0_is_x_t_minus_s_v(fm, digits):
    image = digits.tensors([3])[0]
    traj = forward_trajectory(fm, image, JourneyConfig(steps=6), "file/x")
    assert traj.sampler == "euler" and len(traj.timesteps) == 6
    xt = torch.from_numpy(traj.xt[:, 0])
    t = torch.from_numpy(traj.timesteps)
    with torch.no_grad():
        v = fm.unet(xt, fm.schedule.sigmas()[t] * 1000).sample
    s = fm.schedule.sigmas()[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(torch.from_numpy(traj.x0_pred[:, 0]), (xt - s * v).clamp(-1, 1), rtol=0, atol=1e-5)


def test_the_banks_f_is_the_flow_matching_loss(fm, digits):
    images, keys = digits.tensors([0, 1, 2]), keys_for("val", [0, 1, 2])
    got = simple_loss_outputs(fm, images, keys, k=4, noise_sets=1)[0]
    ts = torch.tensor([0, 250, 500, 750])
    s = fm.schedule.sigmas()[ts].reshape(-1, 1, 1, 1)
    want = []
    for i, key in enumerate(keys):
        eps = noise_for([f"bank/0/{key}"], ts, (1, 16, 16), 0)[0]
        with torch.no_grad():
            v = fm.unet((1 - s) * images[i] + s * eps, s.flatten() * 1000).sample
        want.append(float(((v - (eps - images[i])) ** 2).mean()))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# -- training ------------------------------------------------------------------------------------------------------


def test_training_a_flow_model_writes_a_flow_checkpoint(tmp_path):
    run = train(TrainConfig(dataset="digits", out=str(tmp_path / "run"), epochs=2, preset="tiny", resolution=16,
                            schedule="flow-matching", device="cpu", randomness="crn-slots"))
    meta = json.loads((run / "run.json").read_text())
    assert meta["config"]["schedule"] == "flow-matching"
    assert meta["noise_schedule"] == DEFAULT_FLOW_SCHEDULE
    sched = json.loads((run / "epoch-2" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    model = load_model(str(run), "cpu")
    assert model.schedule.name == "flow-matching" and model.schedule.default_sampler == "euler"
    assert meta["epoch_loss"][1] < meta["epoch_loss"][0]
    # a DDPM run's run.json keeps its keys: no schedule entry
    ddpm = train(TrainConfig(dataset="digits", out=str(tmp_path / "ddpm"), epochs=1, preset="tiny", resolution=16,
                             device="cpu"))
    assert "schedule" not in json.loads((ddpm / "run.json").read_text())["config"]


def test_the_training_loss_is_the_velocity_mse(fm, digits):
    x0 = digits.tensors([0, 1])
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([100, 900])
    s = fm.schedule.sigmas()[t].reshape(-1, 1, 1, 1)
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(fm.unet((1 - s) * x0 + s * eps, s.flatten() * 1000).sample, eps - x0)
        torch.testing.assert_close(fm.training_loss(x0, eps, t), want)


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "edm"}, "--schedule must be one of ddpm, flow-matching"),
    ({"schedule": "flow-matching", "pipeline": "x"}, "keeps its pipeline's noise process"),
])
def test_bad_training_schedules_are_one_line(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match) as exc:
        TrainConfig(dataset="digits", out=str(tmp_path), **kwargs)
    one_line(exc)


@pytest.mark.parametrize("config, match", [
    ({"use_dynamic_shifting": True}, "with use_dynamic_shifting set is not supported"),
    ({"use_karras_sigmas": True}, "with use_karras_sigmas set is not supported"),
    ({"shift": 0.0}, "the time shift must be positive, got 0.0"),
    ({"num_train_timesteps": 1}, "num_train_timesteps must be at least 2, got 1"),
])
def test_flow_scheduler_configs_the_grid_cannot_hold_are_one_line(config, match):
    """Every time a flow model is given lies in (0, 1]: the grid's s = shift u / (1 + (shift - 1) u), u in (0, 1],
    for a positive shift; configs whose times depend on more than the step are refused."""
    with pytest.raises(ConfigError, match=match) as exc:
        FlowMatchingSchedule.from_config({"num_train_timesteps": 1000, "shift": 3.0, **config})
    one_line(exc)
    s = FlowMatchingSchedule.from_config({"num_train_timesteps": 1000, "shift": 3.0}).sigmas()
    assert float(s.min()) > 0 and float(s.max()) == 1.0
