"""End-to-end: `streamlit run app.py` driven by system Chromium through Playwright (UX.md §5.3).

Run with `pytest -m browser`; skipped when no Chromium binary is installed. Playwright's own browser downloads are
never used (`playwright install` is not needed). The server and page helpers live in tests/browser_support.py, which
docs/make_screenshots.py (the README screenshots, on the shipped digits model) uses too.
"""

from __future__ import annotations

import re

import pytest

from browser_support import (ServerError, app_server, choose, chromium_path, full_page_screenshot, launch_chromium,
                             set_number, wait_for_app_run)


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """Base URL of a `streamlit run app.py` serving the tiny model; stopped at teardown.

    Features go to the session's shared cache folder (the one test_app.py uses), never the repository's cache/.
    """
    cache = tmp_path_factory.getbasetemp() / "attribution-cache"
    cache.mkdir(exist_ok=True)
    env = dict(OMP_NUM_THREADS="1", ATTRIBUTION_CHECKPOINT=str(tiny_run), ATTRIBUTION_DATASET="digits",
               ATTRIBUTION_CACHE=str(cache))
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    try:
        with app_server(env, log_path=log) as url:
            yield url
    except ServerError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def browser():
    if chromium_path() is None:
        pytest.skip("no Chromium binary (/usr/bin/chromium or chromium-headless-shell); "
                    "apt-get install chromium or chromium-headless-shell")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.mark.browser
@pytest.mark.slow
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


@pytest.mark.browser
@pytest.mark.slow
def test_attribute_in_browser(server, browser, tmp_path):
    """Validation image 5, K=2, k=512, D-TRAK compared with TRAK: tiles with captions; a full-page screenshot."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/attribute")
    wait_for_app_run(page, timeout=180_000)  # the first run loads the model and samples gen:0
    expect(page.get_by_role("heading", name="Attribute")).to_be_visible()
    page.locator(".st-key-attr_source").get_by_text("Validation image").click()
    wait_for_app_run(page)
    index = page.locator(".st-key-attr_val_idx input")
    index.fill("5")
    index.press("Enter")
    wait_for_app_run(page)
    expect(page.get_by_test_id("stImageCaption").first).to_contain_text("val:5")

    set_number(page, "attr_K", 2)  # the options rerun the page (its estimate): no form
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
    expect(proponents.first.get_by_test_id("stImageCaption")).to_have_text(
        re.compile(r"^train #\d+ · class \d · score \+"))
    for img in proponents.locator("img").all():  # rendered, not broken (waits while an image is still loading)
        page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(),
                               timeout=30_000)
    expect(page.get_by_test_id("stCode").first).to_contain_text("--target val:5")
    full_page_screenshot(page, tmp_path / "attribute.png")

    # A proponent's Details: its rank under both rankings of this session, then "Attribute this image".
    first = proponents.first.get_by_test_id("stImageCaption").inner_text()
    index = int(re.match(r"^train #(\d+)", first)[1])
    page.locator(".st-key-attr_pro_0").get_by_role("button", name="Details").first.click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text("Rank and score under each ranking")).to_be_visible(timeout=60_000)
    expect(dialog.get_by_text("D-TRAK · val:5")).to_be_visible()
    expect(dialog.get_by_text("TRAK · val:5", exact=True)).to_be_visible()
    dialog.get_by_role("button", name="Attribute this image").click()
    wait_for_app_run(page)
    expect(page.get_by_test_id("stImageCaption").first).to_have_text(re.compile(rf"^train:{index}( ·|$)"),
                                                                      timeout=60_000)
    page.close()


@pytest.mark.browser
def test_timesteps_scatter_click_opens_the_training_image(server, browser, tmp_path):
    """Training-set norms on the Timesteps page; clicking a marker of the plotly scatter shows that training image
    (a plotly selection event, which AppTest cannot simulate)."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/timesteps")
    wait_for_app_run(page, timeout=120_000)
    expect(page.get_by_role("heading", name="Timesteps")).to_be_visible()
    page.get_by_role("tab", name="Training set").click()
    samples = page.locator(".st-key-ts_samples input")
    samples.fill("40")
    page.get_by_role("button", name="Compute norms").click()
    chart = page.locator(".st-key-ts_scatter_chart")
    expect(chart.locator(".scatterlayer .point").first).to_be_visible(timeout=120_000)
    wait_for_app_run(page)
    point = chart.locator(".scatterlayer .point").first
    point.click(force=True)
    caption = page.get_by_test_id("stImageCaption").filter(
        has_text=re.compile(r"^train #\d+ · class \d · t=\d+ · norm "))
    expect(caption.first).to_be_visible(timeout=60_000)
    expect(page.get_by_test_id("stException")).to_have_count(0)
    page.screenshot(path=str(tmp_path / "timesteps.png"), full_page=True)
    page.close()


def _start_attribution(browser, server):
    """A fresh browser context (its own session) on the Attribute page: generated target seed 0, K=2, k=512
    (the small feature configuration the other browser tests use), Run pressed; returns the page."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(f"{server}/attribute")
    wait_for_app_run(page, timeout=120_000)
    set_number(page, "attr_K", 2)
    choose(page, "attr_k", "512")
    return page


def _top5(page) -> list[str]:
    from playwright.sync_api import expect

    expect(page.get_by_role("heading", name="Results")).to_be_visible(timeout=300_000)
    wait_for_app_run(page, timeout=120_000)
    expect(page.get_by_test_id("stException")).to_have_count(0)
    captions = page.locator(".st-key-attr_pro_0 [data-testid='stImageCaption']")
    expect(captions).to_have_count(5)
    return captions.all_inner_texts()


@pytest.mark.browser
@pytest.mark.slow
def test_four_concurrent_sessions_get_the_single_session_top5(server, browser):
    """Four browser contexts press Run within a second on the same generated digit: each gets the top-5 (indices
    and scores) that one session alone gets. Before the adapter's lock, each got a different, wrong list."""
    pages = [_start_attribution(browser, server) for _ in range(4)]
    for page in pages:  # as close together as one Playwright thread can click
        page.get_by_role("button", name="Run attribution").click()
    concurrent = [_top5(page) for page in pages]
    for page in pages:
        page.context.close()
    alone = _start_attribution(browser, server)
    alone.get_by_role("button", name="Run attribution").click()
    single = _top5(alone)
    alone.context.close()
    assert all(re.match(r"^train #\d+ · class \d · score \+", c) for c in single), single
    assert concurrent == [single] * 4


@pytest.mark.browser
@pytest.mark.slow
def test_the_current_image_is_in_the_url_across_pages_and_links(server, browser):
    """Issue 24, 7 in a real browser (AppTest cannot see the URL bar): the seed generated is in the URL, stays
    there when the sidebar opens another page, and the URL opened in a new session shows the same image."""
    from urllib.parse import parse_qs, urlparse

    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{server}/generate")
    wait_for_app_run(page, timeout=120_000)
    page.locator(".st-key-gen_seed input").fill("7")
    page.locator(".st-key-gen_n input").fill("1")
    page.locator(".st-key-gen_steps input").fill("5")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_test_id("stImageCaption").first).to_have_text("seed 7", timeout=60_000)
    wait_for_app_run(page)
    expect(page).to_have_url(re.compile(r"image=gen%3A7"))
    page.get_by_test_id("stSidebarNav").get_by_role("link", name="Attribute").click()
    wait_for_app_run(page, timeout=120_000)
    expect(page.get_by_role("heading", name="Attribute")).to_be_visible()
    expect(page.get_by_test_id("stImageCaption").first).to_have_text("gen:7 · ddpm, 5 steps", timeout=60_000)
    wait_for_app_run(page)
    assert parse_qs(urlparse(page.url).query)["image"] == ["gen:7"] and "/attribute" in page.url
    link = page.url
    page.close()

    fresh = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    fresh.goto(link)
    wait_for_app_run(fresh, timeout=120_000)
    expect(fresh.get_by_test_id("stImageCaption").first).to_have_text("gen:7 · ddpm, 5 steps", timeout=60_000)
    expect(fresh.locator(".st-key-attr_seed input")).to_have_value("7")
    expect(fresh.get_by_test_id("stException")).to_have_count(0)
    fresh.context.close()
