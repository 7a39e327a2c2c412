"""AppTest smoke tests, one per page, against the tiny model from `tiny_run` (never the shipped models).

AppTest runs the script in this process, so the app reads `ATTRIBUTION_CHECKPOINT`/`ATTRIBUTION_DATASET` from
`os.environ`, set here per test with monkeypatch.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from attribution.errors import ImageError
from app_pages._ui import display_size, page_indices, read_upload
from page_support import APP, RUN_TIMEOUT, mounted_value, png_bytes, shown_images, tiles

def test_home_and_sidebar(app, tiny_run):
    assert app.title[0].value.startswith("Which training images")
    assert app.session_state["checkpoint"] == str(tiny_run)
    assert app.session_state["dataset"] == "digits"
    captions = " ".join(c.value for c in app.sidebar.caption)
    assert "trained on **digits**" in captions and "Device:" in captions
    assert not app.sidebar.warning


def test_home_leads_to_the_tour_and_claims_only_what_the_app_measures(app):
    """Issue 24, 8: Home said the scores "rank images well" while the README says to trust them only a little, and
    did not lead to the Tour. Its first link is the Tour, and its claims are the measured shares of the reachable
    LDS (the README's "Does it work?" figures, which the Evaluation page reproduces)."""
    assert [link.proto.page for link in app.get("page_link")][0] == "tour"
    text = " ".join(m.value for m in app.main.markdown)
    assert "rank images well" not in text
    readme = " ".join((Path(APP).parent / "README.md").read_text().split())
    for figure in ("+0.64", "+0.52", "37% / 24%"):
        assert figure in text and figure in readme
    assert "a lead to check, not a verdict" in text


def test_sidebar_warns_when_checkpoint_and_dataset_differ(app):
    app.sidebar.selectbox(key="dataset_pick").set_value("animals-2").run()
    assert app.session_state["dataset"] == "animals-2"
    assert "trained on digits" in app.sidebar.warning[0].value
    app.sidebar.button(key="use_recorded").click().run()  # "Use digits": back to the checkpoint's training set
    assert app.session_state["dataset"] == "digits" and not app.sidebar.warning


def test_dataset_follows_a_newly_picked_checkpoint(app, tiny_run):
    """Picking the shipped LoRA model switches the dataset to its finetuning set (a spec outside the list goes to
    the custom field); picking the digits run again brings back the listed `digits`."""
    app.sidebar.selectbox(key="checkpoint_pick").set_value("digits-latent").run()
    assert app.session_state["dataset"] == "digits:5,6,7,8,9" and not app.sidebar.warning
    app.sidebar.selectbox(key="checkpoint_pick").set_value(str(tiny_run)).run()
    assert app.session_state["dataset"] == "digits" and app.session_state["dataset_custom"] == ""


def test_generate(app):
    app.switch_page("app_pages/generate.py").run()
    assert not app.exception and not shown_images(app)
    app.number_input(key="gen_seed").set_value(3)
    app.number_input(key="gen_n").set_value(2)
    app.number_input(key="gen_steps").set_value(4)
    app.button[0].click().run()
    assert not app.exception
    generated = app.session_state["generated"]
    assert generated["seeds"] == [3, 4]
    assert generated["pixels"].shape == (2, 16, 16, 1) and generated["pixels"].dtype == np.uint8
    assert shown_images(app) == ["seed 3", "seed 4"]
    assert app.number_input(key="gen_seed").value == 3  # the form keeps its values after the job


def test_generate_with_a_missing_checkpoint_shows_one_line(tiny_run, feature_cache, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_CHECKPOINT", str(tiny_run / "nope"))
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(feature_cache))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    at.switch_page("app_pages/generate.py").run()
    assert not at.exception
    assert "checkpoint not found" in at.main.error[0].value


def test_training_data_pages_and_filters(app):
    app.switch_page("app_pages/training_data.py").run()
    assert not app.exception
    captions = shown_images(app)
    assert len(captions) == 48 and captions[0].startswith("#0 · ")

    app.multiselect[0].set_value(["3"]).run()
    from attribution.data import load_dataset

    n_threes = int((load_dataset("digits").labels == 3).sum())
    assert app.markdown[0].value.endswith(f"of {n_threes}")
    captions = shown_images(app)
    assert len(captions) == min(48, n_threes) and all(c.endswith(" · 3") for c in captions)

    app.number_input(key="td_page").set_value(4).run()  # the last page of the threes
    assert len(shown_images(app)) == n_threes - 3 * 48

    app.radio(key="td_split").set_value("val").run()  # a new split starts again at page 1
    n_val_threes = int((load_dataset("digits", "val").labels == 3).sum())
    assert app.number_input(key="td_page").value == 1
    assert len(shown_images(app)) == n_val_threes


def test_upload_rejects_non_images_and_keeps_working(app):
    app.switch_page("app_pages/upload.py").run()
    assert not app.exception
    app.file_uploader[0].upload("notes.png", b"this is not an image", "image/png").run()
    assert not app.exception
    assert "notes.png is not an image" in app.error[0].value
    assert "uploaded" not in app.session_state

    app.file_uploader[0].clear().upload("red.png", png_bytes(), "image/png").run()
    assert not app.exception and not app.error
    uploaded = app.session_state["uploaded"]
    assert uploaded["pixels"].shape == (16, 16, 1) and uploaded["name"] == "red.png"
    assert len(app.get("image")) == 2  # original and "as the model sees it"


def test_a_rejected_upload_is_no_target_and_a_tiny_image_gets_a_warning(app, tiny_run, tmp_path):
    """Issue 24, 9: a rejected upload used to leave the previous upload as the Attribute page's target without a
    word, and a 1x1 image was accepted silently (the model sees it enlarged to a flat square)."""
    app.switch_page("app_pages/upload.py").run()
    app.file_uploader[0].upload("red.png", png_bytes(), "image/png").run()
    assert app.session_state["uploaded"]["name"] == "red.png" and not app.warning
    app.file_uploader[0].clear().upload("notes.png", b"this is not an image", "image/png").run()
    assert not app.exception
    assert [e.value for e in app.error] == ["notes.png is not an image file PIL can read (PNG, JPEG, BMP, GIF, "
                                            "WebP, TIFF)"]
    assert "uploaded" not in app.session_state and "Upload an image" in app.info[0].value
    app.switch_page("app_pages/attribute.py").run()
    app.radio(key="attr_source").set_value("Uploaded").run()
    assert not shown_images(app) and "Upload an image on the **Upload** page" in app.main.info[0].value

    app.switch_page("app_pages/upload.py").run()
    app.file_uploader[0].clear().upload("dot.png", png_bytes((1, 1)), "image/png").run()
    assert not app.exception and app.session_state["uploaded"]["name"] == "dot.png"
    assert [w.value for w in app.warning] == ["dot.png is 1x1 pixels, smaller than the 16x16 the model sees: it is "
                                              "enlarged, so the target holds only the detail of a 1x1 image."]
    # The command line says the same of an image file target.
    from attribution.models import load_model
    from attribution.targets import resolve_targets

    (tmp_path / "dot.png").write_bytes(png_bytes((1, 1)))
    notes = resolve_targets(str(tmp_path / "dot.png"), load_model(str(tiny_run), "cpu"), "digits").notes
    assert app.warning[0].value in notes


# -- attribution pages ---------------------------------------------------------------------------------------------


def run_attribution(at: AppTest, source: str, index: int, compare: str = "(none)", K: int = 2,
                    k: int = 512, method: str = "dtrak") -> AppTest:
    """Attribute page: choose a dataset target, set the form and press Run attribution."""
    at.switch_page("app_pages/attribute.py").run()
    assert not at.exception
    at.radio(key="attr_source").set_value(source).run()
    split = "train" if source == "Training image" else "val"
    at.number_input(key=f"attr_{split}_idx").set_value(index)
    at.number_input(key="attr_K").set_value(K)
    at.selectbox(key="attr_k").set_value(k)
    at.selectbox(key="attr_compare").set_value(compare)
    at.selectbox(key="attr_method").set_value(method)
    next(b for b in at.button if b.label == "Run attribution").click().run(timeout=RUN_TIMEOUT)
    assert not at.exception, at.exception
    return at


@pytest.mark.slow
def test_attribute_validation_target_with_comparison_and_lambda(app):
    run_attribution(app, "Validation image", 5, compare="trak")
    assert not app.main.error
    headers = [md.value for md in app.main.markdown if md.value.startswith("#### ")]
    assert headers == ["#### D-TRAK", "#### TRAK"]

    for i in range(2):
        pro, opp = tiles(app, f"attr_pro_{i}"), tiles(app, f"attr_opp_{i}")
        assert len(pro) == 5 and 0 < len(opp) <= 3
        assert all(s > 0 for _, _, s in pro) and all(s < 0 for _, _, s in opp)
        assert [s for _, _, s in pro] == sorted((s for _, _, s in pro), reverse=True)
        assert [s for _, _, s in opp] == sorted(s for _, _, s in opp)  # most negative first
        assert all(c.isdigit() for _, c, _ in pro + opp)  # digits classes are "0".."9"
        result = app.main.get_by_key(f"attr_result_{i}")
        assert "of the positive score mass" in " ".join(c.value for c in result.caption)
        assert [d.label for d in result.get("download_button")] == ["Scores (.csv)", "Scores (.npz)"]
        cli = result.code[0].value
        assert cli.startswith("python -m attribution score") and "--target val:5" in cli
        assert f"--method {('dtrak', 'trak')[i]}" in cli and "--timesteps 2" in cli and "--proj-dim 512" in cli

    # Another lambda re-scores from the cached kernel: new scores, no featurizing, well under a second or two.
    slider = app.main.get_by_key("attr_result_0").select_slider[0]
    before, cli_before = tiles(app, "attr_pro_0"), app.main.get_by_key("attr_result_0").code[0].value
    trak_before = tiles(app, "attr_pro_1")
    options = [float(o.split()[0]) for o in slider.options]  # the default is marked "(default)"
    assert slider.value in options and sum("(default)" in o for o in slider.options) == 1
    default = next(float(o.split()[0]) for o in slider.options if "(default)" in o)
    assert slider.value == default
    new = options[0] if options[0] != slider.value else options[-1]
    start = time.perf_counter()
    slider.set_value(new).run()
    elapsed = time.perf_counter() - start
    assert not app.exception
    after = tiles(app, "attr_pro_0")
    assert [s for _, _, s in after] != [s for _, _, s in before]
    assert not app.status and not app.get("progress")  # nothing was featurized on this rerun
    assert elapsed < 10, elapsed
    assert app.main.get_by_key("attr_result_0").code[0].value != cli_before  # the CLI line carries --lambda
    assert tiles(app, "attr_pro_1") == trak_before  # TRAK's column keeps its own lambda
    result = app.main.get_by_key("attr_result_0")
    assert any("Top-5 shared with the neighbouring λ values" in c.value for c in result.caption)
    next(b for b in result.button if b.label == "Reset λ").click().run()  # back to the default
    slider = app.main.get_by_key("attr_result_0").select_slider[0]
    assert slider.value == default
    assert tiles(app, "attr_pro_0") == before

    # Another checkpoint (the run's first epoch) with the same target spec, then another target: the stored results
    # are never shown as theirs.
    other = next(o for o in app.sidebar.selectbox(key="checkpoint_pick").options if o.endswith("@epoch-1"))
    app.sidebar.selectbox(key="checkpoint_pick").set_value(other).run()
    assert not app.exception
    assert not [md for md in app.main.markdown if md.value.startswith("#### ")]
    assert "Run attribution" in app.main.info[0].value
    app.sidebar.selectbox(key="checkpoint_pick").set_value(app.sidebar.selectbox(key="checkpoint_pick").options[0])
    app.run()
    assert [md.value for md in app.main.markdown if md.value.startswith("#### ")] == ["#### D-TRAK", "#### TRAK"]
    app.number_input(key="attr_val_idx").set_value(6).run()
    assert not app.exception
    assert not [md for md in app.main.markdown if md.value.startswith("#### ")]
    assert "Run attribution" in app.main.info[0].value


def test_lambda_slider_shows_the_lambda_of_the_scores_after_another_target(app):
    """Issue 24, 1: after a second target the browser showed the λ slider at the grid's smallest value while the
    scores, the command line and Reset were at the default λ, and the next click re-scored at the smallest λ. The
    slider leaves the page while the chosen target has no results (the page stops early), so after two such runs
    the browser mounts it anew when results come: it must mount at the λ of the scores."""
    run_attribution(app, "Validation image", 3)
    app.number_input(key="attr_val_idx").set_value(5).run()  # other targets: no results for them yet
    app.number_input(key="attr_val_idx").set_value(6).run()
    assert not app.main.select_slider
    next(b for b in app.button if b.label == "Run attribution").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    result = app.main.get_by_key("attr_result_0")
    slider = result.select_slider[0]
    default = next(float(o.split()[0]) for o in slider.options if "(default)" in o)
    shown = mounted_value(slider)
    assert shown == slider.value == default
    assert np.isclose(float(result.code[0].value.split("--lambda ")[1].split()[0]), shown)
    assert next(b for b in result.button if b.label == "Reset λ").disabled == (shown == default)
    # The browser sends the value it shows with the next click, an unrelated one: the ranking stays.
    pro = tiles(app, "attr_pro_0")
    slider.set_value(shown)
    app.slider(key="attr_npro").set_value(5).run()
    assert not app.exception, app.exception
    assert tiles(app, "attr_pro_0") == pro


def test_attribute_generated_targets(app):
    """A generated target is the CLI's gen:SEED (DDPM, 50 steps) or, made otherwise, the PNG the result column
    offers, so the command line shown reproduces it."""
    app.switch_page("app_pages/attribute.py").run()
    app.radio(key="attr_source").set_value("Generated").run()
    assert not app.exception
    assert shown_images(app) == ["gen:0"]  # nothing generated yet: the seed's DDPM-50 image
    app.switch_page("app_pages/generate.py").run()
    app.number_input(key="gen_seed").set_value(3)
    app.number_input(key="gen_n").set_value(2)
    app.number_input(key="gen_steps").set_value(4)
    app.button[0].click().run()
    app.switch_page("app_pages/attribute.py").run()
    assert not app.exception
    assert app.number_input(key="attr_seed").value == 3 and app.number_input(key="attr_steps").value == 4
    assert shown_images(app) == ["gen:3 · ddpm, 4 steps"]


def test_attribute_training_image_is_its_own_top_proponent(app):
    index = 7
    run_attribution(app, "Training image", index, compare="dtrak")  # comparing D-TRAK with itself: one column
    assert [md.value for md in app.main.markdown if md.value.startswith("#### ")] == ["#### D-TRAK"]
    slider = app.main.get_by_key("attr_result_0").select_slider[0]
    slider.set_value(float(slider.options[0].split()[0])).run()  # the smallest lambda on the slider
    assert not app.exception
    pro = tiles(app, "attr_pro_0")
    assert pro[0][0] == index
    first_caption = app.main.get_by_key("attr_pro_0").get("image")[0].proto.imgs[0].caption
    assert first_caption.startswith(f"train #{index} ·")
    assert "--target train:7" in app.main.get_by_key("attr_result_0").code[0].value
    # Away and back: the options, the results and the chosen lambda are still there (no button state restored).
    lam = app.main.get_by_key("attr_result_0").select_slider[0].value
    app.switch_page("app_pages/generate.py").run()
    app.switch_page("app_pages/attribute.py").run()
    assert not app.exception, app.exception
    assert app.number_input(key="attr_train_idx").value == index
    assert app.main.get_by_key("attr_result_0").select_slider[0].value == lam and tiles(app, "attr_pro_0") == pro


def test_attribute_with_a_missing_checkpoint_shows_one_line(app, tiny_run):
    app.switch_page("app_pages/attribute.py").run()
    app.sidebar.text_input(key="checkpoint_custom").set_value(str(tiny_run / "missing-folder")).run()
    assert not app.exception
    errors = [e.value for e in app.main.error]
    assert len(errors) == 1 and "\n" not in errors[0] and "checkpoint not found" in errors[0]
    assert not app.main.get("radio")  # the page stopped before the target picker


def _si_attribution(at):
    from app_pages._attr import cached_attribution

    return cached_attribution(at.session_state["si_computed"]["opts"])


def test_self_influence(app):
    app.switch_page("app_pages/self_influence.py").run()
    assert not app.exception and app.main.info  # nothing computed yet: guidance
    app.selectbox(key="si_method").set_value("dtrak")
    app.number_input(key="si_K").set_value(2)
    app.selectbox(key="si_k").set_value(512)
    next(b for b in app.button if b.label == "Compute").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception

    def grid(key):
        images = [img for element in app.main.get_by_key(key).get("image") for img in element.proto.imgs]
        values = []
        for img in images:
            m = re.match(r"^train #(\d+) · class (\d) · self-influence (\S+)$", img.caption)
            assert m, img.caption
            values.append(float(m[3]))
        return values

    high, low = grid("si_high"), grid("si_low")
    assert len(high) == len(low) == 10
    assert high == sorted(high, reverse=True) and low == sorted(low)
    assert min(high) >= max(low)
    table = app.dataframe[0].value
    assert len(table) == 1618 and list(table.columns) == ["index", "label", "self_influence", "class_rank"]
    assert table["self_influence"].is_monotonic_decreasing
    assert "plain self-influence" in " ".join(c.value for c in app.main.caption)

    # The size-normalised variant: tau / |phi|^2 from the library's features, ranked within each class.
    from attribution.analysis.memorisation import class_ranks

    app.radio(key="si_variant").set_value("normalised").run()
    app.toggle(key="si_per_class").set_value(True).run()
    assert not app.exception, app.exception
    assert "divided by the squared norm" in " ".join(c.value for c in app.main.caption)
    table = app.dataframe[0].value
    att = _si_attribution(app)
    lam = app.main.select_slider[0].value  # the slider's (rounded) default lambda
    want = att.self_influence(lam) / att.members[0].train_features().norms ** 2
    np.testing.assert_allclose(table.sort_values("index")["self_influence"], want, rtol=1e-9)
    assert (table.sort_values("index")["class_rank"].to_numpy() == class_ranks(want, att.train.labels)).all()
    assert table["class_rank"].is_monotonic_increasing  # the top of every class first

    # Another checkpoint in the sidebar: these values are not shown as its own.
    other = next(o for o in app.sidebar.selectbox(key="checkpoint_pick").options if o.endswith("@epoch-1"))
    app.sidebar.selectbox(key="checkpoint_pick").set_value(other).run()
    assert not app.exception and app.main.info and not app.dataframe
    # Back after another run without them: the values return, and the λ slider, drawn anew, shows the λ they were
    # computed at (issue 24, 1).
    app.run()
    app.sidebar.selectbox(key="checkpoint_pick").set_value(app.sidebar.selectbox(key="checkpoint_pick").options[0])
    app.run()
    assert not app.exception, app.exception
    assert mounted_value(app.main.select_slider[0]) == app.main.select_slider[0].value == lam


# -- the pure helpers behind the pages ------------------------------------------------------------------------------


def test_page_indices():
    labels = np.array([0, 1, 0, 1, 0, 2, 0])
    idx, n, pages = page_indices(labels, [], 1, 3)
    assert idx.tolist() == [0, 1, 2] and n == 7 and pages == 3
    idx, n, pages = page_indices(labels, [0], 2, 3)
    assert idx.tolist() == [6] and n == 4 and pages == 2
    assert page_indices(labels, [0], 99, 3)[0].tolist() == [6]  # clamped to the last page
    idx, n, pages = page_indices(labels, [5], 1, 3)
    assert idx.tolist() == [] and n == 0 and pages == 1


def test_read_upload():
    out = read_upload(png_bytes((40, 30)), "x.png", 16, 1)
    assert out["pixels"].shape == (16, 16, 1) and out["pixels"].dtype == np.uint8
    assert out["preview"].size == (40, 30) and len(out["sha256"]) == 16
    assert read_upload(png_bytes((8, 8), "RGBA"), "y.png", 32, 3)["pixels"].shape == (32, 32, 3)
    with pytest.raises(ImageError, match="bad.png"):
        read_upload(b"GIF89a-but-not-really", "bad.png", 16, 1)
    with pytest.raises(ImageError, match="truncated"):
        read_upload(png_bytes((64, 64))[:60], "cut.png", 16, 1)


def test_display_size():
    assert display_size(16, 96) == 96 and display_size(28, 96) == 84 and display_size(200, 96) == 200


@pytest.mark.slow
def test_attribute_with_a_checkpoint_method_matches_the_library(app, tiny_run, feature_cache):
    """TracInCP on the Attribute page sums over the run's two checkpoints, exactly as the library does."""
    from attribution.engine import open_attribution
    from attribution.run_options import RunOptions
    from attribution.targets import resolve_targets

    at = run_attribution(app, "Validation image", 4, method="tracincp")
    assert any("over 2 checkpoints" in c.value for c in at.caption), [c.value for c in at.caption]
    shown = tiles(at, "attr_pro_0")
    att = open_attribution(RunOptions(str(tiny_run), method="tracincp", dataset="digits", timesteps=2, proj_dim=512,
                                      projector="sjlt", cache=str(feature_cache)))
    target = resolve_targets("val:4", att.target_model, "digits")
    scores = att.scores(att.features_of(target.images, target.keys))[0]
    want = np.argsort(-scores, kind="stable")[:len(shown)]
    assert [i for i, _, _ in shown] == want.tolist()
    # captions show 3 significant digits: within half a unit of the third, 0.5% relative
    np.testing.assert_allclose([s for _, _, s in shown], scores[want], rtol=5e-3)


@pytest.mark.slow
def test_timesteps_page(app, tiny_run):
    app.switch_page("app_pages/timesteps.py").run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    app.radio(key="ts_source").set_value("Training image").run(timeout=RUN_TIMEOUT)
    assert any("recorded" in c.value for c in app.caption)  # the one-image curve marks the training timestep
    app.number_input(key="ts_samples").set_value(30)
    next(b for b in app.button if b.label == "Compute norms").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    table = next(d for d in app.dataframe if "median norm" in d.value.columns)
    assert int(table.value["images"].sum()) == 30
    assert any("Spearman" in c.value and "30 images" in c.value for c in app.caption)
    # per checkpoint: the tiny run has two
    app.number_input(key="ts_samples_c").set_value(20)
    next(b for b in app.button if b.label == "Compute for 2 checkpoints").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    per = next(d for d in app.dataframe if "checkpoint" in d.value.columns)
    assert per.value["checkpoint"].tolist() == [f"{tiny_run}@epoch-1", f"{tiny_run}@epoch-2"]
    # generally influential: two methods, three generated targets, top 2
    app.multiselect(key="ts_infl_methods").set_value(["tracin", "retrac"])
    app.number_input(key="ts_infl_n").set_value(3)
    app.number_input(key="ts_infl_k").set_value(2)
    next(b for b in app.button if b.label == "Compute").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    counts = [m.value for m in app.markdown if "distinct of 6" in m.value]
    assert len(counts) == 2, [m.value for m in app.markdown]
    for text in counts:
        assert 2 <= int(re.search(r"(\d+) distinct", text)[1]) <= 6


def test_tour_walks_through_five_steps(app, tiny_run, feature_cache):
    """The Tour on the tiny model with the small feature set: each button runs its step; the proponents are the
    library's for the CLI's gen:0, and the journey and norm curve appear."""
    from attribution.engine import open_attribution
    from attribution.run_options import RunOptions
    from attribution.targets import resolve_targets

    app.switch_page("app_pages/tour.py").run()
    assert not app.exception, app.exception
    assert [b.disabled for b in app.button if b.key and b.key.startswith("tour_go_")] == [False, True, True, True]
    app.number_input(key="tour_K").set_value(2)
    app.selectbox(key="tour_k").set_value(512)
    app.button(key="tour_go_1").click().run()
    assert not app.exception and "gen:0" in shown_images(app)
    app.button(key="tour_go_2").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    shown = tiles(app, "tour_pro")
    att = open_attribution(RunOptions(str(tiny_run), method="dtrak", dataset="digits", timesteps=2, proj_dim=512,
                                      projector="sjlt", cache=str(feature_cache)))
    target = resolve_targets("gen:0", att.target_model, "digits")
    scores = att.scores(att.features_of(target.images, target.keys))[0]
    assert [i for i, _, _ in shown] == np.argsort(-scores, kind="stable")[:5].tolist()
    # step 3 points at the Counterfactual and Evaluation pages (retraining is not a button)
    assert "python -m attribution counterfactual" in " ".join(m.value for m in app.markdown)
    assert {link.proto.page for link in app.get("page_link")} >= {"counterfactual", "evaluation"}
    app.button(key="tour_go_4").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    assert [c.split(" · ")[0] for c in shown_images(app) if c.startswith("step ")] == [
        f"step {s}" for s in (9, 19, 29, 39, 49)]
    assert any("halfway to the final image" in m.value for m in app.markdown)
    app.button(key="tour_go_5").click().run(timeout=RUN_TIMEOUT)
    assert not app.exception, app.exception
    assert any(c.value.startswith("Largest at t = ") for c in app.caption)


def test_the_tour_promises_only_what_its_journey_measures(app):
    """Issue 24, 8: the Tour said the proponents "settle as the image takes shape" while the journey's own overlap
    with the last step's proponents is 0 until the last step on the digits model; it now points at the sentence
    that reports the measured overlap (attribution/analysis/formation.py)."""
    app.switch_page("app_pages/tour.py").run()
    assert not app.exception, app.exception
    text = " ".join(m.value for m in app.main.markdown)
    assert "how much of the last step's top proponents the earlier steps already hold" in text
    assert "settle" not in text


def test_captions_do_not_wrap_over_three_lines(app):
    """Issue 24, 8: captions wrapped over 4-5 lines (the Attribute page's method note in a third of the width, the
    Timesteps page's notes, the Journey page's comparison note). In the wide layout a caption at full width holds
    about 150 characters a line and one in a column of three about 45: at most 360 and 140."""
    from app_pages._journey import WHY_DIFFERENT

    too_long = []

    def check(page):
        assert not app.exception, app.exception
        too_long.extend((page, c.value) for col in app.main.columns for c in col.caption if len(c.value) > 140)
        too_long.extend((page, c.value) for c in app.main.caption if len(c.value) > 360)

    for page in ("attribute", "timesteps", "journey", "self_influence", "generate", "upload", "tour", "home"):
        app.switch_page(f"app_pages/{page}.py").run()
        check(page)
    app.switch_page("app_pages/attribute.py").run()
    app.selectbox(key="attr_method").set_value("das").run()  # the recommended method's long summary
    check("attribute (das)")
    assert not too_long, too_long
    assert len(WHY_DIFFERENT) <= 260  # shown after a journey with a sentence on the Attribute page's overlap


def test_sidebar_checks_a_dataset_spec_at_once_and_names_checkpoints_without_paths(app, tiny_run):
    app.sidebar.text_input(key="dataset_custom").set_value("blah:xyz").run()
    assert not app.exception
    errors = [e.value for e in app.sidebar.error]
    assert len(errors) == 1 and errors[0].startswith("unknown dataset 'blah:xyz'; use one of: digits")
    assert not app.sidebar.warning  # not "trained on digits, but the dataset chosen is blah:xyz"
    app.sidebar.text_input(key="dataset_custom").set_value("").run()
    assert not app.sidebar.error
    captions = " ".join(c.value for c in app.sidebar.caption)
    assert str(tiny_run) not in captions and tiny_run.name in captions


def test_page_options_survive_a_visit_to_another_page(app):
    app.switch_page("app_pages/attribute.py").run()
    app.selectbox(key="attr_method").set_value("trak").run()
    assert not app.selectbox(key="attr_method").value == "dtrak"
    assert not [s for s in app.selectbox if s.key == "attr_fn"] and not [s for s in app.slider if s.key == "attr_eta"]
    app.number_input(key="attr_K").set_value(3)
    app.radio(key="attr_source").set_value("Validation image").run()
    app.switch_page("app_pages/generate.py").run()
    app.switch_page("app_pages/attribute.py").run()
    assert not app.exception
    assert app.selectbox(key="attr_method").value == "trak"
    assert app.radio(key="attr_source").value == "Validation image"
    # D-TRAK offers its output functions; eta only for interp
    app.selectbox(key="attr_method").set_value("dtrak").run()
    assert app.selectbox(key="attr_fn").value == "square" and not [s for s in app.slider if s.key == "attr_eta"]
    app.selectbox(key="attr_fn").set_value("interp").run()
    assert app.slider(key="attr_eta").value == 1.0
