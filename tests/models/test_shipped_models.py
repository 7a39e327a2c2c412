"""The shipped default models: present, complete, generating what they should, and attributing sensibly.

These run on the real shipped `digits` model (0.65M parameters), with a reduced feature configuration (K=2
timesteps, k=2048) so that featurizing its 1,618 training images takes about a minute on two CPU cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attribution.data import load_dataset, tensor_to_pixels
from attribution.engine import open_attributor
from attribution.run_options import RunOptions
from attribution.methods import get_method
from attribution.models import SHIPPED, list_shipped, load_model, resolve_checkpoint
from attribution.sampling import sample


@pytest.mark.parametrize("alias,dataset,checkpoints", [("digits", "digits", 5), ("animals-2", "animals-2", 5),
                                                       ("digits-flow", "digits", 3)])
def test_shipped_model_is_complete(alias, dataset, checkpoints):
    info = resolve_checkpoint(alias)
    meta = json.loads((SHIPPED[alias] / "run.json").read_text())
    assert meta["config"]["dataset"] == dataset
    assert len(info.siblings) >= checkpoints, "intermediate checkpoints plus the final one"
    for spec in info.siblings:
        sib = resolve_checkpoint(spec)
        assert sib.weights_path.suffix == ".safetensors"
        assert sib.weights_path.stat().st_size < 4 * 2**20, "checkpoints stay small"
    assert alias in list_shipped() and f"{alias}@epoch-{resolve_checkpoint(info.siblings[0]).epoch}" in list_shipped()


@pytest.fixture(scope="module")
def digits_classifier():
    """A pixel logistic-regression classifier of the digits training split (about 97% on its validation split)."""
    from sklearn.linear_model import LogisticRegression

    train = load_dataset("digits", "train")
    val = load_dataset("digits", "val")
    clf = LogisticRegression(max_iter=2000).fit(train.pixels.reshape(len(train), -1) / 255.0, train.labels)
    assert clf.score(val.pixels.reshape(len(val), -1) / 255.0, val.labels) > 0.9
    return clf


@pytest.mark.parametrize("alias", ["digits", "digits-flow"])
def test_shipped_digits_generate_recognisable_digits(digits_classifier, alias):
    """The DDPM (DDPM sampler) and the rectified-flow model (Euler), each at its default sampler and 50 steps."""
    model = load_model(alias, "cpu")
    pixels = tensor_to_pixels(torch.from_numpy(sample(model, 32, seed=0).final))
    proba = digits_classifier.predict_proba(pixels.reshape(32, -1) / 255.0)
    # Recognisable: the classifier is confident on most samples, and they are not all one digit.
    assert np.mean(proba.max(1) > 0.5) >= 0.75, proba.max(1).round(2)
    assert len(set(proba.argmax(1))) >= 6


@pytest.fixture(scope="module")
def digits_attributor(tmp_path_factory):
    model = load_model("digits", "cpu")
    att = open_attributor(model, RunOptions(method="dtrak", timesteps=2, proj_dim=2048, projector="sjlt",
                                            cache=str(tmp_path_factory.mktemp("cache"))))
    att.featurize()
    return att


@pytest.mark.slow
def test_training_image_is_its_own_top_proponent(digits_attributor):
    """A consistency check, not a quality claim: it holds for random features too (the self-score is a leverage
    score), so it shows only that training rows and targets are featurized the same way (same noise keys)."""
    att, method = digits_attributor, get_method("dtrak")
    idx = np.random.default_rng(0).choice(len(att.train), size=40, replace=False)
    G = att.features_of(att.train.tensors(idx), [f"train/{i}" for i in idx])
    S = att.scores(method, G, None)  # the default lambda
    assert np.mean(S.argmax(1) == idx) >= 0.95


def test_generated_digits_have_same_class_proponents(digits_attributor, digits_classifier):
    att, method = digits_attributor, get_method("dtrak")
    traj = sample(att.model, 24, seed=100)
    labels = digits_classifier.predict(tensor_to_pixels(torch.from_numpy(traj.final)).reshape(24, -1) / 255.0)
    S = att.scores(method, att.features_of(torch.from_numpy(traj.final), [f"gen/{s}" for s in traj.seeds]), None)
    top5 = np.argsort(-S, axis=1)[:, :5]
    same = np.mean(att.train.labels[top5] == labels[:, None])
    # "Mostly the same class": well above the 10% chance level of ten balanced classes, and the 95% interval
    # over the 24 targets excludes chance (a check that random features fail).
    assert same >= 0.5, same
    from attribution.analysis.sanity import class_agreement

    agreement = class_agreement(S, att.train.labels, labels, top=5)
    assert agreement.rate == same and agreement.above_chance, agreement


def test_shipped_banks_are_found_by_their_models_identity():
    """A checkpoint's identity (the cache key, and how a bank is found for the model being attributed: the "how far
    to trust this" caption) is the sha256 of its weights file for a pixel model, so it survives code changes; each
    shipped bank records the identity its model has now."""
    import hashlib

    from attribution.evaluation.bank import Bank, bank_for_model, list_banks

    info = resolve_checkpoint("banks/digits/model")
    assert info.content_hash() == hashlib.sha256(info.weights_path.read_bytes()).hexdigest()[:16]
    names = list_banks()
    identity = {name: load_model(Bank.load(name).model_spec, "cpu").identity() for name in names}
    for name in names:  # a model with several banks (digits-crn at alpha 0.5 and 0.8) is found at the first listed
        found = bank_for_model(identity[name])
        assert found == next(n for n in names if identity[n] == identity[name])
        if found != name:
            assert Bank.load(found).meta["alpha"] == 0.5
