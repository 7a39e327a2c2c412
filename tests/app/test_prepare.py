"""Prepare for class (issue 24, 5 and 4): the Tour says before its long steps how long they will take here, and its
"Prepare for class" button computes, in one shared background job, what the Tour (its features and journey) and
the Evaluation page's defaults use; afterwards every step reads the cache. The CLI's `prepare` does the same."""

from __future__ import annotations

import re

from page_support import RUN_TIMEOUT

from attribution.cli import main


def captions(at) -> str:
    return "\n".join(c.value for c in at.main.caption)


def test_the_tour_estimates_its_steps_and_prepares_for_class(tiny_run, start_app, tmp_path, monkeypatch):
    """On a cache of its own (nothing cached: the shared test cache holds the Tour's features from other tests)
    and 40 training digits (the same pages, cheaper), the Tour estimates steps 2 and 4 before they run; "Prepare
    for class" computes both; afterwards both say cached."""
    import numpy as np

    from attribution.data import load_dataset

    digits = load_dataset("digits")
    npz = tmp_path / "digits40.npz"
    np.savez(npz, images=digits.pixels[:40, ..., 0], labels=digits.labels[:40])
    app = start_app(str(tiny_run), tmp_path / "cache", banks=tmp_path / "no-banks", dataset=f"npz:{npz}")
    app.switch_page("app_pages/tour.py").run()
    app.number_input(key="tour_K").set_value(2)
    app.selectbox(key="tour_k").set_value(512).run()
    assert not app.exception, app.exception
    text = captions(app)
    assert "Not cached yet, so this run featurizes" in text and "D-TRAK: about" in text  # before step 2
    assert re.search(r"About \d+ (s|min) on this machine \(40 images at .*a journey of gen:0", text)  # step 4
    table = app.main.dataframe[0].value  # the prepare panel: one row per task, with its estimate
    tour_task = f"Tour and Attribute defaults: D-TRAK, K = 2, k = 512 on {tiny_run}@epoch-2"
    assert table["what"].tolist() == [tour_task]
    assert table["time here"].iloc[0].startswith("about ") and "In all: about" in text

    app.button(key="prepare_go").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    assert any("Prepared" in s.value for s in app.main.success)
    app.run()
    text = captions(app)
    assert "features for these options are cached" in text and "This journey is cached" in text
    assert any("Prepared" in s.value for s in app.main.success)


def test_prepare_command_prints_its_estimate_first(tiny_run, feature_cache, monkeypatch, capsys):
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(feature_cache))
    assert main(["prepare", "--checkpoint", str(tiny_run), "--bank", "none", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"Tour and Attribute defaults: D-TRAK, K = 10, k = 4096 on .*: about \d+", err)
    assert "total: about" in err
    assert main(["prepare", "--checkpoint", str(tiny_run), "--bank", "nosuchbank", "--dry-run"]) == 2


def test_a_servers_first_run_prepares_for_class_in_the_background(tiny_run, start_app, tmp_path, monkeypatch):
    """With ATTRIBUTION_PREPARE on (the app's default; the tests turn it off), the first run starts the Tour panel's
    job for the default checkpoint and dataset without waiting for it: the sidebar shows its progress, the Tour's
    panel watches the same job, and once it ends the Tour's features and journey are cached."""
    import numpy as np

    from app_pages._attr import find_job
    from app_pages._prepare import prepare_key
    from attribution.data import load_dataset
    from attribution.prepare import TOUR

    digits = load_dataset("digits")
    npz = tmp_path / "digits40.npz"
    np.savez(npz, images=digits.pixels[:40, ..., 0], labels=digits.labels[:40])
    monkeypatch.setenv("ATTRIBUTION_PREPARE", "1")
    app = start_app(str(tiny_run), tmp_path / "cache", banks=tmp_path / "no-banks", dataset=f"npz:{npz}")
    assert not app.exception, app.exception
    key = prepare_key(f"{tiny_run}@epoch-2", f"npz:{npz}", TOUR, str(tmp_path / "no-banks"))
    job = find_job(key)
    assert job is not None, "no preparation started at the first run"
    if job.thread.is_alive():  # usually: 40 images take seconds, the first run returns without waiting for them
        bars = [p.proto.text for p in app.sidebar.get("progress")]
        assert any(t.startswith("Preparing for class") for t in bars), bars
    job.thread.join(RUN_TIMEOUT)
    assert job.error is None, job.error
    app.switch_page("app_pages/tour.py").run()
    assert not app.exception, app.exception
    assert any("Prepared" in s.value for s in app.main.success)  # the panel: everything cached
    text = captions(app)
    assert "features for these options are cached" in text and "This journey is cached" in text


def test_a_server_with_preparation_off_starts_nothing(tiny_run, start_app, tmp_path):
    from app_pages._attr import find_job
    from app_pages._prepare import prepare_key
    from attribution.prepare import TOUR

    app = start_app(str(tiny_run), tmp_path / "cache", banks=tmp_path / "no-banks")  # conftest: preparation off
    assert not app.exception, app.exception
    assert find_job(prepare_key(f"{tiny_run}@epoch-2", "digits", TOUR, str(tmp_path / "no-banks"))) is None
    assert not app.sidebar.get("progress")


def test_the_shared_plan_and_job_follow_the_cache_folder(tiny_run, tmp_path, monkeypatch):
    """The plan is shared by sessions (cached once per process): a different cache folder gets its own plan, whose
    features live there, and its own job key."""
    from app_pages._prepare import cached_plan, prepare_key
    from attribution.prepare import TOUR

    folders, keys = [], []
    for name in ("a", "b", "a"):
        monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path / name))
        tasks = cached_plan(f"{tiny_run}@epoch-2", "digits", TOUR, str(tmp_path / "no-banks"))
        folders.append(tasks[0].attribution.members[0].cache_dir)
        keys.append(prepare_key(f"{tiny_run}@epoch-2", "digits", TOUR, str(tmp_path / "no-banks")))
    assert [f.is_relative_to(tmp_path / n) for f, n in zip(folders, "aba")] == [True] * 3, folders
    assert keys[0] == keys[2] != keys[1]
