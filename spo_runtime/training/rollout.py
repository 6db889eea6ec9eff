"""The roll-out half of an SPO round: sampling the prompts with the policy and branching, which yields the
pairs the loss trains on.

For a batch of P prompts (steps 2 and 3 of the round in `trainer`'s docstring): DDIM(eta) from a shared x_T,
the steps with t > `train_t_max` once, untrained; then from the first step with t <= `train_t_max`, in chunks
of `chunk` steps: branch k candidates from each shared latent (same DDIM mean, independent noise), run each
`chunk - 1` more steps, score every candidate's predicted x0 (VAE-decoded) at the next branch point with the
preference scorer (the final latent at t = 0), keep (best, worst) when `loss.select_pair` says so, record
both candidates' transitions of the chunk, and go on from a uniformly random candidate.

Every random draw of a prompt comes from a stream seeded by (seed, round, the prompt's slot in the global
round), so a prompt's roll-out is the same whichever rank and sampling batch it falls in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from spo_runtime.errors import InvalidRequestError
from spo_runtime.model.vae import from_unet
from spo_runtime.preference.scorers import PreferenceScorer
from spo_runtime.sampling.sampler import Schedule
from spo_runtime.training.config import TrainConfig
from spo_runtime.training.loss import select_pair
from spo_runtime.training.policy import DdimPolicy

__all__ = ["BranchingRollout", "Pair", "Transition", "first_branch", "stream_seed"]


@dataclass
class Transition:
    """One step of one candidate trajectory: x_t -> x_prev at schedule index `step`, for the rank's
    prompt `prompt` (its row of the round's conditioning), which is prompt `slot` of the global round."""

    prompt: int
    step: int
    x_t: torch.Tensor  # (C, h, w)
    x_prev: torch.Tensor
    slot: int = 0


@dataclass
class Pair:
    win: Transition
    lose: Transition

    @property
    def key(self) -> tuple[int, int]:
        """The pair's place in the global round, whichever rank holds it: (prompt slot, step)."""
        return self.win.slot, self.win.step


def stream_seed(*parts) -> int:
    """A 63-bit seed for one random stream of a job, from (seed, round, what the stream is for...)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def first_branch(schedule: Schedule, train_t_max: int) -> int:
    """The schedule index of the first branch point: the first step with t <= `train_t_max`."""
    first = next((i for i, t in enumerate(schedule.timesteps) if t <= train_t_max), None)
    if first is None:
        raise InvalidRequestError("config.train_t_max", f"no step has t <= {train_t_max}")
    return first


class BranchingRollout:
    """Samples prompts with `policy` and branching from schedule index `start`, ranking candidates with
    `scorer` (which the trainer may replace)."""

    def __init__(self, policy: DdimPolicy, config: TrainConfig, start: int, scorer: PreferenceScorer):
        self.policy = policy
        self.pipe = policy.pipe
        self.cfg = config
        self.start = start
        self.scorer = scorer

    def _states(self, prompts: list[str], seeds: list[int]):
        reqs = [dict(prompt=p, seed=s, num_inference_steps=self.cfg.num_inference_steps, guidance_scale=self.cfg.guidance_scale,
                     eta=self.cfg.eta, width=self.cfg.width, height=self.cfg.height, lora_scale=0.0) for p, s in zip(prompts, seeds)]
        return self.pipe.prepare([{k: v for k, v in r.items() if v is not None} for r in reqs])

    def _noise(self, gens: list[torch.Generator], per: int, like: torch.Tensor) -> torch.Tensor:
        """Noise for rows laid out prompt by prompt, `per` rows each, each prompt's from its own stream."""
        tail = tuple(like.shape[1:])
        z = torch.cat([torch.randn((per, *tail), generator=g, dtype=torch.float32) for g in gens])
        return z.to(self.pipe.device, like.dtype)

    def _streams(self, round_index: int, slots: list[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(stream_seed(self.cfg.seed, round_index, "prompt", s)) for s in slots]

    def _score(self, x0_latents: torch.Tensor, prompts: list[str], t: float) -> torch.Tensor:
        """Preference scores of VAE-decoded latents (images in [-1, 1]) at timestep t."""
        vae = self.pipe.vae
        # the UNet's scale back to the VAE's as serving decodes (and diffusers: latents_mean/std when the VAE has them)
        img = vae.decode(from_unet(x0_latents, vae.config).to(vae.dtype), return_dict=False)[0].float()
        ts = torch.full((len(prompts),), float(t), device=img.device)
        return self.scorer(img, prompts, ts).float().cpu()

    @torch.no_grad()
    def run(self, prompts: list[str], slots: list[int], round_index: int, scales: dict[str, float]) -> tuple[list[Pair], dict, dict]:
        """Sample every prompt with branching under the adapter `scales` in round `round_index`; return the kept
        pairs, this batch's statistics and its conditioning (one row per prompt, which `Transition.prompt`
        indexes). `slots`: the prompts' places in the global round, which seed their streams."""
        P, k, n = len(prompts), self.cfg.k, self.cfg.num_inference_steps
        policy = self.policy
        gens = self._streams(round_index, slots)
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for g in gens]
        states = self._states(prompts, seeds)
        # clone: embeddings made under inference_mode cannot be saved for backward
        cond = {key: v.clone() for key, v in self.pipe.conditioning(states).items()}
        x = torch.cat([s.latents for s in states]).clone()  # (P, C, h, w): shared x_T
        for i in range(self.start):  # untrained early steps
            step = torch.full((P,), i)
            x, _, _, _ = policy.step(x, policy.eps(x, step, cond, scales), step, self._noise(gens, 1, x))
        rep = torch.arange(P).repeat_interleave(k)  # candidate row r belongs to prompt rep[r]
        cond_k = {key: v.index_select(0, rep.to(v.device)) for key, v in cond.items()}
        step_b = self.start
        eps = policy.eps(x, torch.full((P,), step_b), cond, scales)
        pairs: list[Pair] = []
        kept = total = 0
        win_scores, lose_scores = [], []
        while step_b < n:
            # branch: k candidates from each shared latent, same DDIM mean, independent noise
            s_b = torch.full((P,), step_b)
            _, _, mean, std = policy.step(x, eps, s_b)
            X = mean.index_select(0, rep.to(mean.device)) + std.index_select(0, rep.to(std.device)) * self._noise(gens, k, mean)
            traj = [(x.index_select(0, rep.to(x.device)), X, step_b)]
            end = min(step_b + self.cfg.chunk, n)
            for i in range(step_b + 1, end):
                s_i = torch.full((P * k,), i)
                X_new, _, _, _ = policy.step(X, policy.eps(X, s_i, cond_k, scales), s_i, self._noise(gens, k, X))
                traj.append((X, X_new, i))
                X = X_new
            if end < n:  # score the predicted x0 at the next branch point
                s_e = torch.full((P * k,), end)
                eps_k = policy.eps(X, s_e, cond_k, scales)
                _, x0, _, _ = policy.step(X, eps_k, s_e)
                scores = self._score(x0, [prompts[r] for r in rep.tolist()], float(policy.schedule.timesteps[end]))
            else:  # the final clean latent, at t = 0
                eps_k = None
                scores = self._score(X, [prompts[r] for r in rep.tolist()], 0.0)
            scores = scores.view(P, k)
            w, l, keep = select_pair(scores, self.cfg.threshold)
            total += P
            for p in range(P):
                if not keep[p]:
                    continue
                kept += 1
                win_scores.append(float(scores[p, w[p]]))
                lose_scores.append(float(scores[p, l[p]]))
                rw, rl = p * k + int(w[p]), p * k + int(l[p])
                for x_t, x_prev, i in traj:
                    pairs.append(Pair(Transition(p, i, x_t[rw].detach().clone(), x_prev[rw].detach().clone(), slots[p]),
                                      Transition(p, i, x_t[rl].detach().clone(), x_prev[rl].detach().clone(), slots[p])))
            if end >= n:
                break
            # the next chunk starts from a uniformly random candidate (not the winner)
            pick = torch.cat([torch.randint(0, k, (1,), generator=g) for g in gens])
            rows = (torch.arange(P) * k + pick).to(X.device)
            x, eps = X.index_select(0, rows), eps_k.index_select(0, rows)
            step_b = end
        stats = {"pairs_kept": kept, "branch_points": total, "transitions": len(pairs),
                 "score_w_sum": sum(win_scores), "score_l_sum": sum(lose_scores)}
        return pairs, stats, cond

    def run_batches(self, prompts: list[str], slots: list[int], round_index: int,
                    scales: dict[str, float]) -> tuple[list[Pair], dict, dict]:
        """`run` in sampling batches of `rollout_batch` prompts: the pairs, summed statistics and the
        conditioning of all the prompts (the pairs' `prompt` indexes its rows)."""
        size = self.cfg.rollout_batch or len(prompts)
        pairs: list[Pair] = []
        stats: dict = {}
        conds = []
        for i in range(0, len(prompts), size):
            part, local, cond = self.run(prompts[i : i + size], slots[i : i + size], round_index, scales)
            for p in part:
                p.win.prompt += i
                p.lose.prompt += i
            pairs += part
            stats = {k: stats.get(k, 0) + v for k, v in local.items()}
            conds.append(cond)
        cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        return pairs, stats, cond
