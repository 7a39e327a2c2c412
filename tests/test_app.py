"""AppTest smoke tests, one per page, against the tiny model from `tiny_run` (never the shipped models).

AppTest runs the script in this process, so the app reads `ATTRIBUTION_CHECKPOINT`/`ATTRIBUTION_DATASET` from
`os.environ`, set here per test with monkeypatch.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from attribution.errors import ImageError
from app_pages._ui import display_size, page_indices, read_upload

APP = Path(__file__).resolve().parents[1] / "app.py"


@pytest.fixture
def app(tiny_run, monkeypatch) -> AppTest:
    """The app after its first run, pointed at the tiny run and the digits dataset."""
    monkeypatch.setenv("ATTRIBUTION_CHECKPOINT", str(tiny_run))
    monkeypatch.setenv("ATTRIBUTION_DATASET", "digits")
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    return at


def shown_images(at: AppTest) -> list[str]:
    """Captions of every image on the page (one st.image call can hold many images)."""
    return [img.caption for element in at.get("image") for img in element.proto.imgs]


def png_bytes(size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 200).save(buf, format="PNG")
    return buf.getvalue()


def test_home_and_sidebar(app, tiny_run):
    assert app.title[0].value.startswith("Which training images")
    assert app.session_state["checkpoint"] == str(tiny_run)
    assert app.session_state["dataset"] == "digits"
    captions = " ".join(c.value for c in app.sidebar.caption)
    assert "trained on **digits**" in captions and "Device:" in captions
    assert not app.sidebar.warning


def test_sidebar_warns_when_checkpoint_and_dataset_differ(app):
    app.sidebar.selectbox(key="dataset_pick").set_value("animals-2").run()
    assert app.session_state["dataset"] == "animals-2"
    assert "trained on digits" in app.sidebar.warning[0].value


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


def test_generate_with_a_missing_checkpoint_shows_one_line(tiny_run, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_CHECKPOINT", str(tiny_run / "nope"))
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
