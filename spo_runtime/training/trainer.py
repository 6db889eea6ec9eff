"""SPO: step-by-step preference optimisation of a LoRA (Liang et al., arXiv 2406.04314), SDXL recipe.

One round, top to bottom:
  1. sample `prompts_per_round` prompts in a seeded order (resumable position);
  2. roll out the current policy (UNet + trainable LoRA) with DDIM eta = 1 through the serving code
     (`SpoPipeline.guided_eps` + `sampler.ddim_step`); steps with t > `train_t_max` once, untrained;
  3. from t = 751 on, in chunks of `chunk` steps: branch k candidates from the shared latent, run each
     `chunk - 1` more steps, score every candidate's predicted x0 (VAE-decoded) at the next branch
     point with the preference model (t = 0 for the final latent), keep (best, worst) if
     softmax([s_w, s_l]) gives p_w - p_l > `threshold`, record the chunk's transitions of both, and
     continue from a uniformly random candidate;
  4. DPO-style loss on the kept pairs: r = exp(log p_theta - log p_ref) of the DDIM transition,
     clamped to [1 - clip, 1 + clip]; loss = -log sigmoid(beta * (log r_w - log r_l));
     AdamW on the LoRA parameters only, in optimiser steps of `effective_batch` pairs (the paper's 16)
     made of micro-batches, with clipping.
Data-parallel: N ranks (`distributed.py`) each roll out their own prompts of a global round; gradients
are summed over the ranks at every step, and the result does not depend on N (see SPOTrainer).
Precision: the base in the pipeline's dtype, the LoRA (parameters, gradients, branch) in fp32, a
gradient scaler for an fp16 base, the SPM in fp32.
Checkpoints (both LoRA layouts, optimiser, gradient scaler, round, prompt position, config) are written
atomically by rank 0. `build_trainer` is the one set-up of the CLI (`python -m spo_runtime train`) and of
training jobs; `train_rank` runs the CLI as one rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spo_runtime.training.distributed import LOCAL, Group
from spo_runtime.errors import InvalidRequestError, SpoError
from spo_runtime.faults import NONE as NO_FAULTS, Faults
from spo_runtime.fsutil import atomic_write, fsync_dir, write_json_atomic
from spo_runtime.lora.format import LoraFile, LoraModuleWeights, module_specs, save_lora_file
from spo_runtime.fsutil import file_sha256
from spo_runtime.model.pipeline import SpoPipeline
from spo_runtime.training.spm_source import default_spm_path, spm_weights_file
from spo_runtime.validation import validation_error
from spo_runtime.sampling.sampler import ddim_step, ddim_transition_logprob, make_schedule

log = logging.getLogger("spo_runtime.train")

TRAIN = "train"  # the trainable adapter's name inside the trainer's registry
REF = "ref"  # the frozen starting adapter (reference model), when continuing one
CHECKPOINT = "checkpoint.pt"  # optimiser, RNG, round and prompt position of a checkpoint
OLD_CHECKPOINT = "train_state.pt"  # its name before; still resumed from


class TrainConfig(BaseModel):
    """Every hyperparameter of a job; saved with every checkpoint. Defaults: the paper's SDXL recipe."""

    model_config = ConfigDict(extra="forbid")

    # sampling (DDIM, eta 1, CFG with an empty negative prompt)
    num_inference_steps: int = Field(20, ge=2, le=100)
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    eta: float = Field(1.0, gt=0.0, le=1.0)
    train_t_max: int = Field(751, ge=1, le=999)  # steps with t above this are sampled once, untrained
    chunk: int = Field(4, ge=1, le=50)  # steps per branch chunk
    k: int = Field(2, ge=2, le=16)  # candidates per branch point
    threshold: float = Field(0.4, ge=0.0, lt=1.0)  # keep a pair if p_w - p_l exceeds this
    width: int | None = None  # default: the preset's
    height: int | None = None
    # loss
    beta: float = Field(10.0, gt=0.0)
    ratio_clip: float = Field(0.1, gt=0.0, lt=1.0)
    # LoRA
    rank: int = Field(64, ge=1, le=512)
    alpha: float = Field(64.0, gt=0.0)
    targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]  # suffixes of UNet layer names
    # optimiser
    lr: float = Field(1e-5, gt=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0.0)
    adam_eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    # kept pairs per optimiser step over all ranks: the paper's 4 GPUs x 2 pairs x 2 accumulation
    effective_batch: int = Field(16, ge=1, le=4096)
    micro_batch: int = Field(2, ge=1, le=256)  # pairs per forward/backward on one rank
    # micro-batches per optimiser step on each rank; unset: derived, effective_batch / (micro_batch x nproc).
    # Given without effective_batch, it sets the effective batch: micro_batch x grad_accum x nproc.
    grad_accum: int | None = Field(None, ge=1, le=256)
    prompts_per_round: int = Field(2, ge=1, le=256)  # per rank
    rollout_batch: int | None = Field(None, ge=1, le=256)  # prompts per sampling batch; unset: the round's
    # data-parallel ranks; unset: SPO_TRAIN_NPROC, else the training GPUs' count on CUDA, 1 on CPU
    nproc: int | None = Field(None, ge=1, le=64)
    epochs: float = Field(10.0, gt=0.0)  # passes over the prompt list
    max_rounds: int | None = Field(None, ge=1)
    seed: int = Field(42, ge=0)
    # precision and memory
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # base weights' dtype; LoRA stays fp32
    gradient_checkpointing: bool = False
    # scoring
    scorer: Literal["spm", "brightness", "darkness"] = "spm"
    # SPM checkpoint (.safetensors, or .bin read with weights_only); default: SPO_SPM
    spm_path: str | None = Field(default_factory=default_spm_path)
    # bookkeeping
    checkpoint_every: int = Field(10, ge=1)  # rounds
    keep_checkpoints: int = Field(2, ge=1)

    def pairs_per_step(self, world: int) -> int:
        """Kept pairs per optimiser step over all `world` ranks (the effective batch)."""
        if self.grad_accum is not None and "effective_batch" not in self.model_fields_set:
            return self.micro_batch * self.grad_accum * world
        return self.effective_batch

    def accumulation(self, world: int) -> int:
        """Micro-batches per optimiser step on each rank (on average: ranks split each step's pairs)."""
        return max(1, math.ceil(self.pairs_per_step(world) / (self.micro_batch * world)))

    def check_world(self, world: int) -> None:
        """Given both, grad_accum and effective_batch must agree for `world` ranks."""
        if self.grad_accum is not None and "effective_batch" in self.model_fields_set:
            want = self.micro_batch * self.grad_accum * world
            if want != self.effective_batch:
                raise InvalidRequestError(
                    "config.grad_accum", f"micro_batch x grad_accum x nproc = {self.micro_batch} x {self.grad_accum} x "
                                         f"{world} = {want} differs from effective_batch {self.effective_batch}; give one of the two")

    @classmethod
    def parse(cls, data: dict) -> TrainConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = validation_error(e)
            raise InvalidRequestError(f"config.{err.field}", str(err).split(": ", 1)[-1]) from None


# ---------------------------------------------------------------------------------------------
# The formulas (pure functions; tests hold them to hand computations)


def select_pair(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores (P, k) -> (winner index, loser index, keep mask), each (P,).

    Winner/loser: highest/lowest score; keep when softmax([s_w, s_l]) gives p_w - p_l > threshold
    (p_w - p_l = tanh((s_w - s_l) / 2)).
    """
    w = scores.argmax(dim=1)
    l = scores.argmin(dim=1)
    pair = torch.stack([scores.gather(1, w[:, None])[:, 0], scores.gather(1, l[:, None])[:, 0]], dim=1)
    p = pair.float().softmax(dim=1)
    keep = (p[:, 0] - p[:, 1]) > threshold
    return w, l, keep


def spo_loss(logp_w: torch.Tensor, ref_w: torch.Tensor, logp_l: torch.Tensor, ref_l: torch.Tensor, beta: float, clip: float):
    """-log sigmoid(beta * (log r_w - log r_l)) with r = clamp(exp(logp - logp_ref), 1 - clip, 1 + clip).

    Returns (loss per pair, share of the 2n ratios at the clamp).
    """
    r_w = torch.exp(logp_w - ref_w)
    r_l = torch.exp(logp_l - ref_l)
    clamped = ((r_w <= 1 - clip) | (r_w >= 1 + clip)).float().sum() + ((r_l <= 1 - clip) | (r_l >= 1 + clip)).float().sum()
    r_w, r_l = r_w.clamp(1 - clip, 1 + clip), r_l.clamp(1 - clip, 1 + clip)
    loss = -F.logsigmoid(beta * (torch.log(r_w) - torch.log(r_l)))
    return loss, float(clamped) / (2 * len(loss))


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


def _micro_batches(pairs: list[Pair], size: int) -> list[list[Pair]]:
    """Consecutive runs of at most `size` pairs of one prompt (pairs sorted by key)."""
    out: list[list[Pair]] = []
    for p in pairs:
        if out and len(out[-1]) < size and out[-1][0].win.slot == p.win.slot:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def _stream_seed(*parts) -> int:
    """A 63-bit seed for one random stream of a job, from (seed, round, what the stream is for...)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------


class JobCancelled(SpoError):
    """The job was asked to stop at a round boundary."""


class CheckpointWriteError(SpoError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is left intact."""


class CheckpointCorruptError(SpoError):
    """The checkpoint a job would resume from is damaged or incomplete; the job cannot resume from it."""


class SPOTrainer:
    """Runs SPO rounds on a pipeline (its own UNet copy, unfused), writing checkpoints to `out_dir`.

    Data-parallel with `group` (one trainer per rank, each on its own device): a global round gives each
    rank `prompts_per_round` prompts of its own; every random draw of a prompt's rollout comes from a
    stream seeded by (seed, round, the prompt's slot in the global round), and the kept pairs are
    shuffled and cut into optimiser steps of `effective_batch` pairs in one global order, so a job's
    result does not depend on how many ranks run it. Each rank computes the gradients of its own pairs
    of a step; they are summed over the ranks (one all-reduce) and divided by the step's global pair
    count. Rank 0 writes the checkpoints; every rank resumes from them."""

    def __init__(self, pipe: SpoPipeline, config: TrainConfig, prompts: list[str], out_dir: str | Path,
                 scorer: Callable | None = None, start_adapter: str | Path | None = None, spm_tokenizer=None,
                 faults: Faults = NO_FAULTS, group: Group = LOCAL):
        if not prompts:
            raise InvalidRequestError("prompts", "must hold at least one prompt")
        config.check_world(group.world)
        self.pipe = pipe
        self.cfg = config
        self.group = group
        self.pairs_per_step = config.pairs_per_step(group.world)
        self.faults = faults  # SPO_FAULTS (tests only): enospc_checkpoint
        self.prompts = list(prompts)
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.schedule = make_schedule("ddim", config.num_inference_steps, pipe.noise)
        self.first_branch = next((i for i, t in enumerate(self.schedule.timesteps) if t <= config.train_t_max), None)
        if self.first_branch is None:
            raise InvalidRequestError("config.train_t_max", f"no step has t <= {config.train_t_max}")
        self.scorer = scorer or self._default_scorer(spm_tokenizer)
        reg = pipe.registry
        for name in list(reg.adapters):  # the trainer's own pipeline holds only what it trains against
            pipe.unload_adapter(name)
        self.policy_scales = {TRAIN: 1.0}
        self.ref_scales: dict[str, float] = {}
        start = reg.read(start_adapter) if start_adapter else None
        if start is not None:
            reg.load(REF, start, source=str(start_adapter))
            self.ref_scales = {REF: 1.0}
        self.params = self._init_lora(start)
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.adam_eps)
        # an fp16 base: the loss is scaled so that small gradients do not underflow in the fp16 layers
        self.scaler = torch.amp.GradScaler(pipe.device.type, enabled=pipe.dtype == torch.float16)
        self.round = 0
        self.position = 0  # prompts consumed in the seeded order (by all ranks)
        self.resumed_from: int | None = None  # the checkpoint's round, once load_checkpoint resumed
        per_round = config.prompts_per_round * group.world
        self.total_rounds = config.max_rounds or max(1, math.ceil(config.epochs * len(prompts) / per_round))
        if config.gradient_checkpointing:  # through the registry: recomputation re-enters the row scales
            reg.enable_gradient_checkpointing()

    # -- setup -------------------------------------------------------------------------------

    def _default_scorer(self, tokenizer):
        from spo_runtime.training.scorers import BrightnessScorer, SpmScorer
        from spo_runtime.training.spm import StepAwarePreferenceModel, build_spm, spm_config
        from spo_runtime.training.spm_source import load_spm_tokenizer
        from spo_runtime.training.spm_weights import load_spm_weights

        if self.cfg.scorer == "brightness":
            return BrightnessScorer(+1)
        if self.cfg.scorer == "darkness":
            return BrightnessScorer(-1)
        preset = self.pipe.preset.name
        if preset == "tiny":
            cfg = spm_config("tiny")
            cfg.text_config.vocab_size = len(self.pipe.tokenizers[0])  # the tiny tokenizer's ids
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                model = StepAwarePreferenceModel(cfg)
            tokenizer = tokenizer or self.pipe.tokenizers[0]
        else:
            model = build_spm("sdxl-random" if preset == "sdxl-random" else "sdxl", device="cpu")
            if tokenizer is None:
                if preset == "sdxl-random":
                    tokenizer = self.pipe.tokenizers[0]
                else:  # SPO_SPM_TOKENIZER (offline), else the hub's; the error names the variable
                    tokenizer = load_spm_tokenizer(self.pipe.settings.spm_tokenizer)
        if self.cfg.spm_path:
            load_spm_weights(model, self.cfg.spm_path)
        elif preset == "sdxl-spo":
            load_spm_weights(model, spm_weights_file(None))
        # the SPM scores in float32 whatever the pipeline's dtype, as the authors' code does: pair selection
        # compares score gaps near ln(1.4/0.6), which half precision would blur
        model = model.to(self.pipe.device, torch.float32).eval().requires_grad_(False)
        return SpmScorer(model, tokenizer)

    def _init_lora(self, start: LoraFile | None) -> list[torch.nn.Parameter]:
        """The trainable adapter: a copy of the starting adapter, or gaussian A (std 1/r) and zero B."""
        specs = module_specs(self.pipe.unet)
        if start is not None:
            modules = {m: LoraModuleWeights(m, w.down.float().clone(), w.up.float().clone(), w.alpha) for m, w in start.modules.items()}
        else:
            g = torch.Generator().manual_seed(self.cfg.seed)
            targets = tuple("." + t for t in self.cfg.targets)
            chosen = [m for m in specs if m.endswith(targets)]
            if not chosen:
                raise InvalidRequestError("config.targets", f"no UNet layer ends with any of {self.cfg.targets}")
            modules = {}
            for m in chosen:
                sp = specs[m]
                k = sp.kernel_size if sp.kind == "conv" else ()
                down = torch.randn(self.cfg.rank, sp.in_features, *k, generator=g) / self.cfg.rank
                up = torch.zeros(sp.out_features, self.cfg.rank, *((1, 1) if k else ()))
                modules[m] = LoraModuleWeights(m, down, up, self.cfg.alpha)
        reg = self.pipe.registry
        reg.load(TRAIN, LoraFile("diffusers", modules), source="trainer")
        trainable = reg.make_trainable(TRAIN)  # fp32 parameters; alpha / r folded into up by the registry
        return [p for m in modules for p in trainable[m]]  # this order indexes the optimiser's saved state

    def lora_modules(self) -> dict[str, LoraModuleWeights]:
        """The trained adapter, copied to the CPU in float32 (alpha / rank folded into up, so alpha = rank)."""
        return {m: LoraModuleWeights(m, w.down.float(), w.up.float(), w.alpha)
                for m, w in self.pipe.registry.module_weights(TRAIN).items()}

    # -- prompts -----------------------------------------------------------------------------

    def next_prompts(self) -> tuple[list[str], list[int]]:
        """This rank's prompts of the next global round and their slots in it. A global round takes
        `prompts_per_round` x ranks prompts from a per-epoch seeded permutation (resumable by
        position); rank r takes the r-th `prompts_per_round` of them."""
        n, per = len(self.prompts), self.cfg.prompts_per_round
        out, slots = [], []
        for slot in range(per * self.group.world):
            epoch, i = divmod(self.position, n)
            if slot // per == self.group.rank:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch)).tolist()
                out.append(self.prompts[order[i]])
                slots.append(slot)
            self.position += 1
        return out, slots

    # -- sampling ----------------------------------------------------------------------------

    def _states(self, prompts: list[str], seeds: list[int]):
        reqs = [dict(prompt=p, seed=s, num_inference_steps=self.cfg.num_inference_steps, guidance_scale=self.cfg.guidance_scale,
                     eta=self.cfg.eta, width=self.cfg.width, height=self.cfg.height, lora_scale=0.0) for p, s in zip(prompts, seeds)]
        return self.pipe.prepare([{k: v for k, v in r.items() if v is not None} for r in reqs])

    def _eps(self, x: torch.Tensor, step: torch.Tensor, cond: dict, scales: dict[str, float]) -> torch.Tensor:
        t = self.schedule.timesteps[step].to(x.device)
        # latents stay fp32 along the trajectory; the UNet runs in the pipeline's dtype
        return self.pipe.guided_eps(x.to(self.pipe.dtype), t, cond, [scales] * len(x))

    def _ddim(self, x, eps, step: torch.Tensor, noise=None):
        return ddim_step(x, eps, self.schedule.alpha_t[step], self.schedule.alpha_prev[step], torch.full((len(x),), self.cfg.eta), noise)

    def _noise(self, gens: list[torch.Generator], per: int, like: torch.Tensor) -> torch.Tensor:
        """Noise for rows laid out prompt by prompt, `per` rows each, each prompt's from its own stream."""
        tail = tuple(like.shape[1:])
        z = torch.cat([torch.randn((per, *tail), generator=g, dtype=torch.float32) for g in gens])
        return z.to(self.pipe.device, like.dtype)

    def _streams(self, slots: list[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(_stream_seed(self.cfg.seed, self.round, "prompt", s)) for s in slots]

    def _score(self, x0_latents: torch.Tensor, prompts: list[str], t: float) -> torch.Tensor:
        """Preference scores of VAE-decoded latents (images in [-1, 1]) at timestep t."""
        vae = self.pipe.vae
        img = vae.decode(x0_latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0].float()
        ts = torch.full((len(prompts),), float(t), device=img.device)
        return self.scorer(img, prompts, ts).float().cpu()

    @torch.no_grad()
    def rollout(self, prompts: list[str], slots: list[int] | None = None) -> tuple[list[Pair], dict]:
        """Sample every prompt with branching; return the kept pairs and this rank's round statistics.
        `slots`: the prompts' places in the global round (default 0..P-1), which seed their streams."""
        P, k, n = len(prompts), self.cfg.k, self.cfg.num_inference_steps
        slots = list(range(P)) if slots is None else list(slots)
        gens = self._streams(slots)
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for g in gens]
        states = self._states(prompts, seeds)
        # clone: embeddings made under inference_mode cannot be saved for backward
        cond = {key: v.clone() for key, v in self.pipe.conditioning(states).items()}
        x = torch.cat([s.latents for s in states]).clone()  # (P, C, h, w): shared x_T
        for i in range(self.first_branch):  # untrained early steps
            step = torch.full((P,), i)
            x, _, _, _ = self._ddim(x, self._eps(x, step, cond, self.policy_scales), step, self._noise(gens, 1, x))
        rep = torch.arange(P).repeat_interleave(k)  # candidate row r belongs to prompt rep[r]
        cond_k = {key: v.index_select(0, rep.to(v.device)) for key, v in cond.items()}
        step_b = self.first_branch
        eps = self._eps(x, torch.full((P,), step_b), cond, self.policy_scales)
        pairs: list[Pair] = []
        kept = total = 0
        win_scores, lose_scores = [], []
        while step_b < n:
            # branch: k candidates from each shared latent, same DDIM mean, independent noise
            s_b = torch.full((P,), step_b)
            _, _, mean, std = self._ddim(x, eps, s_b)
            X = mean.index_select(0, rep.to(mean.device)) + std.index_select(0, rep.to(std.device)) * self._noise(gens, k, mean)
            traj = [(x.index_select(0, rep.to(x.device)), X, step_b)]
            end = min(step_b + self.cfg.chunk, n)
            for i in range(step_b + 1, end):
                s_i = torch.full((P * k,), i)
                X_new, _, _, _ = self._ddim(X, self._eps(X, s_i, cond_k, self.policy_scales), s_i, self._noise(gens, k, X))
                traj.append((X, X_new, i))
                X = X_new
            if end < n:  # score the predicted x0 at the next branch point
                s_e = torch.full((P * k,), end)
                eps_k = self._eps(X, s_e, cond_k, self.policy_scales)
                _, x0, _, _ = self._ddim(X, eps_k, s_e)
                scores = self._score(x0, [prompts[r] for r in rep.tolist()], float(self.schedule.timesteps[end]))
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
        self._round_cond = cond
        stats = {"pairs_kept": kept, "branch_points": total, "transitions": len(pairs),
                 "score_w_sum": sum(win_scores), "score_l_sum": sum(lose_scores)}
        return pairs, stats

    def _rollouts(self, prompts: list[str], slots: list[int]) -> tuple[list[Pair], dict, dict]:
        """The round's rollouts in sampling batches of `rollout_batch` prompts: pairs, summed statistics
        and the conditioning of all the round's prompts (the pairs' `prompt` indexes its rows)."""
        size = self.cfg.rollout_batch or len(prompts)
        pairs: list[Pair] = []
        stats: dict = {}
        conds = []
        for i in range(0, len(prompts), size):
            part, local = self.rollout(prompts[i : i + size], slots[i : i + size])
            for p in part:
                p.win.prompt += i
                p.lose.prompt += i
            pairs += part
            stats = {k: stats.get(k, 0) + v for k, v in local.items()}
            conds.append(self._round_cond)
        cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        self._round_cond = cond
        return pairs, stats, cond

    # -- the loss ----------------------------------------------------------------------------

    def _logprobs(self, trans: list[Transition], cond: dict, scales: dict[str, float]) -> torch.Tensor:
        x_t = torch.stack([tr.x_t for tr in trans])
        x_prev = torch.stack([tr.x_prev for tr in trans])
        step = torch.tensor([tr.step for tr in trans])
        idx = torch.tensor([tr.prompt for tr in trans], device=x_t.device)
        c = {key: v.index_select(0, idx.to(v.device)) for key, v in cond.items()}
        eps = self._eps(x_t, step, c, scales)
        _, _, mean, std = self._ddim(x_t.float(), eps.float(), step)
        return ddim_transition_logprob(x_prev.float(), mean, std)

    def train_on(self, pairs: list[Pair], cond: dict) -> dict:
        """One round's optimiser steps over the kept pairs of every rank.

        Each prompt's pairs, in step order, are cut into micro-batches of `micro_batch` pairs; the global
        round's micro-batches, in (prompt slot, step) order, are shuffled by the round's stream and
        grouped into optimiser steps of `effective_batch` pairs (a micro-batch is never split, so a step
        may hold a few more). Each rank runs its own micro-batches of a step, loss summed and divided by
        the step's global pair count, and the gradients are summed over the ranks (a rank without pairs
        in a step adds zeros); then clipping and AdamW (the gradient scaler unscales first on an fp16
        base). Every micro-batch is the same computation on any number of ranks. Returns this round's
        global statistics."""
        g = self.group
        mb = self.cfg.micro_batch
        units = _micro_batches(sorted(pairs, key=lambda p: p.key), mb)  # never across prompts: same on any world size
        sizes, offset = g.all_concat([len(u) for u in units])  # every rank's, in global (prompt slot) order
        total = sum(sizes)
        if total == 0:
            return {"loss": None, "clamp_share": None, "log_ratio": None, "optimizer_steps": 0}
        order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(_stream_seed(self.cfg.seed, self.round, "shuffle"))).tolist()
        windows, current, n = [], [], 0
        for u in order:  # optimiser steps of effective_batch pairs (a micro-batch is never split)
            current.append(u)
            n += sizes[u]
            if n >= self.pairs_per_step:
                windows.append((current, n))
                current, n = [], 0
        if current:
            windows.append((current, n))
        sums = [0.0, 0.0, 0.0]  # loss, ratios at the clamp, |log ratio| (of this rank's pairs)
        steps = 0
        unet = self.pipe.unet
        if self.cfg.gradient_checkpointing:
            unet.train()
        try:
            for window, count in windows:
                for batch in [units[u - offset] for u in window if offset <= u < offset + len(units)]:
                    trans = [p.win for p in batch] + [p.lose for p in batch]
                    with torch.no_grad():
                        ref = self._logprobs(trans, cond, self.ref_scales)
                    # with gradient checkpointing, backward recomputes the forward under the policy's scales
                    logp = self._logprobs(trans, cond, self.policy_scales)
                    m = len(batch)
                    loss, clamp = spo_loss(logp[:m], ref[:m], logp[m:], ref[m:], self.cfg.beta, self.cfg.ratio_clip)
                    self.scaler.scale(loss.sum() / count).backward()
                    sums[0] += float(loss.detach().sum())
                    sums[1] += clamp * 2 * m
                    sums[2] += float((logp - ref).detach().abs().sum())
                g.sum_gradients(self.params)
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
                self.scaler.step(self.opt)
                self.scaler.update()
                self.opt.zero_grad(set_to_none=True)
                steps += 1
        finally:
            unet.eval()
        loss_sum, clamped, log_ratio = g.all_sum(sums)
        return {"loss": loss_sum / total, "clamp_share": clamped / (2 * total), "log_ratio": log_ratio / (2 * total),
                "optimizer_steps": steps}

    def run_round(self) -> dict:
        t0 = time.perf_counter()
        self.faults.round_start(self.group.rank, self.round + 1)
        prompts, slots = self.next_prompts()
        pairs, local, cond = self._rollouts(prompts, slots)
        kept, points, transitions, sw, sl = self.group.all_sum(
            [local["pairs_kept"], local["branch_points"], local["transitions"], local["score_w_sum"], local["score_l_sum"]])
        stats = {"pairs_kept": int(kept), "branch_points": int(points), "kept_rate": kept / max(points, 1),
                 "transitions": int(transitions), "score_w": sw / kept if kept else None, "score_l": sl / kept if kept else None}
        stats.update(self.train_on(pairs, cond))
        self.round += 1
        seconds = time.perf_counter() - t0
        stats.update({"round": self.round, "seconds": seconds, "position": self.position, "world_size": self.group.world,
                      "pairs_per_step": self.pairs_per_step, "pairs_per_s": transitions / seconds})
        if self.group.main:
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(stats) + "\n")
        return stats

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """checkpoints/round-N/ written as a temp dir then renamed; `latest.json` replaced atomically.

        If anything fails part-way (a full disk), the temp dir is removed and CheckpointWriteError
        says so: `latest.json` still names the previous checkpoint, whose files were not touched.
        Only rank 0 writes (the ranks hold the same adapter and optimiser state); the others return None."""
        if not self.group.main:
            return None
        root = self.out / "checkpoints"
        final = root / f"round-{self.round:06d}"
        tmp = root / f".round-{self.round:06d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            modules = self.lora_modules()
            meta = {"config": self.cfg.model_dump_json(), "round": str(self.round)}
            hashes = {
                "diffusers": save_lora_file(tmp / "lora_diffusers.safetensors", modules, "diffusers", metadata=meta),
                "webui": save_lora_file(tmp / "lora_webui.safetensors", modules, "webui", metadata=meta),
            }
            state = {
                "optimizer": self.opt.state_dict(),
                "grad_scaler": self.scaler.state_dict(),
                "round": self.round,
                "position": self.position,
                "world_size": self.group.world,  # for the record: a job may resume on another number of ranks
            }

            def write_state(fh):
                self.faults.checkpoint_write(self.round, fh)
                torch.save(state, fh)

            atomic_write(tmp / CHECKPOINT, write_state)
            hashes["checkpoint"] = file_sha256(tmp / CHECKPOINT)
            atomic_write(tmp / "config.json", self.cfg.model_dump_json(indent=2).encode())
            atomic_write(tmp / "hashes.json", json.dumps(hashes).encode())
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self._latest_name()
            raise CheckpointWriteError(
                f"writing the checkpoint of round {self.round} failed ({e.strerror or e}); "
                + (f"the previous checkpoint ({previous}) is intact" if previous else "there is no earlier checkpoint")
            ) from e
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        write_json_atomic(root / "latest.json", {"round": self.round, "dir": final.name, "hashes": hashes})
        for old in sorted(root.glob("round-*"))[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _latest_name(self) -> str | None:
        try:
            return json.loads((self.out / "checkpoints" / "latest.json").read_text())["dir"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def load_checkpoint(self) -> bool:
        """Resume from checkpoints/latest.json if present; returns whether it resumed. A damaged or
        incomplete checkpoint (unreadable files, bytes that differ from the recorded sha256, missing
        tensors or state) raises CheckpointCorruptError naming the file and the problem."""
        root = self.out / "checkpoints"
        latest = root / "latest.json"
        if not latest.exists():
            return False
        try:
            rec = json.loads(latest.read_text())
            d = root / rec["dir"]
            hashes = rec.get("hashes") or {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise self._corrupt(latest, f"unreadable ({type(e).__name__}: {e})") from None
        files = {"diffusers": d / "lora_diffusers.safetensors", "webui": d / "lora_webui.safetensors", "checkpoint": d / CHECKPOINT}
        for key, path in files.items():
            if key in hashes and path.exists() and file_sha256(path) != hashes[key]:
                raise self._corrupt(path, "its sha256 differs from the one recorded when it was written")
        from safetensors.torch import load_file

        try:
            sd = load_file(str(files["diffusers"]))
            with torch.no_grad():
                for m, down, up in self.pipe.registry.tensors(TRAIN):
                    down.copy_(sd[f"unet.{m}.lora.down.weight"])
                    up.copy_(sd[f"unet.{m}.lora.up.weight"])
        except Exception as e:
            raise self._corrupt(files["diffusers"], f"{type(e).__name__}: {e}") from None
        path = files["checkpoint"]
        if not path.exists() and (d / OLD_CHECKPOINT).exists():
            path = d / OLD_CHECKPOINT  # written before the rename
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
            self.opt.load_state_dict(state["optimizer"])
            if state.get("grad_scaler"):
                self.scaler.load_state_dict(state["grad_scaler"])
            self.round, self.position = int(state["round"]), int(state["position"])
        except Exception as e:
            raise self._corrupt(path, f"{type(e).__name__}: {e}") from None
        self.resumed_from = self.round
        log.info("resumed from %s (round %d)", d, self.round)
        return True

    def _corrupt(self, path: Path, problem: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"cannot resume from the checkpoint: {path} is damaged: {problem}. "
            f"Delete {self.out / 'checkpoints'} to train again from round 0")

    def export(self, adapter_dir: Path, name: str) -> dict:
        """Write the trained adapter to `adapter_dir` in both layouts; returns relative paths and hashes."""
        modules = self.lora_modules()
        meta = {"config": self.cfg.model_dump_json(), "round": str(self.round)}
        adapter_dir.mkdir(parents=True, exist_ok=True)
        files, hashes = {}, {}
        for layout in ("diffusers", "webui"):
            rel = f"{name}_{layout}.safetensors"
            hashes[layout] = save_lora_file(adapter_dir / rel, modules, layout, metadata=meta)
            files[layout] = rel
        return {"files": files, "sha256": hashes}

    def train(self, should_stop: Callable[[], bool] = lambda: False, on_round: Callable[[dict], None] | None = None) -> dict:
        """Rounds until the schedule ends or `should_stop()` on any rank (checked at round boundaries;
        every rank stops at the same one)."""
        last = {}
        while self.round < self.total_rounds:
            if self.group.any(should_stop()):
                self.save_checkpoint()
                self.group.barrier()
                raise JobCancelled(f"stopped at round {self.round}")
            last = self.run_round()
            if on_round:
                on_round(last)
            if self.round % self.cfg.checkpoint_every == 0 or self.round == self.total_rounds:
                self.save_checkpoint()
                self.group.barrier()  # every rank goes on from a written checkpoint
        return last


def read_prompts(path: str | Path) -> list[str]:
    """A prompt file: one prompt per line, blank lines skipped."""
    return [p for p in Path(path).read_text().splitlines() if p.strip()]


def build_trainer(config: TrainConfig, prompts: list[str], out_dir: str | Path,
                  start_adapter: str | Path | None = None, resume: bool = True, group: Group = LOCAL) -> SPOTrainer:
    """The trainer of `python -m spo_runtime train` and of a training job (one per rank): a pipeline of
    its own from the SPO_* settings on the rank's device (unfused; base weights in the config's
    precision, LoRA parameters and branch in float32), resumed from `out_dir`'s last checkpoint when
    there is one (`trainer.resumed_from`)."""
    from spo_runtime.model.loading import load_pipeline
    from spo_runtime.settings import Settings

    dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(config.mixed_precision)  # "no": the preset's dtype
    device = str(group.device) if group.device is not None else None
    threads = None
    if group.distributed and group.device.type == "cpu" and not os.environ.get("SPO_TORCH_THREADS"):
        from spo_runtime.training.distributed import rank_threads

        threads = rank_threads(group.world)  # the ranks share the cores
    # the trainer needs backward through the UNet: never the float8 base (no backward) nor a compiled serving graph
    settings = Settings.from_env(lora_fuse=False, dtype=dtype, device=device, torch_threads=threads, quant="none", compile=False)
    pipe = load_pipeline(settings)
    trainer = SPOTrainer(pipe, config, prompts, out_dir, start_adapter=start_adapter, faults=settings.fault_plan, group=group)
    if resume:
        trainer.load_checkpoint()
    return trainer


def train_rank(rank: int, world: int, rendezvous: str | None, devices: list[str], config_json: str, prompts_path: str,
               out_dir: str, start_adapter: str | None, name: str) -> None:
    """`python -m spo_runtime train` as rank `rank` of `world` (in its own process when world > 1): rank 0
    prints each round's statistics as a JSON line, writes the checkpoints and exports the adapter."""
    from spo_runtime.training.distributed import run_rank

    def body(group: Group) -> None:
        cfg = TrainConfig.model_validate_json(config_json)
        trainer = build_trainer(cfg, read_prompts(prompts_path), out_dir, start_adapter=start_adapter, group=group)
        if trainer.resumed_from is not None and group.main:
            print(f"resumed at round {trainer.round}", file=sys.stderr)
        trainer.train(on_round=lambda s: group.main and print(json.dumps(s), flush=True))
        if group.main:
            print(json.dumps(trainer.export(Path(out_dir), name)), flush=True)

    # one process on CPU: the settings' device (SPO_DEVICE), as the CLI always trained
    device = devices[rank] if world > 1 or devices[0].startswith("cuda") else None
    run_rank(rank, world, rendezvous, device, out_dir, body)
