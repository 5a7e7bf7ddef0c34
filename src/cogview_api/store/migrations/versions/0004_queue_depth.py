"""queue depth counter, account totals

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 21:40:00

How many tasks wait, kept by triggers on `tasks` in 16 stripes (a task counts in stripe
`seq % 16`), so the submit's queue-full check and a new task's queue position read 16 rows
instead of counting the whole queue: a COUNT over the waiting tasks grew with the backlog (the
issue measured it in every submit). Triggers rather than code, so that every path that moves a
task into or out of the queue (submit, claim, lease reclaim, cancel, failure) keeps it exact in
the transaction that moves the task. Stripes, so that concurrent submits on PostgreSQL, each
updating its stripe until it commits, rarely wait on each other.

`api_keys.credits_spent` and `api_keys.images_generated`, kept by triggers on `ledger` and
`images` (both append-only), so `/account` reads its key's row instead of summing the key's whole
ledger. They update the key's row that the same transaction already holds for its balance
(ledger) or that only the completing transaction touches (images).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STRIPES = 16

_SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER tasks_queue_depth_insert AFTER INSERT ON tasks
    WHEN NEW.state = 'queued'
    BEGIN UPDATE queue_depth SET waiting = waiting + 1 WHERE stripe = NEW.seq % {STRIPES}; END""",
    f"""CREATE TRIGGER tasks_queue_depth_update AFTER UPDATE OF state ON tasks
    WHEN (OLD.state = 'queued') != (NEW.state = 'queued')
    BEGIN UPDATE queue_depth SET waiting = waiting
        + (CASE WHEN NEW.state = 'queued' THEN 1 ELSE -1 END)
        WHERE stripe = NEW.seq % {STRIPES}; END""",
    f"""CREATE TRIGGER tasks_queue_depth_delete AFTER DELETE ON tasks
    WHEN OLD.state = 'queued'
    BEGIN UPDATE queue_depth SET waiting = waiting - 1 WHERE stripe = OLD.seq % {STRIPES}; END""",
]

_POSTGRES_TRIGGERS = [
    f"""CREATE FUNCTION tasks_queue_depth() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE delta integer := 0; row_seq bigint;
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.state = 'queued' THEN delta := delta - 1; END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.state = 'queued' THEN delta := delta + 1; END IF;
        IF delta <> 0 THEN
            IF TG_OP = 'DELETE' THEN row_seq := OLD.seq; ELSE row_seq := NEW.seq; END IF;
            UPDATE queue_depth SET waiting = waiting + delta WHERE stripe = row_seq % {STRIPES};
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER tasks_queue_depth_insert AFTER INSERT ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_queue_depth()""",
    """CREATE TRIGGER tasks_queue_depth_update AFTER UPDATE OF state ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_queue_depth()""",
    """CREATE TRIGGER tasks_queue_depth_delete AFTER DELETE ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_queue_depth()""",
]


_SQLITE_TOTALS = [
    """CREATE TRIGGER ledger_credits_spent AFTER INSERT ON ledger
    WHEN NEW.kind IN ('reserve', 'refund')
    BEGIN UPDATE api_keys SET credits_spent = credits_spent - NEW.amount
        WHERE id = NEW.key_id; END""",
    """CREATE TRIGGER images_generated AFTER INSERT ON images
    BEGIN UPDATE api_keys SET images_generated = images_generated + 1
        WHERE id = (SELECT key_id FROM tasks WHERE id = NEW.task_id); END""",
]

_POSTGRES_TOTALS = [
    """CREATE FUNCTION ledger_credits_spent() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.kind IN ('reserve', 'refund') THEN
            UPDATE api_keys SET credits_spent = credits_spent - NEW.amount WHERE id = NEW.key_id;
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER ledger_credits_spent AFTER INSERT ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_credits_spent()""",
    """CREATE FUNCTION images_generated() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE api_keys SET images_generated = images_generated + 1
            WHERE id = (SELECT key_id FROM tasks WHERE id = NEW.task_id);
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER images_generated AFTER INSERT ON images
    FOR EACH ROW EXECUTE FUNCTION images_generated()""",
]


def upgrade() -> None:
    op.create_table(
        "queue_depth",
        sa.Column("stripe", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("waiting", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("stripe", name=op.f("pk_queue_depth")),
    )
    # Counted once here, from the tasks already waiting; the triggers keep it from now on.
    op.execute(
        sa.text(
            "INSERT INTO queue_depth (stripe, waiting) SELECT s.stripe, "
            "(SELECT count(*) FROM tasks WHERE state = 'queued' AND seq % :n = s.stripe) "
            "FROM (" + " UNION ALL ".join(f"SELECT {i} AS stripe" for i in range(STRIPES)) + ") s"
        ).bindparams(n=STRIPES)
    )
    # Plain ADD COLUMN with a constant default: no table rebuild on SQLite.
    op.add_column(
        "api_keys",
        sa.Column("credits_spent", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.add_column(
        "api_keys",
        sa.Column("images_generated", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.execute(
        "UPDATE api_keys SET credits_spent = -(SELECT coalesce(sum(amount), 0) FROM ledger "
        "WHERE ledger.key_id = api_keys.id AND kind IN ('reserve', 'refund')), "
        "images_generated = (SELECT count(*) FROM images JOIN tasks ON images.task_id = tasks.id "
        "WHERE tasks.key_id = api_keys.id)"
    )
    dialect = op.get_bind().dialect.name
    postgres = dialect == "postgresql"
    for statement in (
        [*_POSTGRES_TRIGGERS, *_POSTGRES_TOTALS]
        if postgres
        else [*_SQLITE_TRIGGERS, *_SQLITE_TOTALS]
    ):
        op.execute(statement)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for trigger, table in (("ledger_credits_spent", "ledger"), ("images_generated", "images")):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}" + (f" ON {table}" if postgres else ""))
        if postgres:
            op.execute(f"DROP FUNCTION IF EXISTS {trigger}()")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("images_generated")
        batch.drop_column("credits_spent")
    for name in ("insert", "update", "delete"):
        op.execute(
            f"DROP TRIGGER IF EXISTS tasks_queue_depth_{name} ON tasks"
            if op.get_bind().dialect.name == "postgresql"
            else f"DROP TRIGGER IF EXISTS tasks_queue_depth_{name}"
        )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS tasks_queue_depth()")
    op.drop_table("queue_depth")
