"""`cogview-api generate` and `cogview-api batch`: the users' commands, talking to a server over
HTTP with the client of this package (nothing of the server is imported). Progress goes to
stderr, the saved files' paths to stdout."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from cogview_api.client import _base as base
from cogview_api.client._errors import APIError, AuthenticationError, CogviewError, Conflict
from cogview_api.client._models import Task
from cogview_api.client._sync import Client

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
NO_KEY = (
    f"no API key: set {base.API_KEY_ENV}=cv4_... (the server's operator makes one with"
    " `cogview-api keys create --name NAME --credits 100`)"
)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class UsageError(Exception):
    """A mistake in the command's input: printed as one sentence, exit status 2."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    generate = sub.add_parser(
        "generate",
        help="make images on a server and save them (key from COGVIEW_API_KEY)",
        description="Submit one prompt to a cogview-api server, wait for it, save the images.",
    )
    generate.add_argument("prompt", help="what to draw (at most 1000 characters)")
    _request_flags(generate)
    generate.add_argument(
        "-o",
        "--output",
        help="file to save to (default: TASK_ID.png); with -n 2 or more: OUT-1.png, OUT-2.png ...",
    )
    generate.add_argument("--negative-prompt", help="what not to draw")
    generate.add_argument(
        "--timeout", type=float, help="seconds to wait for the image (default: no limit)"
    )
    _server_flag(generate)

    from cogview_api.client import batch_command

    batch_command.add_parser(sub)


def _request_flags(p: argparse.ArgumentParser, *, batch: bool = False) -> None:
    """The request's fields; for `batch`, the defaults of the lines that do not set them."""
    p.add_argument("--size", help="W*H, e.g. 1024*1024 (the default) or 512*512")
    p.add_argument("--quality", choices=["hd", "standard"], help="hd (default) or standard")
    p.add_argument("-n", type=int, help="images per prompt, 1..4 (default 1)")
    if batch:  # one seed for every line would draw the same image for the same prompt
        p.add_argument("--format", choices=["png", "jpeg", "webp"], help="default: png")
        return
    p.add_argument("--seed", type=int, help="0..4294967295; the same seed draws the same image")
    p.add_argument(
        "--format", choices=["png", "jpeg", "webp"], help="default: from -o's extension, else png"
    )


def _server_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        help=f"the server's address (default: ${base.SERVER_ENV}, else {base.DEFAULT_SERVER})",
    )


def client_for(args: argparse.Namespace) -> Client:
    key = base.default_key(None)
    if key is None:
        raise UsageError(NO_KEY)
    return Client(args.server, key)


def output_format(args: argparse.Namespace) -> str | None:
    """--format, else what -o's extension says, else None (the server's default, png)."""
    out = getattr(args, "output", None)
    implied = FORMATS.get(Path(out).suffix.lower()) if out else None
    if args.format and implied and args.format != implied:
        raise UsageError(f"--format {args.format} does not match the file name {out}")
    return str(args.format or implied) if (args.format or implied) else None


def image_paths(output: str | None, task: Task) -> list[Path]:
    """Where each image of the task goes: OUT, or OUT-1, OUT-2 ... for several."""
    ext = EXTENSIONS.get(task.images[0].format, f".{task.images[0].format}")
    out = Path(output) if output else Path(task.task_id + ext)
    if out.suffix.lower() not in FORMATS:
        out = out.with_name(out.name + ext)
    if len(task.images) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, len(task.images) + 1)]


def run(args: argparse.Namespace) -> int:
    """Run `generate` or `batch`; a mistake or an error of the server is one line on stderr."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if args.command == "generate":
            return generate(args, err)
        from cogview_api.client import batch_command

        return batch_command.run(args, err)
    except UsageError as exc:
        err.print(f"cogview-api {args.command}: {exc}", markup=False)
        return 2
    except AuthenticationError:
        err.print(
            f"cogview-api {args.command}: the server at {args.server or base.default_server(None)}"
            f" does not know the key in {base.API_KEY_ENV} (check the key, and the server's"
            " address)",
            markup=False,
        )
        return 1
    except APIError as exc:
        # The server's own sentence; the status only where it is the server's fault.
        shown = f"{exc.status} {exc.message}" if exc.status >= 500 else exc.message
        err.print(f"cogview-api {args.command}: {shown}", markup=False)
        return 1
    except CogviewError as exc:
        err.print(f"cogview-api {args.command}: {exc}", markup=False)
        return 1
    except KeyboardInterrupt:  # before anything was submitted (the commands handle it after)
        err.print(f"cogview-api {args.command}: stopped.", markup=False)
        return 130


def generate(args: argparse.Namespace, err: Console) -> int:
    if args.n is not None and not 1 <= args.n <= 4:
        raise UsageError("-n must be 1 to 4")
    fmt = output_format(args)
    with client_for(args) as client:
        submitted = client.submit(
            args.prompt,
            size=args.size,
            quality=args.quality,
            seed=args.seed,
            n=args.n,
            output_format=fmt,
            negative_prompt=args.negative_prompt,
        )
        try:
            err.print(
                f"Submitted task {submitted.task_id} ({submitted.credits_charged} credits)",
                markup=False,
            )
            task = _follow(client, submitted.task_id, args.timeout, err)
        except KeyboardInterrupt:
            try:
                cancelled = client.cancel(submitted.task_id)
            except Conflict:  # it ended meanwhile
                ended = client.get(submitted.task_id)
                err.print(f"Task {ended.task_id} had already ended {ended.status}.", markup=False)
                return 130
            err.print(
                f"Cancelled task {cancelled.task_id}; its {cancelled.credits.refunded} credits"
                " were refunded.",
                markup=False,
            )
            return 130
        if not task.ok:
            why = task.error.message if task.error else "no reason given"
            err.print(
                f"Task {task.task_id} ended {task.status}: {why} (its {task.credits.refunded}"
                " credits were refunded)",
                markup=False,
            )
            return 1
        for image, path in zip(task.images, image_paths(args.output, task), strict=True):
            client.download(image, path)
            print(path)
        seeds = ", ".join(str(image.seed) for image in task.images)
        err.print(f"Saved {len(task.images)} image(s); seed {seeds}", markup=False)
    return 0


def _follow(client: Client, task_id: str, timeout: float | None, err: Console) -> Task:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    task: Task | None = None
    with Progress(*columns, console=err, transient=True) as bar:
        line = bar.add_task("queued", total=100)
        for task in client.watch(task_id, timeout=timeout):
            stage = task.progress.stage
            if stage == "queued" and task.progress.queue_position:
                stage = f"queued (position {task.progress.queue_position})"
            bar.update(line, completed=task.progress.percent, description=stage)
    assert task is not None
    return task
