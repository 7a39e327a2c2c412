"""The feature store (attribution/store.py; GPU readiness, issue 9): a trak-cuda store records the GPU its
projection matrix was made on, and opening it for another GPU (or opening one written before the matrix was
recorded) is refused with one line that says how to re-featurize, leaving the store untouched.
"""

from __future__ import annotations

import json

import pytest

from engine_support import one_line

from attribution.errors import CacheMismatchError
from attribution.store import FeatureStore


# -- a store projected on another GPU (issue 9, item 1) ----------------------------------------------------------


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
