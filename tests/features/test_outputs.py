"""Output functions and the noise schedule (attribution/features/outputs.py; the schedule is the model adapter's
DDPMSchedule): every output function against its closed-form formula in float64 (the interpolation's anchors
included), and the schedule's ELBO weights and forward process against diffusers' DDPMScheduler. Numerical
identities on random tensors: no model is needed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.errors import ConfigError
from attribution.features.outputs import OUTPUT_FUNCTIONS, output_value
from attribution.models.schedules import DDPMSchedule
from attribution.models.schedules import DEFAULT_SCHEDULE


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

    sched = DDPMSchedule.from_config(DEFAULT_SCHEDULE)
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
