"""The step-level batching engine, in process, on the tiny model and its own thread: joining, limits,
failures, images equal to the pipeline's. Scheduling decisions (fairness, FIFO, admission, deadlines)
are tested step by step, without a thread, in test_scheduler.py."""

import asyncio

import pytest
import torch

from conftest import max_pixel_diff, wait_until as poll
from spo_runtime import AdapterInUseError, Settings, load_pipeline
from spo_runtime.engine import Engine, EngineConfig
from spo_runtime.errors import DeadlineExceededError, EngineUnavailableError, QueueFullError, RequestCancelledError
from spo_runtime.metrics import Metrics
from prometheus_client import CollectorRegistry


@pytest.fixture(scope="module")
def epipe(tiny_dir):
    return load_pipeline(Settings(model="tiny", base_model=str(tiny_dir)))


def make_engine(pipe, **cfg):
    return Engine(pipe, EngineConfig(**cfg), metrics=Metrics(CollectorRegistry())).start()


def wait_until(cond, timeout=30.0):
    return poll(cond, timeout, every=0.002)  # fine-grained: these wait for step counts


def test_late_request_joins_the_running_batch_and_images_match_alone(epipe):
    eng = make_engine(epipe)
    try:
        long = eng.submit([dict(prompt="a castle", seed=1, num_inference_steps=40)])
        wait_until(lambda: eng.steps >= 10)
        steps_at_submit = eng.steps
        short = eng.submit([dict(prompt="a fox", seed=2, num_inference_steps=3, scheduler="euler", lora_scale=0.5)])
        [s] = short.future.result(60)
        assert not long.future.done(), "the short request must not wait for the long batch"
        [l] = long.future.result(60)
        # it started at the next step boundary, not after the batch
        assert s.timings["queue_ms"] < 1000 and eng.steps - steps_at_submit < 40
        assert eng.metrics.batch_size._sum.get() > eng.steps  # some steps ran more than one image
        assert max_pixel_diff(s.image, epipe.generate([dict(prompt="a fox", seed=2, num_inference_steps=3, scheduler="euler", lora_scale=0.5)])[0].image) <= 1
        assert max_pixel_diff(l.image, epipe.generate([dict(prompt="a castle", seed=1, num_inference_steps=40)])[0].image) <= 1
    finally:
        eng.stop()


def test_request_mode_forms_a_batch_and_runs_it_to_completion(epipe):
    eng = make_engine(epipe, batching="request")
    try:
        long = eng.submit([dict(prompt="a castle", seed=1, num_inference_steps=30)])
        wait_until(lambda: eng.steps >= 3)
        short = eng.submit([dict(prompt="a fox", seed=2, num_inference_steps=2)])
        short.future.result(60)
        assert long.future.done()  # no joins: the short one waited for the running batch
    finally:
        eng.stop()


def test_two_sizes_share_the_engine_and_images_match_alone(epipe):
    eng = make_engine(epipe, max_batch=2)
    try:
        reqs = [dict(prompt="a", seed=i, num_inference_steps=3, width=w) for i, w in enumerate([64, 96, 64])]
        subs = [eng.submit([r]) for r in reqs]
        for r, sub in zip(reqs, subs):
            [img] = sub.future.result(60)
            assert img.image.size == (r["width"], 64)
            assert max_pixel_diff(img.image, epipe.generate([r])[0].image) <= 1
        assert eng.stats()["running"] == 0 and eng.stats()["groups"] == {}
    finally:
        eng.stop()


def test_queue_limit_fails_fast_with_retry_after(epipe):
    # the count alone: three 30-step images cost more than the default SPO_MAX_QUEUE_COST (3 x 40; test_cost.py)
    eng = make_engine(epipe, max_batch=1, max_queue=2, max_queue_cost=1000)
    try:
        subs = [eng.submit([dict(prompt="a", seed=i, num_inference_steps=30)]) for i in range(2)]
        wait_until(lambda: eng.stats()["running"] == 1)
        eng.submit([dict(prompt="a", seed=9, num_inference_steps=30)])  # fills the queue again
        with pytest.raises(QueueFullError) as e:
            eng.submit([dict(prompt="a", seed=10, num_inference_steps=2)] * 2)
        assert e.value.retry_after >= 1 and "SPO_MAX_QUEUE=2" in str(e.value)
        for sub in subs:
            sub.cancel()
    finally:
        eng.stop()


def test_cancel_and_deadline_free_their_slots(epipe):
    eng = make_engine(epipe, max_batch=2)
    try:
        a = eng.submit([dict(prompt="a", seed=1, num_inference_steps=60)])
        b = eng.submit([dict(prompt="b", seed=2, num_inference_steps=60)], timeout_s=0.3)
        wait_until(lambda: eng.stats()["running"] == 2)
        a.cancel()
        with pytest.raises(RequestCancelledError):
            a.future.result(30)
        with pytest.raises(DeadlineExceededError, match="timeout_s"):
            b.future.result(30)
        wait_until(lambda: eng.stats()["running"] == 0 and eng.stats()["waiting"] == 0)
    finally:
        eng.stop()


def test_async_caller_disconnect_frees_the_slot(epipe):
    eng = make_engine(epipe)

    async def main():
        gone = False

        async def is_disconnected():
            return gone

        task = asyncio.ensure_future(eng.generate([dict(prompt="a", seed=1, num_inference_steps=80)], is_disconnected=is_disconnected, poll_s=0.01))
        await asyncio.sleep(0.2)
        gone = True
        with pytest.raises(RequestCancelledError):
            await task

    try:
        asyncio.run(main())
        wait_until(lambda: eng.stats()["running"] == 0)
    finally:
        eng.stop()


def test_oom_splits_the_batch_then_fails_only_that_step(epipe, monkeypatch):
    real = epipe.denoise
    calls = []

    def flaky(states):
        calls.append(len(states))
        if len(states) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        if any(s.seed == 666 for s in states):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(states)

    monkeypatch.setattr(epipe, "denoise", flaky)
    eng = make_engine(epipe)
    try:
        reqs = [dict(prompt="a", seed=i, num_inference_steps=3) for i in range(4)]
        ok = eng.submit(reqs)
        out = ok.future.result(60)
        assert 4 in calls and 2 in calls  # tried 4, retried in halves
        monkeypatch.setattr(epipe, "denoise", real)
        for r, img in zip(reqs, out):
            assert max_pixel_diff(img.image, epipe.generate([r])[0].image) <= 1
        monkeypatch.setattr(epipe, "denoise", flaky)
        # held at a boundary so both share a step: the OOM'd half fails alone, the other half goes on
        import threading

        gate = threading.Event()
        held = eng.call(gate.wait)
        calls.clear()
        bad = eng.submit([dict(prompt="a", seed=666, num_inference_steps=3)])
        good = eng.submit([dict(prompt="a", seed=5, num_inference_steps=3)])
        gate.set()
        held.result(10)
        with pytest.raises(EngineUnavailableError, match="out of device memory"):
            bad.future.result(60)
        assert len(good.future.result(60)) == 1  # the engine kept serving
        assert calls[:3] == [2, 1, 1]  # one step of both, then the halves
    finally:
        eng.stop()


def test_scale_change_applies_to_later_admissions_and_unload_in_use(epipe):
    eng = make_engine(epipe)
    try:
        running = eng.submit([dict(prompt="a", seed=1, num_inference_steps=40)])
        wait_until(lambda: eng.stats()["running"] == 1)
        out = eng.set_default_lora_scale(0.25)
        assert out["previous"] == 1.0 and out["scale"] == 0.25
        later = eng.submit([dict(prompt="a", seed=1, num_inference_steps=3)])
        with pytest.raises(AdapterInUseError):
            eng.unload_adapter("spo")
        assert running.future.result(60)[0].lora_scale == 1.0
        assert later.future.result(60)[0].lora_scale == 0.25
        assert eng.metrics.lora_scale._value.get() == 0.25
    finally:
        eng.set_default_lora_scale(1.0)
        eng.stop()


def test_admitted_submissions_share_one_text_encoding_and_a_bad_one_fails_alone(epipe, monkeypatch):
    import threading

    from spo_runtime import AdapterNotFoundError

    calls = []
    real = epipe.prompts._encode_texts
    monkeypatch.setattr(epipe.prompts, "_encode_texts", lambda texts: calls.append(list(texts)) or real(texts))
    eng = make_engine(epipe)
    try:
        gate = threading.Event()
        held = eng.call(gate.wait)  # hold the loop at a boundary so all three are admitted together
        subs = [eng.submit([dict(prompt=f"a unique prompt {i}", seed=i, num_inference_steps=2)]) for i in range(3)]
        gate.set()
        held.result(10)
        for sub in subs:
            sub.future.result(60)
        assert [c for c in calls if any("unique prompt" in t for t in c)] == [[f"a unique prompt {i}" for i in range(3)]]
        gate.clear()
        held = eng.call(gate.wait)
        bad = eng.submit([dict(prompt="x", adapter="not-loaded", num_inference_steps=2)])
        good = eng.submit([dict(prompt="y", seed=1, num_inference_steps=2)])
        gate.set()
        held.result(10)
        with pytest.raises(AdapterNotFoundError):
            bad.future.result(60)
        assert len(good.future.result(60)) == 1
    finally:
        eng.stop()


@pytest.mark.parametrize("kw, message", [
    (dict(max_batch=0), "SPO_MAX_BATCH: must be >= 1, got 0"),
    (dict(max_queue=-1), "SPO_MAX_QUEUE: must be >= 0, got -1"),
    (dict(request_timeout_s=0.0), "SPO_REQUEST_TIMEOUT_S: must be > 0, got 0.0"),
    (dict(batching="token"), "SPO_BATCHING: must be 'step' or 'request', got 'token'"),
])
def test_engine_config_names_the_variable_of_a_bad_value(kw, message):
    with pytest.raises(ValueError) as e:
        EngineConfig(**kw)
    assert str(e.value) == message
    assert EngineConfig() == EngineConfig(max_batch=8, max_queue=64, request_timeout_s=300.0, batching="step")
