"""TracInCP and GAS with uniform checkpoint weights (attribution/methods/over_checkpoints.py; GPU readiness, issue 9,
item 7): `--checkpoint-weights uniform` is the mean over the checkpoints, each projected with its own seed, and its
scores equal the direct mean of per-checkpoint dot products / cosines; bad values (and a fast_jl k that is not a
multiple of 512) are one-line errors, from the API and from the command line (exit 2); `score --help` states the
default and the difference. Runs on the tiny 2-epoch model of `tiny_run`.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine_support import CPU, one_line

from attribution.data import load_dataset
from attribution.errors import ConfigError
from attribution.features.gradients import per_sample_gradients


# -- TracInCP and GAS with uniform checkpoint weights ------------------------------------------------------------


def test_uniform_checkpoint_weights_average_with_a_projection_seed_per_checkpoint(tiny_run, npz12, tmp_path):
    """--checkpoint-weights uniform: the mean over the C checkpoints, checkpoint c projected with seed + c (its
    own matrix); lr (the default) keeps the learning-rate weights and one projection. Scores equal the direct
    mean of per-checkpoint dot products / cosines of features projected with each checkpoint's seed."""
    from attribution.engine import open_attribution
    from attribution.run_options import RunOptions
    from attribution.methods.over_checkpoints import tracin_weights
    from attribution.features.projectors import make_projector

    opts = dict(dataset=f"npz:{npz12}", timesteps=2, proj_dim=32, projector="sjlt", seed=5, cache=str(tmp_path))
    targets = load_dataset(f"npz:{npz12}").tensors(range(2))
    keys = ["val/0", "val/1"]
    for name, score in (("tracincp", lambda G, X: G @ X.T),
                        ("gas", lambda G, X: (G / np.linalg.norm(G, axis=1, keepdims=True))
                         @ (X / np.linalg.norm(X, axis=1, keepdims=True)).T)):
        uni = open_attribution(RunOptions(str(tiny_run), method=name, device="cpu", checkpoint_weights="uniform",
                                          **opts))
        lr = open_attribution(RunOptions(str(tiny_run), method=name, device="cpu", **opts))
        assert uni.weights == [0.5, 0.5] and lr.weights == tracin_weights([a.model for a in lr.members])[0]
        assert [a.featurizer.projector.seed for a in uni.members] == [5, 6]
        assert [a.featurizer.projector.seed for a in lr.members] == [5, 5]
        assert uni.members[0].store_path == lr.members[0].store_path  # seed 5 either way: one store
        assert uni.members[1].store_path != lr.members[1].store_path
        uni.featurize()
        want = 0.0
        for att in uni.members:
            raw_x = per_sample_gradients(att.model, att.train.tensors(range(12)), [f"train/{i}" for i in range(12)],
                                         att.featurizer.grad_spec)
            proj = make_projector("sjlt", att.grad_dim, 32, att.featurizer.projector.seed, CPU)
            X = proj.project(raw_x).double().numpy()
            G = proj.project(per_sample_gradients(att.model, targets, keys, att.featurizer.grad_spec)).double().numpy()
            want = want + 0.5 * score(G, X)
        got = uni.scores(uni.features_of(targets, keys))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_checkpoint_weights_bad_values_are_one_line_errors(tiny_run, npz12, tmp_path):
    from attribution.engine import open_attribution
    from attribution.run_options import RunOptions

    cases = [("tracincp", "cosine", "unknown --checkpoint-weights 'cosine'; use one of: lr, uniform"),
             ("dtrak", "uniform", "applies to the checkpoint methods")]
    for method, value, match in cases:
        with pytest.raises(ConfigError) as exc:
            open_attribution(RunOptions(str(tiny_run), method=method, device="cpu", checkpoint_weights=value,
                                        dataset=f"npz:{npz12}", cache=str(tmp_path)))
        assert match in one_line(exc)
    assert not any(tmp_path.rglob("*"))


@pytest.mark.parametrize("extra, match", [
    (["--method", "tracincp", "--checkpoint-weights", "cosine"], "unknown --checkpoint-weights 'cosine'"),
    (["--method", "gas", "--projector", "trak-cuda", "--proj-dim", "1000"], "use --proj-dim 1024"),
])
def test_cli_bad_checkpoint_weights_and_fast_jl_k_are_one_line_exit_2(tiny_run, npz12, tmp_path, capsys, extra,
                                                                      match):
    from attribution.cli import main

    rc = main(["score", "--checkpoint", str(tiny_run), "--dataset", f"npz:{npz12}", "--target", "train:0",
               "--cache", str(tmp_path / "cache"), "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not (tmp_path / "cache").exists()


def test_cli_help_states_the_checkpoint_weights_default_and_difference(capsys):
    from attribution.cli import main

    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--checkpoint-weights lr|uniform" in text
    assert "lr (default)" in text and "learning rate" in text and "uniform is TracInCP/GAS" in text
