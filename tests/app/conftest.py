"""Fixtures of the app tests: `feature_cache` (one feature cache for the session, shared with test_browser.py's
server, never the repo's cache/) and `app` (the app after its first run on the tiny run and the digits dataset)."""

from pathlib import Path

import pytest
from page_support import APP
from streamlit.testing.v1 import AppTest


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "attribution-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def app(tiny_run, feature_cache, monkeypatch) -> AppTest:
    monkeypatch.setenv("ATTRIBUTION_CHECKPOINT", str(tiny_run))
    monkeypatch.setenv("ATTRIBUTION_DATASET", "digits")
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(feature_cache))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    return at
