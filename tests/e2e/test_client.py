"""The users' Python client (`cogview_api.client`), sync and async, against a real `serve`
process (the test-echo engine: the model is not under test), through real sockets: results,
errors, the event stream and its polling fallback, and retries that never pay twice."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from cogview_api.client import (
    AsyncClient,
    AuthenticationError,
    BadRequest,
    Client,
    Conflict,
    GenerationRequest,
    InsufficientCredits,
    NotFound,
    Submitted,
    Task,
    TaskFailed,
)
from cogview_api.client import ConnectionError as ClientConnectionError
from cogview_api.client import TimeoutError as ClientTimeoutError
from tests.support import ServerProcess, auth, free_port, server_env

PRICE = 4
ECHO_ENV = {
    "COGVIEW_MODEL": "test-echo",
    # A few steps with a pause each, so a task is seen in progress.
    "COGVIEW_STEPS_HD": "4",
    "COGVIEW_STEPS_STANDARD": "2",
    "COGVIEW_TEST_ECHO_STEP_SECONDS": "0.05",
}
SMALL = {"size": "512*512", "quality": "standard"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("serve-client")
    with ServerProcess(workdir=workdir, env=server_env(tiny_cache, ECHO_ENV)).start() as proc:
        yield proc


def new_key(server: ServerProcess, credits: int = 100) -> dict[str, Any]:
    return server.make_key(credits=credits)


def ledger(server: ServerProcess, key: str) -> list[dict[str, Any]]:
    r = httpx.get(server.base_url + "/api/v1/ledger", headers=auth(key))
    entries: list[dict[str, Any]] = r.json()["data"]["entries"]
    return entries


def test_generate_get_list_download(server: ServerProcess, tmp_path: Path) -> None:
    key = new_key(server)["key"]
    with Client(server.base_url, key) as client:
        task = client.generate("a red fox in the snow", n=2, seed=7, **SMALL)
        assert task.ok and task.done and task.status == "COMPLETED"
        assert [(i.width, i.height, i.seed) for i in task.images] == [(512, 512, 7), (512, 512, 8)]
        assert task.credits.charged == 2 * PRICE and task.request.prompt == "a red fox in the snow"

        path = client.download(task.images[1], tmp_path / "sub" / "fox.png")
        with Image.open(path) as image:
            assert image.size == (512, 512)
        assert not list((tmp_path / "sub").glob(".*part"))

        assert client.get(task.task_id) == task
        listed = client.list_tasks(limit=1)
        assert [t.task_id for t in listed.tasks] == [task.task_id]
        assert [t.task_id for t in client.iter_tasks(status="completed")] == [task.task_id]
        account = client.account()
        assert account.balance == 100 - 2 * PRICE and account.images_generated == 2
        assert client.info().price("standard", 3) == 3 * PRICE


def test_watch_reports_progress_then_the_end(server: ServerProcess) -> None:
    key = new_key(server)["key"]
    with Client(server.base_url, key) as client:
        submitted = client.submit("a lighthouse", size="512*512", quality="hd")
        assert submitted.status == "IN_PROGRESS" and submitted.credits_charged == PRICE
        seen = list(client.watch(submitted.task_id, timeout=60))
    assert seen[-1].status == "COMPLETED" and seen[-1].images
    assert all(not t.done for t in seen[:-1])


def test_errors_are_one_tree(server: ServerProcess) -> None:
    key = new_key(server, credits=PRICE)["key"]
    with Client(server.base_url, key, max_retries=0) as client:
        with pytest.raises(BadRequest) as bad:
            client.submit("a cat", size="500*500")
        assert bad.value.status == 400 and bad.value.param == "size"
        assert bad.value.type == "invalid_request"
        with pytest.raises(NotFound):
            client.get("nope_cv4")
        with pytest.raises(InsufficientCredits) as poor:
            client.submit("a cat", n=2, **SMALL)
        assert poor.value.status == 402
        failed = client.submit("[echo:fail] a cat", **SMALL)
        with pytest.raises(TaskFailed) as ended:
            client.wait(failed.task_id, timeout=60, check=True)
        assert ended.value.task.status == "FAILED" and ended.value.task.credits.refunded == PRICE
        with pytest.raises(Conflict):
            client.cancel(failed.task_id)
    with Client(server.base_url, "cv4_not-a-key") as client, pytest.raises(AuthenticationError):
        client.account()
    with Client(f"http://127.0.0.1:{free_port()}", key, max_retries=1) as client:
        with pytest.raises(ClientConnectionError) as down:
            client.account()
        assert isinstance(down.value, ConnectionError)  # the builtin too


def test_wait_times_out_and_the_task_goes_on(server: ServerProcess) -> None:
    key = new_key(server)["key"]
    with Client(server.base_url, key) as client:
        # 4 hd steps of 0.05 s at least: not done in 0.01 s.
        submitted = client.submit("a slow one", size="512*512", quality="hd")
        with pytest.raises(ClientTimeoutError):
            client.wait(submitted.task_id, timeout=0.01)
        assert client.wait(submitted.task_id, timeout=60).ok


async def wait_async(base_url: str, key: str, http: httpx.AsyncClient) -> Task:
    async with http, AsyncClient(base_url, key, poll_interval=0.1, http_client=http) as client:
        submitted = await client.submit("polled", size="512*512", quality="hd")
        return await client.wait(submitted.task_id, timeout=60)


def test_wait_falls_back_to_polling_when_the_stream_fails(server: ServerProcess) -> None:
    key = new_key(server)["key"]
    proxy = Proxy(server.port, refuse_streams=True)
    limits = httpx.Limits(max_keepalive_connections=0)
    task = asyncio.run(
        wait_async(f"http://127.0.0.1:{proxy.port}", key, httpx.AsyncClient(limits=limits))
    )
    assert task.ok and proxy.refused == 1
    # One connection per request, so the proxy sees each request's path.
    http = httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
    try:
        with Client(
            f"http://127.0.0.1:{proxy.port}", key, poll_interval=0.1, http_client=http
        ) as c:
            submitted = c.submit("polled", size="512*512", quality="hd")
            task = c.wait(submitted.task_id, timeout=60)
            assert task.ok and task.images
            assert [b.status for b in c.watch(submitted.task_id)] == ["COMPLETED"]
        assert proxy.refused >= 1
    finally:
        http.close()
        proxy.close()


def test_idempotency_key_replays_the_same_task(server: ServerProcess) -> None:
    key = new_key(server)["key"]
    with Client(server.base_url, key) as client:
        first = client.submit("once", idempotency_key="order-42", **SMALL)
        again = client.submit("once", idempotency_key="order-42", **SMALL)
        assert again.task_id == first.task_id and again.replayed and not first.replayed
        assert client.account().balance == 100 - PRICE


class Proxy:
    """A TCP proxy in front of the server. `drop_first`: the first connection's request is
    forwarded and the connection closed as the answer starts to come back (the server did the
    work; the client never hears of it). `refuse_streams`: a request for an event stream gets
    502 Bad Gateway, as from a proxy that cannot stream. Anything else passes through."""

    def __init__(
        self, upstream_port: int, *, drop_first: bool = False, refuse_streams: bool = False
    ) -> None:
        self.upstream_port = upstream_port
        self.drop_first = drop_first
        self.refuse_streams = refuse_streams
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.refused = 0
        self.dropped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            drop = self.drop_first and self.connections == 1
            threading.Thread(target=self._serve, args=(client, drop), daemon=True).start()

    def _serve(self, client: socket.socket, drop: bool) -> None:
        head = b""
        while b"\r\n\r\n" not in head and (chunk := client.recv(65536)):
            head += chunk
        if self.refuse_streams and b"/events " in head.split(b"\r\n", 1)[0]:
            self.refused += 1
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        upstream.sendall(head)
        threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
        self._pipe(upstream, client, drop)

    def _pipe(self, source: socket.socket, sink: socket.socket, drop: bool = False) -> None:
        try:
            while data := source.recv(65536):
                if drop:
                    self.dropped.set()
                    break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()


async def submit_async(base_url: str, key: str) -> Submitted:
    async with AsyncClient(base_url, key) as client:
        return await client.submit("paid once", **SMALL)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_retry_after_a_lost_answer_never_pays_twice(server: ServerProcess, flavour: str) -> None:
    key = new_key(server)["key"]
    proxy = Proxy(server.port, drop_first=True)
    try:
        url = f"http://127.0.0.1:{proxy.port}"
        if flavour == "async":
            submitted = asyncio.run(submit_async(url, key))
        else:
            with Client(url, key) as client:
                submitted = client.submit("paid once", **SMALL)
        assert proxy.dropped.is_set() and proxy.connections == 2
        # The retry carried the first attempt's Idempotency-Key: the server answered it with the
        # task the lost answer was about.
        assert submitted.replayed
    finally:
        proxy.close()
    reserves = [e for e in ledger(server, key) if e["kind"] == "reserve"]
    assert [(e["task_id"], e["amount"]) for e in reserves] == [(submitted.task_id, -PRICE)]
    with Client(server.base_url, key) as client:
        assert [t.task_id for t in client.iter_tasks()] == [submitted.task_id]
        assert client.account().balance == 100 - PRICE


def test_async_client(server: ServerProcess, tmp_path: Path) -> None:
    key = new_key(server)["key"]

    async def scenario() -> None:
        async with AsyncClient(server.base_url, key) as client:
            tasks = await asyncio.gather(
                client.generate("one", **SMALL), client.generate("two", seed=3, **SMALL)
            )
            assert [t.status for t in tasks] == ["COMPLETED", "COMPLETED"]
            assert tasks[1].images[0].seed == 3
            path = await client.download(tasks[0].images[0], tmp_path / "one.png")
            with Image.open(path) as image:
                assert image.size == (512, 512)
            assert (await client.get(tasks[0].task_id)).task_id == tasks[0].task_id
            listed = [t.task_id async for t in client.iter_tasks()]
            assert sorted(listed) == sorted(t.task_id for t in tasks)
            assert (await client.account()).balance == 100 - 2 * PRICE
            waiting = await client.submit("to cancel", size="1024*1024", quality="hd")
            cancelled = await client.cancel(waiting.task_id)
            assert cancelled.status == "CANCELLED"
            assert cancelled.credits.refunded == PRICE
            with pytest.raises(TaskFailed):
                await client.wait(waiting.task_id, check=True)
            with pytest.raises(BadRequest):
                await client.submit("x", quality="ultra")

    asyncio.run(scenario())


def require_batches(server: ServerProcess, key: str) -> None:
    r = httpx.get(server.base_url + "/api/v1/batches", headers=auth(key))
    if r.status_code == 404:
        pytest.skip("the server has no batches API (/api/v1/batches answers 404)")


def test_batches(server: ServerProcess, tmp_path: Path) -> None:
    key = new_key(server)["key"]
    require_batches(server, key)
    with Client(server.base_url, key) as client:
        requests: list[Any] = [
            GenerationRequest(prompt="one", **SMALL),
            {"model": "cogview-4", "prompt": "two", "n": 2, **SMALL},
            "three",
        ]
        batch = client.create_batch(requests, metadata={"run": "t"}, idempotency_key="b-1")
        assert batch.status == "IN_PROGRESS" and batch.total == 3 and not batch.replayed
        assert batch.credits.charged == 4 * PRICE and batch.metadata == {"run": "t"}
        assert client.create_batch(requests, metadata={"run": "t"}, idempotency_key="b-1").replayed
        states = list(client.watch_batch(batch.batch_id, timeout=120))
        assert states[-1].done and states[-1].status == "COMPLETED"
        assert states[-1].counts.completed == 3 and states[-1].images.done == 4
        tasks = list(client.iter_batch_tasks(batch.batch_id))
        assert [(t.batch_index, t.batch_id, len(t.images)) for t in tasks] == [
            (0, batch.batch_id, 1),
            (1, batch.batch_id, 2),
            (2, batch.batch_id, 1),
        ]
        assert [b.batch_id for b in client.iter_batches()] == [batch.batch_id]
        assert client.get_batch(batch.batch_id).status == "COMPLETED"
        archive = client.download_archive(batch.batch_id, tmp_path / "b.zip")
        with zipfile.ZipFile(archive) as z:
            assert sorted(z.namelist()) == [
                "images/00000-0.png",
                "images/00001-0.png",
                "images/00001-1.png",
                "images/00002-0.png",
                "manifest.jsonl",
            ]
        with pytest.raises(Conflict):
            client.cancel_batch(batch.batch_id)
        with pytest.raises(BadRequest) as refused:
            client.create_batch(["fine", {"model": "cogview-4", "prompt": "x", "size": "1*1"}])
        assert [(e["index"], e["param"]) for e in refused.value.errors] == [(1, "size")]
        assert client.account().balance == 100 - 4 * PRICE

    async def cancel_one() -> None:
        async with AsyncClient(server.base_url, key) as client:
            big = [GenerationRequest(prompt=f"p{i}", size="1024*1024") for i in range(5)]
            made = await client.create_batch(big)
            cancelled = await client.cancel_batch(made.batch_id)
            assert cancelled.status == "CANCELLED"
            final = await client.wait_batch(made.batch_id, timeout=60)
            assert final.credits.charged - final.credits.refunded == (final.images.done * PRICE)
            listed = [t.status async for t in client.iter_batch_tasks(made.batch_id)]
            assert len(listed) == 5 and "CANCELLED" in listed

    asyncio.run(cancel_one())


DOCS = Path(__file__).parents[2] / "docs" / "client.md"


def examples() -> list[str]:
    blocks = DOCS.read_text().split("```python\n")[1:]
    return [block.split("```", 1)[0] for block in blocks]


@pytest.mark.parametrize("number", range(len(examples())))
def test_the_documented_examples_run(server: ServerProcess, tmp_path: Path, number: int) -> None:
    """docs/client.md's examples, each as its own program, with the two variables they read."""
    code = examples()[number]
    key = new_key(server)["key"]
    if "batch" in code:
        r = httpx.get(server.base_url + "/api/v1/batches", headers=auth(key))
        if r.status_code == 404:
            pytest.skip("the server has no batches API (/api/v1/batches answers 404)")
    env = {**server.env, "COGVIEW_SERVER": server.base_url, "COGVIEW_API_KEY": key}
    ran = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
