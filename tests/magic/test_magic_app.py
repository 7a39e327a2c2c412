"""AppTest for the Exact influence (MAGIC) page, on a tiny MAGIC run (3 training steps) in a temporary cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parents[2] / "app.py"
TINY = ["--hidden", "8", "--steps", "3", "--batch-size", "32", "--ode-steps", "2", "--dtype", "float64"]


@pytest.fixture(scope="module")
def magic_cache(tmp_path_factory) -> Path:
    from attribution.cli.main import main

    root = tmp_path_factory.mktemp("magic-app-cache")
    assert main(["magic", "train", "--cache", str(root), *TINY]) == 0
    return root


def test_magic_page(magic_cache, monkeypatch, capsys):
    from attribution.cli.main import main
    from attribution.magic.runs import list_runs, open_run

    monkeypatch.setenv("ATTRIBUTION_CACHE", str(magic_cache))
    monkeypatch.setenv("ATTRIBUTION_DATASET", "digits")
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    at.switch_page("app_pages/magic.py").run()
    assert not at.exception, at.exception
    at.radio(key="mg_source").set_value("Training image").run()
    at.number_input(key="mg_train_index").set_value(7).run()
    next(b for b in at.button if b.label == "Compute metagradient").click().run()
    assert not at.exception, at.exception
    (run_dir,) = list_runs(magic_cache)
    run = open_run(run_dir)
    (q,) = run.list_queries()
    influence = -np.asarray(q["grad"])
    top = int(np.argmax(influence))
    captions = [img.caption for el in at.get("image") for img in el.proto.imgs]
    assert captions[1].startswith(f"#{top} · ")            # first tile after the query: the largest score
    assert any(m.value == f"{q['meta']['bpd']:.3f}" for m in at.metric)
    # the command to run next names the run as the cache knows it, not by the server's absolute path
    (command,) = [i.value.split("`")[1] for i in at.info if "magic validate" in i.value]
    assert command == f"python -m attribution magic validate --run {run_dir.name} --sets 50"
    assert str(magic_cache) not in "".join(i.value for i in at.info)
    runs_metric = next(m for m in at.metric if m.label == "Training runs of time")
    assert float(runs_metric.value) == pytest.approx(q["meta"]["runs_of_training"], abs=0.05)
    # with retrains present, the scatter and its rho appear
    capsys.readouterr()
    assert main([*command.split()[3:-1], "3"]) == 0  # the page's command as given, with 3 sets
    line = capsys.readouterr().out.strip()
    at.run()
    assert not at.exception, at.exception
    (chart,) = at.get("plotly_chart")
    title = json.loads(chart.proto.spec)["layout"]["title"]["text"]
    rho = line.split("Spearman ")[1].split(" ")[0]
    assert title.startswith(f"ρ = {rho}")


def test_magic_page_says_when_its_run_has_barely_learnt(magic_cache, monkeypatch):
    """Issue 24, 8: the default run's samples score 9.9 bits/dim, near uniform noise (10.7) and far from its training
    images (7.9), and the page did not say so. It measures the run once (fit.json) and says it in one warning."""
    from attribution.magic.runs import list_runs, open_run
    from attribution.magic.validate import fit_summary

    monkeypatch.setenv("ATTRIBUTION_CACHE", str(magic_cache))
    monkeypatch.setenv("ATTRIBUTION_DATASET", "digits")
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    at.switch_page("app_pages/magic.py").run()
    assert not at.exception, at.exception
    warnings = [w.value for w in at.main.warning]
    assert len(warnings) == 1 and warnings[0].startswith("**This run has barely learnt to generate digits**")
    (run_dir,) = list_runs(magic_cache)
    fit = fit_summary(open_run(run_dir))  # read back from the run folder
    assert (run_dir / "fit.json").is_file() and (fit["gap"] is None or fit["gap"] > 0.5)
    assert (f"its samples score {fit['generated']:.2f} bits/dim, its training images {fit['train']:.2f} and "
            f"uniform noise {fit['noise']:.2f}") in warnings[0]
