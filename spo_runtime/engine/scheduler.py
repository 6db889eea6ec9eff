"""`Scheduler`: the engine's bookkeeping (the waiting queue, the running groups, which size ran when, the
recent step time) and the two halves of a step that touch it, both under the engine's one lock:

  - `schedule()` reads: which submissions leave (cancelled, expired, already answered), the image-size
    group whose turn it is (least recently served, so no size starves; ties go to the group holding the
    oldest submission), and which waiting images of that size join it, FIFO, up to `max_batch` (step
    mode: at every step; request mode: only into an empty group). It returns an immutable `StepPlan`;
  - `update(plan, result)` applies: drop the leaving submissions, move the admitted rows from the queue into
    the running group, remove finished and failed rows, count. It returns what to tell the callers (the
    progress notes and the answers), which the engine delivers outside the lock.

Admission (`add`, refused with 429 when the queue is full, or when the work queued and running would cost
more than SPO_MAX_QUEUE_COST: `cost.py`) and the reads for other threads (`stats`,
`retry_after`, `running_scales`, `oldest_running`) take the same lock. Nothing here calls the model: the
scheduler runs on CPU in tests, driven by hand.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
from typing import Any, Callable

import torch

from spo_runtime.engine import cost, selection
from spo_runtime.engine.config import EngineConfig
from spo_runtime.engine.plan import Progress, RunningImage, Size, Slot, StepPlan, StepResult, Submission
from spo_runtime.errors import (AdapterNotFoundError, DeadlineExceededError, InvalidRequestError, NonFiniteError,
                                QueueFullError, RequestCancelledError)
from spo_runtime.metrics import Metrics, size_class
from spo_runtime.requests import ActiveRequest, Status

Answer = tuple[concurrent.futures.Future, Any, BaseException | None]  # (future, value, error): set one
Note = tuple[Callable[[Progress], None], Progress]  # a progress callback and what to tell it


class Scheduler:
    """The queue and the running groups. `lock` is the engine's one Condition; every public method takes it.
    It must be reentrant (a Condition's default RLock): the engine holds it around `add`, which takes it
    again, as does the `retry_after` that a full queue's error reads. `default_size`: the preset's, the
    size whose one UNet pass is a unit of cost."""

    def __init__(self, config: EngineConfig, metrics: Metrics, clock: Callable[[], float],
                 lock: threading.Condition | None = None, default_size: int = 64):
        self.config = config
        self.default_size = default_size
        self.metrics = metrics
        self._clock = clock
        self._lock = threading.Condition() if lock is None else lock
        # everything below is read and written under self._lock
        self._waiting: collections.deque[Slot] = collections.deque()
        self._admitting = 0  # slots of _waiting the step in flight admits: no longer counted as waiting
        self._running: dict[Size, tuple[ActiveRequest, ...]] = {}
        self._served: dict[Size, int] = {}  # size -> the iteration that last ran it
        self._iteration = 0
        self._step_ewma: float | None = None
        self.steps = 0  # UNet steps run

    # -- admission ---------------------------------------------------------------------------

    def add(self, sub: Submission) -> None:
        """Queue every image of `sub` behind the waiting ones; QueueFullError past SPO_MAX_QUEUE (images
        waiting) or past SPO_MAX_QUEUE_COST (the cost of the images waiting and running, and of `sub`'s)."""
        h, w = sub.size
        sub.costs = tuple(cost.waiting_cost(r, h, w) for r in sub.requests)
        with self._lock:
            waiting = len(self._waiting) - self._admitting
            if waiting + len(sub.requests) > self.config.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFullError(
                    f"queue: {waiting} images wait (SPO_MAX_QUEUE={self.config.max_queue}); retry later",
                    retry_after=self.retry_after(),
                )
            queued, new, limit = self._cost(), sum(sub.costs), self.config.queue_cost_limit
            if queued + new > limit * self.default_size ** 2:  # in exact pixel-passes
                self.metrics.rejected.labels("queue_cost").inc()
                raise QueueFullError(self._cost_refusal(sub, self._units(queued), self._units(new), limit),
                                     retry_after=self.retry_after())
            sub.position = waiting
            self._waiting.extend((sub, i) for i in range(len(sub.requests)))
            self.metrics.queue_depth.set(len(self._waiting) - self._admitting)
            self.metrics.queue_cost.set(self._units(queued + new))

    def _cost(self) -> int:
        """Pixel-passes of every image waiting (all its steps) and running (the steps it has left), but those
        of submissions that leave at the next boundary (cancelled, answered): freed at once (lock held)."""
        waiting = sum(sub.costs[i] for sub, i in self._waiting if _live(sub))
        return waiting + sum(cost.running_cost(s) for g in self._running.values() for s in g if _live(s.tag[0]))

    def _units(self, pixel_passes: int) -> float:
        return cost.units(pixel_passes, self.default_size)

    def _cost_refusal(self, sub: Submission, queued: float, new: float, limit: float) -> str:
        (h, w), d = sub.size, self.default_size
        what = (f"queue cost: {len(sub.requests)} image(s) of {w}x{h} cost {new:g} (width x height / {d}x{d} x "
                f"steps, x2 with guidance)")
        if new > limit:
            return f"{what}, more than SPO_MAX_QUEUE_COST={limit:g} allows; ask for fewer or smaller images or fewer steps"
        return f"{what}, and {queued:g} is queued or running (SPO_MAX_QUEUE_COST={limit:g}); retry later"

    @property
    def has_work(self) -> bool:
        """Images wait or run (lock held by the caller)."""
        return bool(self._waiting or self._running)

    # -- schedule: decide the next step ------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Decide the next step from the queue's state. update() applies the plan; until then the
        only trace is that the admitted images count as running, not waiting (the queue limit)."""
        now = self._clock()
        with self._lock:
            drop: dict[Submission, BaseException] = {}
            alive: dict[Size, tuple[ActiveRequest, ...]] = {}
            waiting: list[Slot] = []
            for sub, i in self._waiting:
                if _leaves(sub, now, drop, self.config) is None:
                    waiting.append((sub, i))
            for size, group in self._running.items():
                rows = tuple(s for s in group if _leaves(s.tag[0], now, drop, self.config) is None)
                if rows:
                    alive[size] = rows
            # the oldest submission of each size (waiting or running)
            oldest: dict[Size, int] = {}
            for sub, _ in waiting:
                oldest.setdefault(sub.size, sub.seq)
            for size, rows in alive.items():
                oldest[size] = min(oldest.get(size, math.inf), min(s.tag[0].seq for s in rows))
            if not oldest:
                self._admitting = 0
                return StepPlan(None, drop=tuple(drop.items()))
            # least recently served size first; ties go to the size holding the oldest submission
            size = min(oldest, key=lambda s: (self._served.get(s, -1), oldest[s]))
            running = alive.get(size, ())
            admit: tuple[Slot, ...] = ()
            if self.config.batching == "step" or not running:
                room = self.config.max_batch - len(running)
                admit = _admit([slot for slot in waiting if slot[0].size == size], room)
            self._admitting = len(admit)
            return StepPlan(size, admit, running, tuple(drop.items()))

    # -- update: apply a step ----------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> tuple[list[Note], list[Answer]]:
        """Apply a step: drop leaving submissions, move admitted rows from the queue into the group,
        remove finished and failed rows, count. Returns the progress notes and the answers to deliver
        (outside the lock; notes first)."""
        answers: list[Answer] = []
        notes: list[Note] = []
        with self._lock:
            dropped = {sub for sub, _ in plan.drop}
            for sub, err in plan.drop:
                if not (sub.answered or sub.future.done()):
                    sub.answered = True
                    self.metrics.rejected.labels("timeout" if isinstance(err, DeadlineExceededError) else "cancelled").inc()
                    answers.append((sub.future, None, err))
            taken = set(plan.admit)
            self._admitting = 0
            if dropped or taken:
                self._waiting = collections.deque(slot for slot in self._waiting if slot not in taken and slot[0] not in dropped)
            for size, group in list(self._running.items()):
                for s in group:
                    if s.tag[0] in dropped:
                        s.status = Status.CANCELLED
                self._set_group(size, tuple(s for s in group if s.tag[0] not in dropped))

            for sub, err in result.rejected:
                self._fail(sub, err, answers)
            for s in result.admitted:
                s.status = Status.RUNNING
                self.metrics.queue_wait.observe(s.timings["queue_ms"] / 1e3)
                self.metrics.encode.observe(s.timings.get("encode_ms", 0.0) / 1e3)
            for s, err in result.failed:
                s.status = Status.FAILED
                self._fail(s.tag[0], err, answers)
            for s, r in result.finished:
                sub, i = s.tag
                if isinstance(r, BaseException):
                    s.status = Status.FAILED
                    self._fail(sub, r, answers)
                    continue
                s.status = Status.FINISHED
                self.metrics.denoise.observe(r.timings["denoise_ms"] / 1e3)
                self.metrics.decode.observe(r.timings.get("decode_ms", 0.0) / 1e3)
                self.metrics.images.labels(size_class(s.width, s.height), s.request.scheduler).inc()
                sub.results[i] = r
                if all(x is not None for x in sub.results) and not (sub.answered or sub.future.done()):
                    sub.answered = True
                    answers.append((sub.future, selection.answer(sub), None))  # best_of: each image's best candidate

            if plan.size is not None:
                leave = {id(s) for s, _ in result.failed} | {id(s) for s, _ in result.finished}
                group = self._running.get(plan.size, ()) + result.admitted
                self._set_group(plan.size, tuple(s for s in group if id(s) not in leave))
                self._served[plan.size] = self._iteration
                self._iteration += 1
            if result.step_seconds is not None:
                dt = result.step_seconds
                self.steps += 1
                self._step_ewma = dt if self._step_ewma is None else 0.8 * self._step_ewma + 0.2 * dt
                notes = _progress(plan, result, dropped, self._step_ewma or 0.0)
                self.metrics.step_seconds.observe(dt)
                self.metrics.batch_size.observe(result.batch_size)
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(sum(len(g) for g in self._running.values()))
            self.metrics.queue_cost.set(self._units(self._cost()))
        return notes, answers

    def _set_group(self, size: Size, rows: tuple[ActiveRequest, ...]) -> None:
        if rows:
            self._running[size] = rows
        else:
            self._running.pop(size, None)

    # -- failure paths -----------------------------------------------------------------------

    def _fail(self, sub: Submission, err: BaseException, answers: list[Answer]) -> None:
        """Fail `sub` (lock held); its other rows leave at the next boundary. Answered by the caller."""
        sub.cancelled = True
        if not (sub.answered or sub.future.done()):
            sub.answered = True
            self.metrics.rejected.labels(_reason(err)).inc()
            answers.append((sub.future, None, err))

    def fail_all(self, err: BaseException) -> list[Answer]:
        """Empty the queue and the groups, failing every submission in them; returns the answers."""
        answers: list[Answer] = []
        with self._lock:
            subs = {sub for sub, _ in self._waiting} | {s.tag[0] for g in self._running.values() for s in g}
            self._waiting.clear()
            self._running.clear()
            self._admitting = 0
            for sub in subs:
                self._fail(sub, err, answers)
            self.metrics.queue_cost.set(0)
        return answers

    # -- observation (any thread) ------------------------------------------------------------

    def running_scales(self) -> list[dict[str, float]]:
        """The LoRA scales of every running row (e.g. to refuse unloading an adapter in use)."""
        with self._lock:
            return [dict(s.scales) for g in self._running.values() for s in g]

    def oldest_running(self) -> RunningImage | None:
        """The running image submitted first (what a single-queue client's progress bar shows), or None."""
        with self._lock:
            rows = [s for g in self._running.values() for s in g]
            if not rows:
                return None
            s = min(rows, key=lambda s: (s.tag[0].seq, s.tag[1]))
            return RunningImage(s.tag[0], s.tag[1], s.row.step, s.row.schedule.num_steps, s.row.start,
                                self._step_ewma or 0.0)

    def retry_after(self) -> float:
        """Seconds until a slot is likely to free: the soonest-finishing running row's remaining steps."""
        with self._lock:
            step = self._step_ewma or 0.5
            groups = max(1, len(self._running))
            remaining = [s.row.schedule.num_steps - s.row.step for g in self._running.values() for s in g]
        soonest = min(remaining) if remaining else 1
        return max(1.0, math.ceil(soonest * step * groups))

    def stats(self) -> dict:
        with self._lock:
            return {
                "waiting": len(self._waiting) - self._admitting,
                "running": sum(len(g) for g in self._running.values()) + self._admitting,
                "groups": {f"{h}x{w}": len(g) for (h, w), g in self._running.items()},
                "steps": self.steps,
                "step_seconds_ewma": self._step_ewma,
                "max_batch": self.config.max_batch,
                "max_queue": self.config.max_queue,
                "queue_cost": round(self._units(self._cost()), 3),
                "max_queue_cost": self.config.queue_cost_limit,
                "request_timeout_s": self.config.request_timeout_s,
                "batching": self.config.batching,
            }


def _admit(slots: list[Slot], room: int) -> tuple[Slot, ...]:
    """Waiting slots of one size that join, FIFO, up to `room`; a step-search group only whole (its candidates
    branch on the same step), and the slots behind a group that does not fit wait with it."""
    out: list[Slot] = []
    i = 0
    while i < len(slots) and len(out) < room:
        span = selection.admission_span(*slots[i])
        if len(out) + span > room:
            break
        out += slots[i : i + span]
        i += span
    return tuple(out)


def _reason(err: BaseException) -> str:
    """The `reason` label of spo_rejected_total for a failed request."""
    if isinstance(err, (InvalidRequestError, AdapterNotFoundError)):
        return "invalid"
    if isinstance(err, NonFiniteError):
        return "non_finite"
    return "error"


def _live(sub: Submission) -> bool:
    """Still to be run: not cancelled or answered (such a submission leaves at the next boundary)."""
    return not (sub.cancelled or sub.answered or sub.future.done())


def _leaves(sub: Submission, now: float, drop: dict[Submission, BaseException], config: EngineConfig) -> BaseException | None:
    """Why `sub` leaves at this boundary (recorded in `drop`), or None."""
    if sub in drop:
        return drop[sub]
    err: BaseException | None = None
    if sub.answered or sub.future.done():
        err = RequestCancelledError("already answered")
    elif sub.cancelled:
        err = RequestCancelledError("the request was cancelled")
    elif now > sub.deadline:
        err = DeadlineExceededError(
            f"timeout_s: the request did not finish within its deadline "
            f"({sub.deadline - sub.t_submit:.1f}s; SPO_REQUEST_TIMEOUT_S={config.request_timeout_s})"
        )
    if err is not None:
        drop[sub] = err
    return err


def _progress(plan: StepPlan, result: StepResult, dropped: set[Submission], step_s: float) -> list[Note]:
    """(callback, Progress) for every row that stepped and whose submission listens; `step_s`: the
    recent step time, for the ETA."""
    failed = {id(s) for s, _ in result.failed}
    notes = []
    for s in plan.running + result.admitted:
        sub, slot = s.tag
        index = selection.progress_index(sub, slot)  # best_of: one candidate speaks for its image
        if sub.progress is None or id(s) in failed or sub in dropped or index is None:
            continue
        n = s.row.schedule.num_steps - s.row.start
        i = s.row.step - s.row.start
        lat = s.latents.detach().to("cpu", torch.float32) if sub.preview else None
        notes.append((sub.progress, Progress(index, i, n, max(0.0, (n - i) * step_s), lat)))
    return notes
