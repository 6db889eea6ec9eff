"""SPO_FAULTS in process: the grammar, and each engine fault against the tiny model. Requests are held at a
step boundary so that they share their first step; each outcome is compared with the same batch run
without the fault (byte for byte) and with the request run alone (within 1/255, the documented bound
for a different batch composition)."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry

from conftest import max_pixel_diff, pixels
from spo_runtime import NonFiniteError, Settings, load_pipeline
from spo_runtime.engine import Engine, EngineConfig
from spo_runtime.errors import ConfigError, DeadlineExceededError, EngineUnavailableError
from spo_runtime.faults import Faults
from spo_runtime.metrics import Metrics


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for the module


@pytest.fixture(scope="module")
def fpipe(tiny_dir):
    return load_pipeline(Settings(model="tiny", base_model=str(tiny_dir)))


# -- the grammar ------------------------------------------------------------------------------


def test_grammar_parses_every_fault():
    f = Faults.parse("nan_row:step=2:seed=7, oom_above:batch=0,decode_error,slow_step:s=0.5:seed=3,"
                     "enospc_checkpoint:round=2,engine_crash:step=9")
    assert f.active == {"nan_row": {"step": 2, "seed": 7}, "oom_above": {"batch": 0}, "decode_error": {},
                        "slow_step": {"s": 0.5, "seed": 3}, "enospc_checkpoint": {"round": 2}, "engine_crash": {"step": 9}}
    assert not Faults.parse(None) and not Faults.parse("") and Faults.parse("decode_error")
    assert Settings(faults="oom_above:batch=2").fault_plan.get("oom_above") == {"batch": 2}


@pytest.mark.parametrize("text,message", [
    ("nan_rows:step=1", "unknown fault 'nan_rows'"),
    ("nan_row", "nan_row: missing step"),
    ("nan_row:step=x", "step must be int, got 'x'"),
    ("nan_row:step=1:row=0:seed=1", "give row or seed, not both"),
    ("nan_row:step=1:col=2", "unknown parameter 'col'"),
    ("oom_above", "missing batch"),
    ("oom_above:batch=-1", "batch must be >= 0"),
    ("oom_above:batch", "batch must appear once, as batch=<value>"),
    ("oom_above:batch=1:batch=2", "must appear once"),
    ("decode_error:seed=a", "seed must be int"),
    ("slow_step", "missing s"),
    ("enospc_checkpoint:round=1,enospc_checkpoint:round=2", "named twice"),
])
def test_a_malformed_fault_is_a_config_error(text, message):
    with pytest.raises(ConfigError, match=message) as e:
        Faults.parse(text)
    assert e.value.variable == "SPO_FAULTS"
    with pytest.raises(ConfigError, match="SPO_FAULTS"):
        Settings.from_env({"SPO_FAULTS": text})


# -- the engine under faults --------------------------------------------------------------------


def _gated(pipe, faults: str | None, submissions: list[list[dict]], **cfg) -> list:
    """Submit every submission while the engine is held at a boundary, so they share their first step;
    returns each submission's images or its exception."""
    eng = Engine(pipe, EngineConfig(**cfg), metrics=Metrics(CollectorRegistry()), faults=Faults.parse(faults)).start()
    try:
        gate = threading.Event()
        held = eng.call(gate.wait)
        subs = [eng.submit(reqs) for reqs in submissions]
        gate.set()
        held.result(10)
        out = []
        for sub in subs:
            try:
                out.append(sub.future.result(120))
            except Exception as e:
                out.append(e)
        assert eng.alive
        return out
    finally:
        eng.stop()


def _same(a, b) -> bool:
    return (pixels(a.image) == pixels(b.image)).all()


def test_a_nan_row_fails_alone_and_its_neighbours_are_unchanged(fpipe):
    subs = [[dict(prompt=f"p{i}", seed=seed, num_inference_steps=4)] for i, seed in enumerate((11, 12, 13))]
    clean = _gated(fpipe, None, subs)
    faulty = _gated(fpipe, "nan_row:step=2:seed=12", subs)
    assert isinstance(faulty[1], NonFiniteError) and "NaN" in str(faulty[1])
    for i in (0, 2):
        assert _same(faulty[i][0], clean[i][0])  # byte for byte: the same batch without the NaN
        assert max_pixel_diff(faulty[i][0].image, fpipe.generate(subs[i])[0].image) <= 1  # alone
    # by position: the second row of the batch, at its first step
    by_row = _gated(fpipe, "nan_row:step=0:row=1", subs)
    assert isinstance(by_row[1], NonFiniteError) and _same(by_row[0][0], clean[0][0]) and _same(by_row[2][0], clean[2][0])


def test_oom_above_a_batch_size_halves_and_every_request_succeeds(fpipe, monkeypatch):
    sizes = []
    real = fpipe.denoise

    def counting(states):
        sizes.append(len(states))
        return real(states)

    monkeypatch.setattr(fpipe, "denoise", counting)
    subs = [[dict(prompt="a", seed=20 + i, num_inference_steps=3)] for i in range(4)]
    out = _gated(fpipe, "oom_above:batch=1", subs)
    monkeypatch.setattr(fpipe, "denoise", real)
    assert set(sizes) == {1}  # calls of 4 and 2 rows failed before they reached the pipeline
    for reqs, images in zip(subs, out):
        assert not isinstance(images, Exception), images
        assert max_pixel_diff(images[0].image, fpipe.generate(reqs)[0].image) <= 1


def test_oom_at_every_size_fails_that_steps_rows_only(fpipe):
    small = [[dict(prompt="a", seed=s, num_inference_steps=3)] for s in (30, 31, 32)]
    other = [[dict(prompt="b", seed=40, num_inference_steps=3, width=96)]]  # another size: another step
    out = _gated(fpipe, "oom_above:batch=0:seed=31", small + other)
    for e in out[:3]:
        assert isinstance(e, EngineUnavailableError) and "out of device memory" in str(e)
    assert not isinstance(out[3], Exception) and out[3][0].image.size == (96, 64)
    later = _gated(fpipe, "oom_above:batch=0:seed=31", [[dict(prompt="a", seed=33, num_inference_steps=3)]])
    assert not isinstance(later[0], Exception)


def test_a_decode_error_fails_only_the_rows_of_that_decode(fpipe):
    subs = [[dict(prompt="a", seed=50, num_inference_steps=3)],  # decoded together with the next one
            [dict(prompt="b", seed=51, num_inference_steps=3)],
            [dict(prompt="c", seed=52, num_inference_steps=6)]]  # in the same batch, decoded later
    clean = _gated(fpipe, None, subs)
    out = _gated(fpipe, "decode_error:seed=50", subs)
    for e in out[:2]:
        assert isinstance(e, EngineUnavailableError) and "decode failed" in str(e)
    assert _same(out[2][0], clean[2][0])
    assert max_pixel_diff(out[2][0].image, fpipe.generate(subs[2])[0].image) <= 1


def test_a_slow_step_times_out_its_deadline_and_the_engine_goes_on(fpipe):
    eng = Engine(fpipe, EngineConfig(), metrics=Metrics(CollectorRegistry()), faults=Faults.parse("slow_step:s=0.25:seed=60")).start()
    try:
        slow = eng.submit([dict(prompt="a", seed=60, num_inference_steps=5)], timeout_s=0.6)
        with pytest.raises(DeadlineExceededError):
            slow.future.result(30)
        [img] = eng.submit([dict(prompt="a", seed=61, num_inference_steps=2)]).future.result(30)
        assert img.seed == 61 and eng.alive
    finally:
        eng.stop()
