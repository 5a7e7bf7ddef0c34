"""The `cogview-api` command: thin, parses flags and calls services."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from cogview_api import __version__
from cogview_api.client import commands as user_commands
from cogview_api.config import Settings
from cogview_api.errors import CogviewError, EngineLoadError, StartError

# The operator's commands import the services and the database where they use them, so the
# users' commands (generate, batch), which need neither, start without SQLAlchemy and Alembic
# (about a second less on a small machine).
if TYPE_CHECKING:
    from cogview_api.services.limits import KeyLimits
    from cogview_api.store.db import Database


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cogview-api", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="API + try-it page + in-process worker(s)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help="hub id or folder of CogView4-6B weights, or 'tiny'")
    serve.add_argument("--workers", type=int, help="in-process workers; 0 = API only")
    serve.add_argument(
        "--http-processes",
        type=int,
        help="HTTP processes sharing the port (default 1); the workers stay in this one",
    )
    serve.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    serve.add_argument(
        "--metrics-port", type=int, help="serve /metrics on this port instead of the API's"
    )

    worker = sub.add_parser("worker", help="a worker process taking tasks from the database")
    worker.add_argument("--model")
    worker.add_argument("--device")
    worker.add_argument(
        "--metrics-port", type=int, help="serve this worker's Prometheus metrics on this port"
    )

    sub.add_parser("migrate", help="bring the database schema up to date")

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create a key; prints it once")
    create.add_argument("--name", required=True)
    create.add_argument("--credits", type=int, default=0, help="starting balance (default 0)")
    create.add_argument("--json", action="store_true")
    lst = keys.add_parser("list", help="list keys")
    lst.add_argument("--json", action="store_true")
    revoke = keys.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    rotate = keys.add_parser(
        "rotate-webhook-secret", help="a new webhook signing secret for a key; prints it once"
    )
    rotate.add_argument("key_id")
    rotate.add_argument("--json", action="store_true")

    limits = keys.add_parser(
        "limits",
        help="show a key's limits; with options, give it its own (--reset: the settings' again)",
    )
    limits.add_argument("key_id")
    limits.add_argument("--rate", type=float, help="submits per second; 0 = no rate limit")
    limits.add_argument("--burst", type=int, help="submits at once after a quiet spell")
    limits.add_argument("--max-waiting", type=int, help="tasks waiting at once")
    limits.add_argument("--max-streams", type=int, help="event streams open at once")
    limits.add_argument("--max-waits", type=int, help="Prefer: wait submits waiting at once")
    limits.add_argument("--reset", action="store_true", help="drop the key's own limits")
    limits.add_argument("--json", action="store_true")

    follow = keys.add_parser(
        "follow-limits",
        help="show a key's caps on open event streams and Prefer: wait; with options, set them"
        " (the same as `keys limits --max-streams/--max-waits`)",
    )
    follow.add_argument("key_id")
    follow.add_argument("--max-streams", type=int, help="event streams open at once")
    follow.add_argument("--max-waits", type=int, help="Prefer: wait submits waiting at once")
    follow.add_argument("--reset", action="store_true", help="the settings' defaults again")
    credits = sub.add_parser("credits", help="credit ledger").add_subparsers(
        dest="credits_command", required=True
    )
    grant = credits.add_parser("grant", help="add (or, negative, remove) credits")
    grant.add_argument("key_id")
    grant.add_argument("amount", type=int)
    grant.add_argument("--note")
    # The users' commands, which talk to a server over HTTP (client/commands.py).
    user_commands.add_parsers(sub)
    return p


# Key ids are "key_" and 16 characters (store/keys.py); the header lines up with them.
ID_WIDTH = 20


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("host", "port", "model", "workers", "device", "http_processes", "metrics_port")
        if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def _db(settings: Settings) -> Database:
    from cogview_api.store.db import Database

    db = Database(settings.database_url)
    db.migrate()
    return db


def _actor() -> str:
    """Who the audit log says acted: `cli:` and the OS user running the command."""
    try:
        return f"cli:{getpass.getuser()}"[:64]
    except (KeyError, OSError):  # no user name for this uid (some containers)
        return "cli"


def _key_dict(key: Any) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "balance": key.balance,
        "created_at": key.created_at.isoformat(),
        "revoked": key.revoked_at is not None,
    }


def _key_limits(args: argparse.Namespace, settings: Settings, db: Database) -> KeyLimits:
    from cogview_api.services import limits as limit_service

    values = (args.rate, args.burst, args.max_waiting, args.max_streams, args.max_waits)
    if args.reset or any(v is not None for v in values):
        return limit_service.set_key_limits(
            db,
            settings,
            args.key_id,
            submit_rate=args.rate,
            submit_burst=args.burst,
            max_waiting=args.max_waiting,
            max_streams=args.max_streams,
            max_waits=args.max_waits,
            reset=args.reset,
            actor=_actor(),
        )
    return limit_service.key_limits(db, settings, args.key_id)


FOLLOW_CAPS = frozenset({"max_streams", "max_waits"})


def _follow_limits(args: argparse.Namespace, settings: Settings, db: Database) -> KeyLimits:
    """`keys follow-limits`, the older command for the two caps: `--reset` drops only those
    (and may come with a new value for one of them, the other then back to the settings')."""
    from cogview_api.services import limits as limit_service

    given = {
        name
        for name, value in (("max_streams", args.max_streams), ("max_waits", args.max_waits))
        if value is not None
    }
    if not args.reset and not given:
        return limit_service.key_limits(db, settings, args.key_id)
    return limit_service.set_key_limits(
        db,
        settings,
        args.key_id,
        max_streams=args.max_streams,
        max_waits=args.max_waits,
        reset=FOLLOW_CAPS - given if args.reset else False,
        actor=_actor(),
    )


def _print_limits(limits: KeyLimits, *, as_json: bool) -> None:
    values = {
        "submit_rate": limits.submit_rate,
        "submit_burst": limits.submit_burst,
        "max_waiting": limits.max_waiting,
        "max_streams": limits.max_streams,
        "max_waits": limits.max_waits,
    }
    if as_json:
        print(json.dumps({"id": limits.key_id, **values, "own": sorted(limits.own)}))
        return
    print(f"limits of {limits.key_id} (own: the key's; default: the settings'):")
    for name, value in values.items():
        shown = "no limit" if name == "submit_rate" and value == 0 else f"{value:g}"
        origin = "own" if name in limits.own else "default"
        print(f"  {name:13s} {shown:>12s}  {origin}")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; an unknown flag is reported with the usage of the command it was given
    to (`serve --bad-flag` shows serve's flags), not the top level's."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _command_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The innermost parser of the command `args` names (`keys create`'s, `serve`'s)."""
    for dest in ("command", "keys_command", "credits_command"):
        name = getattr(args, dest, None)
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if name is None or not subs:
            break
        parser = subs[0].choices[name]
    return parser


# Commands of the server's users: no settings, no database, only a server's address and a key.
USER_COMMANDS = frozenset({"generate", "batch"})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.command in USER_COMMANDS:
        return user_commands.run(args)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["loc"]:
            print(f"cogview-api: invalid setting {err['loc'][0]}: {err['msg']}", file=sys.stderr)
        else:  # a rule across settings, whose message names them
            print(f"cogview-api: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    try:
        return _run(args, settings)
    except (EngineLoadError, StartError) as exc:
        print(f"cogview-api: {exc.message}", file=sys.stderr)
        return 2
    except CogviewError as exc:
        print(f"cogview-api: {exc.message}", file=sys.stderr)
        return 1


# The default data folder before COGVIEW_DATA_DIR: `./cogview-data` of the current directory.
OLD_DEFAULT_DATABASE = Path("cogview-data") / "cogview.db"


def _warn_about_old_default(settings: Settings) -> None:
    """A database at the old default place, here, while this command uses another: say so once,
    rather than let an upgraded operator wonder where the keys went."""
    old = OLD_DEFAULT_DATABASE.absolute()
    if old.is_file() and settings.database_url != f"sqlite:///{old}":
        print(
            f"cogview-api: note: {old} (the default place before COGVIEW_DATA_DIR) is not the "
            f"database this command uses; set COGVIEW_DATA_DIR={old.parent} to use it.",
            file=sys.stderr,
        )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    _warn_about_old_default(settings)
    if args.command in ("serve", "worker"):
        from cogview_api import server

        server.configure_logging(settings.log_level, settings.log_format)
        try:
            if args.command == "serve":
                server.serve(settings)
            else:
                server.run_worker(settings)
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass
        return 0
    from cogview_api.services import keys as key_service
    from cogview_api.store.db import describe_database

    db = _db(settings)
    # On stderr, so --json output stays one JSON document: which database this command used
    # (two databases by accident are the first surprise a new operator meets).
    print(f"cogview-api: database {describe_database(settings.database_url)}", file=sys.stderr)
    if args.command == "migrate":
        print("database schema is up to date")
    elif args.command == "keys" and args.keys_command == "create":
        key, secret = key_service.create_key(
            db, name=args.name, credits=args.credits, actor=_actor()
        )
        signing = key_service.webhook_secret(db, key.id)
        if args.json:
            print(json.dumps({**_key_dict(key), "key": secret, "webhook_secret": signing}))
        else:
            print(f"created {key.id} ({key.name}) with {key.balance} credits")
            print(f"API key (shown once, store it now): {secret}")
            print(f"webhook signing secret (shown once, verifies callback_url POSTs): {signing}")
        if key.balance == 0:
            print(
                f"note: {key.id} has 0 credits, so its generations get 402 until you grant some:"
                f" cogview-api credits grant {key.id} 100",
                file=sys.stderr if args.json else sys.stdout,
            )
    elif args.command == "keys" and args.keys_command == "rotate-webhook-secret":
        signing = key_service.rotate_webhook_secret(db, args.key_id, actor=_actor())
        if args.json:
            print(json.dumps({"id": args.key_id, "webhook_secret": signing}))
        else:
            print(f"new webhook signing secret of {args.key_id} (shown once): {signing}")
    elif args.command == "keys" and args.keys_command == "list":
        keys = [_key_dict(k) for k in key_service.list_keys(db)]
        if args.json:
            print(json.dumps(keys))
        else:
            print(f"{'ID':<{ID_WIDTH}}  {'PREFIX':<11}  {'BALANCE':>8}  {'STATE':8}  NAME")
            for k in keys:
                state = "revoked" if k["revoked"] else "active"
                print(f"{k['id']}  {k['prefix']}…  {k['balance']:>8}  {state:8}  {k['name']}")
    elif args.command == "keys" and args.keys_command == "revoke":
        key = key_service.revoke_key(db, args.key_id, actor=_actor())
        print(f"revoked {key.id} ({key.name})")
    elif args.command == "keys" and args.keys_command == "limits":
        _print_limits(_key_limits(args, settings, db), as_json=args.json)
    elif args.command == "keys" and args.keys_command == "follow-limits":
        limits = _follow_limits(args, settings, db)
        caps = (("max_streams", limits.max_streams), ("max_waits", limits.max_waits))
        streams, waits = (
            f"{value}" if name in limits.own else f"{value} (default)" for name, value in caps
        )
        print(f"{args.key_id}: max streams {streams}, max waits {waits}")
    elif args.command == "credits":
        key = key_service.grant_credits(
            db, key_id=args.key_id, amount=args.amount, note=args.note, actor=_actor()
        )
        print(f"{key.id}: balance {key.balance}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
