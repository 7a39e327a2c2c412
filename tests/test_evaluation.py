"""Engine methods evaluated on a ground-truth bank (attribution/evaluation/evaluate.py) and the `lds` command.

The bank here is made by hand (no retraining): the tiny test model as the bank's model, 16 random half-subsets of
the digits training split, 4 validation + 2 generated targets, and F planted as a linear function of the subsets so
the expected LDS is known: F = masks @ effect + noise, with `effect` the true per-image effect on each target.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from attribution.errors import ConfigError
from attribution.evaluation.bank import Bank
from attribution.evaluation.evaluate import (bank_targets, check_external_scores, lambda_sweep, lds_table,
                                             score_bank, split_rows)
from attribution.evaluation.lds import lds

N = 1618  # the digits training split


@pytest.fixture(scope="module")
def fake_bank(tiny_run, tmp_path_factory):
    from attribution.data import load_dataset
    from attribution.models import load_model
    from attribution.sampling import sample

    folder = tmp_path_factory.mktemp("banks") / "fake"
    shutil.copytree(tiny_run / "epoch-2", folder / "model")
    model = load_model(str(folder / "model"), "cpu")
    val = load_dataset("digits", "val", model.resolution, model.channels)
    gen = sample(model, 2, 0, steps=3)
    images = np.concatenate([val.tensors(list(range(4))).numpy(), gen.final]).astype(np.float32)
    keys = [f"val/{i}" for i in range(4)] + ["gen/0", "gen/1"]
    rng = np.random.default_rng(0)
    masks = rng.random((16, N)) < 0.5
    effect = rng.normal(size=(N, len(keys)))  # the true effect of each image on each target's loss
    F = (masks @ effect)[:, None, None, :] + rng.normal(scale=0.5, size=(16, 2, 2, len(keys)))
    (folder / "outputs").mkdir()
    for j in range(16):
        for s in range(2):
            np.savez(folder / "outputs" / f"subset-{j:03d}-seed-{s}.npz", F=F[j, s], targets_hash=np.array("t"))
    np.save(folder / "masks.npy", masks)
    np.savez(folder / "targets.npz", images=images, keys=np.array(keys))
    meta = {"name": "fake", "dataset": "digits", "seeds": [0, 1], "noise_sets": 2, "targets_hash": "t",
            "status": "complete", "recipe_name": "tiny", "alpha": 0.5, "timesteps": [0, 500],
            "identity": {"recipe_key": "x", "gen_steps": 3}}
    (folder / "bank.json").write_text(json.dumps(meta))
    return Bank.load(folder), effect


def test_bank_targets_keep_keys_images_and_seeds(fake_bank):
    bank, _ = fake_bank
    t = bank_targets(bank)
    assert t.keys == bank.target_keys and t.names[4] == "gen:0"
    np.testing.assert_array_equal(t.images.numpy(), bank.target_images)
    assert t.generated[:4] == [None] * 4 and (t.generated[5].seed, t.generated[5].steps) == (1, 3)
    assert list(split_rows(bank, "val")) == [0, 1, 2, 3] and list(split_rows(bank, "gen")) == [4, 5]


def test_true_effects_reach_the_planted_lds_and_the_table_matches_lds(fake_bank):
    """Scores = -effect (a proponent lowers the loss) must give an LDS near 1, their negation near -1, and the
    table's numbers must be lds() on the split's columns."""
    bank, effect = fake_bank
    table = lds_table(bank, {"true": -effect.T, "negated": effect.T}, "val", n_resamples=50)
    assert table.methods["true"].standard.value > 0.9
    assert table.methods["negated"].standard.value < -0.9
    direct = lds(-effect.T[:4], bank.masks, bank.F[..., :4], n_resamples=50)
    assert table.methods["true"].standard.value == pytest.approx(direct.standard.value)


def test_a_method_on_the_bank_and_its_lambda_sweep(fake_bank, tmp_path):
    """TRAK through the engine on the bank's model: scores (T, N) equal the attribution's own scores of the bank
    targets; the sweep's LDS at the default lambda equals the table's; GCV gives a lambda on the grid's scale."""
    bank, _ = fake_bank
    run = score_bank(bank, "trak", device="cpu", timesteps=2, proj_dim=128, cache=str(tmp_path))
    scores = run.scores()
    assert scores.shape == (6, N) and np.isfinite(scores).all()
    G = run.attribution.target_features(bank_targets(bank))
    np.testing.assert_allclose(scores, run.attribution.scores(G, run.default_lambda), rtol=1e-6)
    sweep = lambda_sweep(bank, run, "val", lambdas=[run.default_lambda], n_resamples=20)
    table = lds_table(bank, {"trak": scores}, "val", n_resamples=20)
    assert sweep.standard[0] == pytest.approx(table.methods["trak"].standard.value)
    grid = run.lambda_grid()
    assert grid[0] <= run.gcv(split_rows(bank, "val")) <= grid[-1]


def test_external_scores_are_checked(fake_bank):
    bank, _ = fake_bank
    with pytest.raises(ConfigError, match="needs 6 targets x 1618"):
        check_external_scores(bank, np.zeros((5, N)))
    bad = np.zeros((6, N))
    bad[0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        check_external_scores(bank, bad)


def test_lds_command_with_a_score_file(fake_bank, tmp_path, capsys):
    """`lds --scores FILE.npy` prints the LDS that lds() computes, beside the ceilings; bad input is one line."""
    from attribution.cli import main

    bank, effect = fake_bank
    np.save(tmp_path / "mine.npy", -effect.T)
    assert main(["lds", "--bank", str(bank.path), "--scores", str(tmp_path / "mine.npy"), "--split", "val",
                 "--resamples", "50", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    expected = lds(-effect.T[:4], bank.masks, bank.F[..., :4], n_resamples=50).standard.value
    assert f"{expected:+.3f}" in out and "seed-vs-seed ceiling" in out and "common mode" in out
    assert (tmp_path / "out" / "lds.csv").read_text().startswith("split,")
    np.save(tmp_path / "wrong.npy", np.zeros((3, 3)))
    assert main(["lds", "--bank", str(bank.path), "--scores", str(tmp_path / "wrong.npy")]) == 2
    assert main(["lds", "--bank", "no-such-bank", "--method", "trak"]) == 2
    err = capsys.readouterr().err
    assert "needs 6 targets" in err and "no bank 'no-such-bank'" in err
