"""`cogview-api batch PROMPTS -o DIR`: a file of prompts to a folder of images, as one batch.

The folder remembers its batch in `.cogview-batch.json` (the batch id, and the Idempotency-Key
the submit used, derived from the requests and the folder), so running the same command again
after a crash or Ctrl-C follows the same batch and downloads only what is missing; a crash
between the submit and that file's write is covered by the key: the server answers the same
batch again, charged once."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cogview_api.client._errors import APIError, BadRequest, InsufficientCredits, NotFound
from cogview_api.client._models import Batch, Task
from cogview_api.client._sync import Client
from cogview_api.client.commands import (
    UsageError,
    _request_flags,
    _server_flag,
    client_for,
    plural,
)

STATE_FILE = ".cogview-batch.json"
MANIFEST = "manifest.jsonl"
CSV_COLUMNS = {
    "prompt": str,
    "negative_prompt": str,
    "size": str,
    "quality": str,
    "seed": int,
    "n": int,
    "output_format": str,
    "format": str,
    "user_id": str,
}
PAGE = 100


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "batch",
        help="make the images of a file of prompts (.txt, .csv, .jsonl) into a folder",
        description="Submit a file of prompts as one batch, show its cost and progress, save"
        " each image as it finishes, and write DIR/manifest.jsonl. Run it again to resume.",
    )
    p.add_argument(
        "input",
        help=".txt: one prompt a line; .csv: a `prompt` column (and size, quality, seed, n,"
        " negative_prompt, output_format); .jsonl: one request body a line",
    )
    p.add_argument("-o", "--output", required=True, help="the folder for the images")
    _request_flags(p, batch=True)
    p.add_argument("--yes", "-y", action="store_true", help="submit without asking")
    p.add_argument(
        "--dry-run", action="store_true", help="show the cost and the balance; submit nothing"
    )
    _server_flag(p)


@dataclass(frozen=True)
class Line:
    """One request of the input, and where it came from (for messages)."""

    where: str
    body: dict[str, Any]


def read_input(path: Path, defaults: dict[str, Any]) -> list[Line]:
    """The requests of a .txt, .csv or .jsonl file, with the command's flags as defaults."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    kind = path.suffix.lower()
    if kind not in (".txt", ".csv", ".jsonl"):
        raise UsageError(f"{path}: the input must be a .txt, .csv or .jsonl file")
    text = path.read_text(encoding="utf-8-sig")
    reader = {".txt": _txt, ".csv": _csv, ".jsonl": _jsonl}[kind]
    lines = [
        Line(where, {"model": "cogview-4", **defaults, **body})
        for where, body in reader(path.name, text)
    ]
    if not lines:
        raise UsageError(f"{path}: no prompts in it")
    return lines


def _txt(name: str, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, raw in enumerate(text.splitlines(), 1):
        prompt = raw.strip()
        if prompt and not prompt.startswith("#"):
            yield f"{name} line {number}", {"prompt": prompt}


def _csv(name: str, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in reader.fieldnames or []]
    unknown = [c for c in columns if c not in CSV_COLUMNS]
    if "prompt" not in columns:
        raise UsageError(f"{name}: the first row must name the columns, one of them `prompt`")
    if unknown:
        raise UsageError(f"{name}: unknown column {unknown[0]!r} (known: {', '.join(CSV_COLUMNS)})")
    for row in reader:
        where = f"{name} line {reader.line_num}"
        body: dict[str, Any] = {}
        for column, value in row.items():
            if column is None or value is None or not value.strip():
                continue
            kind = CSV_COLUMNS[column.strip()]
            key = "output_format" if column.strip() == "format" else column.strip()
            try:
                body[key] = kind(value.strip())
            except ValueError:
                raise UsageError(
                    f"{where}: {column} must be a whole number, not {value!r}"
                ) from None
        if "prompt" in body:
            yield where, body
        elif body:
            raise UsageError(f"{where}: no prompt")


def _jsonl(name: str, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"{name} line {number}: not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise UsageError(f"{name} line {number}: not a JSON object")
        yield f"{name} line {number}", body


def fingerprint(lines: list[Line]) -> str:
    """The requests' SHA-256, key order and whitespace aside."""
    canonical = json.dumps([line.body for line in lines], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def idempotency_key(requests_hash: str, folder: Path) -> str:
    """The same requests into the same folder: the same key, so the server answers the batch it
    already made (within its 24 h); another folder: another batch."""
    mixed = hashlib.sha256(f"{requests_hash}\n{folder.resolve()}".encode()).hexdigest()
    return f"cogview-cli-batch-{mixed[:48]}"


@dataclass
class State:
    path: Path
    requests: str
    key: str
    batch_id: str | None = None

    @classmethod
    def load(cls, folder: Path) -> State | None:
        path = folder / STATE_FILE
        try:
            data = json.loads(path.read_text())
            return cls(path, data["requests_sha256"], data["idempotency_key"], data["batch_id"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"{path} is damaged; delete it to start a new batch") from None

    def save(self, server: str) -> None:
        data = {
            "batch_id": self.batch_id,
            "idempotency_key": self.key,
            "requests_sha256": self.requests,
            "server": server,
        }
        _write_atomic(self.path, json.dumps(data, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.part")
    partial.write_text(text)
    os.replace(partial, path)


def run(args: argparse.Namespace, err: Console) -> int:
    defaults = {
        k: v
        for k, v in (
            ("size", args.size),
            ("quality", args.quality),
            ("n", args.n),
            ("output_format", args.format),
        )
        if v is not None
    }
    lines = read_input(Path(args.input), defaults)
    folder = Path(args.output)
    requests = fingerprint(lines)
    state = State.load(folder)
    if state is not None and state.requests != requests:
        raise UsageError(
            f"{folder} belongs to another batch{f' ({state.batch_id})' if state.batch_id else ''},"
            f" of other prompts; use another -o folder, or delete {folder / STATE_FILE} to start"
            " anew there"
        )
    with client_for(args) as client:
        if state is None or state.batch_id is None:
            batch = _submit(client, args, lines, folder, state, requests, err)
            if batch is None:
                return 0
        else:
            try:
                batch = client.get_batch(state.batch_id)
            except NotFound:
                raise UsageError(
                    f"the server at {client.base_url} does not know batch {state.batch_id} of"
                    f" {folder} (another server, or another key?); delete {folder / STATE_FILE}"
                    " to submit these prompts anew"
                ) from None
            err.print(
                f"Resuming batch {batch.batch_id} ({batch.counts.ended} of {batch.total} done);"
                " nothing is charged again.",
                markup=False,
            )
        return _follow(client, batch, lines, folder, err)


def _submit(
    client: Client,
    args: argparse.Namespace,
    lines: list[Line],
    folder: Path,
    state: State | None,
    requests: str,
    err: Console,
) -> Batch | None:
    """Show the cost, ask, submit; None when nothing was submitted (--dry-run, or "no")."""
    info = client.info()
    images = sum(int(line.body.get("n", 1)) for line in lines)
    try:
        cost = sum(info.price(line.body.get("quality"), line.body.get("n")) for line in lines)
    except KeyError as exc:
        raise UsageError(f"unknown quality {exc.args[0]!r}: hd or standard") from None
    balance = client.account().balance
    err.print(
        f"{plural(len(lines), 'prompt')}, {plural(images, 'image')}: {cost} credits."
        f" Your balance: {balance} credits ({balance - cost} after).",
        markup=False,
    )
    if args.dry_run:
        err.print("Dry run: nothing was submitted and nothing was charged.", markup=False)
        return None
    # Above the balance, the server refuses it (402, nothing charged) unless it already has this
    # batch (a crash before its id was saved): so it is sent without asking, and the server says.
    short = cost > balance
    resumed = state is not None  # a run that saved its key but not the batch id: confirmed then
    if not (args.yes or resumed or short) and not _confirm(
        f"Submit {len(lines)} prompts for {cost} credits?"
    ):
        err.print("Nothing submitted.", markup=False)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = State(folder / STATE_FILE, requests, idempotency_key(requests, folder))
        state.save(client.base_url)
    try:
        batch = client.create_batch([line.body for line in lines], idempotency_key=state.key)
    except APIError as exc:
        if exc.status < 500:
            # Refused: nothing was written, so the folder is free again for a corrected input.
            state.path.unlink(missing_ok=True)
        if isinstance(exc, BadRequest):
            raise UsageError(_bad_lines(exc, lines)) from None
        if isinstance(exc, InsufficientCredits):
            raise UsageError(
                f"not enough credits: this batch needs {cost}, the key has {balance}"
            ) from None
        if isinstance(exc, NotFound):
            raise UsageError(
                f"the server at {client.base_url} has no batches API (POST /api/v1/batches"
                " answered 404): it runs an older cogview-api"
            ) from None
        raise
    state.batch_id = batch.batch_id
    state.save(client.base_url)
    if batch.replayed:
        err.print(
            f"The server already had this batch ({batch.batch_id}): following it, nothing"
            " charged again.",
            markup=False,
        )
    else:
        err.print(
            f"Submitted batch {batch.batch_id}: {batch.credits.charged} credits.", markup=False
        )
    return batch


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise UsageError("add --yes to submit without being asked (stdin is not a terminal)")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _bad_lines(exc: BadRequest, lines: list[Line]) -> str:
    """A refused batch's errors, by the input's own line numbers."""
    if not exc.errors:
        return f"the server refused the batch: {exc.message}"
    shown = [
        f"  {lines[e['index']].where if 0 <= e.get('index', -1) < len(lines) else '?'}"
        f" ({e.get('param')}): {e.get('message')}"
        for e in exc.errors[:20]
    ]
    more = f"\n  ... and {len(exc.errors) - 20} more" if len(exc.errors) > 20 else ""
    return (
        f"the server refused the batch ({len(exc.errors)} bad lines), nothing was charged:\n"
        + "\n".join(shown)
        + more
    )


@dataclass
class Collector:
    """The batch's ended tasks, read page by page: pages whose every task had ended are not
    read again (their next page's cursor is kept), so following a batch of 10,000 costs about
    one page per change, not the whole list."""

    batch_id: str
    folder: Path
    ended: dict[int, Task] = field(default_factory=dict)
    settled_cursor: str | None = None

    def scan(self, client: Client) -> int:
        """Read the unsettled pages; download each new COMPLETED task's images. Returns how
        many images this scan saved."""
        saved = 0
        cursor, settled = self.settled_cursor, True
        while True:
            page = client.batch_tasks(self.batch_id, limit=PAGE, cursor=cursor)
            for task in page.tasks:
                index = task.batch_index if task.batch_index is not None else -1
                if task.done and index not in self.ended:
                    saved += self.save(client, task)
                    self.ended[index] = task
            full = len(page.tasks) == PAGE and all(t.done for t in page.tasks)
            if settled and full and page.next_cursor:
                self.settled_cursor = page.next_cursor
            else:
                settled = False
            if not page.has_more or not page.next_cursor:
                return saved
            cursor = page.next_cursor

    def save(self, client: Client, task: Task) -> int:
        saved = 0
        for name, image in zip(self.files(task), task.images, strict=True):
            path = self.folder / name
            if not path.exists():
                client.download(image, path)
                saved += 1
        return saved

    @staticmethod
    def files(task: Task) -> list[str]:
        """The archive's own names: `{index:05d}-{k}.{ext}`."""
        return [f"{task.batch_index:05d}-{k}.{image.format}" for k, image in enumerate(task.images)]

    def manifest(self, lines: list[Line]) -> None:
        rows = []
        for index, task in sorted(self.ended.items()):
            rows.append(
                {
                    "index": index,
                    "task_id": task.task_id,
                    "status": task.status,
                    "prompt": task.request.prompt,
                    "size": task.request.size,
                    "seed": task.images[0].seed if task.images else None,
                    "files": self.files(task),
                    "error": task.error.model_dump() if task.error else None,
                    "line": lines[index].where if 0 <= index < len(lines) else None,
                }
            )
        _write_atomic(self.folder / MANIFEST, "".join(json.dumps(r) + "\n" for r in rows))


def _follow(client: Client, batch: Batch, lines: list[Line], folder: Path, err: Console) -> int:
    collector = Collector(batch.batch_id, folder)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=err) as bar:
            line = bar.add_task("prompts", total=batch.total, counts="")
            seen = -1
            for current in client.watch_batch(batch.batch_id):
                batch, counts = current, current.counts
                bar.update(line, completed=counts.ended, counts=bar_counts(batch))
                if counts.ended != seen or batch.done:
                    if not err.is_terminal and _decile(counts.ended, batch) > _decile(seen, batch):
                        # No live bar without a terminal (a log, CI): a line every tenth.
                        err.print(f"{counts.ended}/{batch.total} ended: {bar_counts(batch)}")
                    seen = counts.ended
                    collector.scan(client)
        collector.scan(client)
        collector.manifest(lines)
    except KeyboardInterrupt:
        collector.manifest(lines)
        err.print(
            f"\nStopped. Batch {batch.batch_id} goes on on the server: run the same command"
            " again to save the rest (nothing is charged twice).",
            markup=False,
        )
        return 130
    return _summary(collector, batch, lines, folder, err)


def bar_counts(batch: Batch) -> str:
    c = batch.counts
    return f"{c.completed} done, {c.failed} failed, {c.running} running, {c.queued} queued"


def _decile(ended: int, batch: Batch) -> int:
    return -1 if ended < 0 else ended * 10 // max(batch.total, 1)


def _summary(
    collector: Collector, batch: Batch, lines: list[Line], folder: Path, err: Console
) -> int:
    failed = [t for _, t in sorted(collector.ended.items()) if not t.ok]
    files = sum(len(collector.files(t)) for t in collector.ended.values())
    where = f"{folder} (manifest: {folder / MANIFEST})"
    if not failed:
        err.print(
            f"Done: {files} images from {batch.total} prompts in {where}. Batch {batch.batch_id},"
            f" {batch.credits.charged - batch.credits.refunded} credits.",
            markup=False,
        )
        return 0
    err.print(
        f"{len(failed)} of {batch.total} prompts made no image (their credits were refunded);"
        f" {files} images are in {where}:",
        markup=False,
    )
    for task in failed[:20]:
        index = task.batch_index if task.batch_index is not None else -1
        source = lines[index].where if 0 <= index < len(lines) else task.task_id
        why = task.error.message if task.error else task.status
        err.print(f"  {source}: {task.status}: {why}", markup=False)
    if len(failed) > 20:
        err.print(f"  ... and {len(failed) - 20} more (see the manifest)", markup=False)
    return 1
