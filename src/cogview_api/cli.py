"""The `cogview-api` command: thin, parses flags and calls services."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from cogview_api.config import Settings
from cogview_api.errors import CogviewError, EngineLoadError
from cogview_api.services import keys as key_service
from cogview_api.services import limits as limit_service
from cogview_api.services.limits import KeyLimits
from cogview_api.store.db import Database


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cogview-api", description=__doc__)
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
    create.add_argument("--credits", type=int, default=0)
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
    limits.add_argument("--reset", action="store_true", help="drop the key's own limits")
    limits.add_argument("--json", action="store_true")

    credits = sub.add_parser("credits", help="credit ledger").add_subparsers(
        dest="credits_command", required=True
    )
    grant = credits.add_parser("grant", help="add (or, negative, remove) credits")
    grant.add_argument("key_id")
    grant.add_argument("amount", type=int)
    grant.add_argument("--note")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("host", "port", "model", "workers", "device", "http_processes", "metrics_port")
        if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def _db(settings: Settings) -> Database:
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
    if args.reset or any(v is not None for v in (args.rate, args.burst, args.max_waiting)):
        return limit_service.set_key_limits(
            db,
            settings,
            args.key_id,
            submit_rate=args.rate,
            submit_burst=args.burst,
            max_waiting=args.max_waiting,
            reset=args.reset,
            actor=_actor(),
        )
    return limit_service.key_limits(db, settings, args.key_id)


def _print_limits(limits: KeyLimits, *, as_json: bool) -> None:
    values = {
        "submit_rate": limits.submit_rate,
        "submit_burst": limits.submit_burst,
        "max_waiting": limits.max_waiting,
    }
    if as_json:
        print(json.dumps({"id": limits.key_id, **values, "own": sorted(limits.own)}))
        return
    print(f"limits of {limits.key_id} (own: the key's; default: the settings'):")
    for name, value in values.items():
        shown = "no limit" if name == "submit_rate" and value == 0 else f"{value:g}"
        origin = "own" if name in limits.own else "default"
        print(f"  {name:13s} {shown:>12s}  {origin}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    except EngineLoadError as exc:
        print(f"cogview-api: {exc.message}", file=sys.stderr)
        return 2
    except CogviewError as exc:
        print(f"cogview-api: {exc.message}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command in ("serve", "worker"):
        from cogview_api import server

        server.configure_logging(settings.log_level)
        try:
            if args.command == "serve":
                server.serve(settings)
            else:
                server.run_worker(settings)
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass
        return 0
    db = _db(settings)
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
            for k in keys:
                state = "revoked" if k["revoked"] else "active"
                print(f"{k['id']}  {k['prefix']}…  {k['balance']:>8}  {state:8}  {k['name']}")
    elif args.command == "keys" and args.keys_command == "revoke":
        key = key_service.revoke_key(db, args.key_id, actor=_actor())
        print(f"revoked {key.id} ({key.name})")
    elif args.command == "keys" and args.keys_command == "limits":
        _print_limits(_key_limits(args, settings, db), as_json=args.json)
    elif args.command == "credits":
        key = key_service.grant_credits(
            db, key_id=args.key_id, amount=args.amount, note=args.note, actor=_actor()
        )
        print(f"{key.id}: balance {key.balance}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
