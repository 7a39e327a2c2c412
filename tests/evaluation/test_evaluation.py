"""Engine methods evaluated on a ground-truth bank (attribution/evaluation/evaluate.py) and the `lds` command.

The bank here is made by hand (no retraining): the tiny test model as the bank's model, 16 random half-subsets of
the digits 0 and 1 of the digits training split (324 images), 4 validation + 2 generated targets, and F planted as
a linear function of the subsets so the expected LDS is known: F = masks @ effect + noise, with `effect` the true
per-image effect on each target.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from attribution.errors import ConfigError
from attribution.evaluation.bank import Bank
from attribution.evaluation.evaluate import (bank_targets, check_external_scores, lambda_sweep, lds_table,
                                             score_bank, split_rows)
from attribution.evaluation.lds import REACHABLE, SEED_CEILING, lds
from attribution.data import load_dataset
from engine_support import FAKE_BANK_DATASET

N = len(load_dataset(FAKE_BANK_DATASET))  # the hand-made bank's training set


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


@pytest.mark.slow
def test_a_method_on_the_bank_and_its_lambda_sweep(fake_bank, tmp_path):
    """TRAK through the engine on the bank's model: scores (T, N) equal the attribution's own scores of the bank
    targets; the sweep's LDS at the default lambda equals the table's; GCV gives a lambda on the grid's scale."""
    bank, _ = fake_bank
    run = score_bank(bank, "trak", device="cpu", timesteps=2, proj_dim=128, cache=str(tmp_path))
    scores = run.scores
    assert scores.shape == (6, N) and np.isfinite(scores).all()
    G = run.attribution.target_features(bank_targets(bank))
    np.testing.assert_allclose(scores, run.attribution.scores(G, run.default_lambda), rtol=1e-6)
    sweep = lambda_sweep(bank, run, "val", lambdas=[run.default_lambda], n_resamples=20)
    table = lds_table(bank, {"trak": scores}, "val", n_resamples=20)
    assert sweep.standard[0] == pytest.approx(table.methods["trak"].standard.value)
    grid = run.lambda_grid()
    assert grid[0] <= run.gcv(split_rows(bank, "val")) <= grid[-1]
    # the targets' features are cached beside the training features: a second run reads them (no gradients),
    # and they are the features the method computes
    cached = list((run.attribution.members[0].store_path / "bank-targets").glob("trak-*.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.load(cached[0]), run.G[0])
    np.testing.assert_allclose(run.G[0], G[0], rtol=1e-5, atol=1e-6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(run.attribution.method), "target_features",
                   lambda *a, **k: pytest.fail("recomputed the bank's targets"))
        again = score_bank(bank, "trak", device="cpu", timesteps=2, proj_dim=128, cache=str(tmp_path))
    np.testing.assert_array_equal(again.scores, scores)


@pytest.mark.slow
def test_journey_trak_on_a_bank_scores_its_generated_targets_only(fake_bank, tmp_path):
    """Journey TRAK has no trajectory for validation targets: its bank features are NaN there and equal the
    method's own features of the generated targets; the table lists it on generated targets only, and its
    lambda sweep on validation targets is one line."""
    bank, _ = fake_bank
    run = score_bank(bank, "journey-trak", device="cpu", timesteps=2, proj_dim=128, cache=str(tmp_path))
    gen = split_rows(bank, "gen")
    assert np.isnan(run.G[0][:4]).all() and np.isfinite(run.G[0][gen]).all()
    direct = run.attribution.target_features(bank_targets(bank).select(gen))
    np.testing.assert_allclose(run.G[0][gen], direct[0], rtol=1e-5, atol=1e-6)
    scores = run.scores
    assert "journey-trak" not in lds_table(bank, {"journey-trak": scores}, "val", n_resamples=20).methods
    table = lds_table(bank, {"journey-trak": scores}, "gen", n_resamples=20)
    assert table.methods["journey-trak"].standard.value == pytest.approx(
        lds(scores[gen], bank.masks, bank.F[..., gen], n_resamples=20).standard.value)
    assert run.covers("gen") and not run.covers("val") and not run.covers("all")
    with pytest.raises(ConfigError, match="generated targets only"):
        lambda_sweep(bank, run, "val", n_resamples=20)
    with pytest.raises(ConfigError, match="no scores for some all targets"):
        lds_table(bank, {"journey-trak": scores}, "all", n_resamples=20)


def test_an_attribution_against_another_training_set_is_refused_before_any_work(fake_bank, tmp_path):
    """The trust caption scores the bank's targets with the page's attribution: against another training set than
    the bank's, one line that names both sets (it said only "scores must have shape (4, 324), got (4, 1618)")."""
    from attribution.engine import open_attribution
    from attribution.evaluation.evaluate import run_on_bank
    from attribution.run_options import RunOptions

    bank, _ = fake_bank
    other = open_attribution(RunOptions(str(bank.model_spec), dataset="digits:0,1,2", method="trak", timesteps=1,
                                        proj_dim=64, device="cpu", cache=str(tmp_path)))
    with pytest.raises(ConfigError) as err:
        run_on_bank(bank, other)
    assert str(err.value) == (f"the fake bank was retrained on subsets of {FAKE_BANK_DATASET} ({N} images); this "
                              f"attribution is against digits:0,1,2 ({len(load_dataset('digits:0,1,2'))} images): "
                              f"attribute against {FAKE_BANK_DATASET} to measure it on this bank")
    assert not list(tmp_path.rglob("*.npy"))  # nothing featurized


def test_external_scores_are_checked(fake_bank):
    bank, _ = fake_bank
    with pytest.raises(ConfigError, match=f"needs 6 targets x {N}"):
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
    # Issue 24, 9: files that are no readable array (text, a pickled object array, cut short) are one line too.
    (tmp_path / "text.npy").write_text("0.1, 0.2\n")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "short.npy").write_bytes((tmp_path / "mine.npy").read_bytes()[:200])
    for name in ("text.npy", "objects.npy", "short.npy"):
        assert main(["lds", "--bank", str(bank.path), "--scores", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith(f"error: --scores {name} is not a readable .npy array"), err


@pytest.mark.slow
def test_evaluation_page(fake_bank_dir, tiny_run, tmp_path, start_app):
    """The page lists the bank, evaluates two methods on it, and shows the same LDS as the library; the λ
    section marks the default, retraining-free and optimal λ."""
    at = start_app(tiny_run, tmp_path, banks=fake_bank_dir.parent, timeout=300)
    at.switch_page("app_pages/evaluation.py").run()
    assert not at.exception
    assert at.selectbox(key="eval_bank").value == "fake"
    assert "dtrak:avg" in at.multiselect(key="eval_methods").options  # the recommended D-TRAK Avg can be evaluated
    # Before Evaluate, an estimate per default method from the measured throughput (issue 24, 4: a spinner only)
    note = next(c.value for c in at.main.caption if c.value.startswith("Before the first Evaluate"))
    assert "dtrak: about" in note and "trak: about" in note and "6 targets at" in note and "in all" in note
    at.multiselect(key="eval_methods").set_value(["pixel-cos", "trak"])
    at.selectbox(key="eval_K").set_value(1)
    at.selectbox(key="eval_k").set_value(512)
    at.number_input(key="eval_noises").set_value(2)  # a feature option from the schema (pixel-cos has none)
    at.button[0].click().run()  # the form's Evaluate button
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    # TRAK was computed with 2 noise draws: the library's LDS of those features, and the command that reproduces it
    bank = Bank.load(fake_bank_dir)
    run = score_bank(bank, "trak", device="cpu", timesteps=1, proj_dim=512, noises=2, cache=str(tmp_path))
    trak = lds(run.scores[:4], bank.masks, bank.F[..., :4], n_resamples=50).standard.value
    assert table.iloc[1, 2].startswith(f"{trak:+.3f}")
    assert any("--timesteps 1 --proj-dim 512 --noises 2" in c.value for c in at.main.code)
    names = list(table.iloc[:, 0])
    assert names[:2] == ["pixel-cos", "trak"] and {SEED_CEILING, REACHABLE} <= set(names)
    pixels = bank_targets(bank).images.reshape(6, -1).double().numpy()
    X = load_dataset(FAKE_BANK_DATASET, "train", 16, 1).tensors().reshape(N, -1).double().numpy()
    cos = (pixels @ X.T) / np.linalg.norm(pixels, axis=1)[:, None] / np.linalg.norm(X, axis=1)[None, :]
    expected = lds(cos[:4], bank.masks, bank.F[..., :4], n_resamples=50).standard.value
    assert table.iloc[0, 2].startswith(f"{expected:+.3f}")
    # each method's share of the reachable ceiling (reachable and method on the same resamples, as the library)
    share = lds_table(bank, {"pixel-cos": np.r_[cos, np.zeros((2, N))]}, "val").of_reachable("pixel-cos")
    assert table["of reachable"].iloc[0].startswith(f"{share[0]:.0%}  [{share[1][0]:.0%}")
    assert {m.label for m in at.metric} >= {"LDS at this λ", "default λ", "retraining-free λ (GCV)",
                                            "λ chosen on held-out targets"}
    # the fake bank has no checkpoint run: the page says how to make one
    assert any("bank checkpoints --name fake" in c.value for c in at.caption)
    assert {d.label for d in at.get("download_button")} >= {"LDS table (CSV)", "LDS versus λ (CSV)",
                                                            "Spearman per target (CSV)"}
    # Empirical Influence and Datamodels beside the methods, all on the held-out subsets: the library's figures
    from attribution.evaluation.retraining_estimators import heldout_lds_table

    at.button(key="eval_estimators").click().run()
    assert not at.exception, at.exception
    shown = at.dataframe[1].value
    held, _ = heldout_lds_table(bank, {"pixel-cos": cos}, "val", n_resamples=20)
    for name in ("Empirical Influence", "Datamodels", "pixel-cos"):
        row = shown[shown.iloc[:, 0] == name]
        assert len(row) == 1 and row.iloc[0, 2].startswith(f"{held.methods[name].standard.value:+.3f}")


def evaluated(start_app, tiny_run, fake_bank_dir, cache, methods, K: int = 1):
    """The Evaluation page on the fake bank after Evaluate with `methods` (K timesteps, k=512)."""
    at = start_app(tiny_run, cache, banks=fake_bank_dir.parent, timeout=300)
    at.switch_page("app_pages/evaluation.py").run()
    at.multiselect(key="eval_methods").set_value(methods)
    at.selectbox(key="eval_K").set_value(K)
    at.selectbox(key="eval_k").set_value(512)
    at.button[0].click().run()  # the form's Evaluate button
    assert not at.exception, at.exception
    return at


def test_the_lambda_figure_labels_each_mark_at_its_lambda(fake_bank_dir, tiny_run, tmp_path, start_app):
    """Issue 24, 6: on the log λ axis a label sits at its own line (plotly reads an annotation's x as log10 on a
    log axis: "optimal" was drawn near 10^λ and stretched the axis), and marks at the same λ (the default and the
    current λ at first) share one label instead of printing over each other."""
    import base64

    import plotly.io as pio

    at = evaluated(start_app, tiny_run, fake_bank_dir, tmp_path, ["trak"])
    chart = next(c for c in at.get("plotly_chart") if c.proto.id.endswith("eval_lam_fig"))
    fig = pio.from_json(chart.proto.spec)
    x = fig.data[1].x  # the LDS line: the λ grid (a typed array in the chart's JSON)
    lambdas = np.log10(np.frombuffer(base64.b64decode(x["bdata"]), x["dtype"]) if isinstance(x, dict) else x)
    lines = sorted({s.x0 for s in fig.layout.shapes if s.x0 == s.x1})  # the dotted vertical lines
    marked = [a for a in fig.layout.annotations if a.text not in ("reachable", "seed-vs-seed (lower)")]
    assert all(np.isclose(np.log10(lines), a.x).any() for a in marked)  # each label at a line (log10 units)
    assert all(lambdas.min() <= a.x <= lambdas.max() for a in marked)
    assert len(marked) == len(lines)  # one label per line: marks at the same λ share it
    assert len({(a.x, a.y) for a in marked}) == len(marked)  # no label printed over another
    names = ", ".join(a.text for a in marked)
    assert all(n in names for n in ("default", "GCV", "optimal", "current"))
    # the reachable and seed-vs-seed ceilings as dashed lines at their values
    bank = Bank.load(fake_bank_dir)
    from attribution.evaluation.evaluate import bank_ceilings

    ceil = bank_ceilings(bank, "val")
    hlines = {a.text: a.y for a in fig.layout.annotations if a.text in ("reachable", "seed-vs-seed (lower)")}
    assert hlines["reachable"] == pytest.approx(ceil.reachable.standard.value, abs=1e-12)


def test_attribute_under_a_worst_predicted_target_opens_it(fake_bank_dir, tiny_run, tmp_path, start_app):
    """Issue 24, 2: the "attribute" button under a worst-predicted target raised StreamlitAPIException (it set the
    sidebar's checkpoint after the sidebar was drawn); it opens the target on the Attribute page, with the bank's
    model and training set in the sidebar."""
    at = evaluated(start_app, tiny_run, fake_bank_dir, tmp_path, ["pixel-cos"])
    at.radio(key="eval_split").set_value("gen").run()
    at.button(key="eval_open_gen/1").click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Attribute"
    assert at.session_state["checkpoint"] == str(fake_bank_dir / "model")
    assert at.session_state["dataset"] == FAKE_BANK_DATASET
    assert at.radio(key="attr_source").value == "Generated" and at.number_input(key="attr_seed").value == 1
    at.switch_page("app_pages/evaluation.py").run()
    at.button(key="eval_open_val/2").click().run()
    assert not at.exception, at.exception
    assert at.radio(key="attr_source").value == "Validation image"
    assert at.number_input(key="attr_val_idx").value == 2


@pytest.mark.slow
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
    assert f"(on the same targets: {float(best['lambda']):.3g} -> {float(best['lds']):+.3f}, optimistic)" in out
    # the held-out choice: the λ best on each half of the validation targets, its LDS on the other half
    from attribution.evaluation.evaluate import lambda_report, score_bank
    from attribution.evaluation.lds import target_halves

    run = score_bank(bank, "trak", device="cpu", timesteps=1, proj_dim=128, cache=str(tmp_path / "c"))
    rep = lambda_report(bank, run, "val", n_resamples=20)
    halves = target_halves(4)
    per_target = rep.sweep.standard_per_target
    pick = [int(np.argmax(per_target[:, h].mean(axis=1))) for h in halves]
    assert rep.held_out.held_out == pytest.approx((per_target[pick[0], halves[1]].mean(),
                                                   per_target[pick[1], halves[0]].mean()))
    assert f"{rep.held_out.chosen[0]:.3g} -> {rep.held_out.held_out[0]:+.3f}" in out
    assert (tmp_path / "out" / "sweep.html").read_text().startswith("<!doctype html>")


def test_lds_evaluates_what_score_computes(fake_bank, tmp_path):
    """`lds` takes the options of `score` (the RunOptions schema): with --noises 2 --strategy cumulative its table
    is the one of those features (computed here through the library), not of the defaults; an option a method in
    the list cannot use (--fn for TRAK) applies to the others; one that none can use is one line."""
    import csv

    from attribution.cli import main

    bank, _ = fake_bank
    cache = str(tmp_path / "c")
    base = ["lds", "--bank", str(bank.path), "--timesteps", "1", "--proj-dim", "64", "--split", "val",
            "--resamples", "20", "--cache", cache, "--device", "cpu"]
    assert main([*base, "--method", "dtrak,trak", "--fn", "avg", "--noises", "2", "--strategy", "cumulative",
                 "--out", str(tmp_path / "out")]) == 0
    rows = {r["name"]: float(r["standard"]) for r in csv.DictReader(open(tmp_path / "out" / "lds.csv"))}
    for name, fn in (("dtrak", "avg"), ("trak", None)):
        run = score_bank(bank, name, device="cpu", fn=fn, timesteps=1, proj_dim=64, noises=2, strategy="cumulative",
                         cache=cache)
        want = lds_table(bank, {name: run.scores}, "val", n_resamples=20).methods[name].standard.value
        got = next(v for k, v in rows.items() if k.startswith(name + " "))
        assert got == pytest.approx(want, abs=5e-7)
    plain = score_bank(bank, "dtrak", device="cpu", fn="avg", timesteps=1, proj_dim=64, cache=cache)
    other = next(v for k, v in rows.items() if k.startswith("dtrak "))
    assert other != pytest.approx(lds_table(bank, {"d": plain.scores}, "val", n_resamples=20).methods["d"]
                                  .standard.value, abs=1e-6)  # the options were used
    assert main([*base, "--method", "trak", "--damping", "0.1"]) == 2  # no method here takes EK-FAC damping
    # METHOD:FN entries: dtrak:avg is D-TRAK with the Avg output (the same features: read from the cache)
    assert main([*base, "--method", "dtrak:avg", "--noises", "2", "--strategy", "cumulative",
                 "--out", str(tmp_path / "out2")]) == 0
    rows2 = {r["name"]: float(r["standard"]) for r in csv.DictReader(open(tmp_path / "out2" / "lds.csv"))}
    assert next(v for k, v in rows2.items() if k.startswith("dtrak:avg ")) == next(
        v for k, v in rows.items() if k.startswith("dtrak "))
    assert main([*base, "--method", "trak:avg"]) == 2  # TRAK has no Avg output: one line


# -- the bank's checkpoint run: TracIn-family methods and the per-checkpoint study ------------------------------------

@pytest.fixture(scope="module")
def bank_with_run(fake_bank_dir, tiny_run, tmp_path_factory):
    """The fake bank with its recipe recorded (the tiny run's), so its full model can be retrained with
    checkpoints; its model is the tiny run's last checkpoint."""
    import json
    import shutil

    from attribution.evaluation.recipes import recipe_from_run

    folder = tmp_path_factory.mktemp("banks") / "withrun"
    shutil.copytree(fake_bank_dir, folder)
    meta = json.loads((folder / "bank.json").read_text())
    recipe = recipe_from_run(tiny_run)
    meta["recipe_name"] = recipe.name
    meta["identity"]["recipe"] = recipe.identity()
    (folder / "bank.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.slow
def test_checkpoint_run_reproduces_the_bank_model_or_is_refused(bank_with_run, tmp_path):
    """`bank checkpoints` retrains the full model with saved epochs; its last checkpoint equals the bank's model
    bit for bit (checked by the command). A recipe that does not reproduce the model writes nothing."""
    import json
    import shutil

    from attribution.evaluation.bank import build_checkpoint_run
    from attribution.models.checkpoint import resolve_checkpoint

    other = tmp_path / "other"
    shutil.copytree(bank_with_run, other)
    meta = json.loads((other / "bank.json").read_text())
    meta["identity"]["recipe"]["lr"] *= 2
    (other / "bank.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="differs from the bank's model"):
        build_checkpoint_run(Bank.load(other), 2, log=lambda m: None)
    assert not (other / "run").exists() and not list(other.glob(".tmp-*"))

    bank = Bank.load(bank_with_run)
    with pytest.raises(ConfigError, match="bank checkpoints"):
        bank.model_spec_for(True)
    run = build_checkpoint_run(bank, 2, log=lambda m: None)
    assert run == bank_with_run / "run" and Bank.load(bank_with_run).run_dir == run
    specs = Bank.load(bank_with_run).checkpoint_specs()
    assert [s.rsplit("@", 1)[1] for s in specs] == ["epoch-1", "epoch-2"]
    assert resolve_checkpoint(specs[-1]).content_hash() == resolve_checkpoint(bank.model_spec).content_hash()


@pytest.mark.slow
def test_lds_sweeps_over_checkpoints_and_K(bank_with_run, tmp_path, capsys):
    """`lds --sweep checkpoint`: one row per checkpoint of the run; the last checkpoint is the bank's model, so
    its LDS equals the plain table's. `--sweep K`: the point at the command's own K equals the plain table's."""
    import csv

    from attribution.cli import main
    from attribution.evaluation.bank import build_checkpoint_run

    build_checkpoint_run(Bank.load(bank_with_run), 2, log=lambda m: None)  # reused if the test above made it
    common = ["lds", "--bank", str(bank_with_run), "--method", "trak", "--timesteps", "1", "--proj-dim", "128",
              "--split", "val", "--resamples", "20", "--cache", str(tmp_path / "c"), "--device", "cpu"]
    assert main(common + ["--sweep", "checkpoint", "--out", str(tmp_path / "o1")]) == 0
    plain = list(csv.DictReader(open(tmp_path / "o1" / "lds.csv")))
    row = next(r for r in plain if r["name"].startswith("trak"))
    sweep = list(csv.DictReader(open(tmp_path / "o1" / "sweep-checkpoint.csv")))
    assert [r["value"] for r in sweep] == ["epoch-1", "epoch-2"]
    assert float(sweep[1]["lds"]) == pytest.approx(float(row["standard"]), abs=1e-12)
    assert float(sweep[0]["lds"]) != pytest.approx(float(sweep[1]["lds"]), abs=1e-12)
    assert main(common + ["--sweep", "K", "--values", "1,2", "--out", str(tmp_path / "o2")]) == 0
    sweep = list(csv.DictReader(open(tmp_path / "o2" / "sweep-K.csv")))
    assert [r["value"] for r in sweep] == ["1", "2"]
    assert float(sweep[0]["lds"]) == pytest.approx(float(row["standard"]), abs=1e-12)
    assert (tmp_path / "o2" / "sweep-K.html").is_file()
    out = capsys.readouterr().out
    assert "LDS along checkpoint" in out and "LDS along K" in out


@pytest.mark.slow
def test_lds_per_checkpoint_is_estimated_before_compute(bank_with_run, tiny_run, tmp_path, start_app):
    """Issue 24, 4: "Compute LDS per checkpoint" showed a spinner only. Beside it, a line says how many checkpoints
    still need features and about how long they take here: a checkpoint not timed yet at the speed measured for
    the bank's model (the same network; Evaluate just featurized it), never a constant; its help lists each."""
    from attribution.evaluation.bank import build_checkpoint_run

    build_checkpoint_run(Bank.load(bank_with_run), 2, log=lambda m: None)  # reused if a test above made it
    # K = 5: the 324 images' featurization takes over the 2 s a throughput needs to be recorded (store.py)
    at = evaluated(start_app, tiny_run, bank_with_run, tmp_path / "cache", ["trak"], K=5)
    note = next(c for c in at.main.caption if "checkpoints to featurize" in c.value)
    assert re.fullmatch(r"1 of 2 checkpoints to featurize \(the training set and the bank's targets each\): about "
                        r"\d+ (s|min) here\.", note.value), note.value
    assert "epoch-1: about" in note.proto.help and "measured here for epoch-2 (the same network)" in note.proto.help
    assert "epoch-2: cached" in note.proto.help
    at.button(key="eval_ckpt_run").click().run()
    assert not at.exception, at.exception
    assert not [c for c in at.main.caption if "checkpoints to featurize" in c.value]  # the figure instead


def test_checkpoint_methods_use_the_bank_run(bank_with_run, tmp_path):
    """TracInCP on a bank attributes over the run's checkpoints (its last is the bank's model)."""
    from attribution.evaluation.bank import build_checkpoint_run
    from attribution.evaluation.evaluate import open_on_bank

    bank = Bank.load(bank_with_run)
    build_checkpoint_run(bank, 2, log=lambda m: None)
    att = open_on_bank(Bank.load(bank_with_run), "tracincp", device="cpu", timesteps=1, proj_dim=128,
                       cache=str(tmp_path))
    assert len(att.members) == 2
    assert [m.model.spec.rsplit("@", 1)[1] for m in att.members] == ["epoch-1", "epoch-2"]


@pytest.mark.slow
def test_attribute_page_shows_the_lds_at_the_slider_lambda(fake_bank_dir, tmp_path, start_app):
    """With the bank's model as the checkpoint, the Attribute page offers to measure the LDS on the bank; the
    verdict beside the ranking then gives the LDS at the slider's λ on the bank's validation targets (the target
    is a validation image), equal to `lds_at` computed directly, with its share of the reachable ceiling, and
    follows the slider."""
    import json
    import shutil

    from attribution.evaluation.evaluate import bank_ceilings, lds_at, score_bank
    from attribution.models.checkpoint import resolve_checkpoint

    folder = tmp_path / "banks" / "trust"
    shutil.copytree(fake_bank_dir, folder)
    meta = json.loads((folder / "bank.json").read_text())
    meta["model"] = {"content_hash": resolve_checkpoint(str(folder / "model")).content_hash()}
    (folder / "bank.json").write_text(json.dumps(meta))
    at = start_app(folder / "model", tmp_path / "cache", banks=folder.parent, timeout=600,
                   dataset=FAKE_BANK_DATASET)
    at.switch_page("app_pages/attribute.py").run()
    at.radio(key="attr_source").set_value("Validation image").run()
    at.number_input(key="attr_K").set_value(1)
    at.selectbox(key="attr_k").set_value(512)
    at.selectbox(key="attr_method").set_value("trak")
    next(b for b in at.button if b.label == "Run attribution").click().run()
    assert not at.exception, at.exception
    next(b for b in at.button if b.label.startswith("How far to trust this?")).click().run()
    assert not at.exception, at.exception
    caption = next(c for c in at.caption if "rankings like this" in c.value)
    bank = Bank.load(folder)
    run = score_bank(bank, "trak", device="cpu", timesteps=1, proj_dim=512, cache=str(tmp_path / "cache"))
    slider = at.main.get_by_key("attr_result_0").select_slider[0]
    lam = float(str(slider.value).split()[0])
    value = lds_at(bank, run, lam, "val").standard.value
    reachable = bank_ceilings(bank, "val").reachable.standard.value
    assert f"LDS {value:+.2f} ({value / reachable:.0%} of reachable)" in caption.value
    assert f"reachable {reachable:+.3f}" in caption.proto.help and "validation targets" in caption.proto.help
    options = [float(o.split()[0]) for o in slider.options]
    slider.set_value(options[0]).run()
    moved = next(c.value for c in at.caption if "rankings like this" in c.value)
    assert f"LDS {lds_at(bank, run, options[0], 'val').standard.value:+.2f}" in moved
