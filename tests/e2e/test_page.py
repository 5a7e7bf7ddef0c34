"""The try-it page at `/` in a real browser (Debian's Chromium, driven by Playwright) against a
real `cogview-api serve` process. The model is not under test here, so the server runs the
`test-echo` engine: `standard` is quick, `hd` slow enough (many 0.2 s steps) to cancel.

With `COGVIEW_PAGE_SHOTS=DIR` set, the tests save a PNG of the page in each state there, for a
person to look at."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support import ServerProcess, auth, server_env

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
SHOTS = os.environ.get("COGVIEW_PAGE_SHOTS")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (the page test needs Chromium)"
    ),
]

IMAGE_LOADED_640x512 = """() => Array.from(document.querySelectorAll('#images img')).some(
    (img) => img.complete && img.naturalWidth === 640 && img.naturalHeight === 512)"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("serve-page")
    env = server_env(
        workdir / "cache",
        {
            "COGVIEW_STEPS_STANDARD": "2",
            "COGVIEW_STEPS_HD": "200",
            "COGVIEW_TEST_ECHO_STEP_SECONDS": "0.2",  # hd: 40 s, time enough to cancel
        },
    )
    proc = ServerProcess(workdir=workdir, env=env, args=("--model", "test-echo")).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


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
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    missing: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    try:
        yield pg
    finally:
        context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"
    assert missing == [], f"404s while the page ran: {missing}"


def shot(page: Page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def account(client: httpx.Client, key: str) -> dict[str, Any]:
    data: dict[str, Any] = client.get("/api/v1/account", headers=auth(key)).json()["data"]
    return data


def open_page(page: Page, server: ServerProcess, key: str) -> None:
    page.goto(server.base_url + "/")
    page.fill("#api-key", key)


def test_generate_from_the_page(server: ServerProcess, client: httpx.Client, page: Page) -> None:
    key = server.make_key(credits=100)["key"]
    info = client.get("/api/v1/info").json()["data"]
    open_page(page, server, key)

    # What the server says, not what the page assumed: the model, the engine's note, the price.
    expect(page.locator("#model-name")).to_have_text(info["models"][0])
    expect(page.locator("#engine-name")).to_have_text("test-echo")
    expect(page.locator("#engine-note")).to_contain_text(info["note"])
    expect(page.locator("#price")).to_contain_text("4 credits per hd image")
    expect(page.locator("#balance")).to_have_text("Balance: 100 credits")
    expect(page.locator("a[href='/docs']")).to_be_visible()

    prompt = "A lighthouse on a cliff at dusk, 'quoted' words"
    page.fill("#prompt", prompt)
    page.select_option("#size", "custom")
    page.fill("#width", "640")
    page.fill("#height", "512")
    page.select_option("#quality", "standard")
    page.fill("#seed", "7")
    page.fill("#n", "2")
    expect(page.locator("#prompt-count")).to_have_text(str(len(prompt)))
    expect(page.locator("#price")).to_contain_text("2 images cost 8 credits")

    curl = page.locator("#curl").inner_text()
    assert f"{server.base_url}/api/v1/images/generations" in curl
    assert f"{server.base_url}/api/v1/tasks/$TASK_ID" in curl
    assert '"640*512"' in curl and '"standard"' in curl and '"seed": 7' in curl
    assert "$COGVIEW_API_KEY" in curl and key not in curl
    assert "negative_prompt" not in curl
    assert "TASK_ID='paste the task_id here'" in curl  # until the submit answers it
    # The block wraps: nothing scrolls sideways.
    assert page.eval_on_selector("#curl", "el => el.scrollWidth <= el.clientWidth")
    shot(page, "1-filled")

    page.click("#submit")
    page.wait_for_function(IMAGE_LOADED_640x512, timeout=60_000)
    shot(page, "2-completed")

    task_id = page.locator("#task-id").inner_text()
    assert task_id.endswith("_cv4")
    assert f"TASK_ID='{task_id}'" in page.locator("#curl").inner_text()
    assert page.eval_on_selector("#progress", "el => el.value") == 100
    expect(page.locator("#status")).to_contain_text("COMPLETED")
    expect(page.locator("#images figure")).to_have_count(2)
    expect(page.locator("#images")).to_contain_text("seed 7")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#submit")).to_be_enabled()
    expect(page.locator("#cancel")).to_be_disabled()
    expect(page.locator("#balance")).to_have_text("Balance: 92 credits")

    # The key is remembered in this browser.
    page.reload()
    expect(page.locator("#api-key")).to_have_value(key)


def test_overlong_paste_is_refused_with_the_servers_message(
    server: ServerProcess, client: httpx.Client, page: Page
) -> None:
    key = server.make_key(credits=100)["key"]
    open_page(page, server, key)
    page.focus("#prompt")
    page.keyboard.insert_text("a" * 1001)  # as a paste does: the field must not cut it

    assert len(page.input_value("#prompt")) == 1001
    expect(page.locator("#prompt-count")).to_have_text("1001")
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text("prompt must be at most 1000 characters")
    expect(page.locator("#error")).to_contain_text("param: prompt")
    expect(page.locator("#status")).to_contain_text("nothing was charged")
    expect(page.locator("#task")).to_be_hidden()
    expect(page.locator("#balance")).to_have_text("Balance: 100 credits")
    shot(page, "3-refused")

    assert account(client, key)["balance"] == 100
    assert client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"] == []


def test_cancel_from_the_page_refunds(
    server: ServerProcess, client: httpx.Client, page: Page
) -> None:
    key = server.make_key(credits=100)["key"]
    open_page(page, server, key)
    page.fill("#prompt", "slow enough to cancel")
    page.select_option("#size", "512*512")
    page.select_option("#quality", "hd")
    expect(page.locator("#cancel")).to_be_disabled()
    page.click("#submit")

    # The id stays in view once progress starts.
    expect(page.locator("#status")).to_contain_text("denoising", timeout=30_000)
    expect(page.locator("#task-id")).to_have_text(
        client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"][0]["task_id"]
    )
    expect(page.locator("#balance")).to_have_text("Balance: 96 credits")
    shot(page, "4-running")

    page.click("#cancel")
    expect(page.locator("#status")).to_contain_text("CANCELLED · 4 credits refunded")
    expect(page.locator("#task-id")).to_be_visible()
    expect(page.locator("#cancel")).to_be_disabled()
    expect(page.locator("#submit")).to_be_enabled()
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#balance")).to_have_text("Balance: 100 credits")
    shot(page, "5-cancelled")
    assert account(client, key)["balance"] == 100


def test_wrong_key_shows_the_api_error(server: ServerProcess, page: Page) -> None:
    page.goto(server.base_url + "/")
    page.fill("#api-key", "cv4_not_a_real_key")
    page.fill("#prompt", "anything")
    expect(page.locator("#balance")).to_contain_text("Invalid API key")
    page.click("#submit")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("Invalid API key")
    expect(page.locator("#images img")).to_have_count(0)


def test_favicon_is_served(server: ServerProcess, client: httpx.Client) -> None:
    r = client.get("/favicon.ico")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/vnd.microsoft.icon"
    assert r.content[:4] == b"\x00\x00\x01\x00"  # an ICO file's header
    svg = client.get("/static/favicon.svg")
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
