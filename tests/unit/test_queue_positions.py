"""Queue positions are the claim's own order (store/positions.py), on SQLite and PostgreSQL: each
waiting task's position is checked against the order a worker then actually claims the tasks in,
fairness between keys and batch keys included."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from sqlalchemy import update

from cogview_api.config import Settings
from cogview_api.domain import BatchKey, GenerationRequest, PriorityClass, Size
from cogview_api.services import generation
from cogview_api.services import keys as key_service
from cogview_api.store import positions, queue, tables
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database

SQUARE, TALL, WIDE = Size(1024, 1024), Size(768, 1344), Size(1344, 768)


def request(size: Size) -> GenerationRequest:
    return GenerationRequest(model="cogview-4", prompt="a cat", size=size, quality="hd", n=1)


def backlog(db: Database, settings: Settings) -> tuple[list[str], list[str]]:
    """Three keys with unequal backlogs and two shapes; returns (task ids, key ids)."""
    keys = [key_service.create_key(db, name=n, credits=1000)[0] for n in ("heavy", "mid", "light")]
    heavy, mid, light = keys
    plan = [(heavy, SQUARE)] * 6 + [(heavy, TALL), (mid, SQUARE), (heavy, SQUARE)]
    plan += [(mid, TALL), (mid, SQUARE), (heavy, SQUARE), (mid, SQUARE), (light, TALL)]
    ids = [generation.submit(db, settings, key=k, request=request(s)).id for k, s in plan]
    return ids, [k.id for k in keys]


def positions_now(db: Database, key_ids: list[str], batch_size: int) -> dict[str, int | None]:
    """Every live task's position, read one by one and checked against the lists."""
    with db.read() as conn:
        listed = {
            t.id: t.queue_position
            for key_id in key_ids
            for t in task_store.list_tasks(conn, key_id=key_id, limit=100, batch_size=batch_size)
            if not t.state.terminal
        }
        single = {
            i: task_store.get_task(conn, i, batch_size=batch_size).queue_position for i in listed
        }
    assert single == listed
    return single


def claim_all(
    db: Database, batch_size: int, key_ids: list[str], every: int = 1
) -> tuple[list[list[str]], list[dict[str, int | None] | None]]:
    """Claims as one worker makes them (`recent`: its previous batch), each batch settled before
    the next claim. Returns the batches and the positions read before the first claim and
    while each `every`th batch runs (what a poll can see: a worker's next claim counts its
    batch in hand as the store counts running tasks); None for the batches not read."""
    batches: list[list[str]] = []
    snapshots: list[dict[str, int | None] | None] = [positions_now(db, key_ids, batch_size)]
    recent: dict[str, int] = {}
    while True:
        with db.write() as conn:
            ids = queue.claim_batch(
                conn, worker_id="w", limit=batch_size, lease_seconds=60, recent=recent
            )
        if not ids:
            return batches, snapshots
        batches.append(ids)
        snapshot = positions_now(db, key_ids, batch_size) if len(batches) % every == 0 else None
        snapshots.append(snapshot)
        assert snapshot is None or all(snapshot[i] is None for i in ids)  # running: no position
        with db.write() as conn:
            recent = dict(Counter(task_store.get_task(conn, i).key_id for i in ids))
            for i in ids:
                assert task_store.fail_task(
                    conn, task_id=i, worker_id="w", error_code=500, error_type="x", message="done"
                )


def assert_positions_match(
    batches: list[list[str]], snapshots: list[dict[str, int | None] | None]
) -> None:
    """Each snapshot read names every waiting task's place in the claims that followed it."""
    order = [i for batch in batches for i in batch]
    done = 0
    for snapshot, batch in zip(snapshots, [[], *batches], strict=False):
        done += len(batch)
        if snapshot is None:
            continue
        ahead = order[done:]
        waiting = {i: p for i, p in snapshot.items() if p is not None}
        assert waiting == {i: ahead.index(i) + 1 for i in ahead}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_positions_are_the_order_a_worker_claims_in(
    db: Database, settings: Settings, batch_size: int
) -> None:
    settings = settings.model_copy(update={"max_batch_size": batch_size})
    ids, key_ids = backlog(db, settings)
    batches, snapshots = claim_all(db, batch_size, key_ids)
    order = [i for batch in batches for i in batch]
    assert sorted(order) == sorted(ids)
    assert order != ids  # fairness reorders this backlog: a FIFO count would not do
    assert_positions_match(batches, snapshots)


def test_light_keys_task_behind_a_long_backlog_is_near_the_front(
    db: Database, settings: Settings
) -> None:
    heavy, _ = key_service.create_key(db, name="heavy", credits=10_000)
    light, _ = key_service.create_key(db, name="light", credits=100)
    for _ in range(40):
        generation.submit(db, settings, key=heavy, request=request(SQUARE))
    late = generation.submit(db, settings, key=light, request=request(SQUARE))
    assert late.queue_position == 2  # heavy's oldest leads (nothing running), then light's
    with db.read() as conn:
        assert task_store.get_task(conn, late.id).queue_position == 2


@pytest.mark.parametrize("batch_size", [1, 3])
def test_past_the_replays_reads_a_position_is_never_too_low(
    db: Database, settings: Settings, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With at most 4 waiting tasks read (14 wait here), the replay stops early or does not
    run: the positions it cannot place are an upper bound, never below the true one nor past
    the waiting count."""
    settings = settings.model_copy(update={"max_batch_size": batch_size})
    ids, key_ids = backlog(db, settings)
    monkeypatch.setattr(positions, "READ_CAP", 4)
    monkeypatch.setattr(positions, "WINDOW", 2)
    monkeypatch.setattr(positions, "CHUNK", 2)
    estimated = positions_now(db, key_ids, batch_size)
    monkeypatch.undo()
    exact = positions_now(db, key_ids, batch_size)
    assert all(
        e is not None and x is not None and x <= e <= len(ids)
        for e, x in zip(estimated.values(), exact.values(), strict=True)
    )
    assert estimated != exact  # the bound was used


def as_batch_class(db: Database, ids: list[str]) -> None:
    """Mark tasks BATCH class, as the batches API submits them (nothing else sets it yet)."""
    with db.write() as conn:
        conn.execute(
            update(tables.tasks)
            .where(tables.tasks.c.id.in_(ids))
            .values(priority=PriorityClass.BATCH)
        )


@pytest.mark.parametrize("same_key", [True, False])
def test_an_interactive_task_goes_before_fifty_batch_tasks(
    db: Database, settings: Settings, same_key: bool
) -> None:
    settings = settings.model_copy(update={"max_batch_size": 4, "submit_rate": 0.0})
    bulk, _ = key_service.create_key(db, name="bulk", credits=10_000)
    user = bulk if same_key else key_service.create_key(db, name="user", credits=100)[0]
    batch = [
        generation.submit(db, settings, key=bulk, request=request(SQUARE)).id for _ in range(50)
    ]
    as_batch_class(db, batch)
    late = generation.submit(db, settings, key=user, request=request(TALL))
    assert late.queue_position == 1
    with db.read() as conn:
        assert (
            task_store.get_task(conn, late.id, batch_size=4).priority is PriorityClass.INTERACTIVE
        )
        # A batch task counts the interactive one, then its own class's replay.
        first, second = (task_store.get_task(conn, i, batch_size=4) for i in batch[:2])
    assert (first.priority, first.queue_position, second.queue_position) == (
        PriorityClass.BATCH,
        2,
        3,
    )
    with db.write() as conn:
        assert queue.claim_batch(conn, worker_id="w", limit=4, lease_seconds=60) == [late.id]
        assert queue.claim_batch(conn, worker_id="w", limit=4, lease_seconds=60) == batch[:4]


def test_batch_tasks_fill_the_room_an_interactive_batch_leaves(
    db: Database, settings: Settings
) -> None:
    bulk, _ = key_service.create_key(db, name="bulk", credits=10_000)
    user, _ = key_service.create_key(db, name="user", credits=100)
    batch = [
        generation.submit(db, settings, key=bulk, request=request(SQUARE)).id for _ in range(5)
    ]
    as_batch_class(db, batch)
    late = generation.submit(db, settings, key=user, request=request(SQUARE))
    with db.write() as conn:
        taken = queue.claim_batch(conn, worker_id="w", limit=3, lease_seconds=60)
    assert taken == [late.id, *batch[:2]]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_positions_with_both_classes_are_the_order_a_worker_claims_in(
    db: Database, settings: Settings, batch_size: int
) -> None:
    """Batch-class tasks wait behind every interactive task, fairness holding within each class
    (batch size 3: the interactive backlog's batches are full, so no batch task fills them)."""
    settings = settings.model_copy(update={"max_batch_size": batch_size})
    ids, key_ids = backlog(db, settings)
    as_batch_class(db, ids[:6])  # heavy's first six, the oldest tasks
    batches, snapshots = claim_all(db, batch_size, key_ids)
    order = [i for batch in batches for i in batch]
    assert set(order[-6:]) == set(ids[:6])
    assert_positions_match(batches, snapshots)


def random_backlog(
    db: Database, settings: Settings, seed: int, n_keys: int, n_tasks: int
) -> tuple[list[str], list[str]]:
    """`n_tasks` tasks of `n_keys` keys (some keys far busier than others) in three shapes,
    in an order drawn from `seed`; returns (task ids, key ids)."""
    rng = random.Random(seed)
    keys = [key_service.create_key(db, name=f"k{i}", credits=10_000)[0] for i in range(n_keys)]
    weights = [rng.choice([1, 1, 2, 8]) for _ in keys]
    plan = [
        (rng.choices(keys, weights)[0], rng.choice([SQUARE, SQUARE, TALL, WIDE]))
        for _ in range(n_tasks)
    ]
    ids = [generation.submit(db, settings, key=k, request=request(s)).id for k, s in plan]
    return ids, [k.id for k in keys]


@pytest.mark.parametrize(
    ("seed", "batch_size", "reads"),
    [(1, 1, "default"), (2, 3, "default"), (3, 1, "small"), (4, 2, "small"), (5, 4, "small")],
)
def test_positions_with_many_keys_are_the_order_a_worker_claims_in(
    db: Database,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
    batch_size: int,
    reads: str,
) -> None:
    """Twelve keys wait at once (the replay used to stop at eight and give bounds), in random
    backlogs of three shapes. "small": the replay reads at most 3 tasks of the keys it has not
    met at a time, from a walk of 5 index entries, and 2 of a key it has met, so every position
    takes many reads, each one checked."""
    settings = settings.model_copy(
        update={"max_batch_size": batch_size, "submit_rate": 0.0, "max_waiting_per_key": 1000}
    )
    if reads == "small":
        monkeypatch.setattr(positions, "WINDOW", 3)
        monkeypatch.setattr(positions, "CHUNK", 2)
        monkeypatch.setattr(positions, "SPAN", 5)
        monkeypatch.setattr(positions, "READ_CAP", 10_000)
        monkeypatch.setattr(positions, "STATEMENT_CAP", 10_000)
    ids, key_ids = random_backlog(db, settings, seed, n_keys=12, n_tasks=48)
    batches, snapshots = claim_all(db, batch_size, key_ids, every=5)
    assert sorted(i for b in batches for i in b) == sorted(ids)
    assert_positions_match(batches, snapshots)


def test_light_keys_behind_one_keys_long_backlog_are_placed_exactly(
    db: Database, settings: Settings
) -> None:
    """Ten keys each submit one task behind one key's 300: each is placed within a few claims,
    exactly (the replay passes over the backlog in the index instead of reading it)."""
    settings = settings.model_copy(update={"submit_rate": 0.0, "max_waiting_per_key": 1000})
    heavy, _ = key_service.create_key(db, name="heavy", credits=10_000)
    for _ in range(300):
        generation.submit(db, settings, key=heavy, request=request(SQUARE))
    light = [key_service.create_key(db, name=f"l{i}", credits=100)[0] for i in range(10)]
    late = [generation.submit(db, settings, key=k, request=request(SQUARE)) for k in light]
    # Nothing runs: heavy's oldest leads, then each claim goes to the oldest task of a key the
    # previous claim did not serve, so heavy and the light keys alternate.
    assert [t.queue_position for t in late] == [2 + 2 * i for i in range(10)]
    with db.read() as conn:
        got = [task_store.get_task(conn, t.id).queue_position for t in late]
    order: list[str] = []
    recent: dict[str, int] = {}
    while len(order) < 25:
        with db.write() as conn:
            (taken,) = queue.claim_batch(
                conn, worker_id="w", limit=1, lease_seconds=60, recent=recent
            )
            owner = task_store.get_task(conn, taken).key_id
            task_store.fail_task(
                conn, task_id=taken, worker_id="w", error_code=500, error_type="x", message="x"
            )
        order.append(taken)
        recent = {owner: 1}
    assert got == [order.index(t.id) + 1 for t in late]


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_the_count_that_spares_a_vain_replay_never_passes_the_true_position(
    db: Database, settings: Settings, seed: int
) -> None:
    """With one task a claim, a task is not replayed when its own key's older tasks and the other
    keys' (but the most of any one key) reach READ_CAP: that count must be a lower bound of
    the position, here with tasks running too (the first claim weighs their keys)."""
    settings = settings.model_copy(
        update={"max_batch_size": 1, "submit_rate": 0.0, "max_waiting_per_key": 1000}
    )
    ids, _ = random_backlog(db, settings, seed, n_keys=9, n_tasks=60)
    with db.write() as conn:
        for _ in range(3):
            queue.claim_batch(conn, worker_id="other", limit=1, lease_seconds=60)
    with db.read() as conn:
        running = dict(conn.execute(positions._RUNNING).tuples().all())
        assert running  # the keys of the running tasks are left out of the count
        checked = 0
        for i in ids:
            task = task_store.get_task(conn, i, batch_size=1)
            if task.queue_position is None:
                continue
            waiting = positions.Waiting(task.id, task.key_id, task.seq, BatchKey.of(task))
            ahead, others, upper = positions._measures(conn, waiting, running, 1)
            assert 1 + ahead + others <= task.queue_position <= upper
            checked += 1
    assert checked == len(ids) - 3
