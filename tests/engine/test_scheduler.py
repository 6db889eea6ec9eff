"""The engine's scheduler, driven by hand: schedule() -> run() -> update() on a fake pipeline.

No thread is started and nothing sleeps: each test submits, calls `schedule()`, checks the plan field
by field, then applies it with `run()` and `update()` and checks the engine's state. Deadlines use an
injected clock. The fake pipeline implements only what the engine calls; its rows are real
`ActiveRequest`s whose sampler row is a step counter.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry

from spo_runtime import AdapterInUseError, AdapterNotFoundError, NonFiniteError
from spo_runtime.engine import Engine, EngineConfig, Scheduler, StepPlan, StepResult, Submission
from spo_runtime.errors import DeadlineExceededError, EngineUnavailableError, QueueFullError, RequestCancelledError
from spo_runtime.metrics import Metrics
from spo_runtime.requests import GeneratedImage, GenerationRequest, ActiveRequest, Status

A, B = (64, 64), (96, 96)  # two image sizes (height, width)


class FakeRow:
    """What the engine reads of a sampler row: its position and its number of steps."""

    def __init__(self, num_steps: int):
        self.schedule = SimpleNamespace(num_steps=num_steps)
        self.step = 0

    @property
    def done(self) -> bool:
        return self.step >= self.schedule.num_steps


class FakeRegistry:
    def __init__(self, names):
        self.adapters = {n: SimpleNamespace(name=n, nbytes=1000) for n in names}

    def get(self, name):
        if name not in self.adapters:
            raise AdapterNotFoundError(name, list(self.adapters))
        return self.adapters[name]

    def in_use(self, name, running_scales):
        if any(row.get(name, 0.0) for row in running_scales):
            raise AdapterInUseError(f"adapter {name!r} is in use")


class FakePipe:
    """The SpoPipeline surface the engine uses. Records every call; `denoise_error` and
    `decode_error` (functions of the states) inject failures."""

    preset = SimpleNamespace(default_size=64, size_range=(64, 256))
    device = torch.device("cpu")

    def __init__(self):
        self.default_lora_scale = 1.0
        self.default_adapter = "spo"
        self.registry = FakeRegistry(["spo"])
        self.prepared: list[list[int]] = []  # seeds of each prepare call
        self.denoised: list[list[int]] = []  # seeds of each UNet call
        self.decoded: list[list[int]] = []
        self.denoise_error = lambda states: None  # -> exception to raise, or None
        self.decode_error = lambda states: None  # -> exception to raise, or None
        self.non_finite: set[int] = set()  # seeds whose decode returns a NonFiniteError

    def parse(self, request):
        return GenerationRequest.parse(request, size_range=self.preset.size_range)

    def prepare(self, requests):
        reqs = [self.parse(r) for r in requests]
        self.prepared.append([r.seed for r in reqs])
        states = []
        for r in reqs:
            adapter = r.adapter if r.adapter is not None else self.default_adapter
            if adapter is not None and adapter not in self.registry.adapters:
                raise AdapterNotFoundError(adapter, list(self.registry.adapters))
            states.append(ActiveRequest(
                request=r, seed=r.seed, width=r.width or 64, height=r.height or 64, adapter=adapter,
                lora_scale=r.lora_scale if r.lora_scale is not None else self.default_lora_scale,
                row=FakeRow(r.num_inference_steps), latents=torch.zeros(1), timings={"encode_ms": 2.0},
            ))
        return states

    def denoise(self, states):
        self.denoised.append([s.seed for s in states])
        err = self.denoise_error(states)
        if err is not None:
            raise err
        for s in states:
            s.row.step += 1

    def decode(self, states):
        self.decoded.append([s.seed for s in states])
        err = self.decode_error(states)
        if err is not None:
            raise err
        out = []
        for s in states:
            if s.seed in self.non_finite:
                out.append(NonFiniteError(f"seed {s.seed}: NaN"))
                continue
            out.append(GeneratedImage(
                image=None, seed=s.seed, lora_scale=s.lora_scale, adapter=s.adapter, adapter_sha256=None,
                prompt_truncated=False, request=s.request, timings={**s.timings, "decode_ms": 1.0},
            ))
        return out

    def set_default_lora_scale(self, scale):
        previous, self.default_lora_scale = self.default_lora_scale, scale
        return {"previous": previous, "scale": scale}

    def set_default_adapter(self, name):
        self.default_adapter = name

    def unload_adapter(self, name):
        del self.registry.adapters[name]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make(clock):
    def make(**cfg) -> tuple[Engine, FakePipe]:
        pipe = FakePipe()
        return Engine(pipe, EngineConfig(**cfg), metrics=Metrics(CollectorRegistry()), clock=clock), pipe

    return make


def req(seed: int, steps: int = 3, size: tuple[int, int] = A, **kw) -> dict:
    return dict(prompt=f"p{seed}", seed=seed, num_inference_steps=steps, height=size[0], width=size[1], **kw)


def step(eng: Engine) -> tuple[StepPlan, StepResult]:
    plan = eng.schedule()
    result = eng.run(plan)
    eng.update(plan, result)
    return plan, result


def seeds(rows) -> list[int]:
    return [s.seed for s in rows]


def admitted(plan: StepPlan) -> list[tuple[Submission, int]]:
    return list(plan.admit)


def rejected(eng: Engine, reason: str) -> float:
    return eng.metrics.rejected.labels(reason)._value.get()


# -- the plan ------------------------------------------------------------------------------------


def test_empty_engine_plans_nothing(make):
    eng, pipe = make()
    plan = eng.schedule()
    assert plan == StepPlan(None) and plan.idle
    assert eng.run(plan) == StepResult()
    eng.update(plan, StepResult())
    assert pipe.prepared == pipe.denoised == [] and eng.steps == 0


def test_the_plan_is_an_immutable_snapshot_and_schedule_only_reads(make):
    eng, _ = make(max_batch=4)
    a = eng.submit([req(0)])
    plan = eng.schedule()
    assert plan == eng.schedule()  # deciding twice decides the same
    assert plan.size == A and plan.admit == ((a, 0),) and plan.running == () and plan.drop == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.size = B
    assert all(isinstance(getattr(plan, f.name), tuple) for f in dataclasses.fields(plan) if f.name != "size")
    eng.update(plan, eng.run(plan))

    b = eng.submit([req(1)])
    plan2 = eng.schedule()
    assert seeds(plan2.running) == [0] and plan2.admit == ((b, 0),)
    result2 = eng.run(plan2)
    assert isinstance(result2.admitted, tuple) and isinstance(result2.finished, tuple)
    eng.update(plan2, result2)
    # update() changed the engine, never the plan it applied
    assert seeds(plan2.running) == [0] and plan2.admit == ((b, 0),)
    assert seeds(eng.schedule().running) == [0, 1]
    assert plan.admit == ((a, 0),) and plan.running == ()


def test_admits_fifo_up_to_max_batch_and_rows_join_running_group(make):
    eng, pipe = make(max_batch=3)
    subs = [eng.submit([req(i, steps=2)]) for i in range(2)]
    pair = eng.submit([req(10, steps=2), req(11, steps=2)])  # one submission of two images
    plan = eng.schedule()
    assert plan.size == A and plan.running == ()
    assert admitted(plan) == [(subs[0], 0), (subs[1], 0), (pair, 0)]  # FIFO, up to max_batch
    result = eng.run(plan)
    assert seeds(result.admitted) == [0, 1, 10] and result.failed == result.finished == ()
    assert result.batch_size == 3 and result.step_seconds is not None
    assert pipe.prepared == [[0, 1, 10]]  # one prepare call: one batched text encoding
    assert eng.stats()["running"] == 3  # counted as running while the step is in flight ...
    eng.update(plan, result)
    assert eng.stats()["running"] == 3 and eng.stats()["waiting"] == 1 and eng.steps == 1
    assert all(s.status == Status.RUNNING for s in result.admitted)

    plan = eng.schedule()  # group full: nobody joins
    assert plan.size == A and plan.admit == () and seeds(plan.running) == [0, 1, 10]
    result = eng.run(plan)
    assert seeds(s for s, _ in result.finished) == [0, 1, 10]
    eng.update(plan, result)
    assert [s.future.result(0)[0].seed for s in subs] == [0, 1]
    assert not pair.future.done()  # answered together, once both images are done
    assert pair.results[0].seed == 10 and pair.results[1] is None

    plan = eng.schedule()
    assert admitted(plan) == [(pair, 1)] and plan.running == ()
    step(eng)
    step(eng)
    assert [r.seed for r in pair.future.result(0)] == [10, 11]
    assert eng.stats()["running"] == eng.stats()["waiting"] == 0 and eng.stats()["groups"] == {}
    assert eng.metrics.images.labels("64x64", "ddim")._value.get() == 4


def test_least_recently_served_size_runs_next_and_fifo_within_a_size(make):
    eng, _ = make(max_batch=2)
    a0 = eng.submit([req(0, steps=3, size=A)])
    b0 = eng.submit([req(1, steps=3, size=B)])
    a1 = eng.submit([req(2, steps=3, size=A)])
    a2 = eng.submit([req(3, steps=3, size=A)])
    b1 = eng.submit([req(4, steps=3, size=B)])

    plan = eng.schedule()  # neither size served yet: the one holding the oldest submission
    assert plan.size == A and admitted(plan) == [(a0, 0), (a1, 0)]
    step(eng)
    plan = eng.schedule()  # B never ran, A just did
    assert plan.size == B and admitted(plan) == [(b0, 0), (b1, 0)] and plan.running == ()
    step(eng)
    sizes = []
    for _ in range(4):
        plan, _ = step(eng)
        sizes.append(plan.size)
    assert sizes == [A, B, A, B]  # the two sizes take turns
    assert a0.future.done() and a1.future.done() and b0.future.done() and b1.future.done()
    plan = eng.schedule()  # a2 waited behind its own size's batch, not behind B
    assert plan.size == A and admitted(plan) == [(a2, 0)]


def test_request_mode_admits_only_into_an_empty_group(make):
    eng, _ = make(batching="request", max_batch=4)
    first = eng.submit([req(0, steps=2)])
    plan, _ = step(eng)
    assert admitted(plan) == [(first, 0)]
    late = eng.submit([req(1, steps=2)])
    plan = eng.schedule()
    assert plan.size == A and plan.admit == () and seeds(plan.running) == [0]  # the batch runs to completion
    eng.update(plan, eng.run(plan))
    assert first.future.done() and not late.future.done()
    plan = eng.schedule()
    assert plan.running == () and admitted(plan) == [(late, 0)]

    step_eng, _ = make(batching="step", max_batch=4)  # the same in step mode: it joins at once
    first = step_eng.submit([req(0, steps=2)])
    step(step_eng)
    late = step_eng.submit([req(1, steps=2)])
    plan = step_eng.schedule()
    assert seeds(plan.running) == [0] and admitted(plan) == [(late, 0)]


def test_the_scheduler_alone_plans_and_applies_a_hand_made_result(clock):
    """No engine and no model: the scheduler's plan, then a StepResult built by hand, applied."""
    sched = Scheduler(EngineConfig(max_batch=2), Metrics(CollectorRegistry()), clock)
    pipe = FakePipe()
    subs = [Submission(f"s{i}", [pipe.parse(req(i, steps=1))], A, clock.t + 10, concurrent.futures.Future(),
                       t_submit=clock.t, results=[None]) for i in range(3)]
    for sub in subs:
        sched.add(sub)
    assert [sub.position for sub in subs] == [0, 1, 2] and sched.has_work
    plan = sched.schedule()
    assert plan == StepPlan(A, admit=((subs[0], 0), (subs[1], 0)))
    assert sched.stats()["waiting"] == 1 and sched.stats()["running"] == 2  # admitted: no longer waiting

    rows = pipe.prepare([sub.requests[i] for sub, i in plan.admit])
    for (sub, i), row in zip(plan.admit, rows):
        row.tag, row.timings["queue_ms"] = (sub, i), 0.0
    image = GeneratedImage(image=None, seed=0, lora_scale=1.0, adapter="spo", adapter_sha256=None,
                           prompt_truncated=False, request=rows[0].request, timings={"denoise_ms": 5.0})
    boom = EngineUnavailableError("step failed (ValueError); retry later")
    notes, answers = sched.update(plan, StepResult(admitted=tuple(rows), failed=((rows[1], boom),),
                                                   finished=((rows[0], image),), step_seconds=0.5, batch_size=2))
    assert notes == []  # nobody listens to progress
    assert answers == [(subs[1].future, None, boom), (subs[0].future, [image], None)]
    assert not subs[0].future.done() and not subs[1].future.done()  # the engine delivers, not the scheduler
    assert [r.status for r in rows] == [Status.FINISHED, Status.FAILED] and subs[1].cancelled
    assert sched.steps == 1 and sched.stats()["step_seconds_ewma"] == 0.5
    assert sched.stats()["waiting"] == 1 and sched.stats()["running"] == 0 and sched.stats()["groups"] == {}
    assert sched.schedule() == StepPlan(A, admit=((subs[2], 0),))
    assert sched.retry_after() == 1.0  # nothing runs: one step of 0.5 s, rounded up to a second


# -- leaving ---------------------------------------------------------------------------------------


def test_cancelled_and_expired_submissions_leave_at_the_next_boundary(make, clock):
    eng, pipe = make(max_batch=3, request_timeout_s=100)
    expires = eng.submit([req(0, steps=10)], timeout_s=5)
    cancelled = eng.submit([req(1, steps=10)])
    stays = eng.submit([req(2, steps=10)])
    waits = eng.submit([req(3, steps=10)], timeout_s=5)  # no room: still waiting when it expires
    late = eng.submit([req(4, steps=10)], timeout_s=50)
    step(eng)
    assert eng.stats()["running"] == 3 and eng.stats()["waiting"] == 2

    clock.t += 6
    cancelled.cancel()
    plan = eng.schedule()
    assert dict(plan.drop).keys() == {expires, cancelled, waits}
    assert isinstance(dict(plan.drop)[expires], DeadlineExceededError)
    assert isinstance(dict(plan.drop)[cancelled], RequestCancelledError)
    assert seeds(plan.running) == [2] and admitted(plan) == [(late, 0)]  # the freed slots are refilled
    assert not expires.future.done()  # nothing is applied before update()
    eng.update(plan, eng.run(plan))
    with pytest.raises(DeadlineExceededError, match="timeout_s.*SPO_REQUEST_TIMEOUT_S=100"):
        expires.future.result(0)
    with pytest.raises(DeadlineExceededError):
        waits.future.result(0)
    with pytest.raises(RequestCancelledError):
        cancelled.future.result(0)
    assert pipe.denoised[-1] == [2, 4]
    assert eng.stats()["running"] == 2 and eng.stats()["waiting"] == 0
    assert rejected(eng, "timeout") == 2 and rejected(eng, "cancelled") == 1
    assert not stays.future.done()


def test_a_plan_that_only_drops_still_applies(make, clock):
    eng, pipe = make()
    sub = eng.submit([req(0)], timeout_s=1)
    clock.t += 2
    plan = eng.schedule()
    assert plan.size is None and not plan.idle and dict(plan.drop).keys() == {sub}
    eng.update(plan, eng.run(plan))
    assert isinstance(sub.future.exception(0), DeadlineExceededError)
    assert eng.stats()["waiting"] == 0 and pipe.denoised == []


def test_queue_full_raises_with_retry_after(make):
    eng, _ = make(max_batch=1, max_queue=2)
    eng.submit([req(0, steps=5)])
    eng.submit([req(1, steps=5)])
    with pytest.raises(QueueFullError) as e:
        eng.submit([req(2)])
    assert e.value.retry_after >= 1 and "2 images wait (SPO_MAX_QUEUE=2)" in str(e.value)
    assert rejected(eng, "queue_full") == 1
    plan = eng.schedule()  # the admitted image no longer waits, even before update()
    assert eng.stats()["waiting"] == 1
    eng.submit([req(3)])
    with pytest.raises(QueueFullError):
        eng.submit([req(4)])
    eng.update(plan, eng.run(plan))
    assert eng.stats() == {
        "waiting": 2, "running": 1, "groups": {"64x64": 1}, "steps": 1, "step_seconds_ewma": eng.stats()["step_seconds_ewma"],
        "max_batch": 1, "max_queue": 2, "request_timeout_s": 300.0, "batching": "step",
        # guided 64x64 images: 2 units a step; running: 4 steps left of 5, waiting: 5 and 3 steps
        "queue_cost": 2 * (4 + 5 + 3), "max_queue_cost": (2 + 1) * 40.0,
    }
    with pytest.raises(QueueFullError) as e:
        eng.submit([req(5)])
    assert e.value.retry_after >= 1


# -- failures --------------------------------------------------------------------------------------


def test_a_failing_step_fails_only_its_rows(make):
    eng, pipe = make(max_batch=4)
    a = eng.submit([req(0, steps=2, size=A), req(1, steps=2, size=A)])
    b = eng.submit([req(2, steps=2, size=B)])
    pipe.denoise_error = lambda states: ValueError("boom") if any(s.height == 64 for s in states) else None
    plan, result = step(eng)
    assert plan.size == A and seeds(s for s, _ in result.failed) == [0, 1]
    assert all(isinstance(e, EngineUnavailableError) for _, e in result.failed)
    with pytest.raises(EngineUnavailableError, match=r"step failed \(ValueError\)"):
        a.future.result(0)
    assert rejected(eng, "error") == 1  # one failed submission, counted once
    assert eng.stats()["groups"] == {} and eng.stats()["waiting"] == 1
    plan, _ = step(eng)
    plan, _ = step(eng)
    assert plan.size == B and [r.seed for r in b.future.result(0)] == [2]  # the engine kept serving


def test_oom_halves_the_batch_recursively_before_failing_a_row(make):
    eng, pipe = make(max_batch=4)
    subs = [eng.submit([req(i, steps=1)]) for i in range(4)]
    pipe.denoise_error = lambda states: RuntimeError("CUDA out of memory") if len(states) > 2 else None
    _, result = step(eng)
    assert pipe.denoised == [[0, 1, 2, 3], [0, 1], [2, 3]]
    assert result.failed == () and [s.future.result(0)[0].seed for s in subs] == [0, 1, 2, 3]

    pipe.denoised.clear()
    pipe.denoise_error = lambda states: RuntimeError("CUDA out of memory") if len(states) > 2 or 666 in seeds(states) else None
    bad = eng.submit([req(666, steps=1)])
    good = [eng.submit([req(i, steps=1)]) for i in (5, 6, 7)]
    _, result = step(eng)
    assert pipe.denoised == [[666, 5, 6, 7], [666, 5], [666], [5], [6, 7]]
    assert seeds(s for s, _ in result.failed) == [666]
    with pytest.raises(EngineUnavailableError, match="out of device memory"):
        bad.future.result(0)
    assert [g.future.result(0)[0].seed for g in good] == [5, 6, 7]


def test_a_decode_error_fails_only_its_request(make):
    eng, pipe = make(max_batch=4)
    nan = eng.submit([req(0, steps=1)])
    ok = eng.submit([req(1, steps=1)])
    pipe.non_finite = {0}
    step(eng)
    assert pipe.decoded == [[0, 1]]  # decoded together
    with pytest.raises(NonFiniteError):
        nan.future.result(0)
    assert ok.future.result(0)[0].seed == 1
    assert rejected(eng, "non_finite") == 1

    done = eng.submit([req(2, steps=1)])
    later = eng.submit([req(3, steps=2)])
    pipe.decode_error = lambda states: RuntimeError("VAE exploded") if 2 in seeds(states) else None
    _, result = step(eng)
    assert [(s.seed, type(r)) for s, r in result.finished] == [(2, EngineUnavailableError)]
    with pytest.raises(EngineUnavailableError, match="decode failed"):
        done.future.result(0)
    assert eng.stats()["running"] == 1  # the row still denoising goes on
    step(eng)
    assert later.future.result(0)[0].seed == 3


def test_a_failed_image_fails_its_submission_and_its_other_rows_leave(make):
    eng, pipe = make(max_batch=4)
    sub = eng.submit([req(7, steps=1), req(8, steps=5)])
    pipe.non_finite = {7}
    step(eng)
    assert isinstance(sub.future.exception(0), NonFiniteError) and sub.cancelled
    plan = eng.schedule()
    assert [s for s, _ in plan.drop] == [sub] and plan.size is None
    eng.update(plan, eng.run(plan))
    assert eng.stats()["running"] == 0 and rejected(eng, "cancelled") == 0  # already answered: not counted twice


def test_a_bad_admission_fails_alone_after_one_shared_prepare(make):
    eng, pipe = make(max_batch=4)
    bad = eng.submit([req(0, adapter="not-loaded")])
    good = eng.submit([req(1, steps=1)])
    _, result = step(eng)
    assert pipe.prepared == [[0, 1], [0], [1]]  # one shared call, then submission by submission
    assert [s for s, _ in result.rejected] == [bad] and seeds(result.admitted) == [1]
    with pytest.raises(AdapterNotFoundError):
        bad.future.result(0)
    assert good.future.result(0)[0].seed == 1 and rejected(eng, "invalid") == 1


def test_running_scales_and_unload_in_use(make):
    eng, pipe = make()
    eng.submit([req(0, steps=5, lora_scale=0.5)])
    eng.submit([req(1, steps=5, lora_scale=0.0)])
    assert eng.running_scales() == []
    step(eng)
    assert eng.running_scales() == [{"spo": 0.5}, {}]
    with pytest.raises(AdapterInUseError):
        eng.unload_adapter("spo")  # not started: the admin call runs at once
    for _ in range(4):
        step(eng)
    assert eng.running_scales() == []
    eng.unload_adapter("spo")
    assert "spo" not in pipe.registry.adapters


def test_stop_fails_the_waiting_and_the_running(make):
    eng, _ = make(max_batch=1)
    running = eng.submit([req(0, steps=5)])
    waiting = eng.submit([req(1, steps=5)])
    step(eng)
    eng.stop()
    for sub in (running, waiting):
        with pytest.raises(EngineUnavailableError, match="stopped"):
            sub.future.result(0)
    assert eng.stats()["running"] == eng.stats()["waiting"] == 0
    with pytest.raises(EngineUnavailableError):
        eng.submit([req(2)])
