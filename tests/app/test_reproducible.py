"""The command line the Attribute page shows reproduces the page: for a generated target (gen:SEED) the CLI
prints the proponents and opponents the page shows, with the same scores. Both attribute the 8-bit image (the
pixels people see and download); before, the CLI attributed the unrounded sample and scores moved by ~7%."""

from __future__ import annotations

import json
import shlex

import numpy as np
import torch

from attribution.cli import main
from attribution.data import tensor_to_pixels
from attribution.data.images import pixels_to_tensor
from attribution.models import load_model
from attribution.sampling import sample
from attribution.targets import resolve_targets
from test_app import RUN_TIMEOUT, app, feature_cache, tiles  # noqa: F401 (fixtures)


def test_gen_target_is_the_8bit_image(tiny_run):
    model = load_model(str(tiny_run), "cpu")
    pixels = tensor_to_pixels(torch.from_numpy(sample(model, 1, 2).final))  # what the app holds and shows
    target = resolve_targets("gen:2", model, "digits")
    assert torch.equal(target.images, pixels_to_tensor(pixels)) and target.keys == ["gen/2"]


def test_the_pages_command_line_prints_the_pages_scores(app, feature_cache, capsys, monkeypatch):
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
    assert np.isclose(out["lambda"], float(line.split("--lambda ")[1].split()[0])) if "--lambda" in line else True


def test_pages_say_before_run_whether_the_features_are_cached(app):
    """Before Run the Attribute page says the features are cached, or how long featurizing will take here (the
    default K=10, k=4096 is never featurized by the tests; a one-image timing gives the estimate)."""
    app.switch_page("app_pages/attribute.py").run()
    note = " ".join(c.value for c in app.main.caption)
    assert "not cached yet: featurizing will take about" in note and "1618 images at" in note
    app.radio(key="attr_source").set_value("Validation image").run()
    app.number_input(key="attr_K").set_value(2)
    app.selectbox(key="attr_k").set_value(512)
    next(b for b in app.button if b.label == "Run attribution").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    app.run()  # the next rerun, with the options just used
    assert "features for these options are cached" in " ".join(c.value for c in app.main.caption)
    app.switch_page("app_pages/self_influence.py").run()
    assert "not cached yet" in " ".join(c.value for c in app.main.caption)
