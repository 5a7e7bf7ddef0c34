"""The operator's command line as a subprocess, against a fresh data folder."""

from __future__ import annotations

import getpass
import json
import subprocess
from pathlib import Path

import httpx
from sqlalchemy import select

from cogview_api.store.db import Database
from cogview_api.store.tables import admin_audit
from tests.support import CLI, EXAMPLE_BODY, ServerProcess, auth, server_env


def cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_keys_and_credits_lifecycle(tmp_path: Path, tiny_cache: Path) -> None:
    env = server_env(tiny_cache)
    made = cli(tmp_path, env, "keys", "create", "--name", "alice", "--credits", "10", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert key["key"].startswith("cv4_") and key["balance"] == 10 and key["name"] == "alice"

    human = cli(tmp_path, env, "keys", "create", "--name", "bob")
    assert human.returncode == 0 and "shown once" in human.stdout

    granted = cli(tmp_path, env, "credits", "grant", key["id"], "6", "--note", "top-up")
    assert granted.returncode == 0 and "balance 16" in granted.stdout
    too_much = cli(tmp_path, env, "credits", "grant", key["id"], "-17")
    assert too_much.returncode == 1 and "Insufficient credits" in too_much.stderr
    limited = cli(
        tmp_path, env, "keys", "limits", key["id"], "--burst", "4", "--max-streams", "3", "--json"
    )
    assert limited.returncode == 0, limited.stderr
    shown = json.loads(limited.stdout)
    assert shown["own"] == ["max_streams", "submit_burst"]
    assert (shown["max_streams"], shown["max_waits"]) == (3, 20)
    # The older command for the two caps is the same service, and audited as well.
    follow = cli(tmp_path, env, "keys", "follow-limits", key["id"], "--max-waits", "2")
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout.strip() == f"{key['id']}: max streams 3, max waits 2"
    assert cli(tmp_path, env, "keys", "limits", key["id"]).returncode == 0  # a read: not logged

    listed = json.loads(cli(tmp_path, env, "keys", "list", "--json").stdout)
    assert [(k["name"], k["balance"], k["revoked"]) for k in listed] == [
        ("alice", 16, False),
        ("bob", 0, False),
    ]
    assert all("key" not in k for k in listed)  # the secret is never shown again
    assert key["key"] not in (tmp_path / "cogview-data" / "cogview.db").read_bytes().decode(
        "latin-1"
    )

    # The key works against a server until it is revoked.
    server = ServerProcess(workdir=tmp_path, env=env, args=("--workers", "0"))
    server.start(wait_ready=False)
    try:
        url = server.base_url + "/api/v1/images/generations"
        assert httpx.post(url, json=EXAMPLE_BODY, headers=auth(key["key"])).status_code == 200
        revoked = cli(tmp_path, env, "keys", "revoke", key["id"])
        assert revoked.returncode == 0
        r = httpx.post(url, json=EXAMPLE_BODY, headers=auth(key["key"]))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_denied"
    finally:
        server.stop()
    listed = json.loads(cli(tmp_path, env, "keys", "list", "--json").stdout)
    # The revoke cancelled the waiting task (nothing ran it) and refunded its 4 credits.
    assert listed[0]["revoked"] is True and listed[0]["balance"] == 16

    # Every change is in the audit log, by the same services as the admin API, as cli:<user>.
    db = Database(f"sqlite:///{tmp_path}/cogview-data/cogview.db")
    try:
        with db.read() as conn:
            rows = conn.execute(
                select(admin_audit.c.actor, admin_audit.c.action, admin_audit.c.key_id).order_by(
                    admin_audit.c.id
                )
            ).all()
    finally:
        db.dispose()
    assert [(r.action, r.key_id) for r in rows] == [
        ("keys.create", key["id"]),
        ("keys.create", listed[1]["id"]),
        ("credits.grant", key["id"]),
        ("keys.limits.set", key["id"]),
        ("keys.limits.set", key["id"]),
        ("keys.revoke", key["id"]),
    ]
    assert {r.actor for r in rows} == {f"cli:{getpass.getuser()}"}


def test_unknown_key_id_and_bad_settings_are_one_line_errors(
    tmp_path: Path, tiny_cache: Path
) -> None:
    env = server_env(tiny_cache)
    missing = cli(tmp_path, env, "keys", "revoke", "key_nope")
    assert missing.returncode == 1 and "No key with id" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = cli(tmp_path, {**env, "COGVIEW_STEPS_HD": "zero"}, "migrate")
    assert bad.returncode == 2 and "steps_hd" in bad.stderr and "Traceback" not in bad.stderr
