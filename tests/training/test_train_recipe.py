"""Tests that fail on a silent non-learner, on the paper's default path, and on the precision split
(LoRA in float32 over a bf16/fp16 base)."""

import math

import numpy as np
import pytest
import torch

from spo_runtime import Settings, load_pipeline
from spo_runtime.training.adapter import TRAIN
from spo_runtime.training.config import TrainConfig
from spo_runtime.training.trainer import SPOTrainer

PROMPTS = ["a fox", "a castle", "an owl", "a city at night", "a red car", "a portrait"]
SMALL = dict(rank=4, alpha=4, width=32, height=32, targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])


def pipeline(tiny_dir, dtype=None):
    return load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False, dtype=dtype))


class StrongBrightness:
    """sign x gain x mean brightness, recording the timesteps it is called at: gain 3000 turns the
    candidates' brightness differences (about 1e-3 on the tiny model) into score gaps past the 0.4
    threshold's 0.85."""

    def __init__(self, sign=1, gain=3000.0):
        self.sign, self.gain, self.timesteps = sign, gain, []

    def __call__(self, images, prompts, timesteps):
        self.timesteps.append(sorted(set(timesteps.tolist())))
        return self.sign * self.gain * images.float().mean(dim=(1, 2, 3))


def held_out_brightness(pipe, scale):
    reqs = [dict(prompt=p, seed=1000 + i, num_inference_steps=20, width=32, height=32, adapter=TRAIN, lora_scale=scale)
            for i, p in enumerate(["a fox", "a castle", "an owl", "a city at night"] * 2)]
    return np.array([np.asarray(r.image, dtype=np.float64).mean() / 255 for r in pipe.generate(reqs)])


@pytest.mark.slow
def test_default_chunk4_path_keeps_pairs_and_trains_the_preferred_way(tiny_dir, tmp_path):
    """(b) The paper's path: 20 DDIM steps, nothing trained above t = 751, chunks of 4, k = 2, threshold 0.4,
    micro-batch 2 x accumulation 2; a scorer strong enough to keep pairs; brighter on held-out seeds.
    (c) The scorer receives each branch point's t, and t = 0 for the final latent."""
    scorer = StrongBrightness()
    cfg = TrainConfig(**SMALL, scorer="brightness", lr=5e-3, effective_batch=4, micro_batch=2, prompts_per_round=2, max_rounds=6)
    assert (cfg.num_inference_steps, cfg.chunk, cfg.k, cfg.threshold, cfg.train_t_max) == (20, 4, 2, 0.4, 751)
    assert cfg.accumulation(1) == 2
    pipe = pipeline(tiny_dir)
    tr = SPOTrainer(pipe, cfg, PROMPTS, tmp_path, scorer=scorer)
    before = held_out_brightness(pipe, 0.0)
    rows = [tr.run_round() for _ in range(cfg.max_rounds)]
    after = held_out_brightness(pipe, 1.0)
    delta = after - before
    print(f"kept {[r['pairs_kept'] for r in rows]} of {rows[0]['branch_points']} branch points; loss "
          f"{[r['loss'] and round(r['loss'], 4) for r in rows]}; |log r| {[r['log_ratio'] and round(r['log_ratio'], 5) for r in rows]}; "
          f"brightness {before.mean():.4f} -> {after.mean():.4f} per seed {np.round(delta, 4).tolist()}")
    assert all(r["branch_points"] == 2 * 4 for r in rows)  # 2 prompts x branch points at t = 751, 551, 351, 151
    assert sum(r["pairs_kept"] for r in rows) >= 0.4 * 8 * len(rows)  # the threshold keeps many pairs, not all
    assert sum(r["pairs_kept"] for r in rows) < 8 * len(rows)
    assert all(r["transitions"] == 4 * r["pairs_kept"] for r in rows)  # a kept chunk records its 4 transitions
    # the step count follows from the effective batch: ceil(transitions / 4) steps of 2 micro-batches
    assert all(r["optimizer_steps"] == math.ceil(r["transitions"] / 4) for r in rows if r["transitions"])
    assert delta.mean() > 0 and (delta > 0).sum() >= 6
    # (c) timesteps seen by the scorer: each chunk's end, t = 551, 351, 151, then 0 (the clean latent)
    schedule = [int(t) for t in tr.schedule.timesteps]
    assert schedule[4] == 751 and [schedule[i] for i in (8, 12, 16)] == [551, 351, 151]
    assert scorer.timesteps[:4] == [[551.0], [351.0], [151.0], [0.0]] and len(scorer.timesteps) == 4 * len(rows)


def test_the_spm_receives_the_branch_points_timestep(tiny_dir, tmp_path):
    """(c) With the step-aware preference model itself (tiny, random weights): the scores the trainer gets
    are the SPM's at each branch point's t, and they depend on t, so a trainer passing the wrong t (or
    none) would select other pairs."""
    tr = SPOTrainer(pipeline(tiny_dir), TrainConfig(**SMALL, scorer="spm", spm_path=None, max_rounds=1), PROMPTS, tmp_path)
    spm = tr.scorer
    calls = []

    def recording(images, prompts, timesteps):
        out = spm(images, prompts, timesteps)
        calls.append((images.clone(), list(prompts), timesteps.clone(), out.clone()))
        return out

    tr.scorer = recording
    tr.rollout(PROMPTS[:1])
    assert [sorted(set(c[2].tolist())) for c in calls] == [[551.0], [351.0], [151.0], [0.0]]
    assert next(spm.model.parameters()).dtype == torch.float32  # the SPM scores in fp32
    images, prompts, t, scores = calls[0]
    elsewhere = spm(images, prompts, torch.full_like(t, 951.0))
    assert (scores - elsewhere).abs().max() > 1e-4  # the score depends on t: the timestep matters


@pytest.mark.slow
def test_the_reference_is_the_frozen_start_not_the_policy(tiny_dir, tmp_path):
    """(a) A trainer whose reference is the policy (ratios always 1, loss ln 2) fails here: once the policy
    has moved, the reference log-probabilities are the base model's, the ratios leave 1 and the loss
    leaves ln 2."""
    cfg = TrainConfig(**SMALL, scorer="brightness", lr=5e-3, num_inference_steps=6, chunk=2, train_t_max=999, threshold=0.0,
                      effective_batch=8, micro_batch=4, prompts_per_round=2, max_rounds=3)
    tr = SPOTrainer(pipeline(tiny_dir), cfg, PROMPTS, tmp_path)
    rows = [tr.run_round() for _ in range(3)]
    print("loss", [r["loss"] for r in rows], "|log r|", [r["log_ratio"] for r in rows])
    assert rows[0]["optimizer_steps"] >= 2
    assert all(r["log_ratio"] > 1e-4 for r in rows[1:]) and all(abs(r["loss"] - math.log(2)) > 1e-3 for r in rows[1:])
    pairs, _ = tr.rollout(PROMPTS[:1])
    trans = [p.win for p in pairs[:4]]
    cond = tr._round_cond
    with torch.no_grad():
        ref = tr._logprobs(trans, cond, tr.ref_scales)
        base = tr._logprobs(trans, cond, {TRAIN: 0.0})  # the UNet without the trained LoRA
        policy = tr._logprobs(trans, cond, tr.policy_scales)
    assert torch.equal(ref, base)
    assert (policy - ref).abs().max() > 1e-4


def _one_step(tiny_dir, tmp_path, pairs_cond, **kw):
    cfg = TrainConfig(**SMALL, scorer="brightness", lr=1e-4, num_inference_steps=6, chunk=2, train_t_max=999, threshold=0.0,
                      prompts_per_round=1, **kw)
    tr = SPOTrainer(pipeline(tiny_dir), cfg, PROMPTS, tmp_path)
    if pairs_cond is None:
        pairs, _ = tr.rollout(PROMPTS[:1])
        pairs_cond = (pairs[:2], tr._round_cond)  # two pairs of one prompt: one optimiser step
    start = tr.lora_modules()
    stats = tr.train_on(*pairs_cond)
    assert stats["optimizer_steps"] == 1
    return tr.lora_modules(), start, pairs_cond


def test_accumulation_2_of_micro_batch_1_equals_micro_batch_2(tiny_dir, tmp_path):
    """(d) One fp32 optimiser step over two pairs: 2 micro-batches of 1 accumulated = 1 micro-batch of 2."""
    acc, start, pc = _one_step(tiny_dir, tmp_path / "a", None, effective_batch=2, micro_batch=1)
    one, _, _ = _one_step(tiny_dir, tmp_path / "b", pc, effective_batch=2, micro_batch=2)
    assert TrainConfig(effective_batch=2, micro_batch=1).accumulation(1) == 2
    worst = max(float((acc[m].up - one[m].up).abs().max()) for m in acc)
    moved = max(float((acc[m].up - start[m].up).abs().max()) for m in acc)
    print(f"accumulated vs one micro-batch: max |d| {worst:.2e}, step moved the LoRA {moved:.2e}")
    assert moved > 5e-5 and worst < 1e-6


@pytest.mark.parametrize("dtype,n,tolerance", [("bfloat16", 4, 0.15), ("float16", 1, 0.02)])
def test_half_precision_base_gives_the_fp32_lora_gradients(tiny_dir, tmp_path, dtype, n, tolerance):
    """With the base in bf16/fp16 and the LoRA in fp32 (its branch too; a gradient scaler for fp16), the LoRA
    gradients of the same `n` pairs match an fp32 run within a relative L2 error of `tolerance` with a
    cosine over 0.99, and no element underflows to zero. Measured on the tiny model (the printout): bf16
    7.9e-2 (8 bits of mantissa through the whole UNet), fp16 below; fp16 on CPU is slow, hence one pair."""
    cfg = TrainConfig(**SMALL, scorer="brightness", num_inference_steps=6, chunk=2, train_t_max=999, threshold=0.0,
                      micro_batch=4, prompts_per_round=1)
    full = SPOTrainer(pipeline(tiny_dir), cfg, PROMPTS, tmp_path / "fp32")
    pairs, _ = full.rollout(PROMPTS[:1])
    pairs = pairs[:n]
    # a non-zero up-projection, so that down-projections get gradients too
    with torch.no_grad():
        for p in full.params[1::2]:
            p.normal_(0, 1e-2, generator=torch.Generator().manual_seed(p.numel()))
    half = SPOTrainer(pipeline(tiny_dir, dtype), cfg, PROMPTS, tmp_path / dtype)
    with torch.no_grad():
        for a, b in zip(half.params, full.params):
            a.copy_(b)
    assert all(p.dtype == torch.float32 for p in half.params) and half.pipe.dtype == getattr(torch, dtype)
    assert half.scaler.is_enabled() == (dtype == "float16")
    grads = {}
    for name, tr in (("fp32", full), (dtype, half)):
        cond = {k: v.to(tr.pipe.dtype) if v.is_floating_point() and k != "guidance" else v for k, v in full._round_cond.items()}
        trans = [p.win for p in pairs] + [p.lose for p in pairs]
        with torch.no_grad():
            ref = tr._logprobs(trans, cond, tr.ref_scales)
        skipped = -1
        while True:  # as AMP does: a scale whose gradients overflow is halved (the trainer skips that step)
            skipped += 1
            logp = tr._logprobs(trans, cond, tr.policy_scales)
            loss = -torch.nn.functional.logsigmoid(10 * ((logp[:n] - ref[:n]) - (logp[n:] - ref[n:]))).sum()
            tr.scaler.scale(loss).backward()
            tr.scaler.unscale_(tr.opt)
            grad = torch.cat([p.grad.flatten() for p in tr.params])
            tr.scaler.update()
            tr.opt.zero_grad(set_to_none=False)
            if torch.isfinite(grad).all():
                break
            assert skipped < 20
        grads[name] = grad
        print(f"{name}: loss scale {tr.scaler.get_scale() if tr.scaler.is_enabled() else 1.0} after {skipped} overflowing scale(s)")
        assert grad.dtype == torch.float32
    g32, gh = grads["fp32"], grads[dtype]
    rel = float((gh - g32).norm() / g32.norm())
    print(f"{dtype} base: LoRA gradient relative L2 error {rel:.2e}, cosine {float(torch.cosine_similarity(gh, g32, 0)):.6f}, "
          f"zero elements {float((gh == 0).float().mean()):.3f} (fp32 {float((g32 == 0).float().mean()):.3f})")
    assert torch.isfinite(gh).all() and gh.abs().max() > 0
    assert float((gh == 0).float().mean()) <= float((g32 == 0).float().mean()) + 0.01  # nothing underflowed to zero
    assert rel < tolerance and float(torch.cosine_similarity(gh, g32, 0)) > 0.99
