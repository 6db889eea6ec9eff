"""The step-level batching engine: one loop owns the device; callers submit and await futures.

Each iteration of the loop is `plan = schedule()`, `run(plan)`, `update(plan)`:
  - schedule: drop cancelled and expired requests, pick the image-size group whose turn it is
    (least recently served, so no size starves), admit waiting requests of that size FIFO up to
    `max_batch` (step mode: at every step; request mode: only into an empty group);
  - run: encode the admitted prompts in one call, one UNet call for the group, the sampler step;
  - update: decode the rows that finished on this step together and answer them at once.
Admin changes (default scale, adapters) queue up and apply at step boundaries.

The loop runs in its own thread. Measured here (2-core CPU, tiny preset): a thread other than the
process's main thread runs the same batch-8 step about 30% slower (OpenMP, see PERF_NOTES); on a
GPU the kernels run asynchronously and the thread costs nothing measurable.
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
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal

import torch

from .errors import InvalidRequestError, SpoError
from .metrics import Metrics, default_metrics
from .models import SpoPipeline
from .requests import GeneratedImage, GenerationRequest, RequestState, Status

log = logging.getLogger("spo_runtime.engine")


class QueueFullError(SpoError):
    """More images wait than SPO_MAX_QUEUE allows (HTTP 429)."""

    def __init__(self, message: str, retry_after: float):
        self.retry_after = retry_after
        super().__init__(message)


class DeadlineExceededError(SpoError):
    """The request's deadline passed before it finished (HTTP 504)."""


class RequestCancelledError(SpoError):
    """The caller went away; the request left the batch."""


class EngineUnavailableError(SpoError):
    """A step failed (e.g. out of device memory even alone) or the engine stopped (HTTP 503)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        self.retry_after = retry_after
        super().__init__(message)


@dataclass(frozen=True)
class EngineConfig:
    """The engine's limits. Built from the service's Settings; each field names its variable."""

    max_batch: int = 8  # SPO_MAX_BATCH: images per UNet call
    max_queue: int = 64  # SPO_MAX_QUEUE: waiting images before 429
    request_timeout_s: float = 300.0  # SPO_REQUEST_TIMEOUT_S
    batching: Literal["step", "request"] = "step"  # SPO_BATCHING

    def __post_init__(self) -> None:
        if not self.max_batch >= 1:
            raise ValueError(f"SPO_MAX_BATCH: must be >= 1, got {self.max_batch}")
        if not self.max_queue >= 0:
            raise ValueError(f"SPO_MAX_QUEUE: must be >= 0, got {self.max_queue}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"SPO_REQUEST_TIMEOUT_S: must be > 0, got {self.request_timeout_s}")
        if self.batching not in ("step", "request"):
            raise ValueError(f"SPO_BATCHING: must be 'step' or 'request', got {self.batching!r}")


@dataclass(eq=False)
class Job:
    """One submission: n images of one size, answered together."""

    id: str
    requests: list[GenerationRequest]
    size: tuple[int, int]  # (height, width)
    deadline: float
    future: concurrent.futures.Future
    t_submit: float = field(default_factory=time.perf_counter)
    results: list[GeneratedImage | None] = field(default_factory=list)
    cancelled: bool = False

    def cancel(self) -> None:
        """Leave the batch at the next step boundary (e.g. the client went away)."""
        self.cancelled = True


@dataclass
class StepPlan:
    """What one loop iteration does: the group it runs and the requests it admits into it."""

    size: tuple[int, int] | None
    admit: list[tuple[Job, int]]
    running: list[RequestState]


class Engine:
    def __init__(self, pipe: SpoPipeline, config: EngineConfig = EngineConfig(), metrics: Metrics | None = None):
        self.pipe = pipe
        self.config = config
        self.metrics = metrics or default_metrics()
        self._cv = threading.Condition()
        self._waiting: collections.deque[tuple[Job, int]] = collections.deque()
        self._running: dict[tuple[int, int], list[RequestState]] = {}
        self._served: dict[tuple[int, int], int] = {}  # size -> loop iteration it last ran
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._boundary_hooks: list[Callable[[], None]] = []
        self._iteration = itertools.count()
        self._step_ewma: float | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0
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

    def submit(self, requests: list[GenerationRequest | dict], timeout_s: float | None = None) -> Job:
        """Queue `requests` (one size) as one job; fails fast when the queue is full."""
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
        job = Job(uuid.uuid4().hex[:16], parsed, sizes.pop(), time.perf_counter() + timeout, concurrent.futures.Future())
        job.results = [None] * len(parsed)
        with self._cv:
            if self._stop:
                raise EngineUnavailableError("the engine is stopped")
            if len(self._waiting) + len(parsed) > self.config.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFullError(
                    f"queue: {len(self._waiting)} images wait (SPO_MAX_QUEUE={self.config.max_queue}); retry later",
                    retry_after=self.retry_after(),
                )
            self._waiting.extend((job, i) for i in range(len(parsed)))
            self.metrics.queue_depth.set(len(self._waiting))
            self._cv.notify_all()
        return job

    async def generate(
        self,
        requests: list[GenerationRequest | dict],
        timeout_s: float | None = None,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        poll_s: float = 0.2,
    ) -> list[GeneratedImage]:
        """Submit and await the images; a caller that disconnects (or is cancelled) frees its slots."""
        job = self.submit(requests, timeout_s)
        fut = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=poll_s)
                if done:
                    return fut.result()
                if is_disconnected is not None and await is_disconnected():
                    job.cancel()
                    self.metrics.rejected.labels("disconnected").inc()
                    raise RequestCancelledError("the client disconnected")
        except asyncio.CancelledError:
            job.cancel()
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
            running = [s.scales for group in self._running.values() for s in group]
            self.pipe.registry.in_use(name, running)
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

    # -- observation -------------------------------------------------------------------------

    def retry_after(self) -> float:
        """Seconds until a slot is likely to free: the soonest-finishing running row's remaining steps."""
        step = self._step_ewma or 0.5
        groups = max(1, len(self._running))
        remaining = [s.row.schedule.num_steps - s.row.step for g in self._running.values() for s in g]
        soonest = min(remaining) if remaining else 1
        return max(1.0, math.ceil(soonest * step * groups))

    def stats(self) -> dict:
        with self._cv:
            return {
                "waiting": len(self._waiting),
                "running": sum(len(g) for g in self._running.values()),
                "groups": {f"{h}x{w}": len(g) for (h, w), g in self._running.items()},
                "steps": self.steps,
                "step_seconds_ewma": self._step_ewma,
                "max_batch": self.config.max_batch,
                "max_queue": self.config.max_queue,
                "request_timeout_s": self.config.request_timeout_s,
                "batching": self.config.batching,
            }

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running and not self._calls:
                    self._cv.wait(timeout=1.0)
                    self._hooks()
                if self._stop:
                    return
            self._run_calls()
            self._hooks()
            plan = self.schedule()
            if plan.size is None:
                continue
            try:
                self.run(plan)
            except Exception as e:  # never let one step kill the loop
                log.exception("engine step failed")
                self._fail_states(plan.running, EngineUnavailableError(f"step failed: {type(e).__name__}: {e}"))

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
        """Drop cancelled/expired requests, choose the group to run, admit waiting requests into it."""
        now = time.perf_counter()
        with self._cv:
            self._drop_finished_jobs(now)
            sizes = set(self._running) | {job.size for job, _ in self._waiting}
            if not sizes:
                return StepPlan(None, [], [])
            # least recently served size first; ties go to the size holding the oldest request
            oldest = {}
            for job, _ in self._waiting:
                oldest.setdefault(job.size, job.t_submit)
            for size, g in self._running.items():
                oldest[size] = min(oldest.get(size, math.inf), min(s.t_submit for s in g))
            size = min(sizes, key=lambda s: (self._served.get(s, -1), oldest.get(s, math.inf)))
            running = self._running.setdefault(size, [])
            admit: list[tuple[Job, int]] = []
            if self.config.batching == "step" or not running:
                room = self.config.max_batch - len(running)
                keep = collections.deque()
                while self._waiting:
                    job, i = self._waiting.popleft()
                    if job.size == size and len(admit) < room:
                        admit.append((job, i))
                    else:
                        keep.append((job, i))
                self._waiting = keep
            self._served[size] = next(self._iteration)
            self.metrics.queue_depth.set(len(self._waiting))
            return StepPlan(size, admit, running)

    def run(self, plan: StepPlan) -> None:
        """Admit (batched text encoding), one UNet step over the group, decode and answer finished rows."""
        if plan.admit:
            self._admit(plan)
        if not plan.running:
            self._running.pop(plan.size, None)
            return
        t0 = time.perf_counter()
        self._denoise(plan.running)
        dt = time.perf_counter() - t0
        self.steps += 1
        self._step_ewma = dt if self._step_ewma is None else 0.8 * self._step_ewma + 0.2 * dt
        self.metrics.step_seconds.observe(dt)
        self.metrics.batch_size.observe(len(plan.running))
        self._memory_metrics()
        done = [s for s in plan.running if s.row.done or s.status >= Status.FINISHED]
        if done:
            finished = [s for s in done if s.status < Status.FINISHED]  # failed rows are already answered
            if finished:
                self._finish(finished)
            with self._cv:
                plan.running[:] = [s for s in plan.running if s not in done]
                if not plan.running:
                    self._running.pop(plan.size, None)
        self.metrics.running.set(sum(len(g) for g in self._running.values()))

    def _admit(self, plan: StepPlan) -> None:
        """Prepare every admitted request in one call (one batched text encoding). If that fails
        (e.g. an adapter was unloaded while a request waited), prepare job by job so only the
        offending job fails."""
        try:
            prepared = list(zip(plan.admit, self.pipe.prepare([job.requests[i] for job, i in plan.admit])))
        except SpoError:
            prepared = []
            by_job: dict[Job, list[int]] = {}
            for job, i in plan.admit:
                by_job.setdefault(job, []).append(i)
            for job, idx in by_job.items():
                try:
                    states = self.pipe.prepare([job.requests[i] for i in idx])
                except SpoError as e:
                    self._fail_job(job, e)
                    continue
                prepared += [((job, i), s) for i, s in zip(idx, states)]
        now = time.perf_counter()
        for (job, i), s in prepared:
            s.tag = (job, i)
            s.t_submit = job.t_submit
            s.t_start = now
            s.status = Status.RUNNING
            s.timings["queue_ms"] = (now - job.t_submit) * 1e3
            self.metrics.queue_wait.observe(now - job.t_submit)
            self.metrics.encode.observe(s.timings.get("encode_ms", 0.0) / 1e3)
            plan.running.append(s)

    def _denoise(self, states: list[RequestState]) -> None:
        """One step; on out-of-memory retry with the batch split in half before failing anything."""
        try:
            self.pipe.denoise(states)
        except Exception as e:
            if _is_oom(e) and len(states) > 1:
                log.warning("out of memory at batch %d: retrying in halves", len(states))
                _empty_cache()
                half = len(states) // 2
                self._denoise(states[:half])
                self._denoise(states[half:])
                return
            log.exception("step failed for %d request(s)", len(states))
            _empty_cache()
            err = EngineUnavailableError(
                f"step failed ({'out of device memory' if _is_oom(e) else type(e).__name__}); retry later",
                retry_after=self.retry_after(),
            )
            self._fail_states(states, err)

    def _finish(self, states: list[RequestState]) -> None:
        results = self.pipe.decode(states)
        now = time.perf_counter()
        for s, r in zip(states, results):
            job, i = s.tag
            if isinstance(r, Exception):
                self._fail_job(job, r)
                continue
            r.timings["denoise_ms"] = (now - s.t_start) * 1e3 - r.timings.get("decode_ms", 0.0)
            self.metrics.denoise.observe(r.timings["denoise_ms"] / 1e3)
            self.metrics.decode.observe(r.timings.get("decode_ms", 0.0) / 1e3)
            self.metrics.images.labels(f"{s.width}x{s.height}", s.request.scheduler).inc()
            job.results[i] = r
            if all(x is not None for x in job.results) and not job.future.done():
                job.future.set_result(list(job.results))

    # -- failure paths -----------------------------------------------------------------------

    def _drop_finished_jobs(self, now: float) -> None:
        """Remove rows of cancelled, expired or failed jobs from the queue and the batch (lock held)."""

        def gone(job: Job) -> BaseException | None:
            if job.future.done():
                return RequestCancelledError("already answered")
            if job.cancelled:
                return RequestCancelledError("the request was cancelled")
            if now > job.deadline:
                return DeadlineExceededError(
                    f"timeout_s: the request did not finish within its deadline "
                    f"({job.deadline - job.t_submit:.1f}s; SPO_REQUEST_TIMEOUT_S={self.config.request_timeout_s})"
                )
            return None

        dropped: dict[Job, BaseException] = {}
        keep = collections.deque()
        for job, i in self._waiting:
            err = dropped.get(job) or gone(job)
            if err is None:
                keep.append((job, i))
            else:
                dropped[job] = err
        self._waiting = keep
        for size, group in list(self._running.items()):
            alive = []
            for s in group:
                job = s.tag[0]
                err = dropped.get(job) or gone(job)
                if err is None:
                    alive.append(s)
                else:
                    dropped[job] = err
                    s.status = Status.CANCELLED
            group[:] = alive
            if not group:
                del self._running[size]
        for job, err in dropped.items():
            if not job.future.done():
                reason = "timeout" if isinstance(err, DeadlineExceededError) else "cancelled"
                self.metrics.rejected.labels(reason).inc()
                job.future.set_exception(err)

    def _fail_states(self, states: list[RequestState], err: BaseException) -> None:
        for s in states:
            s.status = Status.FAILED
            if s.tag is not None:
                self._fail_job(s.tag[0], err)

    def _fail_job(self, job: Job, err: BaseException) -> None:
        job.cancelled = True  # its other rows leave at the next boundary
        if not job.future.done():
            self.metrics.rejected.labels(_reason(err)).inc()
            job.future.set_exception(err)

    def _fail_all(self, err: BaseException) -> None:
        with self._cv:
            jobs = {job for job, _ in self._waiting} | {s.tag[0] for g in self._running.values() for s in g if s.tag}
            self._waiting.clear()
            self._running.clear()
        for job in jobs:
            self._fail_job(job, err)

    def _memory_metrics(self) -> None:
        dev = self.pipe.device
        if dev.type == "cuda":
            self.metrics.mem_allocated.labels(str(dev)).set(torch.cuda.memory_allocated(dev))
            self.metrics.mem_reserved.labels(str(dev)).set(torch.cuda.memory_reserved(dev))


def _reason(err: BaseException) -> str:
    """The `reason` label of spo_rejected_total for a failed request."""
    from .errors import AdapterNotFoundError, NonFiniteError

    if isinstance(err, (InvalidRequestError, AdapterNotFoundError)):
        return "invalid"
    if isinstance(err, NonFiniteError):
        return "non_finite"
    return "error"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
