"""Credit amounts stay within what the 64-bit balance column holds exactly (issue: hardening,
finding 7: credits past 2^63 - 1 turned the SQLite balance into a float, after which submits
cost nothing, and the CLI printed a traceback for large amounts)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from cogview_api.errors import InvalidRequest
from cogview_api.services import keys as key_service
from cogview_api.store import keys as key_store
from cogview_api.store.db import Database
from cogview_api.store.tables import api_keys
from tests.support import CLI, server_env

MAX = key_store.MAX_CREDITS


def _stored_balance(db: Database, key_id: str) -> object:
    with db.read() as conn:
        return conn.execute(select(api_keys.c.balance).where(api_keys.c.id == key_id)).scalar_one()


@pytest.mark.parametrize("credits", [MAX + 1, 2**63, 10**30])
def test_a_key_cannot_be_made_with_more_than_the_maximum(db: Database, credits: int) -> None:
    with pytest.raises(InvalidRequest, match="at most"):
        key_service.create_key(db, name="k", credits=credits)
    assert key_service.list_keys(db) == []


@pytest.mark.parametrize("amount", [2, 2**62, 2**63, -(2**63), 10**30])
def test_a_grant_past_the_maximum_is_refused_and_writes_nothing(db: Database, amount: int) -> None:
    key, _ = key_service.create_key(db, name="k", credits=MAX - 1)
    with db.read() as conn:
        ledger_before = key_store.ledger_sum(conn, key.id)
    with pytest.raises(InvalidRequest, match="at most"):
        key_service.grant_credits(db, key_id=key.id, amount=amount)
    stored = _stored_balance(db, key.id)
    assert type(stored) is int and stored == MAX - 1
    with db.read() as conn:
        assert key_store.ledger_sum(conn, key.id) == ledger_before


def test_a_grant_up_to_the_maximum_is_taken(db: Database) -> None:
    key, _ = key_service.create_key(db, name="k", credits=MAX - 1)
    assert key_service.grant_credits(db, key_id=key.id, amount=1).balance == MAX


def test_the_cli_refuses_a_huge_amount_in_one_sentence(tmp_path: Path, tiny_cache: Path) -> None:
    env = server_env(tiny_cache)
    out = subprocess.run(
        [*CLI, "keys", "create", "--name", "big", "--credits", str(2**64)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    database, refusal = out.stderr.strip().splitlines()  # every command names its database
    assert database.startswith("cogview-api: database sqlite:///")
    assert refusal == f"cogview-api: credits must be at most {MAX}"
