"""Helpers for driving the app in a real browser: used by tests/app/test_browser.py and docs/make_screenshots.py.

Not a test module (pytest collects only test_*.py). Nothing here imports pytest; Playwright is imported inside the
functions that need it, so importing this module is cheap.

- `app_server(env_overrides)`: a context manager that runs `streamlit run app.py` on a free port and yields its URL.
- `chromium_path()` / `launch_chromium(playwright)`: system Chromium (Playwright's own downloads are never used).
- `wait_for_app_run(page)`, `full_page_screenshot(page, path)`, `choose(page, key, option)`: page helpers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
STREAMLIT_FLAGS = ["--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
                   "--browser.gatherUsageStats", "false"]


class ServerError(RuntimeError):
    """`streamlit run` exited or did not answer its health check in time; the message ends with its log."""


def chromium_path() -> str | None:
    """System Chromium: /usr/bin/chromium, /usr/bin/chromium-headless-shell, else either one on PATH; or None."""
    for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-headless-shell"):
        if Path(candidate).is_file():
            return candidate
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


def launch_chromium(playwright):
    """A Playwright browser on system Chromium; RuntimeError when there is none."""
    exe = chromium_path()
    if exe is None:
        raise RuntimeError("no Chromium binary (/usr/bin/chromium or chromium-headless-shell); "
                           "apt-get install chromium or chromium-headless-shell")
    return playwright.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(env_overrides: Mapping[str, str | None] | None = None, log_path: Path | None = None,
               startup_timeout: float = 60) -> Iterator[str]:
    """Run `streamlit run app.py` (repository root, free port, headless) and yield its base URL; stop it on exit.

    The server gets this process's environment with OMP_NUM_THREADS=1 unless already set, then `env_overrides`
    (a value of None removes that variable). Its output goes to `log_path` (a temporary file when not given); the
    tail of it is in the ServerError raised when the server exits or is not healthy within `startup_timeout` s.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    for name, value in (env_overrides or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streamlit-"))) / "server.log"
        port = free_port()
        with open(log_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                                     *STREAMLIT_FLAGS],
                                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                        if r.read() == b"ok":
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ServerError(f"streamlit did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_app_run(page, timeout: float = 60_000) -> None:
    """Websocket up, script run finished, nothing left as a skeleton (Streamlit's own e2e recipe)."""
    from playwright.sync_api import expect

    page.locator("[data-testid='stApp'][data-test-connection-state='CONNECTED']").wait_for(state="attached",
                                                                                          timeout=timeout)
    page.locator("[data-testid='stApp'][data-test-script-state='notRunning']").wait_for(state="attached",
                                                                                       timeout=timeout)
    expect(page.get_by_test_id("stSkeleton")).to_have_count(0, timeout=timeout)  # settles under load too


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
        page.wait_for_function(loaded, timeout=30_000)
    except Exception:
        # Under load the browser can ask for an image's media URL in the moment between two script runs and get a
        # 404; the <img> keeps the same src and never retries. Ask once more for the broken ones. The screenshot is
        # for people: tests assert on the images that matter (e.g. the proponent tiles) themselves.
        page.evaluate("document.querySelectorAll('[data-testid=stImage] img').forEach(i => {"
                      " if (!i.naturalWidth) i.src = i.src.split('?')[0] + '?retry=' + Date.now(); })")
        try:
            page.wait_for_function(loaded, timeout=30_000)
        except Exception:
            pass
    page.screenshot(path=str(path), full_page=True)


def set_number(page, key: str, value, timeout: float = 180_000) -> None:
    """Type `value` into the number input with widget key `key` and commit it (Enter), then wait for the run it
    starts (outside a form it reruns the page)."""
    box = page.locator(f".st-key-{key} input")
    box.fill(str(value))
    box.press("Enter")
    wait_for_app_run(page, timeout=timeout)


def choose(page, key: str, option: str, timeout: float = 180_000) -> None:
    """Pick `option` in the selectbox with widget key `key`, then wait for the run it starts (a selectbox outside a
    form reruns the page, which may time a featurization for its estimate: seconds, minutes on a loaded machine)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(3):
        wait_for_app_run(page, timeout=timeout)  # a rerun that redraws the widget closes an open list
        box = page.locator(f".st-key-{key} [role='combobox']")
        box.scroll_into_view_if_needed()
        box.click()
        page.keyboard.type(option)  # filter the list: a long or virtualised list may not have rendered it yet
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=15_000)
            break
        except PlaywrightTimeout:  # the list was redrawn (detached) by a run that started meanwhile: open it again
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
    wait_for_app_run(page, timeout=timeout)
