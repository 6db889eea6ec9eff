"""SPO: step-by-step preference optimisation of a LoRA (Liang et al., arXiv 2406.04314), SDXL recipe.

One round, top to bottom:
  1. sample `prompts_per_round` prompts in a seeded order (resumable position);
  2. roll out the current policy (UNet + trainable LoRA) with DDIM eta = 1 through the serving code
     (`policy.DdimPolicy`); steps with t > `train_t_max` once, untrained;
  3. from t = 751 on, in chunks of `chunk` steps: branch k candidates from the shared latent, run each
     `chunk - 1` more steps, score every candidate's predicted x0 (VAE-decoded) at the next branch
     point with the preference model (t = 0 for the final latent), keep (best, worst) if
     softmax([s_w, s_l]) gives p_w - p_l > `threshold`, record the chunk's transitions of both, and
     continue from a uniformly random candidate (`rollout.BranchingRollout`);
  4. DPO-style loss on the kept pairs: r = exp(log p_theta - log p_ref) of the DDIM transition,
     clamped to [1 - clip, 1 + clip]; loss = -log sigmoid(beta * (log r_w - log r_l)) (`loss.spo_loss`);
     AdamW on the LoRA parameters only, in optimiser steps of `effective_batch` pairs (the paper's 16)
     made of micro-batches, with clipping (`SPOTrainer.train_on`).
Data-parallel: N ranks (`distributed.py`) each roll out their own prompts of a global round; gradients
are summed over the ranks at every step, and the result does not depend on N (see SPOTrainer).
Precision: the base in the pipeline's dtype, the LoRA (parameters, gradients, branch) in fp32, a
gradient scaler for an fp16 base, the SPM in fp32.
Checkpoints (both LoRA layouts, optimiser, gradient scaler, round, prompt position, config) are written
atomically by rank 0 (`checkpoint`). The configuration is `config.TrainConfig`; `run.build_trainer` is the
one set-up of the CLI (`python -m spo_runtime train`) and of training jobs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from spo_runtime.errors import InvalidRequestError, SpoError
from spo_runtime.faults import NONE as NO_FAULTS, Faults
from spo_runtime.lora.format import LoraModuleWeights
from spo_runtime.model.pipeline import SpoPipeline
from spo_runtime.preference.scorers import PreferenceScorer
from spo_runtime.training.adapter import REF, TRAIN, load_trainable, trained_modules
from spo_runtime.training.checkpoint import export_adapter, restore_checkpoint, trim_metrics, write_checkpoint
from spo_runtime.training.config import TrainConfig
from spo_runtime.training.distributed import LOCAL, Group
from spo_runtime.training.loss import spo_loss
from spo_runtime.training.policy import DdimPolicy
from spo_runtime.training.rollout import BranchingRollout, Pair, Transition, first_branch, stream_seed
from spo_runtime.training.scorers import default_scorer

__all__ = ["JobCancelled", "SPOTrainer"]


class JobCancelled(SpoError):
    """The job was asked to stop at a round boundary."""


def _micro_batches(pairs: list[Pair], size: int) -> list[list[Pair]]:
    """Consecutive runs of at most `size` pairs of one prompt (pairs sorted by key)."""
    out: list[list[Pair]] = []
    for p in pairs:
        if out and len(out[-1]) < size and out[-1][0].win.slot == p.win.slot:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def _optimizer_steps(order: list[int], sizes: list[int], pairs_per_step: int) -> list[tuple[list[int], int]]:
    """Micro-batches (indexes into `sizes`, taken in `order`) grouped into optimiser steps of at least
    `pairs_per_step` pairs (a micro-batch is never split; the last step may hold fewer): (micro-batches, pairs)."""
    windows, current, n = [], [], 0
    for u in order:
        current.append(u)
        n += sizes[u]
        if n >= pairs_per_step:
            windows.append((current, n))
            current, n = [], 0
    if current:
        windows.append((current, n))
    return windows


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
                 scorer: PreferenceScorer | None = None, start_adapter: str | Path | None = None, spm_tokenizer=None,
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
        self.policy = DdimPolicy(pipe, config.num_inference_steps, config.eta)
        self.schedule = self.policy.schedule
        self.first_branch = first_branch(self.schedule, config.train_t_max)
        self.sampler = BranchingRollout(self.policy, config, self.first_branch,
                                        scorer or default_scorer(config, pipe, spm_tokenizer))
        self._round_cond: dict = {}  # the conditioning of the last roll-out's prompts (its pairs index it)
        reg = pipe.registry
        for name in list(reg.adapters):  # the trainer's own pipeline holds only what it trains against
            pipe.unload_adapter(name)
        self.policy_scales = {TRAIN: 1.0}
        self.ref_scales: dict[str, float] = {}
        start = reg.read(start_adapter) if start_adapter else None
        if start is not None:
            reg.load(REF, start, source=str(start_adapter))
            self.ref_scales = {REF: 1.0}
        self.params = load_trainable(pipe, config, start)
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

    @property
    def scorer(self) -> PreferenceScorer:
        """The preference scorer the roll-out ranks candidates with (replaceable)."""
        return self.sampler.scorer

    @scorer.setter
    def scorer(self, scorer: PreferenceScorer) -> None:
        self.sampler.scorer = scorer

    def lora_modules(self) -> dict[str, LoraModuleWeights]:
        """The trained adapter, copied to the CPU in float32 (alpha / rank folded into up, so alpha = rank)."""
        return trained_modules(self.pipe.registry)

    # -- the roll-out ------------------------------------------------------------------------

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

    def rollout(self, prompts: list[str], slots: list[int] | None = None) -> tuple[list[Pair], dict]:
        """Sample every prompt with branching; return the kept pairs and this rank's round statistics.
        `slots`: the prompts' places in the global round (default 0..P-1), which seed their streams."""
        slots = list(range(len(prompts))) if slots is None else list(slots)
        pairs, stats, self._round_cond = self.sampler.run(prompts, slots, self.round, self.policy_scales)
        return pairs, stats

    def _rollouts(self, prompts: list[str], slots: list[int]) -> tuple[list[Pair], dict, dict]:
        """The round's rollouts in sampling batches of `rollout_batch` prompts: pairs, summed statistics
        and the conditioning of all the round's prompts (the pairs' `prompt` indexes its rows)."""
        pairs, stats, self._round_cond = self.sampler.run_batches(prompts, slots, self.round, self.policy_scales)
        return pairs, stats, self._round_cond

    # -- the loss ----------------------------------------------------------------------------

    def _logprobs(self, trans: list[Transition], cond: dict, scales: dict[str, float]) -> torch.Tensor:
        """log p(x_prev | x_t) of `trans` under the adapter `scales`; `cond` has one row per prompt."""
        x_t = torch.stack([tr.x_t for tr in trans])
        x_prev = torch.stack([tr.x_prev for tr in trans])
        step = torch.tensor([tr.step for tr in trans])
        idx = torch.tensor([tr.prompt for tr in trans], device=x_t.device)
        c = {key: v.index_select(0, idx.to(v.device)) for key, v in cond.items()}
        return self.policy.logprob(x_t, x_prev, step, c, scales)

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
        order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(stream_seed(self.cfg.seed, self.round, "shuffle"))).tolist()
        windows = _optimizer_steps(order, sizes, self.pairs_per_step)
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
        """One global round: this rank's prompts, their roll-outs, the optimiser steps over every rank's
        pairs; returns the round's statistics (rank 0 appends them to metrics.jsonl)."""
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

    def save_checkpoint(self) -> Path | None:
        """checkpoints/round-N/ of this round (see `checkpoint.write_checkpoint`); CheckpointWriteError
        leaves the previous one intact. Only rank 0 writes (the ranks hold the same adapter and optimiser
        state); the others return None."""
        if not self.group.main:
            return None
        state = {
            "optimizer": self.opt.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "round": self.round,
            "position": self.position,
            "world_size": self.group.world,  # for the record: a job may resume on another number of ranks
        }
        return write_checkpoint(self.out, self.cfg, self.lora_modules(), state, self.faults)

    def load_checkpoint(self) -> bool:
        """Resume from the newest complete checkpoint, if any; returns whether it resumed. A damaged one
        raises CheckpointCorruptError naming the file and the problem. metrics.jsonl keeps the rounds up to
        the checkpoint's only: the rounds after it run again and are logged again."""
        resumed = restore_checkpoint(self.out, self.pipe.registry, self.opt, self.scaler)
        if self.group.main:
            trim_metrics(self.out, resumed[0] if resumed else 0)
        if resumed is None:
            return False
        self.round, self.position = resumed
        self.resumed_from = self.round
        return True

    def export(self, adapter_dir: Path, name: str, replace: bool = False) -> dict:
        """Write the trained adapter to `adapter_dir` in both layouts; returns relative paths and hashes.
        An existing file is never replaced (AdapterExistsError) unless `replace` (the CLI's own directory)."""
        return export_adapter(adapter_dir, name, self.lora_modules(), self.cfg, self.round, replace=replace)

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
