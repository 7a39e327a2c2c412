"""The command line the Attribute page shows reproduces the page: for a generated target (gen:SEED) the CLI
prints the proponents and opponents the page shows, with the same scores. Both attribute the 8-bit image (the
pixels people see and download); before, the CLI attributed the unrounded sample and scores moved by ~7%."""

from __future__ import annotations

import io
import json
import shlex

import numpy as np
import pytest
import torch

from attribution.cli import main
from attribution.data import tensor_to_pixels
from attribution.data.images import pixels_to_tensor
from attribution.models import load_model
from attribution.sampling import sample
from attribution.targets import resolve_targets
from page_support import RUN_TIMEOUT, tiles


def offered_files(monkeypatch) -> dict[str, bytes]:
    """file name -> bytes of every file the app offers for download from now on (AppTest keeps them in memory)."""
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    files, original = {}, MemoryMediaFileStorage.load_and_get_id

    def record(self, path_or_data, mimetype, kind, filename=None):
        if filename:
            files[filename] = path_or_data
        return original(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)
    return files


def test_gen_target_is_the_8bit_image(tiny_run):
    model = load_model(str(tiny_run), "cpu")
    pixels = tensor_to_pixels(torch.from_numpy(sample(model, 1, 2).final))  # what the app holds and shows
    target = resolve_targets("gen:2", model, "digits")
    assert torch.equal(target.images, pixels_to_tensor(pixels)) and target.keys == ["gen/2"]


def test_the_pages_command_line_prints_the_pages_scores(app, feature_cache, tmp_path, capsys, monkeypatch):
    offered = offered_files(monkeypatch)
    app.switch_page("app_pages/attribute.py").run()
    app.radio(key="attr_source").set_value("Generated").run()
    app.number_input(key="attr_seed").set_value(1)
    app.number_input(key="attr_K").set_value(2)
    app.selectbox(key="attr_k").set_value(512)
    next(b for b in app.button if b.label == "Run attribution").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    pro, opp = tiles(app, "attr_pro_0"), tiles(app, "attr_opp_0")
    assert len(pro) == 5 and opp
    line = app.main.get_by_key("attr_result_0").code[0].value
    argv = shlex.split(line)
    assert argv[:4] == ["python", "-m", "attribution", "score"] and "gen:1" in argv
    top = int(argv[argv.index("--top") + 1])

    monkeypatch.setenv("ATTRIBUTION_CACHE", str(feature_cache))  # the features the page computed
    capsys.readouterr()
    assert main(argv[3:] + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "gen:1" and top == 5
    # The page shows scores to 3 significant digits: same images, same order, same shown scores.
    assert [(e["index"], e["label"], float(f"{e['score']:+.3g}")) for e in out["proponents"]] == pro
    cli_opp = [(e["index"], e["label"], float(f"{e['score']:+.3g}")) for e in out["opponents"]]
    assert cli_opp[:len(opp)] == opp
    lam = float(line.split("--lambda ")[1].split()[0])
    assert np.isclose(out["lambda"], lam)
    # The .npz of the page and of `score --out` hold λ as a number (issue 24, 9: it was the CSV's text).
    npz = next(data for name, data in offered.items() if name.endswith(".npz"))
    assert main(argv[3:] + ["--out", str(tmp_path / "cli.npz")]) == 0
    for source in (io.BytesIO(npz), tmp_path / "cli.npz"):
        with np.load(source) as z:
            assert z["lambda"].dtype == np.float64 and np.isclose(z["lambda"][0], lam)
            assert z["scores"].shape == (1, 1618) and z["target"][0] == "gen:1"


def test_pages_say_before_run_whether_the_features_are_cached(app):
    """Before Run the Attribute page says the features are cached, or how long featurizing will take here (the
    default K=10, k=4096 is never featurized by the tests; a three-image timing gives the estimate)."""
    app.switch_page("app_pages/attribute.py").run()
    note = " ".join(c.value for c in app.main.caption)
    assert "Not cached yet, so this run featurizes" in note and "D-TRAK: about" in note
    app.radio(key="attr_source").set_value("Validation image").run()
    app.number_input(key="attr_K").set_value(2)
    app.selectbox(key="attr_k").set_value(512)
    next(b for b in app.button if b.label == "Run attribution").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    app.run()  # the next rerun, with the options just used
    assert "features for these options are cached" in " ".join(c.value for c in app.main.caption)
    app.switch_page("app_pages/self_influence.py").run()
    assert "Not cached yet" in " ".join(c.value for c in app.main.caption)


def test_the_estimate_before_run_counts_every_comparison_column(app):
    """Issue 24, 4: with the main column's features cached, the note said "cached: a run takes seconds" although
    the comparison columns needed two new featurizations (372 s). Each column is estimated with its own options,
    as the widgets show them, and the note names the ones that featurize."""
    app.switch_page("app_pages/attribute.py").run()
    app.radio(key="attr_source").set_value("Validation image").run()
    app.number_input(key="attr_K").set_value(2)
    app.selectbox(key="attr_k").set_value(512)
    next(b for b in app.button if b.label == "Run attribution").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    app.run()
    assert "features for these options are cached" in " ".join(c.value for c in app.main.caption)
    app.selectbox(key="attr_compare").set_value("trak").run()
    other = next(o for o in app.selectbox(key="attr_compare_ckpt").options if o.endswith("@epoch-1"))
    app.selectbox(key="attr_compare_ckpt").set_value(other).run()
    note = next(c.value for c in app.main.caption if "cached" in c.value)
    assert "a run takes" not in note and "Not cached yet" in note
    # the checkpoint column's features are made by no other test; TRAK's at K=2, k=512 may be cached by one
    assert "@epoch-1: about" in note and " in all. " in note


@pytest.mark.slow
def test_a_checkpoint_column_attributes_the_main_columns_pixels(app, tiny_run, feature_cache, tmp_path, capsys,
                                                                 monkeypatch):
    """Issue 24, 3: "…or with checkpoint" for a generated target attributes the main checkpoint's image (gen:SEED
    with the other checkpoint is another image), and its command line reads those pixels from the PNG the column
    offers, so that it prints the column's ranking."""
    offered = offered_files(monkeypatch)
    app.switch_page("app_pages/attribute.py").run()
    app.radio(key="attr_source").set_value("Generated").run()
    app.number_input(key="attr_seed").set_value(1)
    app.number_input(key="attr_K").set_value(2)
    app.selectbox(key="attr_k").set_value(512)
    other = next(o for o in app.selectbox(key="attr_compare_ckpt").options if o.endswith("@epoch-1"))
    app.selectbox(key="attr_compare_ckpt").set_value(other)
    next(b for b in app.button if b.label == "Run attribution").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    assert "--target gen:1" in app.main.get_by_key("attr_result_0").code[0].value
    pro = tiles(app, "attr_pro_1")
    # Issue 24, 3: a comparison column says how far it agrees with the first (top-k overlap, Spearman), and the
    # figures are those of the two columns' scores.
    shared = len({i for i, *_ in pro} & {i for i, *_ in tiles(app, "attr_pro_0")})
    said = next(c.value for c in app.main.get_by_key("attr_result_1").caption if c.value.startswith("Against"))
    assert said.startswith(f"Against D-TRAK: {shared} of the top 5 proponents shared; Spearman rank correlation")
    assert "Against" not in " ".join(c.value for c in app.main.get_by_key("attr_result_0").caption)
    # Issue 24, verdict: beside a ranking of a model without a bank, a sentence says its trust is not measured
    for i in (0, 1):
        assert "it has no ground-truth bank" in " ".join(c.value for c in
                                                         app.main.get_by_key(f"attr_result_{i}").caption)
    argv = shlex.split(app.main.get_by_key("attr_result_1").code[0].value)
    name = argv[argv.index("--target") + 1]
    assert name.endswith(".png") and argv[argv.index("--checkpoint") + 1].endswith("@epoch-1")

    # The PNG holds the pixels of the main checkpoint's gen:1, which the main column attributes.
    (tmp_path / name).write_bytes(offered[name])
    main_model = load_model(str(tiny_run), "cpu")
    other_model = load_model(argv[argv.index("--checkpoint") + 1], "cpu")
    png = resolve_targets(str(tmp_path / name), other_model, "digits")
    assert torch.equal(png.images, resolve_targets("gen:1", main_model, "digits").images)
    assert not torch.equal(png.images, resolve_targets("gen:1", other_model, "digits").images)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(feature_cache))  # the features the page computed
    capsys.readouterr()
    assert main(argv[3:] + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(e["index"], e["label"], float(f"{e['score']:+.3g}")) for e in out["proponents"]] == pro
