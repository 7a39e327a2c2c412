"""Sanity checks that can fail, and the LDS sign (attribution/analysis/sanity.py; GPU readiness, issue 9, items 4
and 5): one SGD step on a training image changes the target's loss by -lr x its score, so the scores' sign is
right, for one image and for a subset (`predicted_loss_change`, the LDS sign); class agreement is compared with
chance through an interval, and the `score` command reports it for a range of labelled targets. Runs on the tiny
2-epoch model of `tiny_run`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_support import subset

from attribution.data import load_dataset
from attribution.engine import Attributor
from attribution.errors import ConfigError
from attribution.features.config import FeatureConfig
from attribution.features.gradients import output_values
from attribution.methods import get_method


# -- sanity checks that can fail; the LDS sign -------------------------------------------------------------------


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
    spec = att.featurizer.grad_spec
    loss0 = output_values(model, target, key, spec).item()
    lr = 1e-4
    measured = np.array([output_values(model, target, key, spec, params=_sgd_step(model, X[i:i + 1], lr))
                         .item() - loss0 for i in range(len(train))])
    np.testing.assert_allclose(measured, -lr * dot, rtol=0.03, atol=0.01 * lr * np.abs(dot).max())
    # lambda -> infinity: TRAK's scores are grad-dot / lambda, so their sign predicts the loss change
    big = 1e6 * att.train_features().kernel.eigenvalues.mean()
    tau = att.scores(get_method("trak"), G, big)[0]
    assert np.array_equal(np.sign(tau), np.sign(dot))
    assert (measured[tau > 0] < 0).all() and (measured[tau < 0] > 0).all()
    # a subset: the LDS sign
    S = np.array([0, 3, 5, 11, 17])
    change = output_values(model, target, key, spec, params=_sgd_step(model, X[S], lr)).item() - loss0
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
