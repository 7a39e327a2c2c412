"""Journey TRAK over several checkpoints (attribution/methods/journey_trak.py; GPU readiness, issue 9, item 3): in an
ensemble, the first member samples the target, and every member's Journey feature is the mean step feature of that
one trajectory under the member's own gradients, not of the image the member would sample itself; the cache keeps the
two apart. Runs on the tiny model of `tiny_run` (epochs 1 and 2).
"""

from __future__ import annotations

import numpy as np
import torch

from engine_support import subset

from attribution.engine import Attribution, Attributor
from attribution.features.config import FeatureConfig
from attribution.methods import get_method


# -- Journey TRAK over several checkpoints -----------------------------------------------------------------------


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
