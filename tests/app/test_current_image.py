"""One current image (issue 24, 7): the image generated, uploaded or picked on one page is the image of the
Generate, Attribute, Journey and Timesteps pages, and it lives in the URL, so that a link reopens it. Before, the
Attribute page forgot a generated seed after another page, Journey started at seed 0 and Timesteps took training
images only."""

from __future__ import annotations

import base64
import json

import numpy as np
from streamlit.testing.v1 import AppTest

from attribution.analysis.norms import NormConfig, sample_curve
from attribution.models import load_model
from attribution.targets import resolve_targets
from page_support import APP, png_bytes, shown_images


def curve_of(at: AppTest) -> tuple[str, np.ndarray]:
    """The title and the norms of the Timesteps page's one-image curve (the first trace)."""
    (chart,) = at.get("plotly_chart")
    spec = json.loads(chart.proto.spec)
    y = spec["data"][0]["y"]  # plotly sends numpy arrays as {"dtype", "bdata": base64}
    values = np.frombuffer(base64.b64decode(y["bdata"]), dtype=y["dtype"]) if isinstance(y, dict) else y
    return spec["layout"]["title"]["text"], np.asarray(values, dtype=np.float64)


def open_link(params: dict, page: str) -> AppTest:
    """A new session opened on a link with these query parameters, on `page`."""
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params.update(params)
    at.run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def test_a_generated_image_is_the_current_image_of_every_page_and_of_the_link(app, tiny_run):
    app.switch_page("app_pages/generate.py").run()
    app.number_input(key="gen_seed").set_value(7)
    app.number_input(key="gen_n").set_value(2)
    app.number_input(key="gen_steps").set_value(4)
    app.selectbox(key="gen_sampler").set_value("ddim")
    next(b for b in app.button if b.label == "Generate").click().run()
    assert not app.exception, app.exception
    assert app.query_params == {**app.query_params, "image": "gen:7", "steps": "4", "sampler": "ddim"}

    # Attribute opens on gen:7 as Generate made it, with Generate's pixels.
    app.switch_page("app_pages/attribute.py").run()
    assert not app.exception, app.exception
    assert app.radio(key="attr_source").value == "Generated"
    assert (app.number_input(key="attr_seed").value, app.number_input(key="attr_steps").value,
            app.selectbox(key="attr_sampler").value) == (7, 4, "ddim")
    assert shown_images(app)[0] == "gen:7 · ddim, 4 steps"
    # Another seed picked here is the current image of Journey and Timesteps, and Attribute keeps it.
    app.number_input(key="attr_seed").set_value(8).run()
    assert app.query_params["image"] == "gen:8"
    app.switch_page("app_pages/journey.py").run()
    assert not app.exception, app.exception
    assert (app.radio(key="jr_source").value, app.number_input(key="jr_seed").value,
            app.number_input(key="jr_steps").value, app.selectbox(key="jr_sampler").value) == (
        "Generated", 8, 4, "ddim")
    app.switch_page("app_pages/timesteps.py").run()
    assert not app.exception, app.exception
    assert (app.radio(key="ts_source").value, app.number_input(key="ts_seed").value) == ("Generated", 8)
    # Timesteps takes a generated image: sampled as gen:8 is on the command line, its curve is the library's.
    app.number_input(key="ts_steps").set_value(50)
    app.selectbox(key="ts_sampler").set_value("ddpm")
    app.select_slider(key="ts_grid").set_value(10).run()
    assert not app.exception, app.exception
    assert app.query_params["image"] == "gen:8" and "steps" not in app.query_params
    title, norms = curve_of(app)
    model = load_model(str(tiny_run), "cpu")
    target = resolve_targets("gen:8", model, "digits")
    _, want = sample_curve(model, target.images[0], target.keys[0], NormConfig(grid=10))
    assert title.startswith("gen:8: gradient norm")
    np.testing.assert_allclose(norms, want, rtol=1e-5)
    app.switch_page("app_pages/attribute.py").run()
    assert (app.number_input(key="attr_seed").value, app.number_input(key="attr_steps").value) == (8, 50)
    assert shown_images(app)[0] == "gen:8"

    # A link with the image reproduces the page in a new session.
    link = open_link(app.query_params, "app_pages/timesteps.py")
    link.select_slider(key="ts_grid").set_value(10).run()
    assert curve_of(link)[0] == title
    np.testing.assert_allclose(curve_of(link)[1], norms)
    link.switch_page("app_pages/journey.py").run()
    assert (link.number_input(key="jr_seed").value, link.number_input(key="jr_steps").value) == (8, 50)


def test_an_upload_and_a_dataset_image_are_current_images_too(app, tiny_run):
    app.switch_page("app_pages/upload.py").run()
    app.file_uploader[0].upload("grey.png", png_bytes((20, 20), "L"), "image/png").run()
    assert not app.exception, app.exception
    sha = app.session_state["uploaded"]["sha256"]
    assert app.query_params["image"] == f"upload:{sha}"
    app.switch_page("app_pages/timesteps.py").run()
    assert not app.exception, app.exception
    assert app.radio(key="ts_source").value == "Uploaded"
    app.select_slider(key="ts_grid").set_value(10).run()
    title, norms = curve_of(app)
    assert title.startswith("grey.png: gradient norm") and np.all(norms > 0)
    # A new session on the link finds the upload on this server.
    link = open_link(app.query_params, "app_pages/attribute.py")
    assert link.radio(key="attr_source").value == "Uploaded" and shown_images(link)[0] == "grey.png"
    link.switch_page("app_pages/journey.py").run()
    assert link.radio(key="jr_source").value == "Uploaded" and "noising it forward" in link.main.info[0].value

    # A validation image picked on Journey (noised forward; its command line names it) is Attribute's target.
    app.switch_page("app_pages/journey.py").run()
    app.radio(key="jr_source").set_value("Validation image").run()
    app.number_input(key="jr_val_idx").set_value(3).run()
    assert not app.exception, app.exception
    assert app.query_params["image"] == "val:3" and "val:3 has no sampling trajectory" in app.main.info[0].value
    app.switch_page("app_pages/attribute.py").run()
    assert app.radio(key="attr_source").value == "Validation image"
    assert app.number_input(key="attr_val_idx").value == 3 and shown_images(app)[0].startswith("val:3 · label ")
    app.switch_page("app_pages/timesteps.py").run()
    app.select_slider(key="ts_grid").set_value(10).run()
    model = load_model(str(tiny_run), "cpu")
    target = resolve_targets("val:3", model, "digits")
    np.testing.assert_allclose(curve_of(app)[1], sample_curve(model, target.images[0], "val/3",
                                                              NormConfig(grid=10))[1], rtol=1e-5)


def test_a_link_it_cannot_read_is_one_line(tiny_run, feature_cache, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_CHECKPOINT", str(tiny_run))
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(feature_cache))
    at = open_link({"image": "gen:x"}, "app_pages/attribute.py")
    assert [e.value for e in at.sidebar.error] == ["the link's image='gen:x' is not gen:SEED, train:I, val:I or "
                                                   "upload:HASH (SEED and I at most 2147483647)"]
    at = open_link({"image": "gen:3", "steps": "0"}, "app_pages/journey.py")
    assert [e.value for e in at.sidebar.error] == ["the link's steps='0' is not a number from 1 to 10000"]
    at = open_link({"image": "gen:3", "steps": "5000"}, "app_pages/journey.py")  # this model has 1000 timesteps
    assert [w.value for w in at.main.warning] == ["5000 sampling steps are more than this model's 1000 timesteps: "
                                                  "1000."]
    assert at.number_input(key="jr_steps").value == 1000 and at.query_params["steps"] == "1000"
    at = open_link({"image": "upload:0123456789abcdef"}, "app_pages/attribute.py")

    assert [e.value for e in at.main.error] == ["the uploaded image 0123456789abcdef is not on this server; upload it "
                                                "again on the Upload page"]
