"""Regenerate the README screenshots of the app: docs/app-generate.png and docs/app-training-data.png.

    OMP_NUM_THREADS=1 python docs/make_screenshots.py                       # the shipped digits model and dataset
    ATTRIBUTION_CHECKPOINT=runs/x python docs/make_screenshots.py --sampler ddpm --steps 250

Starts `streamlit run app.py` on a free port, drives system Chromium (/usr/bin/chromium or
chromium-headless-shell) with Playwright, and stops the server again.
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

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(page) -> None:
    page.locator("[data-testid='stApp'][data-test-connection-state='CONNECTED']").wait_for(state="attached")
    page.locator("[data-testid='stApp'][data-test-script-state='notRunning']").wait_for(state="attached",
                                                                                       timeout=120_000)


def _full_page_screenshot(page, path: Path) -> None:
    """Streamlit scrolls inside its main container, so grow the viewport to the content and load lazy images."""
    height = page.evaluate("document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": page.viewport_size["width"], "height": max(600, int(height) + 40)})
    page.evaluate("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
    page.wait_for_function("[...document.querySelectorAll('[data-testid=stImage] img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(path), full_page=True)


def main(out_dir: Path = ROOT / "docs", n_images: int = 16, sampler: str = "ddim", steps: int = 50) -> None:
    from playwright.sync_api import expect, sync_playwright

    exe = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-headless-shell") if Path(p).is_file()),
               shutil.which("chromium-headless-shell") or shutil.which("chromium"))
    if exe is None:
        sys.exit("no Chromium found: apt-get install chromium (or chromium-headless-shell)")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                time.sleep(0.3)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu",
                                                                   "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"{url}/generate")
            _wait(page)
            page.locator(".st-key-gen_n input").fill(str(n_images))
            page.locator(".st-key-gen_steps input").fill(str(steps))
            if sampler != "ddim":
                page.locator(".st-key-gen_sampler").click()
                page.get_by_role("option", name=sampler).click()
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("[data-testid='stImage'] img")).to_have_count(n_images, timeout=300_000)
            _wait(page)
            _full_page_screenshot(page, out_dir / "app-generate.png")

            page.set_viewport_size({"width": 1280, "height": 860})
            page.goto(f"{url}/training-data")
            _wait(page)
            expect(page.locator("[data-testid='stImage'] img")).not_to_have_count(0)
            _full_page_screenshot(page, out_dir / "app-training-data.png")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(f"wrote {out_dir / 'app-generate.png'} and {out_dir / 'app-training-data.png'}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="images to generate")
    parser.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    main(n_images=args.n, sampler=args.sampler, steps=args.steps)
