"""The users' commands, `cogview-api generate` and `cogview-api batch`, as subprocesses against a
real `cogview-api serve` (the test-echo engine: the model is not under test, the files are): the
files they write, what they charge, and a batch resumed after a crash without a second charge."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.support import CLI, ServerProcess, auth, server_env

PRICE = 4
PROMPTS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("serve-users")
    env = server_env(tiny_cache, {"COGVIEW_MODEL": "test-echo"})
    with ServerProcess(workdir=workdir, env=env).start() as proc:
        yield proc


def user_env(server: ServerProcess, key: str | None) -> dict[str, str]:
    env = {k: v for k, v in server.env.items() if k != "COGVIEW_API_KEY"}
    env["COGVIEW_SERVER"] = server.base_url
    if key is not None:
        env["COGVIEW_API_KEY"] = key
    return env


def run(
    server: ServerProcess, key: str | None, cwd: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=user_env(server, key),
        capture_output=True,
        text=True,
        timeout=300,
    )


def balance(server: ServerProcess, key: str) -> int:
    r = httpx.get(server.base_url + "/api/v1/account", headers=auth(key))
    return int(r.json()["data"]["balance"])


def reserves(server: ServerProcess, key: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        r = httpx.get(server.base_url + "/api/v1/ledger", params=params, headers=auth(key))
        page = r.json()["data"]
        entries += page["entries"]
        if not page["has_more"]:
            return [e for e in entries if e["kind"] == "reserve"]
        cursor = page["next_cursor"]


def test_generate_saves_each_image(server: ServerProcess, tmp_path: Path) -> None:
    key = server.make_key(credits=100)["key"]
    done = run(
        server,
        key,
        tmp_path,
        *("generate", "a red fox in the snow", "--size", "512*512", "--quality", "standard"),
        *("-n", "2", "--seed", "5", "-o", "fox.png"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fox-1.png", "fox-2.png"]
    assert "Submitted task" in done.stderr and "seed 5, 6" in done.stderr
    for name in ("fox-1.png", "fox-2.png"):
        with Image.open(tmp_path / name) as image:
            assert (image.format, image.size) == ("PNG", (512, 512))

    # The format follows the file name.
    jpeg = run(server, key, tmp_path, "generate", "a fox", "--size", "512*512", "-o", "fox.jpg")
    assert jpeg.returncode == 0, jpeg.stderr
    with Image.open(tmp_path / "fox.jpg") as image:
        assert image.format == "JPEG"
    assert balance(server, key) == 100 - 3 * PRICE

    clash = run(server, key, tmp_path, "generate", "a fox", "--format", "png", "-o", "fox.webp")
    assert clash.returncode == 2 and "does not match" in clash.stderr
    bad = run(server, key, tmp_path, "generate", "a fox", "--size", "500*500")
    assert bad.returncode == 1 and "size" in bad.stderr and "Traceback" not in bad.stderr
    wrong = run(server, "cv4_unknown", tmp_path, "generate", "a fox")
    assert wrong.returncode == 1 and "does not know the key in COGVIEW_API_KEY" in wrong.stderr
    no_key = run(server, None, tmp_path, "generate", "a fox")
    assert no_key.returncode == 2 and "COGVIEW_API_KEY" in no_key.stderr
    assert balance(server, key) == 100 - 3 * PRICE


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def slow_server(tmp_path: Path, tiny_cache: Path) -> Iterator[ServerProcess]:
    """The echo engine at 1 s a step for 8 steps: a generation that a Ctrl-C sent right after
    the submit always interrupts (at 1-2 steps of no pause it may finish first)."""
    slow = {
        "COGVIEW_MODEL": "test-echo",
        "COGVIEW_TEST_ECHO_STEP_SECONDS": "1",
        "COGVIEW_STEPS_HD": "8",
        "COGVIEW_STEPS_STANDARD": "8",
    }
    workdir = tmp_path / "serve-slow"
    workdir.mkdir()
    with ServerProcess(workdir=workdir, env=server_env(tiny_cache, slow)).start() as proc:
        yield proc


def test_ctrl_c_while_generating_cancels_and_refunds(
    slow_server: ServerProcess, tmp_path: Path
) -> None:
    server = slow_server
    key = server.make_key(credits=100)["key"]
    waiting = subprocess.Popen(
        [*CLI, "generate", "a large slow one", "--size", "1024*1024", "-o", "big.png"],
        cwd=tmp_path,
        env=user_env(server, key),
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a test run started in the background (`cmd &` in a script) has
        # SIGINT ignored, which its children inherit, and Python then never raises on Ctrl-C.
        preexec_fn=_sigint_default,
    )
    assert waiting.stderr is not None
    submitted = waiting.stderr.readline()
    assert submitted.startswith("Submitted task"), submitted
    waiting.send_signal(signal.SIGINT)
    rest = waiting.stderr.read()
    waiting.stderr.close()
    assert waiting.wait(timeout=60) == 130
    assert f"its {PRICE} credits were refunded" in rest
    assert balance(server, key) == 100 and not (tmp_path / "big.png").exists()


def write_csv(path: Path, count: int = PROMPTS) -> Path:
    rows = ["prompt,size,quality"] + [
        f'"a lighthouse, variant {i}",512*512,standard' for i in range(count)
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_batch_dry_run_charges_nothing(server: ServerProcess, tmp_path: Path) -> None:
    key = server.make_key(credits=100)["key"]
    prompts = write_csv(tmp_path / "prompts.csv")
    dry = run(server, key, tmp_path, "batch", str(prompts), "-o", "out", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"{PROMPTS} prompts, {PROMPTS} images: {PROMPTS * PRICE} credits" in dry.stderr
    assert "balance: 100 credits" in dry.stderr and "nothing was charged" in dry.stderr
    assert balance(server, key) == 100 and reserves(server, key) == []
    assert not (tmp_path / "out").exists()

    # Without --yes and no terminal to ask on, it says how, and submits nothing.
    asked = run(server, key, tmp_path, "batch", str(prompts), "-o", "out")
    assert asked.returncode == 2 and "--yes" in asked.stderr
    poor = run(server, key, tmp_path, "batch", str(prompts), "-o", "out", "-n", "3", "--yes")
    assert poor.returncode == 2 and "needs 144, the key has 100" in poor.stderr
    bad_column = tmp_path / "typo.csv"
    bad_column.write_text("prompt,qualty\na cat,hd\n")
    typo = run(server, key, tmp_path, "batch", str(bad_column), "-o", "out", "--dry-run")
    assert typo.returncode == 2 and "unknown column 'qualty'" in typo.stderr
    assert balance(server, key) == 100


def require_batches(server: ServerProcess, key: str) -> None:
    r = httpx.get(server.base_url + "/api/v1/batches", headers=auth(key))
    if r.status_code == 404:
        pytest.skip("the server has no batches API (/api/v1/batches answers 404)")


def manifest(folder: Path) -> list[dict[str, Any]]:
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def check_folder(folder: Path) -> list[dict[str, Any]]:
    rows = manifest(folder)
    assert [r["index"] for r in rows] == list(range(PROMPTS))
    assert all(r["status"] == "COMPLETED" and r["error"] is None for r in rows)
    assert [r["prompt"] for r in rows] == [f"a lighthouse, variant {i}" for i in range(PROMPTS)]
    for r in rows:
        assert r["files"] == [f"{r['index']:05d}-0.png"]
        with Image.open(folder / r["files"][0]) as image:
            assert image.size == (512, 512)
    assert sorted(p.name for p in folder.glob("*.png")) == [r["files"][0] for r in rows]
    return rows


def test_batch_resumes_after_a_crash_without_paying_twice(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A 12-line CSV: killed once its batch is submitted and the first image saved, then run
    again: the same batch, 12 images and the manifest, charged once."""
    # Less than two batches' worth: the replay below must not be refused for the balance.
    credits = PROMPTS * PRICE + 12
    key = server.make_key(credits=credits)["key"]
    require_batches(server, key)
    prompts = write_csv(tmp_path / "prompts.csv")
    folder = tmp_path / "out"
    state = folder / ".cogview-batch.json"
    first = subprocess.Popen(
        [*CLI, "batch", str(prompts), "-o", "out", "--yes"],
        cwd=tmp_path,
        env=user_env(server, key),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Killed (SIGKILL, no cleanup) once the batch is submitted and its first image is saved.
    deadline = time.monotonic() + 240
    while not (state.exists() and json.loads(state.read_text())["batch_id"]) or not list(
        folder.glob("*.png")
    ):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    batch_id = json.loads(state.read_text())["batch_id"]
    assert balance(server, key) == credits - PROMPTS * PRICE

    again = run(server, key, tmp_path, "batch", str(prompts), "-o", "out", "--yes")
    assert again.returncode == 0, again.stderr
    assert f"Resuming batch {batch_id}" in again.stderr
    assert f"Done: {PROMPTS} images from {PROMPTS} prompts" in again.stderr
    check_folder(folder)
    assert balance(server, key) == credits - PROMPTS * PRICE

    # A crash between the submit and the state file's write: the Idempotency-Key, derived from
    # the prompts and the folder, gets the same batch back, charged once.
    state.unlink()
    replay = run(server, key, tmp_path, "batch", str(prompts), "-o", "out", "--yes")
    assert replay.returncode == 0, replay.stderr
    assert f"already had this batch ({batch_id})" in replay.stderr
    assert json.loads(state.read_text())["batch_id"] == batch_id
    assert balance(server, key) == credits - PROMPTS * PRICE
    assert sum(-e["amount"] for e in reserves(server, key)) == PROMPTS * PRICE

    # Other prompts into the same folder are refused, not mixed in.
    other = write_csv(tmp_path / "other.csv", count=3)
    mixed = run(server, key, tmp_path, "batch", str(other), "-o", "out", "--yes")
    assert mixed.returncode == 2 and "another batch" in mixed.stderr


def test_a_refused_batch_names_its_bad_lines(server: ServerProcess, tmp_path: Path) -> None:
    key = server.make_key(credits=100)["key"]
    require_batches(server, key)
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,size\na cat,512*512\na dog,500*500\n")
    refused = run(server, key, tmp_path, "batch", str(bad), "-o", "out", "--yes")
    assert refused.returncode == 2
    assert "bad.csv line 3 (size)" in refused.stderr and "nothing was charged" in refused.stderr
    assert balance(server, key) == 100
    # The folder is not tied to the refused batch: the corrected file goes into it.
    bad.write_text("prompt,size\na cat,512*512\na dog,512*512\n")
    dry = run(server, key, tmp_path, "batch", str(bad), "-o", "out", "--dry-run")
    assert dry.returncode == 0, dry.stderr
