"""Regenerate the README screenshots of the app: docs/app-generate.png, app-training-data.png and app-attribute.png.

    OMP_NUM_THREADS=1 python -m docs.make_screenshots                       # the shipped digits model and dataset
    ATTRIBUTION_CHECKPOINT=runs/x python -m docs.make_screenshots --sampler ddim --steps 250
    OMP_NUM_THREADS=1 python -m docs.make_screenshots --explore    # Attribute progress/explore/details, Tour

Starts `streamlit run app.py` on a free port (tests/browser_support.py, shared with tests/app/test_browser.py), drives
system Chromium (/usr/bin/chromium or chromium-headless-shell) with Playwright, and stops the server again.

The app's defaults apply: the shipped `digits` checkpoint and dataset, and the repository's cache/ for features
(ATTRIBUTION_CHECKPOINT, ATTRIBUTION_DATASET and ATTRIBUTION_CACHE in the environment override them, as for the app).
The Attribute shot runs D-TRAK (K=10, k=4096, the form's defaults) compared with TRAK on validation image 12: the
first time, that featurizes the training set twice (several minutes per method on one core); later runs reuse the
cached features.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from tests import browser_support as bs  # the browser helpers the test suite uses
except ModuleNotFoundError:
    raise SystemExit("run it from the repository root as a module: python -m docs.make_screenshots") from None

ROOT = Path(__file__).resolve().parents[1]

PAGE_TIMEOUT_MS = 5 * 60_000  # a page run that loads the model, samples gen:0 and times one image on a busy CPU
FEATURIZE_TIMEOUT_MS = 20 * 60_000  # the first Attribute run featurizes the training set for D-TRAK and TRAK


def shot_generate(page, url: str, out: Path, n_images: int, sampler: str, steps: int) -> None:
    from playwright.sync_api import expect

    page.goto(f"{url}/generate")
    bs.wait_for_app_run(page)
    page.locator(".st-key-gen_n input").fill(str(n_images))
    page.locator(".st-key-gen_steps input").fill(str(steps))
    if sampler != "ddpm":  # the app's default (first in the list)
        bs.choose(page, "gen_sampler", sampler)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("[data-testid='stImage'] img")).to_have_count(n_images, timeout=300_000)
    bs.wait_for_app_run(page)
    expect(page.get_by_test_id("stException")).to_have_count(0)
    bs.full_page_screenshot(page, out)


def shot_training_data(page, url: str, out: Path) -> None:
    from playwright.sync_api import expect

    page.goto(f"{url}/training-data")
    bs.wait_for_app_run(page)
    expect(page.locator("[data-testid='stImage'] img")).not_to_have_count(0)
    expect(page.get_by_test_id("stException")).to_have_count(0)
    bs.full_page_screenshot(page, out)


def shot_attribute(page, url: str, out: Path, val_index: int, compare: str) -> None:
    """Validation image `val_index`, the form's defaults (D-TRAK, K=10, k=4096), compared with `compare`."""
    from playwright.sync_api import expect

    page.goto(f"{url}/attribute")
    bs.wait_for_app_run(page)
    page.locator(".st-key-attr_source").get_by_text("Validation image").click()
    bs.wait_for_app_run(page)
    index = page.locator(".st-key-attr_val_idx input")
    index.fill(str(val_index))
    index.press("Enter")
    bs.wait_for_app_run(page)
    expect(page.get_by_test_id("stImageCaption").first).to_contain_text(f"val:{val_index}")
    bs.choose(page, "attr_compare", compare)
    page.get_by_role("button", name="Run attribution").click()
    expect(page.get_by_role("heading", name="Results")).to_be_visible(timeout=FEATURIZE_TIMEOUT_MS)
    bs.wait_for_app_run(page, timeout=FEATURIZE_TIMEOUT_MS)
    expect(page.get_by_test_id("stException")).to_have_count(0)
    expect(page.locator(".st-key-attr_pro_1 [data-testid='stImage']").first).to_be_visible()
    bs.full_page_screenshot(page, out)


def _attribute_val(page, url: str, val_index: int, K: int, k: int) -> None:
    """Attribute page: validation image `val_index`, D-TRAK at (K, k), Run pressed."""
    from playwright.sync_api import expect

    page.goto(f"{url}/attribute")
    bs.wait_for_app_run(page, timeout=PAGE_TIMEOUT_MS)
    page.locator(".st-key-attr_source").get_by_text("Validation image").click()
    bs.wait_for_app_run(page, timeout=PAGE_TIMEOUT_MS)
    index = page.locator(".st-key-attr_val_idx input")
    index.fill(str(val_index))
    index.press("Enter")
    bs.wait_for_app_run(page, timeout=PAGE_TIMEOUT_MS)
    expect(page.get_by_test_id("stImageCaption").first).to_contain_text(f"val:{val_index}")
    page.locator(".st-key-attr_K input").fill(str(K))
    bs.choose(page, "attr_k", str(k))
    page.get_by_role("button", name="Run attribution").click()


def shot_progress(page, url: str, out: Path, val_index: int, K: int, k: int) -> None:
    """The progress of a featurization a few updates in (`progress_main` makes sure nothing is cached)."""
    from playwright.sync_api import expect

    import re

    _attribute_val(page, url, val_index, K, k)
    expect(page.get_by_text(re.compile(r"featurizing \d+ training images")).first).to_be_visible(
        timeout=PAGE_TIMEOUT_MS)
    page.wait_for_timeout(10_000)  # a few updates: count, rate, time left
    page.screenshot(path=str(out))


def shot_explore(page, url: str, outs: dict, val_index: int, K: int, k: int) -> None:
    """Attribute page with D-TRAK alone at (K, k): the results (captions, λ guidance) and the Details dialog of
    the top proponent."""
    from playwright.sync_api import expect

    _attribute_val(page, url, val_index, K, k)
    expect(page.get_by_role("heading", name="Results")).to_be_visible(timeout=FEATURIZE_TIMEOUT_MS)
    bs.wait_for_app_run(page, timeout=FEATURIZE_TIMEOUT_MS)
    expect(page.get_by_test_id("stException")).to_have_count(0)
    bs.full_page_screenshot(page, outs["explore"])
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.locator(".st-key-attr_pro_0").get_by_role("button", name="Details").first.click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text("Rank and score under each ranking")).to_be_visible(timeout=60_000)
    bs.wait_for_app_run(page)
    dialog.screenshot(path=str(outs["details"]))


def shot_tour(page, url: str, out: Path, K: int, k: int) -> None:
    """The Tour with every step run (the feature set (K, k) of shot_explore, so its features are cached)."""
    from playwright.sync_api import expect

    page.goto(f"{url}/tour")
    bs.wait_for_app_run(page, timeout=PAGE_TIMEOUT_MS)
    page.get_by_text("Settings (shared with the Attribute page").click()
    page.locator(".st-key-tour_K input").fill(str(K))
    page.locator(".st-key-tour_K input").press("Enter")
    bs.wait_for_app_run(page, timeout=PAGE_TIMEOUT_MS)
    bs.choose(page, "tour_k", str(k))
    bs.wait_for_app_run(page, timeout=PAGE_TIMEOUT_MS)
    for n, shows in ((1, "[data-testid='stImage']"), (2, ".st-key-tour_pro [data-testid='stImage']"),
                     (4, ".st-key-tour_film [data-testid='stImage']"), (5, ".st-key-tour_curve")):
        page.locator(f".st-key-tour_go_{n} button").click()
        expect(page.locator(shows).first).to_be_visible(timeout=FEATURIZE_TIMEOUT_MS)
        bs.wait_for_app_run(page, timeout=FEATURIZE_TIMEOUT_MS)
    expect(page.get_by_test_id("stException")).to_have_count(0)
    bs.full_page_screenshot(page, out)


def explore_main(out_dir: Path = ROOT / "docs", val_index: int = 12, K: int = 2, k: int = 512) -> None:
    """The issue-17 shots: docs/app-attribute-progress.png, app-attribute-explore.png, app-attribute-details.png
    and app-tour.png (K=2, k=512 by default: one featurization of a few minutes on CPU, shared by both pages)."""
    from playwright.sync_api import sync_playwright

    outs = {name: out_dir / f"app-{name}.png" for name in ("attribute-progress", "attribute-explore",
                                                            "attribute-details", "tour")}
    with bs.app_server({}) as url, sync_playwright() as p:
        browser = bs.launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        shot_explore(page, url, {"explore": outs["attribute-explore"], "details": outs["attribute-details"]},
                     val_index, K, k)
        page.close()
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        shot_tour(page, url, outs["tour"], K, k)
        page.close()
        browser.close()
    progress_main(outs["attribute-progress"], val_index, K, k)
    print("wrote " + ", ".join(str(p) for p in outs.values() if p.exists()))


def progress_main(out: Path, val_index: int = 12, K: int = 2, k: int = 512) -> None:
    """The progress shot on its own server with an empty feature cache, so the featurization it shows is never
    already cached (the server and its background featurization stop with it)."""
    import tempfile

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as cache, bs.app_server({"ATTRIBUTION_CACHE": cache}) as url, \
            sync_playwright() as p:
        browser = bs.launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            shot_progress(page, url, out, val_index, K, k)
        except AssertionError as exc:  # the featurization did not show within the timeout
            print(f"progress shot skipped: {str(exc).splitlines()[0]}")
        browser.close()


def main(out_dir: Path = ROOT / "docs", n_images: int = 16, sampler: str = "ddpm", steps: int = 50,
         val_index: int = 12, compare: str = "TRAK") -> None:
    from playwright.sync_api import sync_playwright

    if bs.chromium_path() is None:
        sys.exit("no Chromium found: apt-get install chromium (or chromium-headless-shell)")
    outs = {"generate": out_dir / "app-generate.png", "training": out_dir / "app-training-data.png",
            "attribute": out_dir / "app-attribute.png"}
    with bs.app_server({}) as url, sync_playwright() as p:
        browser = bs.launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        shot_generate(page, url, outs["generate"], n_images, sampler, steps)
        page.close()
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        shot_training_data(page, url, outs["training"])
        page.close()
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        shot_attribute(page, url, outs["attribute"], val_index, compare)
        page.close()
        browser.close()
    print("wrote " + ", ".join(str(p) for p in outs.values()))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="images to generate")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--val-index", type=int, default=12, help="validation image attributed")
    parser.add_argument("--compare", default="TRAK", help="'Compare with method' option for the Attribute shot")
    parser.add_argument("--explore", action="store_true",
                        help="only the issue-17 shots: progress, captions and λ guidance, details dialog, Tour")
    args = parser.parse_args()
    if args.explore:
        explore_main(val_index=args.val_index)
        sys.exit(0)
    main(n_images=args.n, sampler=args.sampler, steps=args.steps, val_index=args.val_index, compare=args.compare)
