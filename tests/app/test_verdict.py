"""Issue 24, a plain verdict beside every answer: beside a ranking of a model with a ground-truth bank, one sentence
from the bank (shown at once when the bank's targets are scored with these options, else a button that says what
it computes and how long), and a button that sets the λ chosen on held-out targets.

Each test runs on a bank of its own (the tiny model's hand-made bank) and a feature cache of its own, so what other
tests cached cannot decide what these see."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from attribution.evaluation.bank import Bank
from engine_support import FAKE_BANK_DATASET

TIMEOUT = 600


@pytest.fixture
def trust_bank(fake_bank_dir, tmp_path):
    """The hand-made bank, found as the bank of its own model (its content hash recorded)."""
    from attribution.models.checkpoint import resolve_checkpoint

    folder = tmp_path / "banks" / "trust"
    shutil.copytree(fake_bank_dir, folder)
    meta = json.loads((folder / "bank.json").read_text())
    meta["model"] = {"content_hash": resolve_checkpoint(str(folder / "model")).content_hash()}
    (folder / "bank.json").write_text(json.dumps(meta))
    return folder


def attribute(at, method: str = "trak"):
    """Validation image 0 attributed with `method`, K = 1, k = 512."""
    at.switch_page("app_pages/attribute.py").run()
    at.radio(key="attr_source").set_value("Validation image").run()
    at.number_input(key="attr_K").set_value(1)
    at.selectbox(key="attr_k").set_value(512)
    at.selectbox(key="attr_method").set_value(method)
    next(b for b in at.button if b.label == "Run attribution").click().run()
    assert not at.exception, at.exception
    return at


def trust_captions(at) -> list[str]:
    return [c.value for c in at.main.get_by_key("attr_result_0").caption if "rankings like this" in c.value]


def slider_lambda(at) -> float:
    return float(str(at.main.get_by_key("attr_result_0").select_slider[0].value).split()[0])


@pytest.mark.slow
def test_the_verdict_shows_at_once_when_the_bank_targets_are_cached(trust_bank, tmp_path, start_app):
    """With the bank's targets already scored with these options (and pixel similarity's), the sentence is beside
    the ranking without a click: the bank's LDS at the slider's λ, its share of the reachable, and how it compares
    with pixel similarity, as `verdict` computes it, short enough for a column."""
    from attribution.evaluation.evaluate import score_bank
    from attribution.evaluation.verdict import verdict

    cache = tmp_path / "cache"
    bank = Bank.load(trust_bank)
    run = score_bank(bank, "trak", device="cpu", timesteps=1, proj_dim=512, cache=str(cache))
    pixels = score_bank(bank, "pixel-cos", device="cpu", cache=str(cache))
    at = attribute(start_app(trust_bank / "model", cache, banks=trust_bank.parent, timeout=TIMEOUT,
                            dataset=FAKE_BANK_DATASET))
    assert not [b for b in at.button if b.label.startswith("How far to trust this?")]
    (caption,) = trust_captions(at)
    want = verdict(bank, run, slider_lambda(at), "val", pixels)
    assert caption == want.sentence() and "pixel similarity (" in caption
    assert f"LDS {want.value:+.2f}" in caption and f"{want.share:.0%} of reachable" in caption
    assert len(caption) <= 140


@pytest.mark.slow
def test_the_trust_button_says_what_it_computes_and_then_gives_the_verdict(trust_bank, tmp_path, start_app):
    """Without the bank's targets scored: the button, and one line with what it computes and about how long it
    takes here (from the throughput the run just measured); after the click, the sentence, beside pixel
    similarity's (computed with it: pixels, no gradients). A method without λ gets its sentence too."""
    at = attribute(start_app(trust_bank / "model", tmp_path / "cache", banks=trust_bank.parent, timeout=TIMEOUT,
                            dataset=FAKE_BANK_DATASET))
    note = next(c for c in at.main.get_by_key("attr_result_0").caption if c.value.startswith("Measuring scores"))
    assert re.search(r"the bank's 6 targets with these options: (about \d+ (s|min) here|seconds), once",
                     note.value), note.value
    assert "sample-timesteps/s" in note.proto.help  # the measured throughput it comes from
    next(b for b in at.button if b.label.startswith("How far to trust this?")).click().run()
    assert not at.exception, at.exception
    (caption,) = trust_captions(at)
    assert "rankings like this match retraining at LDS" in caption and "pixel similarity (" in caption
    attribute(at, "pixel-cos")  # no λ slider: the verdict still shows (its bank targets were just cached)
    (caption,) = trust_captions(at)
    assert "rankings like this match retraining at LDS" in caption


@pytest.mark.slow
def test_use_the_lambda_chosen_on_held_out_targets(trust_bank, tmp_path, start_app):
    """The button sets the λ chosen on the bank's validation targets other than this one (val/0): the slider, the
    scores and the command line all move to it (the slider's grid value nearest to the choice)."""
    import numpy as np

    from attribution.evaluation.evaluate import score_bank
    from attribution.evaluation.verdict import held_out_lambda

    cache = tmp_path / "cache"
    bank = Bank.load(trust_bank)
    run = score_bank(bank, "trak", device="cpu", timesteps=1, proj_dim=512, cache=str(cache))
    at = attribute(start_app(trust_bank / "model", cache, banks=trust_bank.parent, timeout=TIMEOUT,
                            dataset=FAKE_BANK_DATASET))
    choice = held_out_lambda(bank, run, "val", exclude="val/0")
    assert choice.excluded == "val/0" and choice.n_targets == 3
    slider = at.main.get_by_key("attr_result_0").select_slider[0]
    grid = [float(o.split()[0]) for o in slider.options]
    want = grid[int(np.argmin(np.abs(np.log(np.asarray(grid) / choice.lam))))]
    if want == slider_lambda(at):  # the default already: move away first, so the button has something to do
        slider.set_value(next(o for o in slider.options if float(o.split()[0]) != want)).run()
    button = next(b for b in at.button if b.label.startswith("Use the λ chosen on held-out targets"))
    assert f"({want:.3g})" in button.label and "other half" in button.proto.help
    button.click().run()
    assert not at.exception, at.exception
    assert slider_lambda(at) == want
    code = at.main.get_by_key("attr_result_0").code[0].value
    assert re.search(r"--lambda (\S+)", code) and float(re.search(r"--lambda (\S+)", code)[1]) == want
    assert next(b for b in at.button if b.label.startswith("Use the λ chosen")).disabled


def lam_slider(at):
    return next(s for s in at.main.select_slider if s.label == "λ")


def _held_out_click(at, slider, choice, key_caption) -> float:
    """Move the slider off the held-out choice if it is there, press the button; the λ it set (grid value)."""
    import numpy as np

    grid = [float(o.split()[0]) for o in slider.options]
    want = grid[int(np.argmin(np.abs(np.log(np.asarray(grid) / choice.lam))))]
    if float(str(slider.value).split()[0]) == want:
        slider.set_value(next(o for o in slider.options if float(o.split()[0]) != want)).run()
    assert any(key_caption in c.value for c in at.main.caption)  # the verdict is shown
    button = next(b for b in at.button if b.label.startswith("Use the λ chosen on held-out targets"))
    assert f"({want:.3g})" in button.label
    button.click().run()
    assert not at.exception, at.exception
    return want


@pytest.mark.slow
def test_journey_and_self_influence_offer_the_held_out_lambda(trust_bank, tmp_path, start_app):
    """The same button beside the Journey's and the Self-influence page's λ slider: the Journey of validation image
    0 (a bank target: left out of the choice, as on Attribute) moves its slider and its command line to the λ
    chosen on the other validation targets; Self-influence to the one chosen on all of them."""
    from attribution.evaluation.evaluate import score_bank
    from attribution.evaluation.verdict import held_out_lambda

    cache = tmp_path / "cache"
    bank = Bank.load(trust_bank)
    run = score_bank(bank, "trak", device="cpu", timesteps=1, proj_dim=512, cache=str(cache))
    at = start_app(trust_bank / "model", cache, banks=trust_bank.parent, timeout=TIMEOUT,
               dataset=FAKE_BANK_DATASET)
    at.switch_page("app_pages/journey.py").run()
    at.radio(key="jr_source").set_value("Validation image").run()
    at.number_input(key="jr_val_idx").set_value(0)
    at.selectbox(key="jr_method").set_value("trak")
    at.number_input(key="jr_fwd_steps").set_value(3)
    at.number_input(key="jr_every").set_value(1)
    at.number_input(key="jr_R").set_value(1)
    at.number_input(key="jr_K").set_value(1)
    at.selectbox(key="jr_k").set_value(512)
    next(b for b in at.button if b.label == "Compute journey").click().run()
    assert not at.exception, at.exception
    want = _held_out_click(at, lam_slider(at), held_out_lambda(bank, run, "val", exclude="val/0"),
                           "rankings like this match retraining")
    assert float(str(lam_slider(at).value).split()[0]) == want
    code = "\n".join(c.value for c in at.main.code)
    assert float(re.search(r"--lambda (\S+)", code)[1]) == want

    at.switch_page("app_pages/self_influence.py").run()
    at.selectbox(key="si_method").set_value("trak")
    at.number_input(key="si_K").set_value(1)
    at.selectbox(key="si_k").set_value(512)
    next(b for b in at.button if b.label == "Compute").click().run()
    assert not at.exception, at.exception
    want = _held_out_click(at, lam_slider(at), held_out_lambda(bank, run, "val"),
                           "rankings like this match retraining")
    assert float(str(lam_slider(at).value).split()[0]) == want
