"""`Runner.run(plan)`: the compute half of a step, outside the lock and without engine bookkeeping.

It prepares the images the plan admits in one call (one batched text encoding; on failure submission by
submission, so only the offending one is rejected), runs one UNet step over the group's rows (on out of
memory, again in halves, recursively, before failing any row), and decodes the rows that finished on this
step together. best_of's scoring runs here too, after the UNet call (`selection.Selector`): the step-search
groups at a branch point, then the finished candidates. What happened is returned as a `StepResult`; `Scheduler.update` applies it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from spo_runtime.engine.plan import Slot, StepPlan, StepResult, Submission
from spo_runtime.engine.selection import Selector
from spo_runtime.engine.step_model import StepModel
from spo_runtime.errors import EngineUnavailableError, SpoError, is_oom
from spo_runtime.faults import Faults
from spo_runtime.requests import ActiveRequest, GeneratedImage

log = logging.getLogger("spo_runtime.engine")


class Runner:
    """Runs plans on `pipe`. `clock` stamps the rows' timings (the engine's clock, injectable in tests);
    `retry_after` gives the Retry-After of a failed step (it reads the scheduler, under its lock)."""

    def __init__(self, pipe: StepModel, faults: Faults, clock: Callable[[], float], retry_after: Callable[[], float]):
        self.pipe = pipe
        self.faults = faults
        self._clock = clock
        self._retry_after = retry_after
        self.selector = Selector(pipe, None)  # best_of's scoring and step search; the engine sets its scorer

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
        failed += tuple(self.selector.branch(s for s in rows if id(s) not in gone))  # search "step"'s branch points
        gone = {id(s) for s, _ in failed}
        done = [s for s in rows if id(s) not in gone and s.row.done]
        return StepResult(admitted, rejected, failed, self.selector.finish(self._decode(done)), dt, len(rows))

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
                retry_after=self._retry_after(),
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


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
