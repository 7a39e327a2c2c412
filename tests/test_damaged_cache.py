"""Damaged files inside the cache (issue 24, "Bad input"; a disk that filled up, a copy cut short, a hand edit).

What the cache can recompute from what it still has is recomputed and saved over the damaged file, giving the same
numbers as before the damage (a kernel decomposition, a bank's target features, a journey, a counterfactual study's
"before" image and scores). What holds finished work that cannot be recomputed cheaply (a feature store's
config.json, done.npy and features.npy) is one line that names the file and the folder to delete, and nothing is
written: the other files stay byte for byte as they were.

Everything runs on a randomly initialised tiny UNet and a few digits (the checks hold for any weights).
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_support import TWO_STEPS, subset

from attribution.cli import main
from attribution.engine import Attributor
from attribution.errors import FileFormatError
from attribution.features.config import FeatureConfig
from attribution.journey import JourneyConfig, run_journey
from attribution.methods import get_method

DAMAGE = {
    "empty": b"",
    "text": b"this is not an array\n",
    "cut short": None,  # the first half of the real file
}


def damage(path, how: str) -> None:
    data = DAMAGE[how]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if data is None else data)


def featurized(model, digits, folder) -> Attributor:
    cfg = FeatureConfig(fn="square", projector="sjlt", proj_dim=64, **TWO_STEPS)
    att = Attributor(model, subset(digits, 6), cfg, store_dir=folder)
    att.featurize()
    return att


@pytest.mark.parametrize("how", list(DAMAGE))
@pytest.mark.parametrize("name", ["config.json", "done.npy", "features.npy"])
def test_a_damaged_feature_store_file_is_one_line_and_nothing_is_written(model, digits, name, how, tmp_path):
    folder = tmp_path / "store"
    featurized(model, digits, folder)
    if name == "config.json" and how == "cut short":
        (folder / name).write_text('{"identity": {"checkpoint": ')
    else:
        damage(folder / name, how)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    fresh = Attributor(model, subset(digits, 6), FeatureConfig(fn="square", projector="sjlt", proj_dim=64,
                                                              **TWO_STEPS), store_dir=folder)
    with pytest.raises(FileFormatError) as exc:
        fresh.featurize()
        fresh.train_features()
    line = str(exc.value)
    assert "\n" not in line and name in line and f"delete the folder {folder}" in line, line
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_a_features_file_of_the_wrong_shape_is_one_line(model, digits, tmp_path):
    folder = tmp_path / "store"
    featurized(model, digits, folder)
    np.save(folder / "features.npy", np.zeros((6, 32), dtype=np.float32))  # another k
    att = Attributor(model, subset(digits, 6), FeatureConfig(fn="square", projector="sjlt", proj_dim=64,
                                                            **TWO_STEPS), store_dir=folder)
    with pytest.raises(FileFormatError, match=r"features.npy is damaged \(shape \(6, 32\), expected \(6, 64\)\)"):
        att.train_features()


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_kernel_is_recomputed_with_the_same_scores(model, digits, digits_val, how, tmp_path):
    folder = tmp_path / "store"
    att = featurized(model, digits, folder)
    G = att.features_of(digits_val.tensors([0, 1]), ["val/0", "val/1"])
    method = get_method("dtrak")
    want = att.scores(method, G, 0.1)
    assert (folder / "kernel.npz").is_file()
    damage(folder / "kernel.npz", how)
    again = Attributor(model, subset(digits, 6), att.cfg, store_dir=folder)
    np.testing.assert_allclose(again.scores(method, G, 0.1), want, rtol=1e-5, atol=1e-7)
    with np.load(folder / "kernel.npz") as z:  # saved over the damaged one
        assert z.files  # readable again


def test_a_damaged_journey_is_recomputed(model, digits, tmp_path):
    att = Attributor(model, subset(digits, 6), FeatureConfig(fn="square", projector="sjlt", proj_dim=64,
                                                            **TWO_STEPS), cache=tmp_path / "cache")
    att.featurize()
    cfg = JourneyConfig(seed=0, steps=3, sampler="ddpm", every=1, resamples=1)
    first = run_journey(att, cfg, cache=str(tmp_path / "cache"))
    cached = sorted((tmp_path / "cache" / "journey").rglob("*.npz"))
    assert len(cached) == 1
    damage(cached[0], "cut short")
    again = run_journey(att, cfg, cache=str(tmp_path / "cache"))
    np.testing.assert_array_equal(again.x0, first.x0)
    np.testing.assert_allclose(att.scores(get_method("dtrak"), again.features),
                               att.scores(get_method("dtrak"), first.features), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_the_cli_says_it_in_one_line(tiny_run, tmp_path, capsys):
    args = ["featurize", "--checkpoint", str(tiny_run), "--dataset", "digits", "--timesteps", "1",
            "--proj-dim", "32", "--projector", "sjlt", "--cache", str(tmp_path / "cache")]
    assert main(args) == 0
    (done,) = (tmp_path / "cache").rglob("done.npy")
    damage(done, "text")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert err.startswith("error: cache file") and "done.npy is damaged (not a .npy array)" in err, err


@pytest.mark.slow
def test_damaged_bank_target_features_are_recomputed(fake_bank_dir, tmp_path):
    from attribution.evaluation.bank import Bank
    from attribution.evaluation.evaluate import score_bank

    bank = Bank.load(fake_bank_dir)
    first = score_bank(bank, "trak", device="cpu", timesteps=1, proj_dim=64, cache=str(tmp_path / "cache"))
    (cached,) = (tmp_path / "cache").rglob("bank-targets/*.npy")
    damage(cached, "cut short")
    again = score_bank(bank, "trak", device="cpu", timesteps=1, proj_dim=64, cache=str(tmp_path / "cache"))
    np.testing.assert_allclose(again.scores, first.scores, rtol=1e-5, atol=1e-7)
    assert np.load(cached).shape[0] == len(bank.target_keys)  # saved over


def test_a_damaged_study_cell_is_one_line(tmp_path):
    """A finished cell whose arrays are damaged (its retrained model is cached, so rerunning the study remakes it):
    reading it for the page is one line saying so; the before image likewise."""
    import json

    from attribution.evaluation.counterfactual import Cell, Study

    folder = tmp_path / "study"
    (folder / "cells").mkdir(parents=True)
    (folder / "before").mkdir()
    (folder / "study.json").write_text(json.dumps({"source": "test"}))
    cell = {"target": 0, "method": "random", "direction": "proponents", "k": 5, "seed": 0, "l2": 0.1}
    name = Cell(0, "random", "proponents", 5, 0).name
    (folder / "cells" / f"{name}.json").write_text(json.dumps(cell))
    (folder / "cells" / f"{name}.npz").write_bytes(b"PK\x03\x04 cut short")
    (folder / "before" / "gen-0.npz").write_bytes(b"")
    study = Study.load(folder)
    with pytest.raises(FileFormatError, match=rf"delete cells/{name}\.\* and rerun the study") as exc:
        study.cell_arrays(study.cells[0])
    assert "\n" not in str(exc.value)
    with pytest.raises(FileFormatError, match="gen-0.npz is empty; delete it and rerun the study"):
        study.before(0)
