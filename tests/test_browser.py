"""End-to-end: `streamlit run app.py` driven by system Chromium through Playwright (UX.md §5.3).

Run with `pytest -m browser`; skipped when no Chromium binary is installed. Playwright's own browser downloads are
never used (`playwright install` is not needed).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "app-attribute.png"  # shown in the README
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-headless-shell"):
        if Path(candidate).is_file():
            return candidate
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """Base URL of a `streamlit run app.py` serving the tiny model; stopped at teardown.

    Features go to the session's shared cache folder (the one test_app.py uses), never the repository's cache/.
    """
    port = free_port()
    cache = tmp_path_factory.getbasetemp() / "attribution-cache"
    cache.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", ATTRIBUTION_CHECKPOINT=str(tiny_run), ATTRIBUTION_DATASET="digits",
               ATTRIBUTION_CACHE=str(cache))
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
             "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium binary (/usr/bin/chromium or chromium-headless-shell); "
                    "apt-get install chromium or chromium-headless-shell")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


def wait_for_app_run(page, timeout: float = 60_000) -> None:
    """Websocket up, script run finished, nothing left as a skeleton (Streamlit's own e2e recipe)."""
    from playwright.sync_api import expect

    page.locator("[data-testid='stApp'][data-test-connection-state='CONNECTED']").wait_for(state="attached",
                                                                                          timeout=timeout)
    page.locator("[data-testid='stApp'][data-test-script-state='notRunning']").wait_for(state="attached",
                                                                                       timeout=timeout)
    expect(page.get_by_test_id("stSkeleton")).to_have_count(0)


@pytest.mark.browser
def test_generate_in_browser(server, browser, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{server}/generate")  # a deep link on a fresh server: the frame (sidebar) must run too
    wait_for_app_run(page)
    expect(page.get_by_test_id("stSidebar").get_by_text("trained on")).to_be_visible()
    expect(page.get_by_role("heading", name="Generate")).to_be_visible()

    page.locator(".st-key-gen_n input").fill("3")
    page.locator(".st-key-gen_steps input").fill("5")
    page.get_by_role("button", name="Generate").click()
    images = page.locator("[data-testid='stImage'] img")
    expect(images).to_have_count(3, timeout=60_000)  # the job's run, then its st.rerun
    wait_for_app_run(page)
    expect(images).to_have_count(3)
    expect(page.get_by_test_id("stImageCaption").first).to_have_text("seed 0")
    expect(page.get_by_test_id("stException")).to_have_count(0)
    page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)
    page.close()


def full_page_screenshot(page, path: Path) -> None:
    """Streamlit scrolls inside its main container (`full_page` alone stops at the viewport): grow the viewport to
    the content first, then wait until every image has loaded."""
    height = page.evaluate("document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": page.viewport_size["width"], "height": max(600, int(height) + 40)})
    wait_for_app_run(page)
    page.evaluate("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
    loaded = ("[...document.querySelectorAll('[data-testid=stImage] img')]"
              ".every(i => i.complete && i.naturalWidth > 0)")
    try:
        page.wait_for_function(loaded, timeout=60_000)
    except Exception:
        images = page.evaluate("[...document.querySelectorAll('[data-testid=stImage] img')]"
                               ".map(i => [i.complete, i.naturalWidth, i.src])")
        raise AssertionError(f"images not loaded (complete, naturalWidth, src): {images}") from None
    page.screenshot(path=str(path), full_page=True)


def choose(page, key: str, option: str) -> None:
    """Pick `option` in the selectbox with widget key `key` (a form's selectbox does not rerun the app)."""
    page.locator(f".st-key-{key} [role='combobox']").click()
    page.get_by_role("option", name=option, exact=True).click()


@pytest.mark.browser
def test_attribute_in_browser(server, browser, tmp_path):
    """Validation image 5, K=2, k=512, D-TRAK compared with TRAK: tiles with captions; a screenshot for the README."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/attribute")
    wait_for_app_run(page)
    expect(page.get_by_role("heading", name="Attribute")).to_be_visible()
    page.locator(".st-key-attr_source").get_by_text("Validation image").click()
    wait_for_app_run(page)
    index = page.locator(".st-key-attr_val_idx input")
    index.fill("5")
    index.press("Enter")
    wait_for_app_run(page)
    expect(page.get_by_test_id("stImageCaption").first).to_contain_text("val:5")

    page.locator(".st-key-attr_K input").fill("2")
    choose(page, "attr_k", "512")
    choose(page, "attr_compare", "TRAK")
    page.get_by_role("button", name="Run attribution").click()
    expect(page.get_by_role("heading", name="Results")).to_be_visible(timeout=180_000)  # first run: featurizing
    wait_for_app_run(page, timeout=180_000)

    expect(page.get_by_test_id("stException")).to_have_count(0)
    expect(page.get_by_role("heading", name="D-TRAK", exact=True)).to_be_visible()
    expect(page.get_by_role("heading", name="TRAK", exact=True)).to_be_visible()
    expect(page.get_by_text("Proponents").first).to_be_visible()
    proponents = page.locator(".st-key-attr_pro_0 [data-testid='stImage']")
    expect(proponents).to_have_count(5)
    expect(page.locator(".st-key-attr_pro_1 [data-testid='stImage']")).to_have_count(5)
    assert page.get_by_test_id("stImage").count() >= 11  # the target and 2 x 5 proponents at least
    expect(proponents.first.get_by_test_id("stImageCaption")).to_have_text(re.compile(r"^#\d+ · \d · \+"))
    for img in proponents.locator("img").all():  # rendered, not broken
        assert img.evaluate("el => el.complete && el.naturalWidth > 0")
    expect(page.get_by_test_id("stCode").first).to_contain_text("--target val:5")

    shot = tmp_path / "attribute.png"
    full_page_screenshot(page, shot)
    if os.environ.get("ATTRIBUTION_UPDATE_DOCS"):  # refresh the README picture on request only
        shutil.copyfile(shot, SCREENSHOT)
    page.close()
