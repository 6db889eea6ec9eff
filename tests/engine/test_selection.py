"""best_of and search "step" in process, on the tiny model (32x32, 4-8 steps) and the engine's own thread, with
a deterministic scorer (mean brightness) as the oracle: best_of=1 is today's image, the chosen candidate is its
seed generated alone, the step search is the algorithm of engine/selection.py's docstring written out here on
the pipeline's primitives (argmax at every branch point), and it beats plain best_of on that scorer over 16
prompts (a sign test and a paired t statistic, seeded). Then the request model's bounds, admission of a
step-search group only whole, the queue counting candidates, progress, refusals and a failing scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from conftest import max_pixel_diff, pixels
from spo_runtime import Settings, load_pipeline
from spo_runtime.engine import Engine, EngineConfig
from spo_runtime.engine.plan import Submission
from spo_runtime.engine.scheduler import _admit
from spo_runtime.engine.selection import expand
from spo_runtime.errors import EngineUnavailableError, InvalidRequestError, QueueFullError
from spo_runtime.imaging import encode_image
from spo_runtime.metrics import Metrics
from spo_runtime.preference.scorers import BrightnessScorer, build_scorer
from spo_runtime.requests import GenerationRequest
from spo_runtime.sampling.sampler import add_noise

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(width=32, height=32, num_inference_steps=4)


@pytest.fixture(scope="module")
def epipe(tiny_dir):
    return load_pipeline(Settings(model="tiny", base_model=str(tiny_dir)))


@pytest.fixture(scope="module")
def engine(epipe):
    eng = make_engine(epipe, BrightnessScorer(), max_batch=16, max_queue=256)
    yield eng
    eng.stop()


def make_engine(pipe, scorer, **cfg):
    return Engine(pipe, EngineConfig(**cfg), metrics=Metrics(CollectorRegistry()), scorer=scorer).start()


def brightness(image) -> float:
    """The oracle's score of a finished image, from its pixels as answered."""
    return float((pixels(image).astype(np.float32) / 127.5 - 1.0).mean())


def test_best_of_1_is_todays_image_to_the_byte(engine, epipe):
    body = dict(prompt="a watercolor fox", seed=7, **SMALL)
    [alone] = epipe.generate([body])
    for given in (body, dict(body, best_of=1)):
        sub = engine.submit([given])
        [r] = sub.future.result(60)
        assert sub.groups == () and len(sub.requests) == 1 and r.selection is None and r.score is None
        assert encode_image(r, "png", 90) == encode_image(alone, "png", 90)


def test_plain_best_of_answers_the_argmax_and_it_is_its_seed_alone(engine, epipe):
    body = dict(prompt="a red owl at night", seed=41, best_of=4, **SMALL)
    [r] = engine.generate_sync([body])
    alone = epipe.generate([dict(body, seed=41 + i, best_of=1) for i in range(4)])
    sel = r.selection
    assert sel.best_of == 4 and sel.seeds == (41, 42, 43, 44) and sel.search is None and sel.branches == ()
    # every candidate's score is the oracle's of that seed alone; the answer is their argmax
    assert np.allclose(sel.scores, [brightness(a.image) for a in alone], atol=1e-6)
    assert sel.index == int(np.argmax(sel.scores)) and sel.score == max(sel.scores)
    assert r.seed == 41 + sel.index and r.selection.score == pytest.approx(brightness(r.image), abs=1e-6)
    assert max_pixel_diff(r.image, alone[sel.index].image) <= 1  # within 1/255 of the same seed alone
    assert "Best of: 4" in r.parameters_text() and r.timings["score_ms"] >= 0


def reference_search(pipe, body: dict, scorer) -> tuple[list[tuple[int, float, list[float], int]], int, list]:
    """engine/selection.py's algorithm on the pipeline's primitives, without the engine: the branch trace
    (step, t, scores, chosen), the final choice and the final images."""
    k, n = body["best_of"], body["num_inference_steps"]
    plain = {f: v for f, v in body.items() if f not in ("best_of", "search", "search_steps")}
    states = pipe.prepare([dict(plain, seed=body["seed"] + i) for i in range(k)])
    m = body.get("search_steps") or min(3, n - 1)
    points = {round(j * n / (m + 1)) for j in range(1, m + 1)}
    side = getattr(scorer, "image_size", None)
    trace = []
    while not states[0].row.done:
        pipe.denoise(states)
        step = states[0].row.step
        if step not in points:
            continue
        t = float(states[0].row.schedule.timesteps[step - 1])
        scores = scorer(pipe.images(torch.cat([s.x0 for s in states]), side), [body["prompt"]], torch.full((k,), t))
        w = int(torch.argmax(scores))
        trace.append((step, t, scores.tolist(), w))
        for i, s in enumerate(states):
            if i != w:  # re-branch from the winner's estimate at the next step's noise level, own fresh noise
                noise = torch.randn((1, *s.x0.shape[1:]), generator=s.row.generator, dtype=s.x0.dtype)
                s.latents = add_noise(s.row.schedule, step, states[w].x0, noise)
                s.row.x0_prev = states[w].row.x0_prev
    images = [r.image for r in pipe.decode(states)]
    final = [brightness(im) for im in images] if isinstance(scorer, BrightnessScorer) else \
        scorer(torch.stack([torch.from_numpy(pixels(im).astype(np.float32)).permute(2, 0, 1) for im in images]) / 127.5 - 1,
               [body["prompt"]], torch.zeros(k)).tolist()
    return trace, int(np.argmax(final)), images


@pytest.mark.parametrize("scorer_kind, extra", [
    ("brightness", dict(num_inference_steps=8)),
    ("brightness", dict(scheduler="euler", num_inference_steps=6, search_steps=2)),
    ("spm", dict(scheduler="dpmpp_2m_karras", num_inference_steps=6)),  # the tiny SPM: decoded at its 28-pixel side
    ("brightness", dict(eta=1.0, best_of=3, num_inference_steps=5, search_steps=4)),
])
def test_step_search_picks_the_argmax_at_every_branch_point(epipe, scorer_kind, extra):
    scorer = BrightnessScorer() if scorer_kind == "brightness" else build_scorer("spm", epipe)
    body = {"prompt": "a castle by a lake", "seed": 300, "best_of": 4, "search": "step", **SMALL, **extra}
    # max_batch 5 and a long plain request running: the group waits until it fits, then joins whole
    eng = make_engine(epipe, scorer, max_batch=5)
    try:
        other = eng.submit([dict(prompt="a dog", seed=1, num_inference_steps=12, width=32, height=32)])
        [r] = eng.submit([body]).future.result(60)
        other.future.result(60)
    finally:
        eng.stop()
    trace, chosen, images = reference_search(epipe, body, scorer)
    sel = r.selection
    assert [(b.step, b.timestep, b.chosen) for b in sel.branches] == [(s, t, w) for s, t, _, w in trace]
    for b, (_, _, scores, _) in zip(sel.branches, trace):
        assert np.allclose(b.scores, scores, atol=1e-5) and b.chosen == int(np.argmax(b.scores))
    assert len(sel.branches) == (extra.get("search_steps") or 3)
    assert sel.index == chosen == int(np.argmax(sel.scores)) and r.seed == 300  # the request's seed: reproducible
    assert max_pixel_diff(r.image, images[chosen]) <= 1


def test_step_search_beats_plain_best_of_on_its_scorer_over_16_prompts(engine):
    words = "fox owl cat dog castle river forest dragon robot knight city ocean garden moon train boat".split()
    bodies = [dict(prompt=f"a {w}", seed=1000 + 97 * i, best_of=4, **SMALL) for i, w in enumerate(words)]
    plain = [engine.submit([b]) for b in bodies]
    search = [engine.submit([dict(b, search="step")]) for b in bodies]
    d = np.array([s.future.result(120)[0].selection.score - p.future.result(120)[0].selection.score
                  for p, s in zip(plain, search)])
    wins = int((d > 0).sum())
    p_sign = sum(math.comb(16, j) for j in range(wins, 17)) / 2**16  # one-sided sign test, H0: no better
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))  # paired t, 15 degrees of freedom
    print(f"search - plain best_of=4 brightness: mean {d.mean():+.5f}, wins {wins}/16, sign p {p_sign:.2g}, t {t:.2f}")
    assert d.mean() > 0 and p_sign < 0.01 and t > 2.95  # t_0.995(15) = 2.95


@pytest.mark.parametrize("body, field, says", [
    (dict(best_of=9), "best_of", "must be in 1..8, got 9"),
    (dict(best_of=0), "best_of", "must be in 1..8"),
    (dict(best_of=4, search="x"), "search", "must be one of step, got 'x'"),
    (dict(search="step"), "search", "only with best_of > 1"),
    (dict(best_of=2, search="step", num_inference_steps=1), "search", "at least 2 denoising steps"),
    (dict(best_of=2, search_steps=2), "search_steps", "only with search"),
    (dict(best_of=2, search="step", num_inference_steps=4, search_steps=4), "search_steps", "must be in 1..3"),
    (dict(best_of=2, search="step", search_steps=21), "search_steps", "must be in 1..20"),
    (dict(best_of=4, seed=2**32 - 2), "best_of", "must be in 1..2"),
])
def test_the_request_model_names_the_field_and_its_range(body, field, says):
    with pytest.raises(InvalidRequestError) as e:
        GenerationRequest.parse({"prompt": "a", **body})
    assert e.value.field == field and says in str(e.value)


def _subs(*bodies) -> list[tuple[Submission, int]]:
    slots = []
    for b in bodies:
        reqs, groups, places = expand([GenerationRequest.parse({"prompt": "a", "seed": 1, **b})])
        sub = Submission("s", reqs, (64, 64), 0.0, None, groups=groups, places=places)
        slots += [(sub, i) for i in range(len(reqs))]
    return slots


def test_a_step_search_group_joins_only_whole_and_what_is_behind_it_waits():
    slots = _subs({}, {"best_of": 4, "search": "step"}, {})
    assert _admit(slots, 4) == tuple(slots[:1])  # 1 + 4 > 4: the group and the plain one behind it wait
    assert _admit(slots, 5) == tuple(slots[:5]) and _admit(slots, 8) == tuple(slots)
    plain = _subs({"best_of": 4})  # plain best_of: independent candidates, they may join apart
    assert _admit(plain, 2) == tuple(plain[:2])
    assert [r.seed for r in plain[0][0].requests] == [1, 2, 3, 4] and plain[0][0].groups == ((0, 1, 2, 3),)


def test_candidates_count_as_images_against_the_queue(epipe):
    eng = Engine(epipe, EngineConfig(max_queue=3), metrics=Metrics(CollectorRegistry()), scorer=BrightnessScorer())
    with pytest.raises(QueueFullError, match="SPO_MAX_QUEUE=3"):
        eng.submit([dict(prompt="a", best_of=4, **SMALL)])
    sub = eng.submit([dict(prompt="a", best_of=3, **SMALL)])  # not started: it waits, counted as 3
    assert eng.stats()["waiting"] == 3 and len(sub.requests) == 3
    eng.stop()


def test_progress_speaks_once_per_step_for_the_image(engine):
    notes = []
    sub = engine.submit([dict(prompt="a", seed=3, best_of=3, search="step", **SMALL)], progress=notes.append)
    sub.future.result(60)
    assert [(p.index, p.i, p.n) for p in notes] == [(0, i, 4) for i in range(1, 5)]


def test_refusals_name_best_of(epipe):
    bare = Engine(epipe, EngineConfig(), metrics=Metrics(CollectorRegistry()), scorer_unavailable="no scorer here")
    with pytest.raises(InvalidRequestError, match="must be 1 on this server: no scorer here") as e:
        bare.submit([dict(prompt="a", best_of=2)])
    assert e.value.field == "best_of"
    narrow = Engine(epipe, EngineConfig(max_batch=2), metrics=Metrics(CollectorRegistry()), scorer=BrightnessScorer())
    with pytest.raises(InvalidRequestError, match="at most SPO_MAX_BATCH=2"):
        narrow.submit([dict(prompt="a", best_of=3, search="step")])
    narrow.submit([dict(prompt="a", best_of=3, **SMALL)])  # plain best_of: its candidates need not step together
    with pytest.raises(InvalidRequestError, match="runs through the engine") as e:
        epipe.generate([dict(prompt="a", best_of=2)])
    assert e.value.field == "best_of"


def test_a_failing_scorer_fails_that_request_only(epipe):
    def broken(images, prompts, timesteps):
        raise RuntimeError("scorer on fire")

    eng = make_engine(epipe, broken)
    try:
        with pytest.raises(EngineUnavailableError, match="scorer on fire"):
            eng.generate_sync([dict(prompt="a", best_of=2, **SMALL)])
        with pytest.raises(EngineUnavailableError, match="scorer on fire"):
            eng.generate_sync([dict(prompt="a", best_of=2, search="step", **SMALL)])
        [r] = eng.generate_sync([dict(prompt="a", seed=5, **SMALL)])  # the engine goes on
        assert r.image.size == (32, 32) and eng.alive
    finally:
        eng.stop()
