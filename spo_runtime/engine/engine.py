"""`Engine`: the step-level batching loop. One thread owns the device; callers submit and await futures.

Each iteration of the loop is a step boundary (queued admin calls and boundary hooks run), then
    plan = schedule()         # Scheduler: which submissions leave, which size group runs, who joins it
    result = run(plan)        # Runner: prepare the joiners, one UNet call over the group, decode the done
    update(plan, result)      # Scheduler applies the step; the engine tells the callers
`scheduler.py` and `runner.py` say what each half decides and computes. Cancellations, deadlines and
admin changes take effect only at these boundaries. The engine owns one Condition: the scheduler's state,
the admin-call queue and the stop flag are read and written under it from any thread, `died` written.

The loop runs in its own thread. Measured here (2-core CPU, tiny preset): a thread other than the
process's main thread runs the same batch-8 step about 30% slower (OpenMP's thread pool is tuned for
the main thread); on a GPU the kernels run asynchronously and the thread costs nothing measurable.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from typing import Any, Awaitable, Callable, Mapping

import torch

from spo_runtime.engine import selection
from spo_runtime.engine.config import EngineConfig
from spo_runtime.engine.plan import Progress, RunningImage, StepPlan, StepResult, Submission
from spo_runtime.engine.runner import Runner
from spo_runtime.engine.scheduler import Answer, Note, Scheduler
from spo_runtime.engine.step_model import LoadedAdapter, Scorer, StepModel
from spo_runtime.errors import EngineUnavailableError, InvalidRequestError, RequestCancelledError
from spo_runtime.faults import NONE, Faults, InjectedFault
from spo_runtime.metrics import Metrics, default_metrics
from spo_runtime.requests import GeneratedImage, GenerationRequest

log = logging.getLogger("spo_runtime.engine")


class Engine:
    """Drives `pipe` (a `StepModel`) step by step over every submitted image. `clock` (injectable in tests)
    sets deadlines and queue times; `faults` is SPO_FAULTS' plan (tests only)."""

    def __init__(
        self,
        pipe: StepModel,
        config: EngineConfig = EngineConfig(),
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
        faults: Faults = NONE,
        scorer: Scorer | None = None,
        scorer_unavailable: str = "no preference scorer was given to the engine",
    ):
        self.pipe = pipe
        self.config = config
        self.metrics = metrics or default_metrics()
        self._clock = clock
        self.faults = faults
        self.died: str | None = None
        self._cv = threading.Condition()  # an RLock: submit holds it around scheduler.add, which takes it again
        self.scheduler = Scheduler(config, self.metrics, clock, self._cv,  # its state is under self._cv
                                   default_size=pipe.preset.default_size)
        self.runner = Runner(pipe, faults, clock, self.scheduler.retry_after)
        # read and written under self._cv
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._stop = False
        # the engine thread's own
        self._boundary_hooks: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._metric_adapters: set[str] = set()
        self.metrics.lora_scale.set(pipe.default_lora_scale)
        self._adapter_metrics()
        # best_of's preference scorer (the service builds it: SPO_SCORER); None: best_of > 1 is refused, saying why
        self.runner.selector.scorer = scorer
        self.scorer_unavailable = scorer_unavailable

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
        """Queue `requests` (one size) as one submission; fails fast when the queue is full (SPO_MAX_QUEUE
        images waiting, or SPO_MAX_QUEUE_COST of work queued and running)."""
        if not requests:
            raise InvalidRequestError("requests", "must hold at least one request")
        parsed = [self.pipe.parse(r) for r in requests]
        self._check_best_of(parsed)
        parsed, groups, places = selection.expand(parsed)  # best_of: each image's candidates
        d = self.pipe.preset.default_size
        sizes = {(r.height or d, r.width or d) for r in parsed}
        if len(sizes) != 1:
            raise InvalidRequestError("width", "all images of one submission must have one size")
        if timeout_s is not None and not 0 < timeout_s:
            raise InvalidRequestError("timeout_s", f"must be > 0, got {timeout_s}")
        timeout = min(timeout_s or self.config.request_timeout_s, self.config.request_timeout_s)
        now = self._clock()
        sub = Submission(uuid.uuid4().hex[:16], parsed, sizes.pop(), now + timeout, concurrent.futures.Future(),
                         t_submit=now, results=[None] * len(parsed), progress=progress, preview=preview)
        sub.groups, sub.places = groups, places
        with self._cv:
            if self._stop:
                raise EngineUnavailableError("the engine is stopped")
            if self.died is not None:
                raise EngineUnavailableError(f"the engine thread died ({self.died_type}); restart the server", retry_after=30)
            self.scheduler.add(sub)  # QueueFullError past SPO_MAX_QUEUE or SPO_MAX_QUEUE_COST
            self._cv.notify_all()
        return sub

    def _check_best_of(self, parsed: list[GenerationRequest]) -> None:
        for r in parsed:
            if r.best_of == 1:
                continue
            if self.runner.selector.scorer is None:
                raise InvalidRequestError("best_of", f"must be 1 on this server: {self.scorer_unavailable}")
            if r.search == "step" and r.best_of > self.config.max_batch:
                raise InvalidRequestError("best_of", f"with search \"step\" must be at most SPO_MAX_BATCH="
                                                     f"{self.config.max_batch} (the candidates step together), got {r.best_of}")

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
        self._metric_adapters = _adapter_gauges(self.metrics, self.pipe.registry.adapters, self._metric_adapters)

    # -- observation (any thread; each read takes the lock) ----------------------------------

    def running_scales(self) -> list[dict[str, float]]:
        """The LoRA scales of every running row (e.g. to refuse unloading an adapter in use)."""
        return self.scheduler.running_scales()

    def oldest_running(self) -> RunningImage | None:
        """The running image submitted first (what a single-queue client's progress bar shows), or None."""
        return self.scheduler.oldest_running()

    def retry_after(self) -> float:
        """Seconds until a slot is likely to free: the soonest-finishing running row's remaining steps."""
        return self.scheduler.retry_after()

    def stats(self) -> dict:
        return self.scheduler.stats()

    @property
    def steps(self) -> int:
        """UNet steps run so far."""
        return self.scheduler.steps

    @property
    def died_type(self) -> str | None:
        """The type of the exception that killed the engine thread: what answers to clients name (its text,
        in `died`, may hold paths; the log and /info with the admin token carry it)."""
        return None if self.died is None else self.died.split(":", 1)[0]

    @property
    def alive(self) -> bool:
        """False once the engine thread died (not when it was stopped): /livez turns 503."""
        return self.died is None

    # -- one step: schedule -> run -> update -------------------------------------------------

    def schedule(self) -> StepPlan:
        return self.scheduler.schedule()

    def run(self, plan: StepPlan) -> StepResult:
        return self.runner.run(plan)

    def update(self, plan: StepPlan, result: StepResult) -> None:
        """Apply a step, then tell the callers outside the lock: progress first (a listener sees a row's
        last step before its image), then the answers."""
        notes, answers = self.scheduler.update(plan, result)
        if result.step_seconds is not None:
            _memory_gauges(self.metrics, self.pipe.device)
        _deliver(notes, answers)

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        """The engine thread. Nothing a step raises kills it; if it dies anyway (a bug, an injected
        fault), every waiting and running request is answered 503 at once and new ones are refused."""
        try:
            self._serve()
        except BaseException as e:
            with self._cv:
                self.died = f"{type(e).__name__}: {e}"
            log.critical("the engine thread died: %s", self.died, exc_info=e)
            self._fail_all(EngineUnavailableError(f"the engine thread died ({self.died_type}); restart the server",
                                                  retry_after=30))

    def _serve(self) -> None:
        torch.set_grad_enabled(False)
        crash = self.faults.get("engine_crash")
        while True:
            if crash is not None and self.steps >= crash["step"]:
                raise InjectedFault(f"engine_crash after {self.steps} steps (SPO_FAULTS)")
            if not self._boundary():
                return
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

    def _boundary(self) -> bool:
        """A step boundary: wait while idle, then run the hooks and the queued admin calls. False: stop.

        The hooks first: the admin-state sync then reads every recorded change (its own worker's last one
        included) before this worker applies the next; the other way round, a record that landed after the
        last poll (the engine idled) undid a change just applied (an adapter unloaded here came back from
        the older record until the next one was read)."""
        with self._cv:
            if not (self._stop or self.scheduler.has_work or self._calls):
                self._cv.wait(timeout=1.0)  # idle: the hooks still run about once a second
            if self._stop:
                return False
        for hook in self._boundary_hooks:
            try:
                hook()
            except Exception:
                log.exception("boundary hook failed")
        self._run_calls()
        return True

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

    def _fail_all(self, err: BaseException) -> None:
        _deliver([], self.scheduler.fail_all(err))


def _deliver(notes: list[Note], answers: list[Answer]) -> None:
    """Call the progress callbacks, then set the futures (the engine thread, outside the lock)."""
    for callback, note in notes:
        try:
            callback(note)
        except Exception:
            log.exception("progress callback failed")
    for fut, value, err in answers:
        try:
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(value)
        except concurrent.futures.InvalidStateError:  # the caller cancelled the future itself
            pass


def _memory_gauges(metrics: Metrics, dev: torch.device) -> None:
    if dev.type == "cuda":
        metrics.mem_allocated.labels(str(dev)).set(torch.cuda.memory_allocated(dev))
        metrics.mem_reserved.labels(str(dev)).set(torch.cuda.memory_reserved(dev))


def _adapter_gauges(metrics: Metrics, loaded: Mapping[str, LoadedAdapter], shown: set[str]) -> set[str]:
    """Set spo_adapters_loaded and spo_adapter_memory_bytes to the `loaded` adapters, removing the series of
    the ones `shown` before that are gone; returns the names shown now."""
    metrics.adapters.set(len(loaded))
    for name in shown - set(loaded):
        metrics.adapter_bytes.remove(name)
    for a in loaded.values():
        metrics.adapter_bytes.labels(a.name).set(a.nbytes)
    return set(loaded)
