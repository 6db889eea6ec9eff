"""Admission by cost (SPO_MAX_QUEUE_COST): what an image costs, the limit at its exact boundary, the cost of
running rows shrinking with their remaining steps and released when they finish or are cancelled, the
default that keeps today's limit for ordinary requests, and the bounded `size` label. Driven by hand on
test_scheduler's fake pipeline (its preset's default size is 64x64: a guided 64x64 step costs 2 units)."""

from __future__ import annotations

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from spo_runtime.engine import Engine, EngineConfig
from spo_runtime.engine import cost
from spo_runtime.errors import ConfigError, QueueFullError, RequestCancelledError
from spo_runtime.metrics import SIZE_CLASSES, Metrics, size_class
from spo_runtime.requests import GenerationRequest
from spo_runtime.settings import Settings
from test_scheduler import A, B, Clock, FakePipe, rejected, req, step


@pytest.fixture
def make():
    def make(**cfg) -> tuple[Engine, FakePipe]:
        pipe = FakePipe()
        return Engine(pipe, EngineConfig(**cfg), metrics=Metrics(CollectorRegistry()), clock=Clock()), pipe

    return make


def queued(eng: Engine) -> float:
    """The queued cost as /info's engine section and the spo_queue_cost gauge report it (they agree after
    each admission and each step boundary)."""
    value = eng.stats()["queue_cost"]
    assert eng.metrics.queue_cost._value.get() == pytest.approx(value)
    return value


def test_an_image_costs_its_pixels_times_its_steps_times_its_passes():
    def units(**kw) -> float:
        r = GenerationRequest(prompt="p", **kw)
        return cost.units(cost.waiting_cost(r, r.height or 1024, r.width or 1024), 1024)

    assert units() == 40 == cost.ORDINARY_COST  # the default request: 20 steps, guidance 5 (two passes)
    assert units(guidance_scale=1.0) == 20  # guidance <= 1: one pass
    assert units(width=2048, height=2048, num_inference_steps=100) == 800  # one of the 8 x 2048^2 x 100 request
    assert units(width=512, height=1024, num_inference_steps=10) == 10
    image = Image.new("RGB", (1024, 1024))
    assert units(init_image=image, num_inference_steps=10, strength=0.5) == 10  # img2img: only the steps it runs
    assert units(init_image=image, num_inference_steps=10) == 14  # int(10 * 0.75) steps


def test_admitted_at_the_limit_refused_one_unit_past_it(make):
    eng, _ = make(max_batch=2, max_queue=10, max_queue_cost=20)
    eng.submit([req(0, steps=5)])  # 10 units
    eng.submit([req(1, steps=5)])  # 20: exactly the limit
    assert queued(eng) == 20
    with pytest.raises(QueueFullError) as e:
        eng.submit([req(2, steps=1, guidance_scale=1.0)])  # 1 unit more
    msg = str(e.value)
    assert "SPO_MAX_QUEUE_COST=20" in msg and "cost 1" in msg and "20 is queued or running" in msg, msg
    assert e.value.retry_after >= 1
    assert rejected(eng, "queue_cost") == 1 and rejected(eng, "queue_full") == 0
    assert eng.stats()["waiting"] == 2 and queued(eng) == 20  # the refused request left nothing behind


def test_a_request_over_the_limit_alone_is_refused_on_an_idle_engine(make):
    eng, _ = make(max_batch=8, max_queue=64, max_queue_cost=200)
    with pytest.raises(QueueFullError) as e:  # 8 x (128x128 / 64x64) x 100 steps x 2 = 6400
        eng.submit([req(i, steps=100, size=(128, 128)) for i in range(8)])
    msg = str(e.value)
    assert "cost 6400" in msg and "more than SPO_MAX_QUEUE_COST=200" in msg and "fewer" in msg, msg
    assert queued(eng) == 0 and not eng.scheduler.has_work
    eng.submit([req(0, steps=100)])  # 200: the whole budget, on its own
    assert queued(eng) == 200


def test_running_rows_cost_their_remaining_steps_and_free_it_when_they_finish(make):
    eng, _ = make(max_batch=2, max_queue=10, max_queue_cost=20)
    a = eng.submit([req(0, steps=5)])
    b = eng.submit([req(1, steps=5)])
    step(eng)  # both run one step: 4 left each
    assert eng.stats()["running"] == 2 and queued(eng) == 16
    eng.submit([req(2, steps=2)])  # 4 more: 20, at the limit again
    with pytest.raises(QueueFullError):
        eng.submit([req(3, steps=1, guidance_scale=1.0)])
    step(eng)  # the queued 64x64 image waits for a slot; the running ones step: 3 left each
    assert queued(eng) == 12 + 4
    eng.submit([req(3, steps=2)])  # 20
    for _ in range(3):
        step(eng)
    assert a.future.result(0) and b.future.result(0)
    stats = eng.stats()  # the two 2-step ones wait for the next boundary
    assert (stats["running"], stats["waiting"]) == (0, 2) and queued(eng) == 2 * 2 * 2
    step(eng)
    step(eng)
    assert not eng.scheduler.has_work and queued(eng) == 0


def test_cancelling_frees_the_cost_at_once_waiting_or_running(make):
    eng, _ = make(max_batch=1, max_queue=10, max_queue_cost=30)
    running = eng.submit([req(0, steps=5)])
    step(eng)  # 4 steps left: 8
    waiting = eng.submit([req(1, steps=10)])  # 20: 28 in all
    with pytest.raises(QueueFullError):
        eng.submit([req(2, steps=2)])  # 4 more would be 32
    waiting.cancel()
    assert eng.stats()["queue_cost"] == 8  # at once: before the next boundary drops it (the gauge follows there)
    eng.submit([req(2, steps=2)])
    assert queued(eng) == 12
    running.cancel()
    assert eng.stats()["queue_cost"] == 4
    step(eng)  # both leave; the 2-step one takes the slot and runs a step
    with pytest.raises(RequestCancelledError):
        running.future.result(0)
    assert (eng.stats()["running"], eng.stats()["waiting"]) == (1, 0) and queued(eng) == 2


def test_each_size_costs_its_pixels(make):
    eng, _ = make(max_batch=4, max_queue=10, max_queue_cost=100)
    eng.submit([req(0, steps=4, size=A)])  # 8
    eng.submit([req(1, steps=4, size=B)])  # 96x96: 2.25 x 8 = 18
    assert queued(eng) == 26
    step(eng)  # only A's group steps
    assert queued(eng) == 6 + 18


def test_the_default_limit_is_what_max_queue_plus_max_batch_ordinary_requests_cost():
    assert EngineConfig().queue_cost_limit == (64 + 8) * 40
    assert EngineConfig(max_queue=16, max_batch=8).queue_cost_limit == 960
    assert EngineConfig(max_queue_cost=200).queue_cost_limit == 200
    settings = Settings.from_env({"SPO_MAX_QUEUE_COST": "200.5"})
    assert EngineConfig.from_settings(settings).queue_cost_limit == 200.5
    assert EngineConfig.from_settings(Settings.from_env({})).queue_cost_limit == 2880
    for bad in ("0", "-1", "nan", "inf", "lots"):
        with pytest.raises(ConfigError) as e:
            Settings.from_env({"SPO_MAX_QUEUE_COST": bad})
        assert e.value.variable == "SPO_MAX_QUEUE_COST", bad
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="SPO_MAX_QUEUE_COST"):
            EngineConfig(max_queue_cost=bad)


def test_an_ordinary_full_queue_is_refused_by_count_as_before(make):
    """With the default limit, SPO_MAX_QUEUE waiting and SPO_MAX_BATCH running default requests fit."""
    eng, _ = make(max_batch=2, max_queue=4)
    eng.submit([req(0, steps=20), req(1, steps=20)])
    step(eng)
    eng.submit([req(i, steps=20) for i in range(2, 6)])
    with pytest.raises(QueueFullError) as e:
        eng.submit([req(6, steps=20)])
    assert "SPO_MAX_QUEUE=4" in str(e.value) and rejected(eng, "queue_full") == 1


def test_the_size_label_takes_few_values_whatever_the_sizes():
    labels = {size_class(w, h) for w in range(32, 2049, 8) for h in range(32, 2049, 40)}
    assert labels == {f"{s}x{s}" for s in SIZE_CLASSES} and len(labels) == 9
    assert size_class(64, 64) == "64x64" and size_class(32, 32) == "32x32" and size_class(40, 32) == "64x64"
    assert size_class(1024, 1024) == size_class(1152, 896) == size_class(1216, 832) == "1024x1024"
    assert size_class(1280, 1280) == "1536x1536" and size_class(4096, 4096) == "2048x2048"


def test_images_are_counted_by_size_class(make):
    eng, _ = make(max_batch=4)
    for i, size in enumerate([(64, 64), (96, 96), (128, 128), (128, 136)]):  # the fake preset: 64..256
        eng.submit([req(i, steps=1, size=size)])
    while eng.scheduler.has_work:
        step(eng)
    counts = {s.labels["size"]: s.value for m in eng.metrics.images.collect() for s in m.samples
              if s.name == "spo_images_total"}
    assert counts == {"64x64": 1, "128x128": 2, "256x256": 1}
