"""The broker's scheduler: open jobs in memory, ready queues, and who runs what.

Pure state, no sockets and no store: :class:`BrokerState` journals every change
to the store and asks this module what to dispatch.

Queues are kept per priority (0 first), then per owner, then per *class* (the
tags a job requires, whether anonymous workers may run it, and its size class),
each lane in submission order. A monitor takes jobs from the most urgent
priority that has any it may run; within a priority, owners take turns
(round-robin), so one client's 100,000 jobs do not starve another's ten. A
monitor may run a class when it offers every required tag, when it takes frames
as large as the jobs' (its ``--max-message-size``), and, if it is anonymous,
when the jobs say ``anonymous_ok``.

One owner for each fact: :attr:`Scheduler.jobs` holds every open job, and a
job's :attr:`Job.monitor` says which monitor has it (``None`` while queued);
:attr:`Scheduler.assigned` is the index by monitor, kept by the same methods.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass

from .protocol import DEFAULT_MAX_MESSAGE_SIZE, MIN_MESSAGE_SIZE


class Where(enum.Enum):
    QUEUED = "queued"
    ASSIGNED = "assigned"


#: (required tags, anonymous_ok, size class)
JobClass = tuple[frozenset[str], bool, int]


def size_class(frame: int) -> int:
    """The size class of a job whose largest frame (its payload, or an attached file)
    is ``frame`` bytes: 0 when every monitor takes it, else ``frame`` rounded up to an
    eighth of a power of two, so that jobs of about the same size share a lane."""
    if frame <= MIN_MESSAGE_SIZE:
        return 0
    step = 1 << (frame.bit_length() - 4)
    return -(-frame // step) * step


@dataclass(slots=True, eq=False)
class Job:
    """An open job (queued or assigned to a monitor)."""

    id: str
    owner: str
    name: str | None
    kind: str
    priority: int
    timeout: float | None
    memory: int | None
    anonymous_ok: bool
    requires: frozenset[str]
    created: float
    failures: int
    #: submission order (the store's row number)
    seq: int
    #: the payload, or None when it is kept in the store only (memory budget)
    payload: bytes | None
    where: Where = Where.QUEUED
    #: the monitor id that has it, while assigned
    monitor: str | None = None
    started: float | None = None
    #: monitors that lost this job but whose late result is still welcome
    lost_from: set[str] | None = None
    #: run it in a slot process no earlier job ran in
    isolate: bool = False
    #: re-runs allowed after its code raised one of ``retry_on`` (exception class names)
    retries: int = 0
    retry_on: tuple[str, ...] = ()
    #: which run this is: 1, then one more after each retry (a lost worker is not one)
    attempt: int = 1
    #: content hashes of the shared blobs (attached files) it uses, kept in the store
    shared: tuple[str, ...] = ()
    #: its largest frame to a monitor, in bytes: its payload or an attached file
    frame: int = 0

    @property
    def retries_left(self) -> int:
        return max(0, self.retries + 1 - self.attempt)

    @property
    def job_class(self) -> JobClass:
        return (self.requires, self.anonymous_ok, size_class(self.frame))


@dataclass(frozen=True, slots=True)
class Taker:
    """What the scheduler needs to know of a monitor to pick jobs for it."""

    monitor_id: str
    tags: frozenset[str]
    anonymous: bool
    #: the largest frame it takes (its ``--max-message-size``)
    max_frame: int = DEFAULT_MAX_MESSAGE_SIZE

    def may_run(self, cls: JobClass) -> bool:
        requires, anonymous_ok, size = cls
        return (anonymous_ok or not self.anonymous) and requires <= self.tags \
            and size <= self.max_frame


class _Level:
    """The queued jobs of one priority: owner -> class -> lane, owners in turn order."""

    __slots__ = ("owners",)

    def __init__(self) -> None:
        self.owners: OrderedDict[str, dict[JobClass, deque[Job]]] = OrderedDict()


class Scheduler:
    """Open jobs, their queues, and their assignment to monitors."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.assigned: dict[str, set[str]] = {}
        self._levels: dict[int, _Level] = {}
        #: queued jobs: in all, per owner, and per class
        self.queued = 0
        self.queued_by_owner: dict[str, int] = {}
        self.queued_by_class: dict[JobClass, int] = {}

    # --- queue

    def add(self, job: Job) -> None:
        """A new open job, queued (or, with ``job.monitor`` set, assigned)."""
        self.jobs[job.id] = job
        if job.monitor is not None:
            job.where = Where.ASSIGNED
            self.assigned.setdefault(job.monitor, set()).add(job.id)
        else:
            self._enqueue(job, front=False)

    def _enqueue(self, job: Job, front: bool) -> None:
        job.where, job.monitor, job.started = Where.QUEUED, None, None
        level = self._levels.get(job.priority)
        if level is None:
            level = self._levels[job.priority] = _Level()
        lanes = level.owners.get(job.owner)
        if lanes is None:
            lanes = level.owners[job.owner] = {}
        lane = lanes.get(job.job_class)
        if lane is None:
            lane = lanes[job.job_class] = deque()
        if front:
            lane.appendleft(job)
        else:
            lane.append(job)
        self._count(job, 1)

    def _count(self, job: Job, delta: int) -> None:
        self.queued += delta
        self.queued_by_owner[job.owner] = self.queued_by_owner.get(job.owner, 0) + delta
        if not self.queued_by_owner[job.owner]:
            del self.queued_by_owner[job.owner]
        cls = job.job_class
        self.queued_by_class[cls] = self.queued_by_class.get(cls, 0) + delta
        if not self.queued_by_class[cls]:
            del self.queued_by_class[cls]

    def _unqueue(self, job: Job) -> None:
        """Take a queued job out of the counts; its lane entry is skipped later."""
        self._count(job, -1)

    # --- dispatch

    def take(self, taker: Taker, n: int) -> list[Job]:
        """Up to ``n`` queued jobs the monitor may run, most urgent first, owners
        taking turns within a priority; they become assigned to it."""
        out: list[Job] = []
        if n <= 0 or not self.queued or not any(taker.may_run(c) for c in self.queued_by_class):
            return out
        for priority in sorted(self._levels):
            level = self._levels[priority]
            while len(out) < n and level.owners:
                served = False
                for owner in list(level.owners):
                    job = self._pop_for(level, owner, taker)
                    if job is None:
                        continue
                    served = True
                    self._assign(job, taker.monitor_id)
                    out.append(job)
                    if owner in level.owners:
                        level.owners.move_to_end(owner)  # the next turn is another owner's
                    if len(out) >= n:
                        break
                if not served:
                    break
            if not level.owners:
                del self._levels[priority]
            if len(out) >= n:
                break
        return out

    def _pop_for(self, level: _Level, owner: str, taker: Taker) -> Job | None:
        """The owner's oldest job at this level that ``taker`` may run, out of its lane."""
        lanes = level.owners[owner]
        best: deque[Job] | None = None
        for cls, lane in list(lanes.items()):
            while lane and not self._is_queued(lane[0]):
                lane.popleft()  # killed or taken back while queued
            if not lane:
                del lanes[cls]
                continue
            if taker.may_run(cls) and (best is None or lane[0].seq < best[0].seq):
                best = lane
        if not lanes:
            del level.owners[owner]
        if best is None:
            return None
        job = best.popleft()
        if not best:
            del lanes[job.job_class]
            if not lanes:
                del level.owners[owner]
        self._unqueue(job)
        return job

    def _is_queued(self, job: Job) -> bool:
        return job.where is Where.QUEUED and self.jobs.get(job.id) is job

    def _assign(self, job: Job, monitor_id: str) -> None:
        job.where, job.monitor = Where.ASSIGNED, monitor_id
        self.assigned.setdefault(monitor_id, set()).add(job.id)

    def _unassign(self, job: Job) -> None:
        if job.monitor is not None:
            ids = self.assigned.get(job.monitor)
            if ids is not None:
                ids.discard(job.id)
                if not ids:
                    del self.assigned[job.monitor]
        job.monitor = None

    # --- changes of one job

    def adopt(self, job_id: str, monitor_id: str) -> Job | None:
        """Assign an open job to ``monitor_id`` (which says it has it), taking it out
        of the queue or away from another monitor; None if the job is not open."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        self._detach(job)
        self._assign(job, monitor_id)
        if job.lost_from:
            job.lost_from.discard(monitor_id)
        return job

    def requeue(self, job_id: str, lost_from: str | None = None) -> Job | None:
        """Put an assigned job back at the front of its queue; its monitor's late
        result stays welcome when ``lost_from`` names it."""
        job = self.jobs.get(job_id)
        if job is None or job.where is not Where.ASSIGNED:
            return None
        if lost_from is not None:
            if job.lost_from is None:
                job.lost_from = set()
            job.lost_from.add(lost_from)
        self._unassign(job)
        self._enqueue(job, front=True)
        return job

    def retry(self, job_id: str) -> Job | None:
        """An assigned job whose code raised goes back to the end of its queue for its
        next attempt; None if it is not assigned or has no retry left."""
        job = self.jobs.get(job_id)
        if job is None or job.where is not Where.ASSIGNED or not job.retries_left:
            return None
        job.attempt += 1
        job.lost_from = None  # results of the earlier attempt are stale now
        self._unassign(job)
        self._enqueue(job, front=False)
        return job

    def remove(self, job_id: str) -> Job | None:
        """The job is final: forget it (its lane entry is skipped later)."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return None
        self._detach(job)
        job.where = Where.ASSIGNED  # no longer queued, whatever a lane still holds
        return job

    def _detach(self, job: Job) -> None:
        """Out of the queue counts, or away from its monitor."""
        if job.where is Where.QUEUED:
            self._unqueue(job)
        else:
            self._unassign(job)

    # --- views

    def of_monitor(self, monitor_id: str) -> list[str]:
        """Ids of the jobs assigned to a monitor."""
        return list(self.assigned.get(monitor_id, ()))


def waiting_reason(job: Job, takers: list[Taker]) -> str | None:
    """Why a queued job cannot run on any connected monitor, or None if one could run it."""
    if any(t.may_run(job.job_class) for t in takers):
        return None
    if not takers:
        return "no worker is connected"
    if not job.anonymous_ok and all(t.anonymous for t in takers):
        return "only anonymous workers are connected, and the job is not anonymous_ok"
    offered = [t for t in takers if job.anonymous_ok or not t.anonymous]
    fits = [t for t in offered if size_class(job.frame) <= t.max_frame]
    if not fits:
        return (f"its payload or an attached file is {job.frame} bytes, more than any "
                f"connected worker takes (their --max-message-size is at most "
                f"{max(t.max_frame for t in offered)} bytes)")
    fewest = min((job.requires - t.tags for t in fits), key=len)
    missing = sorted(fewest)
    return f"no connected worker offers the tag{'s' if len(missing) > 1 else ''} " \
           f"{', '.join(missing)} that the job requires"
