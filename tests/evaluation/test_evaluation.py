"""Engine methods evaluated on a ground-truth bank (attribution/evaluation/evaluate.py) and the `lds` command.

The bank here is made by hand (no retraining): the tiny test model as the bank's model, 16 random half-subsets of
the digits training split, 4 validation + 2 generated targets, and F planted as a linear function of the subsets so
the expected LDS is known: F = masks @ effect + noise, with `effect` the true per-image effect on each target.
"""

from __future__ import annotations

import numpy as np
import pytest

from attribution.errors import ConfigError
from attribution.evaluation.bank import Bank
from attribution.evaluation.evaluate import (bank_targets, check_external_scores, lambda_sweep, lds_table,
                                             score_bank, split_rows)
from attribution.evaluation.lds import lds

N = 1618  # the digits training split


@pytest.fixture(scope="module")
def fake_bank(fake_bank_dir):
    bank = Bank.load(fake_bank_dir)
    return bank, np.load(fake_bank_dir / "effect.npy")


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


def test_evaluation_page(fake_bank_dir, tiny_run, tmp_path, monkeypatch):
    """The page lists the bank, evaluates two methods on it, and shows the same LDS as the library; the λ
    section marks the default, retraining-free and optimal λ."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ATTRIBUTION_BANKS", str(fake_bank_dir.parent))
    monkeypatch.setenv("ATTRIBUTION_CHECKPOINT", str(tiny_run))
    monkeypatch.setenv("ATTRIBUTION_DATASET", "digits")
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "app.py"), default_timeout=300).run()
    at.switch_page("app_pages/evaluation.py").run()
    assert not at.exception
    assert at.selectbox(key="eval_bank").value == "fake"
    at.multiselect(key="eval_methods").set_value(["pixel-cos", "trak"])
    at.selectbox(key="eval_K").set_value(1)
    at.selectbox(key="eval_k").set_value(512)
    at.button[0].click().run()  # the form's Evaluate button
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    names = list(table.iloc[:, 0])
    assert names[:2] == ["pixel-cos", "trak"] and "seed-vs-seed ceiling" in names
    bank = Bank.load(fake_bank_dir)
    pixels = bank_targets(bank).images.reshape(6, -1).double().numpy()
    from attribution.data import load_dataset

    X = load_dataset("digits", "train", 16, 1).tensors().reshape(N, -1).double().numpy()
    cos = (pixels @ X.T) / np.linalg.norm(pixels, axis=1)[:, None] / np.linalg.norm(X, axis=1)[None, :]
    expected = lds(cos[:4], bank.masks, bank.F[..., :4], n_resamples=50).standard.value
    assert table.iloc[0, 2].startswith(f"{expected:+.3f}")
    assert {m.label for m in at.metric} >= {"LDS at this λ", "default λ", "retraining-free λ (GCV)",
                                            "LDS-optimal λ"}


def test_lds_command_sweeps_lambda_for_a_method(fake_bank, tmp_path, capsys):
    """`lds --method trak --sweep lambda --out DIR`: the GCV and optimal lambda line, a sweep table whose best row
    is the reported optimum, and sweep.csv / sweep.html."""
    import csv

    from attribution.cli import main

    bank, _ = fake_bank
    assert main(["lds", "--bank", str(bank.path), "--method", "trak", "--timesteps", "1", "--proj-dim", "128",
                 "--split", "val", "--resamples", "20", "--sweep", "lambda", "--cache", str(tmp_path / "c"),
                 "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "retraining-free lambda (GCV)" in out
    rows = list(csv.DictReader(open(tmp_path / "out" / "sweep.csv")))
    best = max(rows, key=lambda r: float(r["lds"]))
    assert f"LDS-optimal lambda {float(best['lambda']):.3g} -> LDS {float(best['lds']):+.3f}" in out
    assert (tmp_path / "out" / "sweep.html").read_text().startswith("<!doctype html>")
