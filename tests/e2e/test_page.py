"""The try-it page at `/` in a real browser (Debian's Chromium, driven by Playwright) against a
real `cogview-api serve` process. The model is not under test here, so the server runs the
`test-echo` engine: `standard` is quick (8 steps of 0.2 s: time enough to see previews
arrive before the image), `hd` slow enough (200 steps) to cancel.

With `COGVIEW_PAGE_SHOTS=DIR` set, the tests save a PNG of the page in each state there, for a
person to look at."""

from __future__ import annotations

import io
import json
import os
import zipfile
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
            "COGVIEW_STEPS_STANDARD": "8",
            "COGVIEW_STEPS_HD": "200",
            "COGVIEW_TEST_ECHO_STEP_SECONDS": "0.2",  # hd: 40 s, time enough to cancel
        },
    )
    with ServerProcess(workdir=workdir, env=env, args=("--model", "test-echo")).start() as proc:
        yield proc


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


# -- live previews on the single tab -----------------------------------------------------------

PREVIEWS_SHOWN_BEFORE_THE_IMAGE = """() =>
    document.querySelectorAll('#previews-strip img').length >= 1
    && document.querySelectorAll('#images img').length === 0"""
IMAGE_LOADED_512 = """() => Array.from(document.querySelectorAll('#images img')).some(
    (img) => img.complete && img.naturalWidth === 512)"""
ALL_PREVIEWS_LOADED = """(count) => {
    const imgs = Array.from(document.querySelectorAll('#previews-strip img'));
    return imgs.length === count && imgs.every((img) => img.complete && img.naturalWidth > 0);
}"""


def skip_unless_previews(client: httpx.Client, key: str) -> None:
    """Skipped only while the server refuses the field as unknown (the previews API has not
    landed on this branch); any other answer runs the test."""
    r = client.post(
        "/api/v1/images/generations",
        json={"model": "cogview-4", "prompt": "probe", "previews": 99},
        headers=auth(key),
    )
    error = r.json().get("error") or {}
    if r.status_code == 400 and "unknown" in error.get("message", "").lower():
        pytest.skip("this server has no previews field yet")


def test_previews_arrive_then_the_final_image(
    server: ServerProcess, client: httpx.Client, page: Page
) -> None:
    key = server.make_key(credits=100)["key"]
    skip_unless_previews(client, key)
    open_page(page, server, key)
    page.fill("#prompt", "a harbour at dawn, previews on")
    page.select_option("#size", "512*512")
    page.select_option("#quality", "standard")
    page.check("#previews")
    assert '"previews": 3' in page.locator("#curl").inner_text()

    page.click("#submit")
    page.wait_for_function(PREVIEWS_SHOWN_BEFORE_THE_IMAGE, timeout=60_000)
    shot(page, "6-previews")
    page.wait_for_function(IMAGE_LOADED_512, timeout=60_000)
    expect(page.locator("#status")).to_contain_text("COMPLETED")

    task_id = page.locator("#task-id").inner_text()
    task = client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).json()["data"]
    previews = task["previews"]
    assert len(previews) >= 1
    # Every preview the task has is on the page, in order, each a loaded image from its URL.
    page.wait_for_function(ALL_PREVIEWS_LOADED, arg=len(previews))
    shown = page.eval_on_selector_all("#previews-strip img", "imgs => imgs.map((i) => i.src)")
    assert shown == [p["url"] for p in sorted(previews, key=lambda p: p["index"])]
    captions = page.locator("#previews-strip figcaption").all_inner_texts()
    assert captions[0] == f"preview 1 · step {previews[0]['step']}/8"
    expect(page.locator("#images figure")).to_have_count(1)
    shot(page, "7-previews-final")


# -- the batch tab -------------------------------------------------------------------------------


def skip_unless_batches(client: httpx.Client, key: str) -> None:
    """Skipped only while the batches route answers 404 (the batches API has not landed on
    this branch)."""
    if client.get("/api/v1/batches", headers=auth(key)).status_code == 404:
        pytest.skip("this server has no /api/v1/batches yet")


def open_batch_tab(page: Page, server: ServerProcess, key: str) -> None:
    open_page(page, server, key)
    page.click("#tab-batch")
    expect(page.locator("#batch")).to_be_visible()
    expect(page.locator("#single")).to_be_hidden()


def batches_of(client: httpx.Client, key: str) -> list[dict[str, Any]]:
    data = client.get("/api/v1/batches", headers=auth(key)).json()["data"]
    batches: list[dict[str, Any]] = data["batches"]
    return batches


CELLS_LOADED_512 = """(count) => {
    const imgs = Array.from(document.querySelectorAll('#batch-grid .cell img'));
    return imgs.length === count && imgs.every((img) => img.complete && img.naturalWidth === 512);
}"""

PROMPTS = [
    "a red fox in fresh snow",
    "a bowl of ramen, studio light",
    "",  # a blank line: skipped, and the lines after it keep their numbers
    "a lighthouse on a cliff at dusk",
    "an old map of an invented island",
]


def test_batch_tab_end_to_end(server: ServerProcess, client: httpx.Client, page: Page) -> None:
    key = server.make_key(credits=100)["key"]
    skip_unless_batches(client, key)
    open_batch_tab(page, server, key)
    page.fill("#batch-prompts", "\n".join(PROMPTS))
    page.select_option("#batch-size", "512*512")
    page.select_option("#batch-quality", "standard")
    expect(page.locator("#batch-count")).to_have_text("4")
    expect(page.locator("#batch-cost")).to_contain_text(
        "4 prompts × 1 image × 4 credits (standard) = 16 credits"
    )
    expect(page.locator("#batch-cost")).to_contain_text("Balance: 100 credits")
    shot(page, "8-batch-filled")

    page.click("#batch-submit")
    expect(page.locator("#batch-grid .cell")).to_have_count(4)
    page.wait_for_function(CELLS_LOADED_512, arg=4, timeout=60_000)
    expect(page.locator("#batch-status")).to_contain_text("COMPLETED")
    expect(page.locator("#batch-status")).to_contain_text("4 of 4 images")
    expect(page.locator("#batch-cancel")).to_be_disabled()
    expect(page.locator("#balance")).to_have_text("Balance: 84 credits")
    expect(page.locator("#batch-error")).to_be_hidden()
    shot(page, "9-batch-completed")

    [batch] = batches_of(client, key)
    assert page.locator("#batch-id").inner_text() == batch["batch_id"]
    assert batch["status"] == "COMPLETED" and batch["credits"]["charged"] == 16
    # Each cell is its line: the line numbers of the box, blank line skipped.
    labels = page.locator("#batch-grid .cell .label").all_inner_texts()
    assert [label.split(" · ")[0] for label in labels] == ["line 1", "line 2", "line 4", "line 5"]
    prompts = page.locator("#batch-grid .cell .prompt").all_inner_texts()
    assert prompts == [p for p in PROMPTS if p]

    with page.expect_download() as download_info:
        page.click("#batch-download")
    download = download_info.value
    assert download.suggested_filename == f"{batch['batch_id']}.zip"
    with zipfile.ZipFile(io.BytesIO(Path(download.path()).read_bytes())) as archive:
        assert archive.testzip() is None
        names = set(archive.namelist())
        manifest = [json.loads(line) for line in archive.read("manifest.jsonl").splitlines()]
    assert [m["prompt"] for m in manifest] == [p for p in PROMPTS if p]
    assert all(m["status"] == "COMPLETED" for m in manifest)
    assert names == {"manifest.jsonl", *(f for m in manifest for f in m["files"])}
    assert len(names) == 5


def test_batch_refusals_name_the_lines_and_charge_nothing(
    server: ServerProcess, client: httpx.Client, page: Page
) -> None:
    key = server.make_key(credits=100)["key"]
    skip_unless_batches(client, key)
    open_batch_tab(page, server, key)
    page.fill("#batch-prompts", "\n".join(["fine", "", "a" * 1001, "also fine", "b" * 1001]))
    page.click("#batch-submit")
    error = page.locator("#batch-error")
    expect(error).to_contain_text("nothing was charged: 2 lines need fixing")
    expect(error).to_contain_text("Line 3: ")
    expect(error).to_contain_text("Line 5: ")
    expect(error).to_contain_text("1000 characters")
    expect(page.locator("#batch-grid .cell")).to_have_count(0)
    shot(page, "10-batch-refused")

    # More than the balance: refused whole, the server's numbers in the words.
    poor = server.make_key(credits=4)["key"]
    page.fill("#api-key", poor)
    page.fill("#batch-prompts", "one\ntwo")
    expect(page.locator("#batch-cost")).to_contain_text("more than the balance")
    page.click("#batch-submit")
    expect(error).to_contain_text("Not enough credits for the whole batch; nothing was charged")
    expect(error).to_contain_text("8")  # the credits needed, as the server says them
    expect(error).to_contain_text("402 insufficient_credits")
    expect(page.locator("#balance")).to_have_text("Balance: 4 credits")

    assert batches_of(client, key) == [] and batches_of(client, poor) == []
    assert account(client, key)["balance"] == 100 and account(client, poor)["balance"] == 4


def test_cancel_a_batch_from_the_page(
    server: ServerProcess, client: httpx.Client, page: Page
) -> None:
    key = server.make_key(credits=100)["key"]
    skip_unless_batches(client, key)
    open_batch_tab(page, server, key)
    page.fill("#batch-prompts", "slow one\nslow two\nslow three")
    page.select_option("#batch-size", "512*512")
    page.select_option("#batch-quality", "hd")  # 200 steps of 0.2 s: time to cancel
    page.click("#batch-submit")
    expect(page.locator("#batch-grid .cell[data-state='denoising']").first).to_be_visible(
        timeout=30_000
    )
    expect(page.locator("#balance")).to_have_text("Balance: 88 credits")
    shot(page, "11-batch-running")

    page.click("#batch-cancel")
    expect(page.locator("#batch-status")).to_contain_text("CANCELLED")
    expect(page.locator("#batch-grid .cell[data-state='cancelled']")).to_have_count(3)
    expect(page.locator("#batch-cancel")).to_be_disabled()
    expect(page.locator("#batch-credits")).to_contain_text("refunded 12")
    expect(page.locator("#balance")).to_have_text("Balance: 100 credits")
    [batch] = batches_of(client, key)
    assert batch["status"] == "CANCELLED"
    assert account(client, key)["balance"] == 100
