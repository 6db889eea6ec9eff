"""The step-level batching engine: one loop owns the device; callers submit and await futures.

Each iteration of the loop is a step boundary (queued admin calls and boundary hooks run), then
`plan = schedule()`, `result = run(plan)`, `update(plan, result)`:
  - schedule (reads, under the lock): which submissions leave (cancelled, expired, already
    answered), the image-size group whose turn it is (least recently served, so no size starves;
    ties go to the group holding the oldest submission), and which waiting images of that size join
    it, FIFO, up to `max_batch` (step mode: at every step; request mode: only into an empty group).
    The plan is immutable: tuples, never the engine's live lists;
  - run (computes, no lock, no engine bookkeeping): prepare the admitted images in one call (one
    batched text encoding), one UNet call over the group (halved on out-of-memory), decode the rows
    that finished on this step together. It returns a `StepResult`;
  - update (applies, under the lock): drop the leaving submissions, move the admitted rows from the
    queue into the running group, remove finished and failed rows, count, then answer the futures.
Every read from another thread (`stats`, `retry_after`, `running_scales`) takes the same lock.

The loop runs in its own thread. Measured here (2-core CPU, tiny preset): a thread other than the
process's main thread runs the same batch-8 step about 30% slower (OpenMP's thread pool is tuned for
the main thread); on a GPU the kernels run asynchronously and the thread costs nothing measurable.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import math
import threading
import time
import uuid
from typing import Any, Awaitable, Callable

import torch

from spo_runtime.errors import (DeadlineExceededError, SpoError, EngineUnavailableError, InvalidRequestError, QueueFullError,
                                RequestCancelledError, is_oom)
from spo_runtime.faults import NONE, Faults, InjectedFault
from spo_runtime.metrics import Metrics, default_metrics
from spo_runtime.engine.config import EngineConfig
from spo_runtime.engine.plan import Progress, RunningImage, Size, Slot, StepPlan, StepResult, Submission
from spo_runtime.engine.step_model import StepModel
from spo_runtime.requests import GeneratedImage, GenerationRequest, ActiveRequest, Status

log = logging.getLogger("spo_runtime.engine")


class Engine:
    def __init__(
        self,
        pipe: StepModel,
        config: EngineConfig = EngineConfig(),
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
        faults: Faults = NONE,
    ):
        self.pipe = pipe
        self.config = config
        self.metrics = metrics or default_metrics()
        self._clock = clock
        self.faults = faults
        self.died: str | None = None
        self._cv = threading.Condition()  # an RLock: boundary hooks may read running_scales()
        # everything below is read and written under self._cv
        self._waiting: collections.deque[Slot] = collections.deque()
        self._admitting = 0  # slots of _waiting the step in flight admits: no longer counted as waiting
        self._running: dict[Size, tuple[ActiveRequest, ...]] = {}
        self._served: dict[Size, int] = {}  # size -> the iteration that last ran it
        self._iteration = 0
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._step_ewma: float | None = None
        self._stop = False
        self.steps = 0
        # the engine thread's own
        self._boundary_hooks: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._metric_adapters: set[str] = set()
        self.metrics.lora_scale.set(pipe.default_lora_scale)
        self._adapter_metrics()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="spo-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all(EngineUnavailableError("the engine stopped"))

    def on_boundary(self, hook: Callable[[], None]) -> None:
        """Run `hook` in the engine thread at every step boundary (e.g. converge to shared admin state)."""
        self._boundary_hooks.append(hook)

    # -- submitting --------------------------------------------------------------------------

    def submit(self, requests: list[GenerationRequest | dict], timeout_s: float | None = None,
               progress: Callable[[Progress], None] | None = None, preview: bool = False) -> Submission:
        """Queue `requests` (one size) as one submission; fails fast when the queue is full."""
        if not requests:
            raise InvalidRequestError("requests", "must hold at least one request")
        parsed = [self.pipe.parse(r) for r in requests]
        d = self.pipe.preset.default_size
        sizes = {(r.height or d, r.width or d) for r in parsed}
        if len(sizes) != 1:
            raise InvalidRequestError("width", "all images of one submission must have one size")
        if timeout_s is not None and not 0 < timeout_s:
            raise InvalidRequestError("timeout_s", f"must be > 0, got {timeout_s}")
        timeout = min(timeout_s or self.config.request_timeout_s, self.config.request_timeout_s)
        now = self._clock()
        sub = Submission(uuid.uuid4().hex[:16], parsed, sizes.pop(), now + timeout, concurrent.futures.Future(), t_submit=now)
        sub.results = [None] * len(parsed)
        with self._cv:
            if self._stop:
                raise EngineUnavailableError("the engine is stopped")
            if self.died is not None:
                raise EngineUnavailableError(f"the engine thread died ({self.died}); restart the server", retry_after=30)
            waiting = len(self._waiting) - self._admitting
            if waiting + len(parsed) > self.config.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFullError(
                    f"queue: {waiting} images wait (SPO_MAX_QUEUE={self.config.max_queue}); retry later",
                    retry_after=self.retry_after(),
                )
            sub.progress, sub.preview, sub.position = progress, preview, waiting
            self._waiting.extend((sub, i) for i in range(len(parsed)))
            self.metrics.queue_depth.set(len(self._waiting) - self._admitting)
            self._cv.notify_all()
        return sub

    async def generate(
        self,
        requests: list[GenerationRequest | dict],
        timeout_s: float | None = None,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        poll_s: float = 0.2,
    ) -> list[GeneratedImage]:
        """Submit and await the images; a caller that disconnects (or is cancelled) frees its slots."""
        sub = self.submit(requests, timeout_s)
        fut = asyncio.wrap_future(sub.future)
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=poll_s)
                if done:
                    return fut.result()
                if is_disconnected is not None and await is_disconnected():
                    sub.cancel()
                    self.metrics.rejected.labels("disconnected").inc()
                    raise RequestCancelledError("the client disconnected")
        except asyncio.CancelledError:
            sub.cancel()
            raise

    def generate_sync(self, requests, timeout_s: float | None = None) -> list[GeneratedImage]:
        return self.submit(requests, timeout_s).future.result()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` in the engine thread at the next step boundary (admin changes)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify_all()
        if self._thread is None:  # not started: run now
            self._run_calls()
        return fut

    # -- admin, applied at step boundaries ---------------------------------------------------

    def set_default_lora_scale(self, scale: float) -> dict:
        def apply():
            out = self.pipe.set_default_lora_scale(scale)
            self.metrics.lora_scale.set(self.pipe.default_lora_scale)
            return out

        t0 = time.perf_counter()
        out = self.call(apply).result()
        out["applied_ms"] = (time.perf_counter() - t0) * 1e3
        return out

    def set_default_adapter(self, name: str | None) -> None:
        self.call(lambda: self.pipe.set_default_adapter(name)).result()

    def load_adapter(self, name: str, path, replace: bool = False):
        lora = self.pipe.registry.read(path)  # read and validate outside the loop

        def apply():
            out = self.pipe.registry.load(name, lora, source=str(path), replace=replace)
            self._adapter_metrics()
            return out

        return self.call(apply).result()

    def unload_adapter(self, name: str) -> None:
        def apply():
            self.pipe.registry.get(name)
            self.pipe.registry.in_use(name, self.running_scales())
            self.pipe.unload_adapter(name)
            self._adapter_metrics()

        self.call(apply).result()

    def _adapter_metrics(self) -> None:
        loaded = self.pipe.registry.adapters
        self.metrics.adapters.set(len(loaded))
        for name in self._metric_adapters - set(loaded):
            self.metrics.adapter_bytes.remove(name)
        for a in loaded.values():
            self.metrics.adapter_bytes.labels(a.name).set(a.nbytes)
        self._metric_adapters = set(loaded)

    # -- observation (any thread) ------------------------------------------------------------

    def running_scales(self) -> list[dict[str, float]]:
        """The LoRA scales of every running row (e.g. to refuse unloading an adapter in use)."""
        with self._cv:
            return [dict(s.scales) for g in self._running.values() for s in g]

    def oldest_running(self) -> RunningImage | None:
        """The running image submitted first (what a single-queue client's progress bar shows), or None."""
        with self._cv:
            rows = [s for g in self._running.values() for s in g]
            if not rows:
                return None
            s = min(rows, key=lambda s: (s.tag[0].seq, s.tag[1]))
            return RunningImage(s.tag[0], s.tag[1], s.row.step, s.row.schedule.num_steps, s.row.start,
                                self._step_ewma or 0.0)

    def retry_after(self) -> float:
        """Seconds until a slot is likely to free: the soonest-finishing running row's remaining steps."""
        with self._cv:
            step = self._step_ewma or 0.5
            groups = max(1, len(self._running))
            remaining = [s.row.schedule.num_steps - s.row.step for g in self._running.values() for s in g]
        soonest = min(remaining) if remaining else 1
        return max(1.0, math.ceil(soonest * step * groups))

    def stats(self) -> dict:
        with self._cv:
            return {
                "waiting": len(self._waiting) - self._admitting,
                "running": sum(len(g) for g in self._running.values()) + self._admitting,
                "groups": {f"{h}x{w}": len(g) for (h, w), g in self._running.items()},
                "steps": self.steps,
                "step_seconds_ewma": self._step_ewma,
                "max_batch": self.config.max_batch,
                "max_queue": self.config.max_queue,
                "request_timeout_s": self.config.request_timeout_s,
                "batching": self.config.batching,
            }

    # -- the loop ----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the engine thread died (not when it was stopped): /livez turns 503."""
        return self.died is None

    def _loop(self) -> None:
        """The engine thread. Nothing a step raises kills it; if it dies anyway (a bug, an injected
        fault), every waiting and running request is answered 503 at once and new ones are refused."""
        try:
            self._serve()
        except BaseException as e:
            with self._cv:
                self.died = f"{type(e).__name__}: {e}"
            log.critical("the engine thread died: %s", self.died, exc_info=e)
            self._fail_all(EngineUnavailableError(f"the engine thread died ({self.died}); restart the server",
                                                  retry_after=30))

    def _serve(self) -> None:
        torch.set_grad_enabled(False)
        crash = self.faults.get("engine_crash")
        while True:
            if crash is not None and self.steps >= crash["step"]:
                raise InjectedFault(f"engine_crash after {self.steps} steps (SPO_FAULTS)")
            with self._cv:
                if not (self._stop or self._waiting or self._running or self._calls):
                    self._cv.wait(timeout=1.0)  # idle: the hooks still run about once a second
                if self._stop:
                    return
            self._run_calls()
            self._hooks()
            plan = self.schedule()
            if plan.idle:
                continue
            try:
                result = self.run(plan)
            except Exception as e:  # never let one step kill the loop: fail this step's rows only
                log.exception("engine step failed")
                result = StepResult.all_failed(plan, EngineUnavailableError(f"step failed: {type(e).__name__}: {e}"))
            try:
                self.update(plan, result)
            except Exception as e:  # the bookkeeping is no longer trustworthy: answer everyone
                log.exception("engine update failed")
                self._fail_all(EngineUnavailableError(f"engine failed: {type(e).__name__}: {e}"))

    def _hooks(self) -> None:
        for hook in self._boundary_hooks:
            try:
                hook()
            except Exception:
                log.exception("boundary hook failed")

    def _run_calls(self) -> None:
        while True:
            with self._cv:
                if not self._calls:
                    return
                fn, fut = self._calls.popleft()
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def schedule(self) -> StepPlan:
        """Decide the next step from the engine's state. update() applies the plan; until then the
        only trace is that the admitted images count as running, not waiting (the queue limit)."""
        now = self._clock()
        with self._cv:
            drop: dict[Submission, BaseException] = {}
            alive: dict[Size, tuple[ActiveRequest, ...]] = {}
            waiting: list[Slot] = []
            for sub, i in self._waiting:
                if self._leaves(sub, now, drop) is None:
                    waiting.append((sub, i))
            for size, group in self._running.items():
                rows = tuple(s for s in group if self._leaves(s.tag[0], now, drop) is None)
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
                admit = tuple(itertools.islice((slot for slot in waiting if slot[0].size == size), max(0, room)))
            self._admitting = len(admit)
            return StepPlan(size, admit, running, tuple(drop.items()))

    def _leaves(self, sub: Submission, now: float, drop: dict[Submission, BaseException]) -> BaseException | None:
        """Why `sub` leaves at this boundary (recorded in `drop`), or None (lock held)."""
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
                f"({sub.deadline - sub.t_submit:.1f}s; SPO_REQUEST_TIMEOUT_S={self.config.request_timeout_s})"
            )
        if err is not None:
            drop[sub] = err
        return err

    def run(self, plan: StepPlan) -> StepResult:
        """Prepare the admitted images (one batched text encoding), one UNet step over the group, decode
        the rows that finished. Touches only the plan's rows, never the engine's bookkeeping."""
        if plan.size is None:
            return StepResult()
        admitted, rejected = self._prepare(plan.admit) if plan.admit else ((), ())
        rows = plan.running + admitted
        if not rows:
            return StepResult(admitted, rejected)
        t0 = time.perf_counter()
        self.faults.before_step(list(rows))  # SPO_FAULTS (tests only): slow_step, nan_row
        failed = tuple(self._denoise(list(rows)))
        dt = time.perf_counter() - t0
        gone = {id(s) for s, _ in failed}
        done = [s for s in rows if id(s) not in gone and s.row.done]
        return StepResult(admitted, rejected, failed, self._decode(done), dt, len(rows))

    def _prepare(self, admit: tuple[Slot, ...]) -> tuple[tuple[ActiveRequest, ...], tuple[tuple[Submission, BaseException], ...]]:
        """Prepare every admitted image in one call (one batched text encoding). If that fails (e.g. an
        adapter was unloaded while a request waited), prepare submission by submission so only the
        offending submission fails."""
        rejected: list[tuple[Submission, BaseException]] = []
        try:
            prepared = list(zip(admit, self.pipe.prepare([sub.requests[i] for sub, i in admit])))
        except Exception:
            prepared = []
            by_sub: dict[Submission, list[int]] = {}
            for sub, i in admit:
                by_sub.setdefault(sub, []).append(i)
            for sub, idx in by_sub.items():
                try:
                    states = self.pipe.prepare([sub.requests[i] for i in idx])
                except SpoError as e:
                    rejected.append((sub, e))
                    continue
                except Exception as e:
                    log.exception("preparing a request failed")
                    rejected.append((sub, EngineUnavailableError(f"step failed: {type(e).__name__}: {e}")))
                    continue
                prepared += [((sub, i), s) for i, s in zip(idx, states)]
        now = self._clock()
        for (sub, i), s in prepared:
            s.tag = (sub, i)
            s.t_submit = sub.t_submit
            s.t_start = now
            s.timings["queue_ms"] = (now - sub.t_submit) * 1e3
        return tuple(s for _, s in prepared), tuple(rejected)

    def _denoise(self, states: list[ActiveRequest], step: list[ActiveRequest] | None = None) -> list[tuple[ActiveRequest, BaseException]]:
        """One step; on out-of-memory retry with the batch split in half before failing anything.
        Returns the rows that failed, with their error. `step`: the whole step's rows (for SPO_FAULTS)."""
        step = states if step is None else step
        try:
            self.faults.before_unet(step, states)  # SPO_FAULTS (tests only): oom_above
            self.pipe.denoise(states)
            return []
        except Exception as e:
            if is_oom(e) and len(states) > 1:
                log.warning("out of memory at batch %d: retrying in halves", len(states))
                _empty_cache()
                half = len(states) // 2
                return self._denoise(states[:half], step) + self._denoise(states[half:], step)
            log.exception("step failed for %d request(s)", len(states))
            _empty_cache()
            err = EngineUnavailableError(
                f"step failed ({'out of device memory' if is_oom(e) else type(e).__name__}); retry later",
                retry_after=self.retry_after(),
            )
            return [(s, err) for s in states]

    def _decode(self, states: list[ActiveRequest]) -> tuple[tuple[ActiveRequest, GeneratedImage | BaseException], ...]:
        """Decode finished rows together; a decode that raises fails those rows only."""
        if not states:
            return ()
        try:
            self.faults.before_decode(states)  # SPO_FAULTS (tests only): decode_error
            results = self.pipe.decode(states)
        except Exception as e:
            log.exception("decode failed for %d request(s)", len(states))
            _empty_cache()
            err = EngineUnavailableError(f"decode failed ({'out of device memory' if is_oom(e) else type(e).__name__}); retry later")
            return tuple((s, err) for s in states)
        now = self._clock()
        for s, r in zip(states, results):
            if not isinstance(r, BaseException):
                r.timings["denoise_ms"] = (now - s.t_start) * 1e3 - r.timings.get("decode_ms", 0.0)
        return tuple(zip(states, results))

    def update(self, plan: StepPlan, result: StepResult) -> None:
        """Apply a step: drop leaving submissions, move admitted rows from the queue into the group,
        remove finished and failed rows, count; then answer the futures (outside the lock)."""
        answers: list[tuple[concurrent.futures.Future, Any, BaseException | None]] = []
        notes: list[tuple[Callable[[Progress], None], Progress]] = []
        with self._cv:
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
                self.metrics.images.labels(f"{s.width}x{s.height}", s.request.scheduler).inc()
                sub.results[i] = r
                if all(x is not None for x in sub.results) and not (sub.answered or sub.future.done()):
                    sub.answered = True
                    answers.append((sub.future, list(sub.results), None))

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
                notes = self._progress(plan, result, dropped)
                self.metrics.step_seconds.observe(dt)
                self.metrics.batch_size.observe(result.batch_size)
                self._memory_metrics()
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(sum(len(g) for g in self._running.values()))
        for callback, note in notes:  # before the answers: a listener sees a row's last step before its image
            try:
                callback(note)
            except Exception:
                log.exception("progress callback failed")
        for fut, value, err in answers:
            _answer(fut, value, err)

    def _progress(self, plan: StepPlan, result: StepResult, dropped: set) -> list:
        """(callback, Progress) for every row that stepped and whose submission listens (lock held)."""
        failed = {id(s) for s, _ in result.failed}
        notes = []
        for s in plan.running + result.admitted:
            sub, index = s.tag
            if sub.progress is None or id(s) in failed or sub in dropped:
                continue
            n = s.row.schedule.num_steps - s.row.start
            i = s.row.step - s.row.start
            lat = s.latents.detach().to("cpu", torch.float32) if sub.preview else None
            notes.append((sub.progress, Progress(index, i, n, max(0.0, (n - i) * (self._step_ewma or 0.0)), lat)))
        return notes

    def _set_group(self, size: Size, rows: tuple[ActiveRequest, ...]) -> None:
        if rows:
            self._running[size] = rows
        else:
            self._running.pop(size, None)

    # -- failure paths -----------------------------------------------------------------------

    def _fail(self, sub: Submission, err: BaseException, answers: list) -> None:
        """Fail `sub` (lock held); its other rows leave at the next boundary. Answered by the caller."""
        sub.cancelled = True
        if not (sub.answered or sub.future.done()):
            sub.answered = True
            self.metrics.rejected.labels(_reason(err)).inc()
            answers.append((sub.future, None, err))

    def _fail_all(self, err: BaseException) -> None:
        answers: list = []
        with self._cv:
            subs = {sub for sub, _ in self._waiting} | {s.tag[0] for g in self._running.values() for s in g}
            self._waiting.clear()
            self._running.clear()
            self._admitting = 0
            for sub in subs:
                self._fail(sub, err, answers)
        for fut, value, e in answers:
            _answer(fut, value, e)

    def _memory_metrics(self) -> None:
        dev = self.pipe.device
        if dev.type == "cuda":
            self.metrics.mem_allocated.labels(str(dev)).set(torch.cuda.memory_allocated(dev))
            self.metrics.mem_reserved.labels(str(dev)).set(torch.cuda.memory_reserved(dev))


def _answer(fut: concurrent.futures.Future, value: Any, err: BaseException | None) -> None:
    try:
        if err is not None:
            fut.set_exception(err)
        else:
            fut.set_result(value)
    except concurrent.futures.InvalidStateError:  # the caller cancelled the future itself
        pass


def _reason(err: BaseException) -> str:
    """The `reason` label of spo_rejected_total for a failed request."""
    from spo_runtime.errors import AdapterNotFoundError, NonFiniteError

    if isinstance(err, (InvalidRequestError, AdapterNotFoundError)):
        return "invalid"
    if isinstance(err, NonFiniteError):
        return "non_finite"
    return "error"


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
