"""Kinds of features as plug-ins (`features.featurizer`): a kind defined outside the library is one class, and the
engine, the store and a method reach it only through the interface; kinds refuse what is not theirs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.engine import Attribution, Attributor
from attribution.errors import ConfigError
from attribution.features.config import FeatureConfig
from attribution.features.featurizer import FEATURIZERS, Featurizer, featurizer_class
from attribution.methods import get_method
from attribution.methods.base import SimilarityMethod
from engine_support import keys_for, subset


@pytest.fixture
def thumbnails():
    """A throwaway kind (4 x 4 average-pooled images) and a cosine method on it, unregistered afterwards."""

    class Thumbnails(Featurizer):
        kind = "test-thumbnails"
        description = "4x4 thumbnails"

        @classmethod
        def config_dict(cls, cfg):
            return {"embedding": "test-thumbnails"}

        @classmethod
        def slug(cls, cfg):
            return "thumbnails"

        @classmethod
        def cost_kind(cls, cfg):
            return "thumbnails"

        def __init__(self, model, train, cfg, cache_dir, batch_size=16):
            super().__init__(model, train, cfg, cache_dir, batch_size)
            self.grad_dim = self.proj_dim = model.channels * 16

        def rows(self, images, keys, fn=None):
            return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1).numpy()

    class ThumbCos(SimilarityMethod):
        name, title, summary = "test-thumb-cos", "Thumbnail cosine", "cosine of 4x4 thumbnails"
        features = Thumbnails
        cosine = True

    try:
        yield Thumbnails, ThumbCos()
    finally:
        FEATURIZERS.pop("test-thumbnails", None)


def _thumbs(images: torch.Tensor) -> np.ndarray:
    """4 x 4 block means, directly."""
    x = images.double().numpy()
    n, c, h, w = x.shape
    return x.reshape(n, c, 4, h // 4, 4, w // 4).mean(axis=(3, 5)).reshape(n, -1)


def test_a_new_kind_of_features_is_one_class(thumbnails, model, digits, digits_val, tmp_path):
    kind, method = thumbnails
    train = subset(digits, 20)
    cfg = method.feature_config()
    assert cfg.kind == "test-thumbnails" and cfg.featurizer is kind and featurizer_class("test-thumbnails") is kind
    att = Attributor(model, train, cfg, cache=str(tmp_path))
    X = np.asarray(att.featurize().features(), dtype=np.float64)
    np.testing.assert_allclose(X, _thumbs(train.tensors()), rtol=1e-5, atol=1e-6)  # rows through the interface
    assert att.store_path.name.startswith("thumbnails-")  # its folder name and identity
    assert att.store.config()["identity"]["features"] == {"embedding": "test-thumbnails"}
    images = digits_val.tensors(range(3))
    scores = Attribution(method, [att]).scores([att.features_of(images, keys_for("val", range(3)))])
    G = _thumbs(images)
    want = (G / np.linalg.norm(G, axis=1, keepdims=True)) @ (X / np.linalg.norm(X, axis=1, keepdims=True)).T
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="scores plain gradient features, these are 4x4 thumbnails"):
        Attribution(get_method("dtrak"), [att])  # a method of another kind refuses them, in one line


def test_kinds_refuse_what_is_not_theirs(thumbnails):
    with pytest.raises(ConfigError, match="unknown kind of features 'nope'; use one of: .*gradients"):
        FeatureConfig(kind="nope")
    with pytest.raises(ConfigError, match="damping applies to the influence-function"):
        FeatureConfig(kind="test-thumbnails", damping=0.1)  # another kind's option
    with pytest.raises(ValueError, match="two feature kinds are called 'gradients'"):
        type("Again", (Featurizer,), {"kind": "gradients"})
    assert FeatureConfig(kind="ekfac", damping=0.5).to_dict()["damping"] == 0.5  # the owner takes it
    for name, kind in (("dtrak", "gradients"), ("ekfac", "ekfac"), ("das", "das-residual"),
                       ("das-size", "das-residual-size"), ("pixel-cos", "pixels"), ("clip-dot", "clip")):
        assert get_method(name).features.kind == kind
    # DAS's features are D-TRAK Avg's (one store), its statistic beside them
    das, dtrak = FeatureConfig(kind="das-residual", fn="avg"), FeatureConfig(fn="avg")
    assert das.to_dict() == dtrak.to_dict() and das.slug() == dtrak.slug()
