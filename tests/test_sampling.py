"""Sampling steps against direct computation: every step's x̂0 is (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar) for
epsilon- and v-prediction models, with DDIM and DDPM; classifier-free guidance combines the noise predictions as
uncond + w (cond - uncond); a v-prediction model samples what its epsilon twin samples; a checkpoint that does not
say what it predicts is read as epsilon only when it predicts the noise; a scheduler the sampler cannot drive is
refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attribution.errors import AttributionError, CheckpointError, ConfigError
from attribution.models import DEFAULT_SCHEDULE, load_model, unet_for
from attribution.models.adapter import check_predicts_noise
from attribution.models.schedules import DDPMSchedule
from attribution.models.pixel_ddpm import PixelDDPM
from attribution.sampling import Prompt, gen_key, sample

# x̂0 divides by sqrt(abar_t), down to 0.0064 at t = 999 (156x), and diffusers keeps abar in float32 where the
# adapter keeps it in float64 (relative difference up to 2.4e-7): differences up to ~1e-4 of x̂0's size are
# rounding. The v-prediction bug this guards against moved x̂0 by O(1).
RTOL = 1e-4


def tiny(prediction_type: str, seed: int = 0) -> PixelDDPM:
    torch.manual_seed(seed)
    config = {**DEFAULT_SCHEDULE, "prediction_type": prediction_type, "clip_sample": False}  # x̂0 unclipped
    return PixelDDPM(unet_for(16, 1, "tiny"), DDPMSchedule.from_config(config), None, "cpu")


def direct_x0(model, xt: np.ndarray, t: int, eps: torch.Tensor) -> np.ndarray:
    abar = model.schedule.alphas_cumprod[t]
    return ((torch.from_numpy(xt).double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()).numpy()


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    err = np.abs(got - want).max()
    assert err <= RTOL * np.abs(want).max(), f"max |x̂0 - direct| {err:.3g} of |x̂0| up to {np.abs(want).max():.3g}"


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_each_step_predicts_x0_from_the_noise_prediction(prediction_type, sampler):
    model = tiny(prediction_type)
    traj = sample(model, 2, seed=3, steps=4, sampler=sampler)
    for i, t in enumerate(traj.timesteps):
        xt = traj.xt[i]
        tt = torch.full((2,), int(t), dtype=torch.long)
        eps = model.schedule.eps_from_raw(model.raw(model.parameters(), torch.from_numpy(xt), tt),
                                          torch.from_numpy(xt), tt)
        assert_close(traj.x0_pred[i], direct_x0(model, xt, int(t), eps))
    if prediction_type == "v_prediction":  # the network's raw output is not the noise: the check above has teeth
        raw = model.raw(model.parameters(), torch.from_numpy(traj.xt[0]), torch.full((2,), int(traj.timesteps[0])))
        assert not np.allclose(traj.x0_pred[0], direct_x0(model, traj.xt[0], int(traj.timesteps[0]), raw), atol=0.1)


def as_velocity(spec: str):
    """The checkpoint loaded as a v-prediction model: its network's output is replaced (on this instance only) by
    v = sqrt(abar) eps_hat - sqrt(1 - abar) x̂0, exactly what a v-model that learnt the same denoiser would output."""
    model = load_model(spec, "cpu")
    eps_raw = model.raw

    def raw(params, x_t, t, cond=None):
        eps = eps_raw(params, x_t, t, cond)
        return model.schedule.prediction_target(model.schedule.predict_x0(x_t, eps, t), eps, t)

    model.schedule = DDPMSchedule.from_config({**model.schedule.config, "prediction_type": "v_prediction"})
    model.raw = raw
    return model


@pytest.fixture(scope="module")
def digits_twins():
    return load_model("digits", "cpu"), as_velocity("digits")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_v_prediction_model_samples_what_its_epsilon_twin_samples(digits_twins, sampler):
    eps_model, v_model = digits_twins
    a = sample(eps_model, 2, seed=5, steps=8, sampler=sampler)
    b = sample(v_model, 2, seed=5, steps=8, sampler=sampler)
    # the conversion to v and back rounds in float32 (~1e-6); 8 steps keep it far below one grey level (2/255)
    assert np.abs(a.final - b.final).max() < 1e-3
    assert np.abs(a.x0_pred - b.x0_pred).max() < 1e-3


def test_a_model_that_does_not_predict_the_noise_needs_its_prediction_type(digits_twins, tmp_path):
    eps_model, v_model = digits_twins
    check_predicts_noise(eps_model, tmp_path / "scheduler_config.json")  # the trained epsilon model passes
    with pytest.raises(ConfigError, match='"prediction_type": "v_prediction"') as exc:
        check_predicts_noise(v_model, tmp_path / "scheduler_config.json")
    assert "\n" not in str(exc.value)
    # through the loader: a bare UNet folder without a scheduler config is epsilon if it predicts the noise ...
    eps_model.unet.save_pretrained(str(tmp_path / "trained"), safe_serialization=True)
    assert load_model(str(tmp_path / "trained"), "cpu").schedule.prediction_type == "epsilon"
    # ... and is refused when it does not (here an untrained network), until its config says what it predicts
    tiny("epsilon").unet.save_pretrained(str(tmp_path / "untrained"), safe_serialization=True)
    with pytest.raises(ConfigError, match="does not predict the noise"):
        load_model(str(tmp_path / "untrained"), "cpu")
    (tmp_path / "untrained" / "scheduler_config.json").write_text(json.dumps(
        {**DEFAULT_SCHEDULE, "prediction_type": "v_prediction"}))
    assert load_model(str(tmp_path / "untrained"), "cpu").schedule.prediction_type == "v_prediction"


@pytest.mark.parametrize("name", ["ScoreSdeVeScheduler", "EDMEulerScheduler"])
def test_a_scheduler_the_sampler_cannot_drive_is_refused(tmp_path, name):
    tiny("epsilon").unet.save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    (tmp_path / "m" / "scheduler_config.json").write_text(json.dumps({"_class_name": name,
                                                                      "num_train_timesteps": 1000}))
    with pytest.raises(CheckpointError, match=name) as exc:
        load_model(str(tmp_path / "m"), "cpu")
    assert "\n" not in str(exc.value) and isinstance(exc.value, AttributionError)
    assert "FlowMatchEulerDiscreteScheduler" in str(exc.value)  # the supported ones are named


def test_a_flow_matching_folder_loads_and_dynamic_shifting_is_refused(tmp_path):
    tiny("epsilon").unet.save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    (tmp_path / "m" / "scheduler_config.json").write_text(json.dumps(config))
    model = load_model(str(tmp_path / "m"), "cpu")  # no noise check: a flow model states what it predicts
    assert model.schedule.name == "flow-matching" and model.schedule.shift == 3.0
    (tmp_path / "m" / "scheduler_config.json").write_text(json.dumps({**config, "use_dynamic_shifting": True}))
    with pytest.raises(CheckpointError, match="use_dynamic_shifting") as exc:
        load_model(str(tmp_path / "m"), "cpu")
    assert "\n" not in str(exc.value)


# -- classifier-free guidance (on the shipped text-conditional model: trained, so the prompt matters) -------------

@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def text_model(request):
    return load_model("digits-latent", "cpu") if request.param == "epsilon" else as_velocity("digits-latent")


def latent_x0(model, xt: np.ndarray, t: int, eps: torch.Tensor) -> np.ndarray:
    return model.decode(torch.from_numpy(direct_x0(model, xt, t, eps)).float()).numpy()


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_guided_step_combines_conditional_and_unconditional_noise(text_model, guidance):
    model = text_model
    prompt = Prompt("a handwritten digit 7", negative="", guidance=guidance)
    traj = sample(model, 1, seed=2, steps=3, sampler="ddim", prompt=prompt)
    for i, t in enumerate(traj.timesteps):
        xt = torch.from_numpy(traj.xt[i])
        tt = torch.full((1,), int(t), dtype=torch.long)
        cond = model.eps(model.parameters(), xt, tt, model.condition([gen_key(2, prompt)]))
        uncond = model.eps(model.parameters(), xt, tt, model.prompt_condition([""]))
        assert_close(traj.x0_pred[i], latent_x0(model, traj.xt[i], int(t), uncond + guidance * (cond - uncond)))
        alone = latent_x0(model, traj.xt[i], int(t), cond)  # the conditional prediction alone
        if guidance == 1.0:
            assert_close(traj.x0_pred[i], alone)
        else:  # guidance moves x̂0 far beyond the tolerance, so the checks above have teeth
            assert np.abs(traj.x0_pred[i] - alone).max() > 100 * RTOL * np.abs(alone).max()
