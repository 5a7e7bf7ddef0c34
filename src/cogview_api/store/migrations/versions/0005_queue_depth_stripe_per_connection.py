"""queue depth: one stripe per PostgreSQL connection, not per task

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 23:40:00

Migration 0004 counted a task in stripe `seq % 16`. On PostgreSQL a worker's claim moves several
tasks out of the queue in one statement, so its trigger updated several stripes, one per row, in
the order of the rows; two claims that took rows of the same stripes in the opposite order each
held a stripe the other wanted, and PostgreSQL aborted one with "deadlock detected" (seen in
`test_concurrent_workers_never_claim_the_same_task[pg]`). Now the stripe is the connection's:
`pg_backend_pid() % 16`. A transaction runs on one connection, so it updates one stripe row
however many tasks it moves, and two transactions can no longer wait on each other's stripes.
The claim takes its task rows (FOR UPDATE SKIP LOCKED) before it updates them, so no transaction
waits for a task row while it holds a stripe either. Concurrent submits on different connections
still update different rows, as before.

What a stripe holds is now only a share of the count: the readers sum all 16 (store/tasks.py),
and a stripe may go negative (a task counted in by one connection, out by another). SQLite
keeps its triggers of 0004: it has one writer at a time, so there is nothing to deadlock.
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

STRIPES = 16


def _function(stripe: str) -> str:
    return f"""CREATE OR REPLACE FUNCTION tasks_queue_depth() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE delta integer := 0; row_seq bigint;
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.state = 'queued' THEN delta := delta - 1; END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.state = 'queued' THEN delta := delta + 1; END IF;
        IF delta <> 0 THEN
            IF TG_OP = 'DELETE' THEN row_seq := OLD.seq; ELSE row_seq := NEW.seq; END IF;
            UPDATE queue_depth SET waiting = waiting + delta WHERE stripe = {stripe};
        END IF;
        RETURN NULL;
    END $$"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_function(f"pg_backend_pid() % {STRIPES}"))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # 0004's stripes count tasks by seq: recount them, since this revision's are by connection.
        op.execute(_function(f"row_seq % {STRIPES}"))
        op.execute(
            f"UPDATE queue_depth SET waiting = (SELECT count(*) FROM tasks "
            f"WHERE state = 'queued' AND seq % {STRIPES} = queue_depth.stripe)"
        )
