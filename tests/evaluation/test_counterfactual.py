"""Counterfactual evaluation (evaluation/counterfactual.py, counterfactual_stats.py, image_metrics.py, the CLI
command and the page): a tiny end-to-end study on a local Ray, reuse of retrained models, bit-for-bit regeneration of
an unchanged training set, the statistics against direct computations, and bad input.

The study: recipe "tiny-test" (a 30k-parameter UNet, one epoch on the digits), 2 generated targets (3 DDPM steps),
methods random and pixel-cos, K = 100, controls: 5 retrains of a few seconds each.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from attribution.errors import ConfigError
from attribution.evaluation.counterfactual import (Cell, StudySpec, Study, emptied_classes, parse_removals,
                                                   parse_targets, removal_count, run_study, source_from_checkpoint)
from attribution.evaluation.counterfactual_stats import dose_response, paired, per_target, summary_rows
from attribution.evaluation.image_metrics import pixel_l2, ssim, ssim_map
from attribution.evaluation.recipes import get_recipe

N_DIGITS = 1618


# -- image metrics -------------------------------------------------------------------------------------------------

def test_pixel_l2_and_ssim_against_direct_computations():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
    b = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
    assert pixel_l2(a, b) == pytest.approx(np.sqrt((((a / 255.0) - (b / 255.0)) ** 2).sum()))
    assert pixel_l2(a, a) == 0 and ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) == pytest.approx(ssim(b, a)) and ssim(a, b) < 0.5
    # two constant images: no variance, so SSIM = (2 x y + C1) / (x^2 + y^2 + C1) exactly
    x, y = np.full((16, 16), 51, np.uint8), np.full((16, 16), 204, np.uint8)
    c1 = 0.01 ** 2
    assert ssim(x, y) == pytest.approx((2 * 0.2 * 0.8 + c1) / (0.2 ** 2 + 0.8 ** 2 + c1))
    # the SSIM map at an interior pixel from explicitly weighted window statistics (Gaussian sigma 1.5, 11 x 11)
    g = np.exp(-np.arange(-5, 6) ** 2 / (2 * 1.5 ** 2))
    wgt = np.outer(g, g) / np.outer(g, g).sum()
    pa, pb = a[3:14, 3:14, 0] / 255.0, b[3:14, 3:14, 0] / 255.0
    ma, mb = (wgt * pa).sum(), (wgt * pb).sum()
    va, vb, cab = (wgt * pa * pa).sum() - ma ** 2, (wgt * pb * pb).sum() - mb ** 2, (wgt * pa * pb).sum() - ma * mb
    c2 = 0.03 ** 2
    direct = (2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    assert ssim_map(a, b)[8, 8, 0] == pytest.approx(direct, rel=1e-9)
    with pytest.raises(ConfigError, match="at least 11x11"):
        ssim(a[:8, :8], b[:8, :8])


def test_paired_statistics_against_direct_computation():
    from scipy.stats import wilcoxon

    x, r = np.array([3.0, 2.5, 4.0, 1.0, 2.2]), np.array([1.0, 1.5, 1.0, 1.2, 0.2])
    p = paired(x, r)
    assert p["mean_diff"] == pytest.approx((x - r).mean())
    assert p["p"] == pytest.approx(wilcoxon(x - r).pvalue)
    assert p["ci"][0] <= p["mean_diff"] <= p["ci"][1]


# -- bad input -----------------------------------------------------------------------------------------------------

def test_removal_sizes_targets_and_classes():
    assert removal_count(0.05, N_DIGITS) == 81 and removal_count(100, N_DIGITS) == 100
    for bad in (0, -3, N_DIGITS, 5000, 1e-9):
        with pytest.raises(ConfigError, match="K must be at least 1|at least one image") as exc:
            removal_count(bad, N_DIGITS)
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="whole number"):
        removal_count(2.5, N_DIGITS)
    assert parse_targets("gen:0-2,gen:7") == (0, 1, 2, 7)
    for bad in ("upload.png", "val:3", "train:0-4"):
        with pytest.raises(ConfigError, match="only generated targets"):
            parse_targets(bad)
    assert parse_removals("0.05,100") == (0.05, 100.0)
    with pytest.raises(ConfigError, match="unknown method"):
        StudySpec(targets=(0,), methods=("random", "nope"), removals=(10,))
    labels = np.array([0, 0, 1, 1, 2])
    assert emptied_classes(np.array([2, 3]), labels, ["a", "b", "c"]) == ["b"]
    assert emptied_classes(np.array([0, 2]), labels, ["a", "b", "c"]) == []


def test_a_method_with_its_output_function(tmp_path):
    """`dtrak:avg` is D-TRAK with the Avg output: accepted, attributed with that function, and written to files
    without a colon; an output function the method does not have is one line."""
    from attribution.evaluation.counterfactual import Cell, _open_attributions

    spec = StudySpec(targets=(0,), methods=("random", "dtrak:avg"), removals=(0.05,),
                     features={"proj_dim": 512, "timesteps": 1})
    assert Cell(0, "dtrak:avg", "proponents", 81, 0).name == "gen-0__dtrak-avg__proponents__k81__seed-0"
    source = source_from_checkpoint("digits")
    att = _open_attributions(source, spec, ["dtrak:avg"], str(tmp_path))["dtrak:avg"]
    assert att.method.name == "dtrak" and att.members[0].cfg.fn == "avg"
    for bad in ("dtrak:nope", "pixel-cos:avg"):
        with pytest.raises(ConfigError, match="has no output function") as exc:
            StudySpec(targets=(0,), methods=(bad,), removals=(0.05,))
        assert "\n" not in str(exc.value)


def test_cli_bad_input_is_one_line(recipe_run, tmp_path, capsys):
    from attribution.cli import main

    from test_evaluation_bank import socket_closed_port

    base = ["counterfactual", "--checkpoint", str(recipe_run), "--cache", str(tmp_path), "--steps", "2"]
    cases = [(["--remove", "0"], "remove at least one image"),
             (["--remove", str(N_DIGITS)], "below the training set size 1618"),
             (["--targets", str(tmp_path / "upload.png")], "only generated targets"),
             (["--clip-weights", str(tmp_path / "missing.pt"), "--methods", "random"], "CLIP weights file not found"),
             (["--methods", "random,clip-cos"], "need CLIP weights")]
    for extra, msg in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    with socket_closed_port() as port:
        start = time.monotonic()
        assert main(base + ["--ray-address", f"127.0.0.1:{port}"]) == 2
        assert time.monotonic() - start < 5
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no Ray cluster answers") and "\n" not in err
    assert main(["counterfactual", "--checkpoint", str(recipe_run / "epoch-1" / "unet"), "--steps", "2"]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    assert not list(tmp_path.glob("counterfactual/*/*/cells"))


# -- end to end ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory) -> Path:
    """The model to study: trained by the tiny-test recipe on the whole training split at seed 0 (a run folder)."""
    from attribution.train import train

    out = tmp_path_factory.mktemp("cf_model") / "run"
    return train(get_recipe("tiny-test").train_config(out, None, 0, "cpu"))


def test_a_study_takes_the_options_of_score(tmp_path):
    """A study's methods take every feature option of `score` from the one schema (each those of its kind); one
    that none of its methods can use is refused in one line; the options are in its identity and its command."""
    from attribution.evaluation.counterfactual import Study, _open_attributions

    features = {"timesteps": 1, "proj_dim": 256, "noises": 2, "strategy": "cumulative", "seed": 3}
    spec = StudySpec(targets=(0,), methods=("random", "dtrak", "pixel-cos"), removals=(0.05,), features=features)
    source = source_from_checkpoint("digits")
    atts = _open_attributions(source, spec, ["dtrak", "pixel-cos"], str(tmp_path))
    cfg = atts["dtrak"].members[0].cfg
    assert (cfg.timesteps, cfg.proj_dim, cfg.noises, cfg.strategy, cfg.seed) == (1, 256, 2, "cumulative", 3)
    assert atts["pixel-cos"].members[0].cfg.kind == "pixels"  # the gradient options are not pixel similarity's
    identity = source.identity(spec, "h")["features"]
    assert identity == {"timesteps": 1, "proj_dim": 256, "projector": "auto", "seed": 3, "noises": 2,
                        "strategy": "cumulative"}
    plain = StudySpec(targets=(0,), methods=("random", "dtrak"), removals=(0.05,))
    assert source.identity(plain, "h")["features"] == {"timesteps": 10, "proj_dim": 4096, "projector": "auto",
                                                        "seed": 0}  # as studies before these options recorded it
    for bad, says in (({"damping": 0.5}, "--damping applies to the EK-FAC influence methods"),
                      ({"projector": "fft"}, "unknown projector 'fft'"),
                      ({"nope": 1}, "not a feature option of a study: nope")):
        with pytest.raises(ConfigError, match=says) as exc:
            StudySpec(targets=(0,), methods=("random", "dtrak"), removals=(0.05,), features=bad)
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="noises per timestep must be positive"):  # when opened: before retraining
        _open_attributions(source, StudySpec(targets=(0,), methods=("random", "dtrak"), removals=(0.05,),
                                             features={"noises": 0}), ["dtrak"], str(tmp_path))
    StudySpec(targets=(0,), methods=("random", "dtrak"), removals=(0.05,),
              features={"clip_weights": "w.pt"})  # the CLIP measure's weights, though no method uses them
    study = Study(tmp_path, {"source": "--bank digits", "randomness": "crn-slots",
                             "asked": {"targets": [0], "methods": ["random", "dtrak"], "removals": [0.05],
                                       "features": features}}, [])
    assert study.cli_line().endswith("--remove 0.05 --timesteps 1 --strategy cumulative --noises 2 --proj-dim 256 "
                                     "--seed 3 --randomness crn-slots")


def tiny_spec(**kw) -> StudySpec:
    """The stream study (recipe_run is a stream run: the control at its seed retrains it bit for bit)."""
    return StudySpec(**{"targets": (0, 1), "methods": ("random", "pixel-cos"), "removals": (100,), "steps": 3,
                        "controls": True, "randomness": "stream", **kw})


@pytest.fixture(scope="module")
def study(recipe_run, local_ray, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cf_cache")
    report = run_study(source_from_checkpoint(str(recipe_run)), tiny_spec(), log=lambda m: None, cache=str(cache),
                       cluster=local_ray)
    return report, cache


@pytest.mark.slow
def test_end_to_end_study(study, recipe_run):
    report, cache = study
    assert (report.cells_total, report.cells_done_before, report.models_trained, report.models_reused) == (6, 0, 5, 0)
    s = Study.load(report.folder)
    assert report.folder.is_relative_to(cache / "counterfactual") and s.meta["status"] == "complete"
    assert len(s.cells) == 6
    from attribution.data import load_dataset

    X = load_dataset("digits", "train").tensors().reshape(N_DIGITS, -1).double().numpy()
    for c in s.cells:
        removed, after = s.cell_arrays(c)
        before = s.before(c["target"])
        assert c["l2"] == pytest.approx(np.sqrt(((after / 255.0 - before / 255.0) ** 2).sum()))
        assert c["ssim"] == pytest.approx(ssim(before, after))
        if c["method"] == "pixel-cos":  # the top 100 by cosine of the target's pixels, computed directly
            t = (before.astype(np.float64) / 127.5 - 1).transpose(2, 0, 1).ravel()
            cos = X @ t / np.linalg.norm(X, axis=1) / np.linalg.norm(t)
            assert set(removed.tolist()) == set(np.argsort(-cos)[:100].tolist())
            assert removed[0] == np.argmax(cos)
        if c["method"] == "random":
            assert len(set(removed.tolist())) == 100
        if c["method"] == "none":  # nothing removed, the model's own seed: the original image, bit for bit
            assert len(removed) == 0 and c["identical"] and c["l2"] == 0 and np.array_equal(after, before)
    rows = {(r["method"], r["direction"]): r for r in summary_rows(s)}
    pc, rnd = rows[("pixel-cos", "proponents")], rows[("random", "proponents")]
    by = {(c["method"], c["target"]): c["l2"] for c in s.cells}
    assert pc["l2_vs_random"] == pytest.approx(np.mean([by["pixel-cos", t] - by["random", t] for t in (0, 1)]))
    assert rnd["l2_median"] == pytest.approx(np.median([by["random", t] for t in (0, 1)]))
    assert per_target(s, "l2", "proponents", 100, 0)["pixel-cos"] == {t: by["pixel-cos", t] for t in (0, 1)}
    assert dose_response(s, "l2", "proponents", 0)["random"] == [(100, rnd["l2_median"])]


def test_rerun_is_instant_and_removal_sets_are_reused(study, recipe_run, local_ray):
    report, cache = study
    markers = sorted((cache / "retrain").glob("*/*/retrain.json"))
    assert len(markers) == 5
    mtimes = [p.stat().st_mtime_ns for p in markers]
    start = time.monotonic()
    again = run_study(source_from_checkpoint(str(recipe_run)), tiny_spec(), log=lambda m: None, cache=str(cache))
    assert time.monotonic() - start < 30  # no Ray, no training: loading the model and the scores
    assert (again.cells_done_before, again.models_trained, again.models_reused) == (6, 0, 0)
    # another study (its own folder, --out) with the same removal sets trains nothing
    other = run_study(source_from_checkpoint(str(recipe_run)), tiny_spec(), folder=cache / "other-study",
                      log=lambda m: None, cache=str(cache), cluster=local_ray)
    assert other.folder != report.folder
    assert (other.cells_done_before, other.models_trained, other.models_reused) == (0, 0, 5)
    assert [p.stat().st_mtime_ns for p in sorted((cache / "retrain").glob("*/*/retrain.json"))] == mtimes
    a, b = Study.load(report.folder), Study.load(other.folder)
    assert {(c["method"], c["target"], c["l2"]) for c in a.cells} == {(c["method"], c["target"], c["l2"])
                                                                      for c in b.cells}
    # a run killed after some models: the cells of the missing model are redone from that model, nothing else
    lost = next(c for c in b.cells if c["method"] == "random" and c["target"] == 1)
    Path(other.folder, "cells", Cell(1, "random", "proponents", 100, 0).name + ".json").unlink()
    resumed = run_study(source_from_checkpoint(str(recipe_run)), tiny_spec(), folder=cache / "other-study",
                        log=lambda m: None, cache=str(cache), cluster=local_ray)
    assert (resumed.cells_done_before, resumed.models_trained, resumed.models_reused) == (5, 0, 1)
    again = next(c for c in Study.load(other.folder).cells if c["method"] == "random" and c["target"] == 1)
    assert again["l2"] == lost["l2"] and again["model_hash"] == lost["model_hash"]


@pytest.mark.slow
def test_crn_study_of_a_stream_model_retrains_its_before(recipe_run, local_ray, tmp_path):
    """A CRN study of a model trained with the stream: the recipe is retrained with CRN on the full split at the
    model's seed and that model is the "before" (attributed and regenerated); every removal is a CRN retrain; the
    study records it. Resuming a study with another randomness or another recipe is refused in one line, before any
    retraining; a removal fraction outside (0, 1) too."""
    import json
    from dataclasses import replace

    from attribution.models.checkpoint import resolve_checkpoint

    cache = tmp_path
    source = source_from_checkpoint(str(recipe_run))
    spec = tiny_spec(targets=(0,), methods=("random",), randomness="crn")
    report = run_study(source, spec, log=lambda m: None, cache=str(cache), cluster=local_ray)
    s = Study.load(report.folder)
    assert s.meta["randomness"] == "crn" and s.meta["identity"]["recipe"]["randomness"] == "crn"
    assert s.meta["identity"]["model"] != source.model_hash  # the CRN full model, not the stream run
    crn_key = s.meta["identity"]["recipe_key"]
    before_run = Path(cache, "retrain", crn_key)
    runs = sorted(p.parent for p in before_run.glob("*/run.json"))
    assert len(runs) == 2 and all(json.loads((r / "run.json").read_text())["config"]["randomness"] == "crn"
                                  for r in runs)  # the full model (also the control at seed 0) and one removal
    assert s.meta["identity"]["model"] in {resolve_checkpoint(str(r)).content_hash() for r in runs}
    control = next(c for c in s.cells if c["method"] == "none")
    assert control["identical"] and report.models_trained == 1 and report.models_reused == 1
    assert s.cli_line().endswith("--randomness crn") and "-ddpm3-crn-" in report.folder.name
    # resuming it another way: one line each, nothing trained or lost
    markers = sorted(cache.glob("retrain/*/*/retrain.json"))
    cells = sorted(p.name for p in (report.folder / "cells").iterdir())
    bad = [(source, replace(spec, randomness="stream"), "holds a study retrained with crn randomness"),
           (replace(source, recipe=replace(source.recipe, lr=5e-3, randomness="crn")), spec,
            "recipe.lr: 0.001 there, 0.005 asked")]
    for src, sp, msg in bad:
        with pytest.raises(ConfigError, match=msg) as exc:
            run_study(src, sp, folder=report.folder, log=lambda m: None, cache=str(cache))
        assert "\n" not in str(exc.value)
    assert sorted(cache.glob("retrain/*/*/retrain.json")) == markers
    assert sorted(p.name for p in (report.folder / "cells").iterdir()) == cells
    for fraction in ("-0.05", "1.5"):
        with pytest.raises(ConfigError, match="at least one image|whole number") as exc:
            StudySpec(targets=(0,), methods=("random",), removals=parse_removals(fraction))
        assert "(0, 1)" in str(exc.value) or "below 1" in str(exc.value)


def test_counterfactual_command_prints_the_study(study, recipe_run, capsys):
    from attribution.cli import main

    report, cache = study
    assert main(["counterfactual", "--checkpoint", str(recipe_run), "--targets", "gen:0-1", "--methods",
                 "random,pixel-cos", "--remove", "100", "--steps", "3", "--controls",
                 "--cache", str(cache), "--randomness", "stream"]) == 0
    out = capsys.readouterr().out
    assert str(report.folder) in out and "pixel-cos" in out and "100 = 6.2%" in out
    assert Study.load(report.folder).cli_line().endswith("--controls --randomness stream")


def test_counterfactual_page_shows_a_cached_study(study, tiny_run, start_app):
    report, cache = study
    at = start_app(tiny_run, cache, banks=cache / "no-banks")
    at.switch_page("app_pages/counterfactual.py").run()
    assert not at.exception, at.exception
    at.selectbox(key="cf_method").set_value("pixel-cos").run()
    at.selectbox(key="cf_target").set_value(1).run()
    assert not at.exception, at.exception
    captions = [img.caption for element in at.get("image") for img in element.proto.imgs]
    assert "before (gen:1)" in captions and any(c.startswith("after: pixel-cos") for c in captions)
    assert sum(c.startswith("removed #") for c in captions) >= 16
    s = Study.load(report.folder)
    cell = next(c for c in s.cells if c["method"] == "pixel-cos" and c["target"] == 1)
    assert any(f"{cell['l2']:.3f}" in m.value for m in at.metric)
    assert any("python -m attribution counterfactual --checkpoint" in c.value for c in at.code)


def test_a_bank_is_a_source_and_keeps_its_studies(fake_bank_dir, tmp_path):
    """--bank: the bank's model, recipe and seed; its studies go to the bank's counterfactual/ folder, which the page
    lists. A bank without a recorded recipe is refused in one line."""
    import json
    import shutil

    from attribution.evaluation.counterfactual import source_from_bank, study_folder
    from attribution.evaluation.recipes import get_recipe

    with pytest.raises(ConfigError, match="does not record the recipe"):
        source_from_bank(str(fake_bank_dir))
    bank = tmp_path / "banks" / "withrecipe"
    shutil.copytree(fake_bank_dir, bank)
    meta = json.loads((bank / "bank.json").read_text())
    meta["name"] = "withrecipe"
    meta["identity"]["recipe"] = get_recipe("tiny-test").identity()
    meta["model"] = {"seed": 3, "content_hash": "abc"}
    (bank / "bank.json").write_text(json.dumps(meta))
    source = source_from_bank(str(bank))
    assert (source.seed, source.model_hash, source.label) == (3, "abc", "--bank withrecipe")
    assert source.recipe.identity() == get_recipe("tiny-test").identity()
    folder = study_folder(source, tiny_spec(), "datahash")
    assert folder.parent == bank / "counterfactual"
    assert study_folder(source, tiny_spec(steps=4), "datahash") != folder
    with_k = tiny_spec(methods=("random", "dtrak"), features={"proj_dim": 256})
    assert study_folder(source, with_k, "datahash") != study_folder(source, tiny_spec(methods=("random", "dtrak")),
                                                                   "datahash")


def test_the_shipped_stream_study_keeps_its_folder():
    """The digits bank's study made before CRN: asked again with --randomness stream it is the same folder (same
    identity), so it is reopened, not redone; with crn it is another study."""
    import json

    from attribution.evaluation.counterfactual import source_from_bank, study_folder

    folder = Path(__file__).resolve().parents[2] / "banks" / "digits" / "counterfactual" / \
        "digits-eval-ddpm50-61e28d932e0a"
    meta = json.loads((folder / "study.json").read_text())
    a = meta["asked"]
    spec = StudySpec(targets=tuple(a["targets"]), methods=tuple(a["methods"]), removals=tuple(a["removals"]),
                     steps=a["steps"], randomness="stream")
    source = source_from_bank("digits")
    assert source.identity(spec, meta["identity"]["dataset_hash"]) == meta["identity"]
    assert study_folder(source, spec, meta["identity"]["dataset_hash"]) == folder
    assert Study.load(folder).cli_line().endswith("--remove 0.05 --randomness stream")


def test_estimators_command_on_a_bank(fake_bank_dir, capsys):
    from attribution.cli import main

    assert main(["estimators", "--bank", str(fake_bank_dir), "--split", "val", "--resamples", "20"]) == 0
    out = capsys.readouterr().out
    assert "LDS on the held-out subsets" in out and "Empirical Influence" in out and "Datamodels" in out


def plant_study(folder: Path, targets=(0, 1, 2), methods=("random", "dtrak"), ks=(10, 40), seeds=(0, 1)) -> None:
    """A study written by hand (no model, no retraining): every cell of targets x methods x both directions x ks x
    seeds, with an 'after' image that differs from 'before' more for dtrak and for larger K."""
    import json

    from attribution.fileio import save_npz

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({
        "identity": {"model": "planted"}, "source": "--bank plant", "n_train": N_DIGITS, "dataset": "digits",
        "status": "complete", "warnings": ["warning: dtrak removing 40 images for gen:2 leaves no image of class 7"],
        "asked": {"targets": list(targets), "methods": list(methods), "removals": list(ks), "opponents": True,
                  "seeds": len(seeds), "controls": False, "counts": list(ks)}}))
    for t in targets:
        before = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
        save_npz(folder / "before" / f"gen-{t}.npz", pixels=before, seed=np.array(t))
        for m in methods:
            for d in ("proponents", "opponents"):
                for k in ks:
                    for s in seeds:
                        cell = Cell(t, m, d, k, s)
                        change = k * (3 if m == "dtrak" else 1) + 5 * s
                        after = np.clip(before.astype(int) + rng.integers(-change, change + 1, before.shape), 0,
                                        255).astype(np.uint8)
                        save_npz(folder / "cells" / f"{cell.name}.npz", after=after,
                                 removed=rng.choice(N_DIGITS, k, replace=False).astype(np.int32))
                        rec = {"target": t, "method": m, "direction": d, "k": k, "seed": s,
                               "l2": pixel_l2(before, after), "ssim": ssim(before, after), "identical": False,
                               "train_seconds": 180.0, "hardware": "CPU test"}
                        (folder / "cells" / f"{cell.name}.json").write_text(json.dumps(rec))


def test_counterfactual_page_on_a_planted_bank_study(tmp_path, tiny_run, start_app):
    """A bank's study (banks/<name>/counterfactual/): opponents, two K (the dose-response curve), two seeds (the
    seed-noise line), the class warning; the values shown are the planted cells' own."""
    folder = tmp_path / "banks" / "plant" / "counterfactual" / "planted-study"
    plant_study(folder)
    at = start_app(tiny_run, tmp_path / "cache", banks=tmp_path / "banks")
    at.switch_page("app_pages/counterfactual.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="cf_study").value == str(folder)
    at.selectbox(key="cf_direction").set_value("opponents").run()
    at.selectbox(key="cf_k").set_value(40).run()
    at.selectbox(key="cf_seed").set_value(1).run()
    at.selectbox(key="cf_method").set_value("dtrak").run()
    at.selectbox(key="cf_target").set_value(2).run()
    assert not at.exception, at.exception
    rec = Study.load(folder)
    cell = next(c for c in rec.cells if (c["method"], c["direction"], c["k"], c["seed"], c["target"])
                == ("dtrak", "opponents", 40, 1, 2))
    rnd = next(c for c in rec.cells if (c["method"], c["direction"], c["k"], c["seed"], c["target"])
               == ("random", "opponents", 40, 1, 2))
    l2 = next(m for m in at.metric if m.label == "pixel L2")
    assert l2.value == f"{cell['l2']:.3f}" and l2.delta == f"{cell['l2'] - rnd['l2']:+.3f} vs random"
    assert len(at.get("plotly_chart")) == 2  # the boxplots and the dose-response curve
    assert any("leaves no image of class 7" in w.value for w in at.warning)
    assert any("Retraining-seed noise" in c.value for c in at.caption)
    table = at.dataframe[0].value
    assert list(table["method"]) == ["random", "dtrak"]
    assert "--opponents --seeds 2" in at.code[0].value and "--bank plant" in at.code[0].value


def test_counterfactual_page_leads_with_a_verdict_on_the_best_supported_method(tmp_path, tiny_run, start_app):
    """Issue 24, 8: the page opened on TRAK (the last method by name) and gave no plain answer. It opens on the
    method the study supports best (dtrak: its planted removals change the images three times as much as random
    ones; trak's as much as random) and leads with one sentence from the paired statistics."""
    folder = tmp_path / "banks" / "plant" / "counterfactual" / "planted-study"
    plant_study(folder, targets=range(6), methods=("random", "dtrak", "trak"), ks=(10,), seeds=(0,))
    at = start_app(tiny_run, tmp_path / "cache", banks=tmp_path / "banks")
    at.switch_page("app_pages/counterfactual.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="cf_method").value == "dtrak" and at.main.markdown[0].value.startswith("**Verdict**")
    from attribution.evaluation.counterfactual_stats import best_supported, summary_rows, verdict

    rows = summary_rows(Study.load(folder))
    assert best_supported(rows, "proponents", 10, 0) == "dtrak" == at.selectbox(key="cf_method").value
    said = verdict(rows, "dtrak", "proponents", 10, 0, N_DIGITS)
    assert said.startswith("Removing dtrak's top 10 proponents (0.6% of the training set) changed the regenerated "
                           "images more than removing 10 random images did: median pixel L2 ")
    first = at.main.markdown[0].value  # the first text under the title
    assert first == f"**Verdict** (the method this study supports best): {said}"
    at.selectbox(key="cf_method").set_value("trak").run()
    assert at.main.markdown[0].value == ("**Verdict** (the method chosen below): "
                                         + verdict(rows, "trak", "proponents", 10, 0, N_DIGITS))
    assert "did not change the regenerated images measurably more than" in at.main.markdown[0].value
    at.selectbox(key="cf_method").set_value("random").run()  # the reference itself: the best method's verdict
    assert at.main.markdown[0].value == first


def test_clip_cosine_is_added_to_finished_cells(tiny_clip_name, tmp_path):
    """CLIP weights given to a study with finished cells (here a planted one): every cell gains the CLIP cosine of
    its before/after images under that embedder, equal to a direct computation, and the summary reports it."""
    import torch

    from attribution.evaluation.counterfactual import _add_clip
    from attribution.evaluation.image_metrics import to_tensor
    from attribution.features.embeddings import ClipEmbedder

    folder = tmp_path / "study"
    plant_study(folder, targets=(0, 1), ks=(10,), seeds=(0,))
    torch.save(ClipEmbedder.random(tiny_clip_name, seed=2).model.state_dict(), tmp_path / "clip.pt")
    emb = ClipEmbedder.from_file(tmp_path / "clip.pt", tiny_clip_name)
    s = Study.load(folder)
    _add_clip(folder, emb, {t: s.before(t) for t in (0, 1)})
    s = Study.load(folder)
    assert len(s.cells) == 8
    for c in s.cells:
        a = emb.embed(to_tensor(s.before(c["target"])[None]))[0].astype(np.float64)
        b = emb.embed(to_tensor(s.cell_arrays(c)[1][None]))[0].astype(np.float64)
        assert c["clip"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-6)
        assert c["clip_identity"] == emb.identity
    assert all(r["clip_median"] is not None for r in summary_rows(s))


def test_studies_with_common_random_numbers_are_listed_first(tmp_path):
    """The Counterfactual page opens on the first study listed: a CRN study (it can tell methods apart) before
    stream ones, whose study.json from before CRN has no `randomness`; a damaged study.json is still listed."""
    from attribution.evaluation.counterfactual import list_studies
    from attribution.fileio import write_json

    made = {"a-stream": {"status": "done"}, "b-stream": {"randomness": "stream"}, "z-crn": {"randomness": "crn-slots"},
            "c-crn": {"randomness": "crn"}}
    for name, meta in made.items():
        write_json(tmp_path / "bank" / "counterfactual" / name / "study.json", meta)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "study.json").write_text("{not json")
    got = [p.name for p in list_studies([tmp_path / "bank" / "counterfactual", tmp_path / "broken"])]
    assert got[:2] == ["c-crn", "z-crn"] and set(got[2:]) == {"a-stream", "b-stream", "broken"}


def test_a_verdict_on_too_few_targets_says_so_and_the_page_opens_on_the_most_finished_k(tmp_path, tiny_run,
                                                                                         start_app):
    """A dose still being retrained had 2 of 10 targets done, and the page opened on it saying pixel cosine's
    removal "changed the regenerated images more than" random removal (a bootstrap interval over 2 targets, Wilcoxon
    p = 0.5). With fewer than 6 paired targets no signed-rank test can reach p < 0.05: the verdict says so and
    claims nothing; the page opens on the K with the most finished cells."""
    from attribution.evaluation.counterfactual_stats import summary_rows, verdict

    folder = tmp_path / "banks" / "plant" / "counterfactual" / "planted-study"
    plant_study(folder, targets=(0, 1, 2), ks=(10, 40), seeds=(0,))
    rows = summary_rows(Study.load(folder))
    row = next(r for r in rows if (r["method"], r["direction"], r["k"]) == ("dtrak", "proponents", 40))
    assert row["l2_vs_random_ci_low"] > 0  # the interval alone would have said "more"
    said = verdict(rows, "dtrak", "proponents", 40, 0, N_DIGITS)
    assert "did not change the regenerated images measurably more than" in said
    assert said.endswith("With 3 targets no paired test can decide (the signed-rank test needs 6 or more).")
    for cell in (folder / "cells").glob("gen-2__*__k40__*"):  # K = 40 still retraining for one target
        cell.unlink()
    at = start_app(tiny_run, tmp_path / "cache", banks=tmp_path / "banks")
    at.switch_page("app_pages/counterfactual.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="cf_k").value == 10


def test_counterfactual_page_says_a_damaged_cell_in_one_line(tmp_path, tiny_run, start_app):
    """A cell's arrays damaged on disk: the page shows one error line that says how to remake it, no traceback."""
    from attribution.evaluation.counterfactual import Cell

    folder = tmp_path / "banks" / "plant" / "counterfactual" / "planted-study"
    plant_study(folder)
    for c in Study.load(folder).cells:  # every cell, whichever the page opens on
        name = Cell(int(c["target"]), c["method"], c["direction"], int(c["k"]), int(c["seed"])).name
        path = folder / "cells" / f"{name}.npz"
        path.write_bytes(path.read_bytes()[:40])
    at = start_app(tiny_run, tmp_path / "cache", banks=tmp_path / "banks")
    at.switch_page("app_pages/counterfactual.py").run()
    assert not at.exception, at.exception
    (error,) = at.error
    assert "rerun the study to remake it" in error.value and "\n" not in error.value


def test_a_studys_sampler_is_its_models_own():
    """A study regenerates with the model's default sampler (euler for a flow-matching recipe), refuses another
    process's in one line, and records the resolved one in its identity; DDPM recipes keep their keys."""
    from dataclasses import replace

    from attribution.evaluation.counterfactual import Source
    from attribution.evaluation.recipes import Recipe

    spec = StudySpec(targets=(0,), methods=("random",))
    flow = Source("m", "h", Recipe("r", "digits", preset="tiny", schedule="flow-matching"), 0, "x")
    ddpm = Source("m", "h", Recipe("r", "digits", preset="tiny"), 0, "x")
    assert flow.resolve(spec).sampler == "euler" and ddpm.resolve(spec).sampler == "ddpm"
    with pytest.raises(ConfigError, match="a DDPM model samples with ddpm or ddim, not 'heun'") as exc:
        ddpm.resolve(replace(spec, sampler="heun"))
    assert "\n" not in str(exc.value)
    assert flow.identity(spec, "d")["sampler"] == "euler" and flow.recipe.identity()["schedule"] == "flow-matching"
    assert "schedule" not in ddpm.recipe.identity()
