"""The contract every registered method passes (diffusers' SchedulerCommonTest idea): one test class, run for each
name in the registry, so a new method file is checked the moment it is registered.

For each method, on the tiny test model and 12 digits: scores have shape (targets, training images) and are finite
float64; they are deterministic (a second attribution from scratch gives the same numbers); the sign convention
holds on a problem whose answer is known (a training image used as its own target has a positive score against
itself: it pushes the model toward itself); self-influence has one finite value per training image where the
method defines it, and is a one-line ConfigError where it does not; targets the method cannot attribute are
refused before any featurizing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.engine import open_attribution
from attribution.run_options import RunOptions
from attribution.errors import ConfigError
from attribution.methods import METHODS
from attribution.targets import from_pixels, resolve_targets


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory, tiny_clip_name):
    """A tiny randomly initialised open_clip tower saved to a local file (no CLIP weights exist offline)."""
    from attribution.features.embeddings import ClipEmbedder

    path = tmp_path_factory.mktemp("clip") / "w.pt"
    torch.save(ClipEmbedder.random(tiny_clip_name, seed=0).model.state_dict(), path)
    return str(path)


def attribution_for(name, tiny_run, npz12, cache, clip_weights):
    # the options of a comparison of every method: each takes those of its kind (`RunOptions.for_method`)
    return open_attribution(RunOptions.for_method(name, checkpoint=str(tiny_run), device="cpu",
                                                  dataset=f"npz:{npz12}", timesteps=2, proj_dim=64, cache=str(cache),
                                                  clip_model="tiny-clip-test", clip_weights=clip_weights))


@pytest.mark.parametrize("name", list(METHODS))
class TestMethodContract:
    def test_shape_sign_and_determinism(self, name, tiny_run, npz12, tmp_path, clip_weights):
        att = attribution_for(name, tiny_run, npz12, tmp_path / "a", clip_weights)
        method = att.method
        try:  # an image without a sampling trajectory (the training image itself)
            method.check_targets(from_pixels(att.train.pixels[3:4], ["train-3.png"]))
            accepts_images = True
        except ConfigError as exc:  # refused before any featurizing, in one line
            assert "\n" not in str(exc) and not any((tmp_path / "a").rglob("features.npy"))
            accepts_images = False
        att.featurize()
        targets = (resolve_targets("train:3", att.target_model, f"npz:{npz12}") if accepts_images
                   else resolve_targets("gen:1", att.target_model, f"npz:{npz12}", steps=3))
        scores = att.scores(att.target_features(targets, cache=str(tmp_path / "a")))
        assert scores.shape == (1, 12) and scores.dtype == np.float64 and np.isfinite(scores).all()
        if accepts_images:  # sign convention: an image pushes the model toward itself
            assert scores[0, 3] > 0, (name, scores[0, 3])
        again = attribution_for(name, tiny_run, npz12, tmp_path / "b", clip_weights)
        result = again.run(targets, cache=str(tmp_path / "b"))  # the lifecycle in one call, from scratch
        np.testing.assert_allclose(result.scores, scores, rtol=1e-6, atol=1e-12)
        assert sorted(result.ranking[0]) == list(range(12))  # a permutation, strongest proponent first
        assert (np.diff(result.scores[0, result.ranking[0]]) <= 0).all()
        assert result.lam == again.resolve_lambda(None)  # the default, resolved once
        if method.uses_lambda:  # re-scoring at another lambda = scoring the same target features directly
            np.testing.assert_allclose(result.at(3 * result.lam).scores, again.scores(result.G, 3 * result.lam),
                                       rtol=1e-12)

    def test_self_influence_where_defined(self, name, tiny_run, npz12, tmp_path, clip_weights):
        att = attribution_for(name, tiny_run, npz12, tmp_path, clip_weights)
        att.featurize()
        if att.method.has_self_influence:
            values = att.self_influence()
            assert values.shape == (12,) and np.isfinite(values).all()
        else:
            with pytest.raises(ConfigError) as exc:
                att.self_influence()
            assert "\n" not in str(exc.value)
