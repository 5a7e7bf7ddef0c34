"""The try-it page at `/` in a real browser against a real `serve --model tiny` process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (the page test needs Chromium)"
    ),
]

IMAGE_LOADED_768x1344 = """() => Array.from(document.querySelectorAll('#images img')).some(
    (img) => img.complete && img.naturalWidth === 768 && img.naturalHeight === 1344)"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield pg
    finally:
        context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_generate_from_the_page(server: ServerProcess, page: Page) -> None:
    key = server.make_key(credits=100)["key"]
    page.goto(server.base_url + "/")
    expect(page.locator("body")).to_contain_text("--model tiny")

    page.fill("#api-key", key)
    prompt = "A lighthouse on a cliff at dusk, 'quoted' words"
    page.fill("#prompt", prompt)
    page.select_option("#size", "768*1344")
    page.select_option("#quality", "standard")
    page.fill("#seed", "7")
    expect(page.locator("#prompt-count")).to_have_text(str(len(prompt)))

    curl = page.locator("#curl").inner_text()
    assert f"{server.base_url}/api/v1/images/generations" in curl
    assert '"768*1344"' in curl
    assert '"standard"' in curl
    assert '"seed": 7' in curl
    assert "$COGVIEW_API_KEY" in curl
    assert key not in curl
    assert "negative_prompt" not in curl and '"n"' not in curl

    page.click("#submit")
    page.wait_for_function(IMAGE_LOADED_768x1344, timeout=120_000)

    assert page.eval_on_selector("#progress", "el => el.value") == 100
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#status")).to_contain_text("COMPLETED")
    expect(page.locator("#images")).to_contain_text("seed 7")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#submit")).to_be_enabled()

    # The key is remembered in this browser.
    page.reload()
    expect(page.locator("#api-key")).to_have_value(key)


def test_wrong_key_shows_the_api_error(server: ServerProcess, page: Page) -> None:
    page.goto(server.base_url + "/")
    page.fill("#api-key", "cv4_not_a_real_key")
    page.fill("#prompt", "anything")
    page.click("#submit")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("Invalid API key")
    expect(page.locator("#images img")).to_have_count(0)
