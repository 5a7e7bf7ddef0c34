"""Queue positions in the claim's own order (store/queue.py `claim_batch`), fairness included.

A waiting task's position is 1 + the number of waiting tasks a worker will claim before it, with
the claim's rules replayed on the waiting tasks as they are now, by one worker that takes
`batch_size` tasks a claim: the least-loaded API key's oldest task picks the batch key (load:
the key's running tasks before the first claim, then its share of the previous batch), and the
batch takes that batch key's tasks by (their key's load, seq). Tasks submitted later, other
workers and cancels can change it; each read replays it afresh.

Priority classes (domain.PriorityClass): the replay runs within a task's own class. A task of a
later class (BATCH) counts every task of the earlier classes waiting, then its place in its
class's replay; an INTERACTIVE task ignores BATCH tasks (a claim takes them only to fill the room
interactive tasks leave).

Cost is bounded however long the queue: a task with `HORIZON` or more of its own key's tasks
of its class ahead is not replayed at all, nor is a class while more than `MAX_KEYS` keys have
tasks of it waiting; otherwise the replay reads at most `HORIZON` waiting tasks of each key (index
ix_tasks_state_priority_key_seq) and stops where a task it did not read could take part. A task
the replay does not reach gets an upper bound instead, never too low: every waiting task but the
ones that can never go before it (its own key's later tasks of its class and batch key, counted
up to `COUNT_CAP`).
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, exists, func, select

from cogview_api.domain import BatchKey, PriorityClass, TaskState
from cogview_api.store.tables import api_keys, queue_depth, tasks

HORIZON = 32  # waiting tasks read per key
COUNT_CAP = 256  # later tasks counted for the bound (rows read: the shape is not in the index)
MAX_KEYS = 8  # keys with tasks waiting beyond which nothing is replayed (a statement per key)

_queued = tasks.c.state == TaskState.QUEUED
_in_class = tasks.c.priority == bindparam("priority")
_SHAPE = (tasks.c.width, tasks.c.height, tasks.c.steps, tasks.c.guidance_scale)
_RUNNING = (
    select(tasks.c.key_id, func.count())
    .where(tasks.c.state == TaskState.RUNNING)
    .group_by(tasks.c.key_id)
)
# One index probe per key (keys are few next to tasks): no scan of the waiting tasks.
_KEYS_WAITING = (
    select(api_keys.c.id)
    .where(exists().where(tasks.c.key_id == api_keys.c.id, _queued, _in_class))
    .limit(bindparam("limit"))
)
_KEY_HEAD = (
    select(tasks.c.id, tasks.c.seq, *_SHAPE)
    .where(tasks.c.key_id == bindparam("key_id"), _queued, _in_class)
    .order_by(tasks.c.seq)
    .limit(bindparam("limit"))
)
# How many of its key's waiting tasks of its class are older than a task, counted up to HORIZON
# (index only).
_KEY_AHEAD = select(func.count()).select_from(
    select(tasks.c.id)
    .where(
        tasks.c.key_id == bindparam("key_id"), _queued, _in_class, tasks.c.seq < bindparam("seq")
    )
    .limit(bindparam("limit"))
    .subquery()
)
_WAITING = select(func.coalesce(func.sum(queue_depth.c.waiting), 0))
# The waiting tasks of the classes before a class: all of them go first (index range).
_EARLIER_CLASSES = select(func.count()).where(_queued, tasks.c.priority < bindparam("priority"))
_LATER_SAME = select(func.count()).select_from(
    select(tasks.c.id)
    .where(
        tasks.c.key_id == bindparam("key_id"),
        _queued,
        _in_class,
        tasks.c.seq > bindparam("seq"),
        tasks.c.width == bindparam("width"),
        tasks.c.height == bindparam("height"),
        tasks.c.steps == bindparam("steps"),
        tasks.c.guidance_scale == bindparam("guidance_scale"),
    )
    .limit(COUNT_CAP)
    .subquery()
)
_MEASURES = select(
    _KEY_AHEAD.scalar_subquery(), _WAITING.scalar_subquery(), _LATER_SAME.scalar_subquery()
)


@dataclass(frozen=True)
class Waiting:
    """A waiting task as the claim sees it."""

    id: str
    key_id: str
    seq: int
    shape: BatchKey
    priority: PriorityClass = PriorityClass.INTERACTIVE


@dataclass
class _KeyQueue:
    """One key's waiting tasks read so far, oldest first; `more`: it has tasks not read."""

    tasks: list[Waiting]
    more: bool
    head: int = 0
    done: set[str] = field(default_factory=set)
    by_shape: dict[BatchKey, deque[Waiting]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for t in self.tasks:
            self.by_shape.setdefault(t.shape, deque()).append(t)

    @property
    def last_seq(self) -> int:
        return self.tasks[-1].seq if self.tasks else -1


def _read(row: Any, key_id: str, priority: PriorityClass) -> Waiting:
    shape = BatchKey(row.width, row.height, row.steps, row.guidance_scale)
    return Waiting(id=row.id, key_id=key_id, seq=int(row.seq), shape=shape, priority=priority)


def queue_positions(
    conn: Connection, targets: Sequence[Waiting], *, batch_size: int
) -> dict[str, int]:
    """The position (1 = in the next claim, first) of each waiting task of `targets`."""
    out: dict[str, int] = {}
    bounds: dict[str, int] = {}
    near: dict[PriorityClass, list[Waiting]] = {}
    for t in targets:
        ahead, bounds[t.id] = _measures(conn, t)
        if ahead >= HORIZON:  # past its key's horizon: the replay would stop before it
            out[t.id] = bounds[t.id]
        else:
            near.setdefault(t.priority, []).append(t)
    if not near:
        return out
    load: dict[str, int] = {k: int(n) for k, n in conn.execute(_RUNNING).all()}
    for priority, group in near.items():
        found = _replay_class(conn, priority, load, {t.id for t in group}, batch_size)
        earlier = 0
        if found and priority > min(PriorityClass):
            earlier = int(conn.execute(_EARLIER_CLASSES, {"priority": priority}).scalar_one())
        for t in group:
            out[t.id] = earlier + found[t.id] if t.id in found else bounds[t.id]
    return out


def _replay_class(
    conn: Connection,
    priority: PriorityClass,
    load: dict[str, int],
    wanted: set[str],
    batch_size: int,
) -> dict[str, int]:
    """The places of `wanted` in the replay of one class's claims ({} past MAX_KEYS keys)."""
    keys = list(
        conn.execute(_KEYS_WAITING, {"limit": MAX_KEYS + 1, "priority": priority}).scalars()
    )
    if len(keys) > MAX_KEYS:  # many tenants waiting: the replay would cost a poll too much
        return {}
    queues: dict[str, _KeyQueue] = {}
    for key_id in keys:
        rows = conn.execute(
            _KEY_HEAD, {"key_id": key_id, "limit": HORIZON + 1, "priority": priority}
        ).all()
        read = [_read(r, key_id, priority) for r in rows[:HORIZON]]
        queues[key_id] = _KeyQueue(read, more=len(rows) > HORIZON)
    return replay(queues, load, wanted, batch_size)


def replay(
    queues: dict[str, _KeyQueue], load: dict[str, int], wanted: set[str], batch_size: int
) -> dict[str, int]:
    """Claims replayed on `queues` (consumed) until every wanted task is placed or a claim
    could involve a task not read. Returns the positions found."""
    found: dict[str, int] = {}
    placed = 0
    wanted = set(wanted)
    while wanted:
        leader = _leader(queues, load)
        if leader is None:
            break
        batch = _fill(queues, load, leader.shape, batch_size)
        if batch is None:
            break
        for t in batch:
            placed += 1
            if t.id in wanted:
                found[t.id] = placed
                wanted.discard(t.id)
        load = dict(Counter(t.key_id for t in batch))
    return found


def _leader(queues: dict[str, _KeyQueue], load: Mapping[str, int]) -> Waiting | None:
    """The oldest waiting task of the least-loaded key; None if a key's head was not read."""
    best: tuple[int, int] | None = None
    leader: Waiting | None = None
    for key_id, q in queues.items():
        while q.head < len(q.tasks) and q.tasks[q.head].id in q.done:
            q.head += 1
        if q.head == len(q.tasks):
            if q.more:
                return None
            continue
        head = q.tasks[q.head]
        rank = (load.get(key_id, 0), head.seq)
        if best is None or rank < best:
            best, leader = rank, head
    return leader


def _fill(
    queues: dict[str, _KeyQueue], load: Mapping[str, int], shape: BatchKey, batch_size: int
) -> list[Waiting] | None:
    """The batch of `shape`: its tasks by (key load, seq), taken from `queues`; None if a task
    not read could be among them."""
    heap: list[tuple[int, int, str]] = []
    for key_id, q in queues.items():
        d = q.by_shape.get(shape)
        if d:
            heap.append((load.get(key_id, 0), d[0].seq, key_id))
    heapq.heapify(heap)
    batch: list[Waiting] = []
    while heap and len(batch) < batch_size:
        _, _, key_id = heapq.heappop(heap)
        d = queues[key_id].by_shape[shape]
        batch.append(d.popleft())
        if d:
            heapq.heappush(heap, (load.get(key_id, 0), d[0].seq, key_id))
    for key_id, q in queues.items():
        # A task of this key not read has a seq past the last one read: it could be in the
        # batch if the batch has room, or if it would sort before the batch's last task.
        if q.more and (
            len(batch) < batch_size
            or (load.get(key_id, 0), q.last_seq) < (load.get(batch[-1].key_id, 0), batch[-1].seq)
        ):
            return None
    for t in batch:
        queues[t.key_id].done.add(t.id)
    return batch


def _measures(conn: Connection, t: Waiting) -> tuple[int, int]:
    """(its key's tasks ahead of `t`, up to HORIZON; the upper bound of its position), in one
    statement. The bound: 1 + every other waiting task, less the ones that never go before `t`:
    its key's later tasks of its class and batch key (a batch takes one key's tasks of a class
    and batch key in seq order, and the key's head, older than them, leads first)."""
    ahead, waiting, later = conn.execute(
        _MEASURES,
        {
            "key_id": t.key_id,
            "priority": t.priority,
            "seq": t.seq,
            "limit": HORIZON,
            "width": t.shape.width,
            "height": t.shape.height,
            "steps": t.shape.steps,
            "guidance_scale": t.shape.guidance_scale,
        },
    ).one()
    return int(ahead), max(1, int(waiting) - int(later))
