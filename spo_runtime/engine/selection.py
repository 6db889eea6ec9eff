"""best_of: k candidates per image in the same batch, answered by the one a preference scorer ranks highest;
and search "step", the SPO paper's step-aware selection used at inference.

Notation (SPO, Liang et al. 2024, arXiv 2406.04314; DDIM, Song et al. 2021):
    c          the prompt;  k = best_of candidates, indexed i = 0..k-1;  s the request's seed
    t_0 > t_1 > ... > t_{n-1}   the timesteps of the n steps the image runs (img2img: its last ones)
    x^i_j      candidate i's latent before step j (x^i_0: its initial noise, drawn from seed s + i)
    x0^i_j     the clean-latent estimate of step j, from x^i_j and the guided eps at t_j (DDIM's "predicted x0")
    R(x, c, t) the preference score of the decoded image x for c at timestep t: the step-aware preference
               model (SPM) of SPO, whose t = 0 is a clean image (or any `Scorer`, e.g. mean brightness)
    D(z)       the VAE decoder;  q(x_j | x0) the forward process at the noise level of step j (`add_noise`)

Plain best_of: candidate i is the image of seed s + i alone (same rows, same sampler, nothing shared), so
it is reproducible by itself; once all k are decoded, the answer is i* = argmax_i R(D(x^i_n), c, 0).

search "step" (m = search_steps branch points b_1 < ... < b_m, evenly spread: b_j = round(j n / (m + 1))):
    x^i_0 ~ N(0, I) from seed s + i, for i = 0..k-1
    for j = 1..m:
        run every candidate from step b_{j-1} to b_j (b_0 = 0), all in the same batch
        score   r_i = R(D(x0^i_{b_j - 1}), c, t_{b_j - 1})     the estimate of the segment's last step, at its t
        choose  w = argmax_i r_i                                 (the first of equal scores)
        branch  x^w_{b_j} is kept; x^i_{b_j} = q(x_{b_j} | x0^w_{b_j - 1}) with fresh noise from candidate i's
                generator for i != w: every candidate continues from the chosen one's estimate, re-noised to
                the level of step b_j (the paper's k candidates from one shared state, independent noise; here
                for every sampler, deterministic ones included, so the candidates differ again)
    run every candidate to the end; answer i* = argmax_i R(D(x^i_n), c, 0)
The paper branches at every chunk of training; here the winner, not a random candidate, seeds the next segment
(the paper's training walks on from a random one to cover the trajectory space; inference wants the best).

Cost: plain best_of is k images plus k scorer calls on the finished images. search "step" adds m scorer calls
on k intermediate images each, decoded smaller (`StepModel.images`: a 1024x1024 image at 256x256 for the SPM's
224-pixel input). Scoring runs in the engine thread between steps, on the engine's device: each branch point is
one VAE call and one scorer call over the candidates that reach it on that step.

The engine's side: `expand` turns each request into its candidates (one submission, counted as k images
against the queue and cost limits); the scheduler admits a step-search group only whole (`admission_span`),
so its candidates stay on the same step; `Selector` (in the runner) scores and branches; `answer` picks each
image's candidate when the submission is complete.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from typing import Iterable

import numpy as np
import torch

from spo_runtime.engine.plan import Submission
from spo_runtime.engine.step_model import Scorer, StepModel
from spo_runtime.errors import EngineUnavailableError
from spo_runtime.limits import DEFAULT_SEARCH_STEPS, MAX_SEED
from spo_runtime.requests import ActiveRequest, Branch, GeneratedImage, GenerationRequest, Selection
from spo_runtime.sampling.sampler import add_noise, initial_noise

Place = tuple[int, int]  # (image index in the submission's answer, candidate index)


def expand(requests: list[GenerationRequest]) -> tuple[list[GenerationRequest], tuple[tuple[int, ...], ...], tuple[Place, ...]]:
    """(the candidates, each answer image's candidate indices, each candidate's place): a request with best_of k
    becomes k requests with seeds seed..seed+k-1 (a seed drawn so that all k stay <= MAX_SEED when it has none).
    Without best_of > 1 the requests come back as they are, with no groups."""
    if all(r.best_of == 1 for r in requests):
        return requests, (), ()
    out: list[GenerationRequest] = []
    groups: list[tuple[int, ...]] = []
    places: list[Place] = []
    for j, r in enumerate(requests):
        k = r.best_of
        if k == 1:
            cands = [r]
        else:
            seed = r.seed if r.seed is not None else secrets.randbelow(MAX_SEED - k + 2)
            cands = [r.model_copy(update={"seed": seed + i}) for i in range(k)]
        groups.append(tuple(range(len(out), len(out) + k)))
        places += [(j, i) for i in range(k)]
        out += cands
    return out, tuple(groups), tuple(places)


def branch_steps(request: GenerationRequest, start: int, num_steps: int) -> frozenset[int]:
    """The row step counts (steps done, `SamplerRow.step`) after which search "step" branches: m points evenly
    spread over the steps the image runs, m = search_steps (unset: 3, at most steps - 1)."""
    if request.search != "step":
        return frozenset()
    n = num_steps - start
    m = request.search_steps if request.search_steps is not None else min(DEFAULT_SEARCH_STEPS, n - 1)
    return frozenset(start + round(j * n / (m + 1)) for j in range(1, m + 1))


def admission_span(sub: Submission, index: int) -> int:
    """How many waiting slots from (sub, index) on must join the batch together: a step-search group's
    candidates (they branch on the same step), else 1."""
    if not sub.groups or sub.requests[index].search != "step":
        return 1
    j, i = sub.places[index]
    return len(sub.groups[j]) - i


def progress_index(sub: Submission, index: int) -> int | None:
    """The answer image a row's progress reports as (its first candidate's; the others stay silent), or None."""
    if not sub.groups:
        return index
    j, i = sub.places[index]
    return j if i == 0 else None


def answer(sub: Submission) -> list[GeneratedImage]:
    """The answer of a complete submission: each image's highest-scoring candidate (the first of equal scores),
    carrying its `Selection`. Plain best_of reports the chosen candidate's own seed (generating it alone gives
    the same image); search "step" the request's seed (the search is reproducible from it, best_of and
    search_steps)."""
    if not sub.groups:
        return list(sub.results)
    out = []
    for slots in sub.groups:
        cands = [sub.results[i] for i in slots]
        if len(cands) == 1:
            out.append(cands[0])
            continue
        scores = tuple(float(c.score) for c in cands)
        w = max(range(len(cands)), key=lambda i: (_rank(scores[i]), -i))
        r = cands[w]
        search = r.request.search
        sel = Selection(len(cands), w, scores, tuple(c.seed for c in cands), search, r.branches)
        out.append(dataclasses.replace(r, seed=cands[0].seed if search else r.seed, selection=sel))
    return out


def _rank(score: float) -> float:
    return score if not math.isnan(score) else -math.inf


class Selector:
    """The runner's half: scores candidates on the engine's device between steps and branches step-search
    groups. `scorer` None: nothing of best_of reaches the runner (the engine refuses best_of > 1)."""

    def __init__(self, pipe: StepModel, scorer: Scorer | None):
        self.pipe = pipe
        self.scorer = scorer

    def branch(self, rows: Iterable[ActiveRequest]) -> list[tuple[ActiveRequest, BaseException]]:
        """Branch every step-search group whose candidates just finished a segment: score their clean-image
        estimates at the segment's last timestep, keep the best, re-noise the others from its estimate. One
        decode and one scorer call for all of them. Returns the rows whose scoring failed."""
        groups: dict[tuple[int, int], dict[int, ActiveRequest]] = {}
        for s in rows:
            r = s.request
            if r.search != "step" or s.row.done or s.row.step not in branch_steps(r, s.row.start, s.row.schedule.num_steps):
                continue
            sub, index = s.tag
            j, i = sub.places[index]
            groups.setdefault((id(sub), j), {})[i] = s
        ready = [[g[i] for i in range(len(g))] for g in groups.values() if len(g) == next(iter(g.values())).request.best_of]
        if not ready:
            return []
        members = [s for g in ready for s in g]
        t0 = time.perf_counter()
        try:
            t = torch.tensor([float(s.row.schedule.timesteps[s.row.step - 1]) for s in members])
            scores = self._score(self.pipe.images(torch.cat([s.x0 for s in members]), self._side()), members, t)
        except Exception as e:
            err = EngineUnavailableError(f"best_of: scoring the candidates failed ({type(e).__name__}: {e})")
            return [(s, err) for s in members]
        ms = (time.perf_counter() - t0) * 1e3
        at = 0
        for g in ready:
            sc = scores[at : at + len(g)]
            at += len(g)
            w = max(range(len(g)), key=lambda i: (_rank(sc[i]), -i))
            trace = g[0].branches if g[0].branches is not None else []
            trace.append(Branch(g[0].row.step, float(t[at - len(g)]), tuple(sc), w))
            _rebranch(g, w)
            for s in g:
                s.branches = trace
                s.timings["score_ms"] = s.timings.get("score_ms", 0.0) + ms
        return []

    def finish(self, finished: tuple[tuple[ActiveRequest, GeneratedImage | BaseException], ...]
               ) -> tuple[tuple[ActiveRequest, GeneratedImage | BaseException], ...]:
        """Score the finished candidates (the decoded images, at t = 0), in one scorer call; a candidate whose
        scoring fails gets the error instead of its image."""
        todo = [(s, r) for s, r in finished if isinstance(r, GeneratedImage) and s.request.best_of > 1]
        if not todo:
            return finished
        t0 = time.perf_counter()
        try:
            pixels = np.stack([np.asarray(r.image.convert("RGB"), dtype=np.float32) for _, r in todo])
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).div(127.5).sub(1.0).to(self.pipe.device)
            scores = self._score(images, [s for s, _ in todo], torch.zeros(len(todo)))
        except Exception as e:
            err = EngineUnavailableError(f"best_of: scoring the candidates failed ({type(e).__name__}: {e})")
            bad = {id(s) for s, _ in todo}
            return tuple((s, err if id(s) in bad else r) for s, r in finished)
        ms = (time.perf_counter() - t0) * 1e3
        for (s, r), score in zip(todo, scores):
            r.score = score
            r.branches = tuple(s.branches or ())
            r.timings["score_ms"] = s.timings.get("score_ms", 0.0) + ms
        return finished

    def _side(self) -> int | None:
        return getattr(self.scorer, "image_size", None)

    def _score(self, images: torch.Tensor, rows: list[ActiveRequest], t: torch.Tensor) -> list[float]:
        if self.scorer is None:
            raise RuntimeError("no preference scorer")
        out = self.scorer(images, [s.request.prompt for s in rows], t.to(images.device))
        return out.detach().to("cpu", torch.float32).tolist()


def _rebranch(group: list[ActiveRequest], w: int) -> None:
    """Every candidate but `w` continues from w's clean-latent estimate, re-noised to the level of the next
    step with fresh noise from its own generator (q(x_j | x0), as img2img starts); w keeps its latent."""
    win = group[w]
    x0 = win.x0
    for i, s in enumerate(group):
        if i == w:
            continue
        noise = initial_noise(s.row.generator, tuple(x0.shape[1:]), x0.dtype, x0.device)
        s.latents = add_noise(s.row.schedule, s.row.step, x0, noise)
        s.row.x0_prev = win.row.x0_prev  # DPM++ 2M's history: the chosen trajectory's
