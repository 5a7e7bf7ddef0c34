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

The replay reads only what its next pick could depend on, oldest first, however many keys
wait, in three reads:
- a window: the oldest waiting tasks of the keys it has not met yet and of the keys it follows
  with the windows (8, then doubling up to `WINDOW` at a time), walking at most `SPAN` seqs of
  ix_tasks_state_priority_seq, which holds key_id: the keys left out (the loaded ones, whose
  tasks a pick among unloaded keys does not need, and the keys read further by their own reads)
  are passed over in the index, not read, so one key's long backlog costs an index walk;
- a key's next tasks (4, then doubling up to `CHUNK`; ix_tasks_state_priority_key_seq) once the
  replay has claimed all it read of that key and the key could be next;
- the oldest task of every key (a walk from key to key, one index probe each), when a window
  found nothing (a backlog longer than its walk) and at most `MAX_KEYS` keys wait, once.
Before each pick it checks that no task it has not read could come first (a key not met has
nothing up to the windows' end; a key met has nothing unread up to what was read of it), and
reads more where one could. So every position it gives is exact, for any number of keys.

Cost is bounded however long the queue: one replay reads at most `READ_CAP` waiting tasks in
at most `STATEMENT_CAP` reads. It does not start for a task at least that many tasks must go
before: its own key's older tasks, and with one task a claim, the other keys' older ones but the
most of any one key (`_measures`). A task the replay does not reach gets an upper bound
instead, never too low: every waiting task but the ones that can never go before it (its own
key's later tasks of its class and batch key, counted up to `COUNT_CAP`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection, bindparam, func, literal, select

from cogview_api.domain import BatchKey, PriorityClass, TaskState
from cogview_api.store.tables import queue_depth, tasks

WINDOW = 64  # most waiting tasks of keys not met yet read at once (the first read: 8, doubling)
CHUNK = 32  # most waiting tasks of one met key read at once (its first read: 4, doubling)
SPAN = 1024  # seqs one window read walks at most (the keys left out are passed over)
MAX_KEYS = 64  # keys the heads read (after a window walk found nothing new) lists at most
READ_CAP = 128  # waiting tasks one replay may read; then the bound
STATEMENT_CAP = 12  # reads one replay may make; then the bound
COUNT_CAP = 256  # later tasks counted for the bound (rows read: the shape is not in the index)
OLDER_CAP = 2 * READ_CAP  # older tasks counted for the lower bound that spares a vain replay

_queued = tasks.c.state == TaskState.QUEUED
_in_class = tasks.c.priority == bindparam("priority")
_SHAPE = (tasks.c.width, tasks.c.height, tasks.c.steps, tasks.c.guidance_scale)
_TASK = (tasks.c.seq, tasks.c.id, tasks.c.key_id, *_SHAPE)
_RUNNING = (
    select(tasks.c.key_id, func.count())
    .where(tasks.c.state == TaskState.RUNNING)
    .group_by(tasks.c.key_id)
)
# The window: the next waiting tasks of a class past seq `after` of the keys not in `out`, among
# the ones up to `upto`: `span` seqs past the first waiting task after `after`, so the walk of
# ix_tasks_state_priority_seq (covering: the keys left out are passed over in the index, not
# read) stops there, or once `limit` are found. `last`: the class's newest waiting task.
_after = tasks.c.seq > bindparam("after")
_upto = (
    select(func.min(tasks.c.seq)).where(_queued, _in_class, _after).scalar_subquery()
    + bindparam("span")
).label("upto")
_last = select(func.max(tasks.c.seq)).where(_queued, _in_class).scalar_subquery().label("last")
_WINDOW = (
    select(*_TASK, _upto, _last)
    .where(_queued, _in_class, _after, tasks.c.seq <= _upto)
    .where(tasks.c.key_id.not_in(bindparam("out", expanding=True)))
    .order_by(tasks.c.seq)
    .limit(bindparam("limit"))
)
_SPAN = select(_upto, _last)
# A key's next waiting tasks of a class past `after`.
_KEY_NEXT = (
    select(*_TASK)
    .where(tasks.c.key_id == bindparam("key_id"), _queued, _in_class)
    .where(tasks.c.seq > bindparam("after"))
    .order_by(tasks.c.seq)
    .limit(bindparam("limit"))
)
# The oldest waiting task of a class of each key with one, for up to `max_keys` + 1 keys: a
# recursive walk from key to key over ix_tasks_state_priority_key_seq (one probe a key, however
# many tasks each has), then each key's head.
_keys = (
    select(func.min(tasks.c.key_id).label("key_id"), literal(1).label("n"))
    .where(_queued, _in_class)
    .cte("keys", recursive=True)
)
_keys = _keys.union_all(
    select(
        select(func.min(tasks.c.key_id))
        .where(_queued, _in_class, tasks.c.key_id > _keys.c.key_id)
        .scalar_subquery(),
        _keys.c.n + 1,
    ).where(_keys.c.key_id.is_not(None), _keys.c.n <= bindparam("max_keys"))
)
_h = tasks.alias("h")
_key_tasks = (
    _h.c.key_id == _keys.c.key_id,
    _h.c.state == TaskState.QUEUED,
    _h.c.priority == bindparam("priority"),
)
_head = select(func.min(_h.c.seq)).where(*_key_tasks).scalar_subquery()
# ...and whether it has another one waiting.
_KEY_HEADS = select(
    *_TASK,
    select(_h.c.seq)
    .where(*_key_tasks, _h.c.seq > tasks.c.seq)
    .order_by(_h.c.seq)
    .limit(1)
    .scalar_subquery()
    .label("next_seq"),
).select_from(_keys.join(tasks, tasks.c.seq == _head))
# How many of its key's waiting tasks of its class are older than a task, counted up to
# READ_CAP (index only).
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
# Of the OLDER_CAP oldest waiting tasks of its class, those older than a task, of keys not in
# `spared` (its own key and the keys with tasks running): their number less the most one key
# has. With one task a claim, each of them but one key's goes before the task (below).
_older = (
    select(tasks.c.key_id)
    .where(_queued, _in_class, tasks.c.seq < bindparam("seq"))
    .order_by(tasks.c.seq)
    .limit(bindparam("older_cap"))
    .subquery()
)
_per_key = (
    select(func.count().label("n"))
    .where(_older.c.key_id.not_in(bindparam("spared", expanding=True)))
    .group_by(_older.c.key_id)
    .subquery()
)
_OTHERS_AHEAD = select(
    func.coalesce(func.sum(_per_key.c.n), 0) - func.coalesce(func.max(_per_key.c.n), 0)
)
_BOUNDS = (_KEY_AHEAD.scalar_subquery(), _WAITING.scalar_subquery(), _LATER_SAME.scalar_subquery())
_MEASURES = select(*_BOUNDS, literal(0))
_MEASURES_ONE_A_CLAIM = select(*_BOUNDS, _OTHERS_AHEAD.scalar_subquery())


@dataclass(frozen=True)
class Waiting:
    """A waiting task as the claim sees it."""

    id: str
    key_id: str
    seq: int
    shape: BatchKey
    priority: PriorityClass = PriorityClass.INTERACTIVE


_INF = math.inf
_Shape = tuple[int, int, int, float]
# A waiting task as the replay holds it: (seq, id, key id, batch key).
_Task = tuple[int, str, str, _Shape]
# A key's place in the leader's pick: (seq, 0, key) its oldest task the replay has read and not
# claimed; (through, 1, key) none such, and its next waiting task (if any) is past `through`.
_Entry = tuple[float, int, str]


class _OutOfReads(Exception):
    """The replay would read more than READ_CAP waiting tasks or make more than STATEMENT_CAP
    reads."""


class Source(Protocol):
    """Where the replay reads one class's waiting tasks, oldest first (the store: `_Reader`)."""

    def window(self, after: float, out: Sequence[str], limit: int) -> tuple[list[_Task], float]:
        """Up to `limit` waiting tasks past seq `after` of the keys not in `out`, and the seq up
        to which every such task has been returned (inf: all of them)."""
        ...

    def key(self, key_id: str, after: float, limit: int) -> list[_Task]:
        """Up to `limit` of the key's waiting tasks past seq `after`."""
        ...

    def heads(self, limit: int) -> list[tuple[_Task, bool]] | None:
        """The oldest waiting task of each key with one, and whether the key has another
        (None: more than `limit` keys)."""
        ...


@dataclass
class _Key:
    """What the replay read of one key's waiting tasks: all those with seq <= `through`, or,
    while `tracked`, all those up to where the windows have read (`_Replay.unmet_after`)."""

    tasks: list[_Task]
    through: float
    chunk: int  # how many of its tasks its next read asks for (doubling up to CHUNK)
    tracked: bool = False
    head: int = 0  # its first task the replay has not claimed (index into `tasks`)


def queue_positions(
    conn: Connection, targets: Sequence[Waiting], *, batch_size: int
) -> dict[str, int]:
    """The position (1 = in the next claim, first) of each waiting task of `targets`."""
    if not targets:
        return {}
    running: dict[str, int] = {k: int(n) for k, n in conn.execute(_RUNNING).all()}
    out: dict[str, int] = {}
    bounds: dict[str, int] = {}
    near: dict[PriorityClass, list[Waiting]] = {}
    for t in targets:
        ahead, others, bounds[t.id] = _measures(conn, t, running, batch_size)
        # At least this many tasks go first: the replay would run out of reads before it.
        if ahead >= READ_CAP or (batch_size == 1 and ahead + others >= READ_CAP):
            out[t.id] = bounds[t.id]
        else:
            near.setdefault(t.priority, []).append(t)
    for priority, group in near.items():
        found = replay(_Reader(conn, priority), running, {t.id for t in group}, batch_size)
        earlier = 0
        if found and priority > min(PriorityClass):
            earlier = int(conn.execute(_EARLIER_CLASSES, {"priority": priority}).scalar_one())
        for t in group:
            out[t.id] = earlier + found[t.id] if t.id in found else bounds[t.id]
    return out


class _Reader:
    """The two reads of one class's waiting tasks (a `Source`), counted against the caps."""

    def __init__(self, conn: Connection, priority: PriorityClass) -> None:
        self.conn = conn
        self.priority = priority
        self.read = 0
        self.statements = 0

    def window(self, after: float, out: Sequence[str], limit: int) -> tuple[list[_Task], float]:
        rows = self._execute(
            _WINDOW, {"after": after, "out": list(out), "limit": limit, "span": SPAN}
        )
        self.read += len(rows)
        found = [_task(r) for r in rows]
        if len(found) == limit:
            return found, found[-1][0]
        upto, last = (rows[0] if rows else self._execute(_SPAN, {"after": after, "span": SPAN})[0])[
            -2:
        ]
        return found, _INF if upto is None or upto >= last else float(upto)

    def key(self, key_id: str, after: float, limit: int) -> list[_Task]:
        rows = self._execute(_KEY_NEXT, {"key_id": key_id, "after": after, "limit": limit})
        self.read += len(rows)
        return [_task(r) for r in rows]

    def heads(self, limit: int) -> list[tuple[_Task, bool]] | None:
        rows = self._execute(_KEY_HEADS, {"max_keys": limit})
        self.read += len(rows)
        return None if len(rows) > limit else [(_task(r), r.next_seq is not None) for r in rows]

    def _execute(self, query: Any, params: dict[str, Any]) -> Sequence[Any]:
        if self.read >= READ_CAP or self.statements >= STATEMENT_CAP:
            raise _OutOfReads
        self.statements += 1
        after = params.get("after")
        if after is not None:
            params["after"] = -1 if after == -_INF else int(after)
        return self.conn.execute(query, {**params, "priority": self.priority}).all()


def _task(row: Any) -> _Task:
    """A row (seq, id, key_id, width, height, steps, guidance_scale) as the replay holds it."""
    return (int(row[0]), row[1], row[2], (row[3], row[4], row[5], row[6]))


def replay(
    source: Source, running: Mapping[str, int], wanted: set[str], batch_size: int
) -> dict[str, int]:
    """Claims replayed on the waiting tasks `source` reads until every wanted task is placed,
    nothing waits or the reads run out. Returns the positions found."""
    return _Replay(source).run(running, set(wanted), batch_size)


class _Replay:
    """One replay's claims, on what it has read so far."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.keys: dict[str, _Key] = {}
        # Keys not met yet have no waiting task with seq <= unmet_after (inf: there are none).
        self.unmet_after: float = -_INF
        self.window = min(8, WINDOW)  # how many tasks the next window asks for
        self.heads_read = False  # whether the heads of every key were asked for
        self.claimed: set[str] = set()
        self.heads: list[_Entry] = []  # every met key's entry (stale ones skipped on pop)
        self.fronts: list[tuple[float, str]] = []  # (through, key) of met keys not read in full
        self.by_shape: dict[_Shape, list[_Task]] = {}  # heaps of the tasks read, by seq

    def run(self, running: Mapping[str, int], wanted: set[str], batch_size: int) -> dict[str, int]:
        found: dict[str, int] = {}
        load: dict[str, int] = dict(running)
        placed = 0
        try:
            while wanted:
                leader = self._leader(load)
                if leader is None:
                    break
                batch = [leader] if batch_size == 1 else self._fill(leader[3], load, batch_size)
                for t in batch:
                    placed += 1
                    self.claimed.add(t[1])
                    if t[1] in wanted:
                        found[t[1]] = placed
                        wanted.discard(t[1])
                load = {}
                for t in batch:
                    load[t[2]] = load.get(t[2], 0) + 1
                for key_id in load:
                    self._push(key_id)
        except _OutOfReads:
            pass
        return found

    # What is known of each key

    def _entry(self, key_id: str) -> _Entry | None:
        """The key's entry (None: nothing of it is left to read or claim, or it is tracked and
        has nothing read left: then it is found as a key not met would be)."""
        k = self.keys[key_id]
        while k.head < len(k.tasks) and k.tasks[k.head][1] in self.claimed:
            k.head += 1
        if k.head < len(k.tasks):
            return (k.tasks[k.head][0], 0, key_id)
        return None if k.tracked or k.through == _INF else (k.through, 1, key_id)

    def _push(self, key_id: str) -> None:
        entry = self._entry(key_id)
        if entry is not None:
            heapq.heappush(self.heads, entry)

    def _add(
        self, key_id: str, found: list[_Task], through: float = _INF, tracked: bool = False
    ) -> None:
        k = self.keys.get(key_id)
        if k is None:
            k = self.keys[key_id] = _Key([], through, min(4, CHUNK))
        k.tasks.extend(found)
        k.through, k.tracked = through, tracked
        for t in found:
            heapq.heappush(self.by_shape.setdefault(t[3], []), t)
        if not tracked and through != _INF:
            heapq.heappush(self.fronts, (through, key_id))
        self._push(key_id)

    def _untrack(self, key_id: str) -> None:
        """A key the windows stop covering: read up to where they have read."""
        if key_id not in self.keys or self.keys[key_id].tracked:  # not met: nothing up to there
            self._add(key_id, [], self.unmet_after)

    def _complete(self, key_id: str) -> bool:
        k = self.keys[key_id]
        return k.through == _INF if not k.tracked else self.unmet_after == _INF

    def _read_window(self, load: Mapping[str, int]) -> None:
        """The next window: the tasks past `unmet_after` of the keys not met and of the keys
        tracked, leaving out the keys with load (a window is read to find keys with none; they
        stop being tracked) and the keys read further by their own reads. The keys it covers
        are then read up to where it ends. A window that finds nothing (one key's long backlog,
        left out, fills its walk) turns to the heads of every key, once, if there are at most
        MAX_KEYS."""
        for key_id in load:
            self._untrack(key_id)
        out = [k for k, q in self.keys.items() if not q.tracked and q.through != _INF]
        found, end = self.source.window(self.unmet_after, out, self.window)
        self.window = min(2 * self.window, WINDOW)
        per_key: dict[str, list[_Task]] = {}
        for t in found:
            per_key.setdefault(t[2], []).append(t)
        for key_id, tasks_of_key in per_key.items():
            self._add(key_id, tasks_of_key, tracked=True)
        self.unmet_after = end
        if not found and end != _INF and not self.heads_read:
            self.heads_read = True
            heads = self.source.heads(MAX_KEYS)
            if heads is not None:
                for key_id in [k for k, q in self.keys.items() if q.tracked]:
                    self._untrack(key_id)
                for t, more in heads:
                    if t[2] not in self.keys:  # a met key's own reads know more of it
                        self._add(t[2], [t], t[0] if more else _INF)
                self.unmet_after = _INF

    def _read_key(self, key_id: str) -> None:
        self._untrack(key_id)
        k = self.keys[key_id]
        found = self.source.key(key_id, k.through, k.chunk)
        through = found[-1][0] if len(found) == k.chunk else _INF
        k.chunk = min(2 * k.chunk, CHUNK)
        self._add(key_id, found, through)

    def _valid_front(self, load: Mapping[str, int]) -> tuple[float, str] | None:
        """The met key with no load not read in full, read the least far (None: none)."""
        aside: list[tuple[float, str]] = []
        try:
            while self.fronts:
                through, key_id = self.fronts[0]
                if self.keys[key_id].tracked or self.keys[key_id].through != through:
                    heapq.heappop(self.fronts)
                elif load.get(key_id, 0):
                    aside.append(heapq.heappop(self.fronts))
                else:
                    return self.fronts[0]
            return None
        finally:
            for e in aside:
                heapq.heappush(self.fronts, e)

    # The claim's two picks

    def _leader(self, load: Mapping[str, int]) -> _Task | None:
        """The oldest waiting task of the least-loaded key, read first wherever a task not read
        could be it (None: nothing waits)."""
        while True:
            aside: list[_Entry] = []
            top: _Entry | None = None
            while self.heads:
                entry = self.heads[0]
                if self._entry(entry[2]) != entry:
                    heapq.heappop(self.heads)
                elif load.get(entry[2], 0):
                    aside.append(heapq.heappop(self.heads))
                else:
                    top = entry
                    break
            for e in aside:
                heapq.heappush(self.heads, e)
            if top is not None and top[1] == 0 and top[0] <= self.unmet_after:
                k = self.keys[top[2]]
                return k.tasks[k.head]
            if top is not None and top[1] == 1 and top[0] < self.unmet_after:
                self._read_key(top[2])  # its next task could lead before any key not met
            elif self.unmet_after != _INF:
                self._read_window(load)  # a key not met could have the oldest task of all
            else:
                return self._loaded_leader(aside, load)

    def _loaded_leader(self, loaded: list[_Entry], load: Mapping[str, int]) -> _Task | None:
        """The leader when every key with tasks waiting has load: by (load, seq). Every key is
        met then (`unmet_after` is inf), so a key with no entry has nothing left."""
        best: tuple[int, float] | None = None
        leader: _Task | None = None
        for _, _, key_id in loaded:
            entry = self._entry(key_id)
            while entry is not None and entry[1] == 1:
                self._read_key(key_id)
                entry = self._entry(key_id)
            if entry is not None and (best is None or (load[key_id], entry[0]) < best):
                best = (load[key_id], entry[0])
                k = self.keys[key_id]
                leader = k.tasks[k.head]
        return leader

    def _fill(self, shape: _Shape, load: Mapping[str, int], batch_size: int) -> list[_Task]:
        """The batch of `shape`: its tasks by (key load, seq), up to `batch_size`."""
        batch: list[_Task] = []
        aside: list[_Task] = []
        heap = self.by_shape.setdefault(shape, [])
        try:
            while len(batch) < batch_size:  # first the keys with no load, oldest first
                while heap and (heap[0][1] in self.claimed or load.get(heap[0][2], 0)):
                    t = heapq.heappop(heap)
                    if t[1] not in self.claimed:
                        aside.append(t)
                front = self._valid_front(load)
                bound = min(self.unmet_after, front[0] if front else _INF)
                if heap and heap[0][0] <= bound:  # nothing not read could come before it
                    t = heapq.heappop(heap)
                    batch.append(t)
                    self.claimed.add(t[1])
                elif bound == _INF:
                    break  # every key with no load is read in full
                elif front is not None and front[0] < self.unmet_after:
                    self._read_key(front[1])
                else:
                    self._read_window(load)
            if len(batch) < batch_size:  # then the loaded keys, read in full, by (load, seq)
                for key_id in [k for k in self.keys if load.get(k, 0)]:
                    while not self._complete(key_id):
                        self._read_key(key_id)
                rest = {t[1]: t for t in [*aside, *heap] if t[1] not in self.claimed}
                for t in sorted(rest.values(), key=lambda t: (load[t[2]], t[0]))[
                    : batch_size - len(batch)
                ]:
                    batch.append(t)
                    self.claimed.add(t[1])
        finally:
            for t in aside:
                if t[1] not in self.claimed:
                    heapq.heappush(heap, t)
        return batch


def _measures(
    conn: Connection, t: Waiting, running: Mapping[str, int], batch_size: int
) -> tuple[int, int, int]:
    """(its key's tasks ahead of `t`, up to READ_CAP; with one task a claim, other keys' tasks
    that go before it, at least (else 0); the upper bound of its position), in one statement.

    Its key's tasks ahead all go first (a key's oldest task leads before its later ones). With
    one task a claim, so do the other keys' older tasks but those of the key with most of them:
    when `t` leads a claim after the first, only the key the previous claim served can still
    have a task older than `t` (any other would lead instead). Keys with tasks running are left
    out (the first claim weighs them), and only the OLDER_CAP oldest waiting tasks are counted.

    The upper bound: 1 + every other waiting task, less the ones that never go before `t`: its
    key's later tasks of its class and batch key (a batch takes one key's tasks of a class and
    batch key in seq order, and the key's head, older than them, leads first)."""
    ahead, waiting, later, others = conn.execute(
        _MEASURES_ONE_A_CLAIM if batch_size == 1 else _MEASURES,
        {
            "key_id": t.key_id,
            "priority": t.priority,
            "seq": t.seq,
            "limit": READ_CAP,
            "width": t.shape.width,
            "height": t.shape.height,
            "steps": t.shape.steps,
            "guidance_scale": t.shape.guidance_scale,
            "older_cap": OLDER_CAP,
            "spared": [t.key_id, *running],
        },
    ).one()
    return int(ahead), int(others), max(1, int(waiting) - int(later))
