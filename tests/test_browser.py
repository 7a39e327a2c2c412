"""End-to-end: `streamlit run app.py` driven by system Chromium through Playwright (UX.md §5.3).

Run with `pytest -m browser`; skipped when no Chromium binary is installed. Playwright's own browser downloads are
never used (`playwright install` is not needed).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
    """Base URL of a `streamlit run app.py` serving the tiny model; stopped at teardown."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", ATTRIBUTION_CHECKPOINT=str(tiny_run), ATTRIBUTION_DATASET="digits")
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
