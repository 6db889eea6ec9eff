"""The plain data of the engine: what a caller submits and hears back (`Submission`, `Progress`,
`RunningImage`) and what one loop iteration passes along (`StepPlan` from `schedule()` to `run()` and
`update()`, `StepResult` from `run()` to `update()`). Plans and results are frozen and hold tuples, never
the scheduler's live lists."""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from spo_runtime.requests import ActiveRequest, GeneratedImage, GenerationRequest

Size = tuple[int, int]  # (height, width)

_submission_seq = itertools.count()  # process-wide: orders submissions (FIFO), ties included


@dataclass(eq=False)
class Submission:
    """One call to `submit`: n images of one size, answered together by one future."""

    id: str
    requests: list[GenerationRequest]
    size: Size
    deadline: float
    future: concurrent.futures.Future
    t_submit: float = field(default_factory=time.perf_counter)
    results: list[GeneratedImage | None] = field(default_factory=list)
    # best_of (engine/selection.py): `requests` are the candidates; groups[j]: answer image j's candidate indices,
    # places[i]: candidate i's (image, candidate) place; both empty without best_of > 1
    groups: tuple[tuple[int, ...], ...] = ()
    places: tuple[tuple[int, int], ...] = ()
    cancelled: bool = False
    answered: bool = False  # the engine has decided the answer (set under the lock; the future follows)
    seq: int = field(default_factory=lambda: next(_submission_seq))  # FIFO order, ties included
    # progress: called in the engine thread after each step of each row, with a `Progress`; keep it cheap
    progress: Callable[[Progress], None] | None = None
    preview: bool = False  # Progress carries a CPU copy of the row's latent
    position: int = 0  # images ahead of this submission in the queue when it was submitted
    costs: tuple[int, ...] = ()  # each image's pixel-passes (engine/cost.py), set when it is queued

    def cancel(self) -> None:
        """Leave the batch at the next step boundary (e.g. the client went away)."""
        self.cancelled = True


Slot = tuple[Submission, int]  # one image of a submission: (submission, index in its requests)


@dataclass(frozen=True)
class Progress:
    """One denoising step of one image: step `i` of the `n` its row runs (an img2img row runs fewer)."""

    index: int  # which image of the submission
    i: int
    n: int
    eta_s: float  # seconds until this image is done, at the recent step time
    latents: torch.Tensor | None = None  # (1, C, h, w) on the CPU, when the submission asked for previews


@dataclass(frozen=True)
class RunningImage:
    """A snapshot of one running image (`Engine.oldest_running`)."""

    submission: Submission  # `.cancel()` makes it leave at the next step boundary
    index: int
    step: int
    steps: int
    start: int  # an img2img row starts past 0
    step_seconds: float  # the recent step time (EWMA)


@dataclass(frozen=True)
class StepPlan:
    """What one loop iteration does, decided by `schedule()`; a snapshot, never the live lists."""

    size: Size | None  # the group that runs (None: nothing to run)
    admit: tuple[Slot, ...] = ()  # waiting images that join the group on this step, FIFO
    running: tuple[ActiveRequest, ...] = ()  # the group's rows before the admitted ones join
    drop: tuple[tuple[Submission, BaseException], ...] = ()  # submissions that leave, and why

    @property
    def idle(self) -> bool:
        return self.size is None and not self.drop


@dataclass(frozen=True)
class StepResult:
    """What `run(plan)` computed; `update(plan, result)` applies it."""

    admitted: tuple[ActiveRequest, ...] = ()  # prepared rows of plan.admit (tag = their slot)
    rejected: tuple[tuple[Submission, BaseException], ...] = ()  # submissions whose preparation failed
    failed: tuple[tuple[ActiveRequest, BaseException], ...] = ()  # rows whose step failed
    finished: tuple[tuple[ActiveRequest, GeneratedImage | BaseException], ...] = ()  # done rows: image or decode error
    step_seconds: float | None = None  # None: no UNet call ran
    batch_size: int = 0

    @classmethod
    def all_failed(cls, plan: StepPlan, err: BaseException) -> StepResult:
        """The result of a step that raised unexpectedly: its rows and its admitted submissions fail."""
        subs = dict.fromkeys(sub for sub, _ in plan.admit)
        return cls(rejected=tuple((sub, err) for sub in subs), failed=tuple((s, err) for s in plan.running))
