"""The SPO trainer: formulas against hand computations, direction of learning, checkpoints and resume."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import max_pixel_diff
from spo_runtime import InvalidRequestError, Settings, load_pipeline
from spo_runtime.lora.format import read_lora_file, module_specs
from spo_runtime.sampling.sampler import NoiseSchedule, make_schedule
from spo_runtime.training.config import TrainConfig
from spo_runtime.training.loss import select_pair, spo_loss
from spo_runtime.training.trainer import SPOTrainer

PROMPTS = ["a fox", "a castle", "an owl", "a city at night", "a red car", "a portrait"]
# A fast probe: 32x32, 10 DDIM steps, a branch at every step, LoRA on attention, feed-forward and convs.
FAST = dict(rank=8, alpha=8, lr=3e-3, num_inference_steps=10, chunk=1, train_t_max=999, threshold=0.0,
            targets=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"],
            prompts_per_round=4, micro_batch=8, grad_accum=1, checkpoint_every=100, width=32, height=32)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_loss_hand_computed_inside_and_at_the_clamp():
    # inside the clamp: log r_w = 0.05, log r_l = -0.05 -> -log sigmoid(10 * 0.1)
    lw = torch.tensor([0.05, 0.5], requires_grad=True)
    ll = torch.tensor([-0.05, -0.5], requires_grad=True)
    loss, clamp_share = spo_loss(lw, torch.zeros(2), ll, torch.zeros(2), beta=10.0, clip=0.1)
    assert loss[0].item() == pytest.approx(-math.log(sigmoid(1.0)), abs=1e-6)
    # at the clamp: r_w -> 1.1, r_l -> 0.9
    assert loss[1].item() == pytest.approx(-math.log(sigmoid(10 * (math.log(1.1) - math.log(0.9)))), abs=1e-6)
    assert clamp_share == 0.5
    loss.sum().backward()
    assert lw.grad[1] == 0 and ll.grad[1] == 0 and lw.grad[0] < 0 < ll.grad[0]  # clamped ratios carry no gradient
    # both ratios of every pair clamped the same way round -> loss exactly ln 2, zero gradient
    z, _ = spo_loss(torch.tensor([0.5]), torch.zeros(1), torch.tensor([0.7]), torch.zeros(1), 10.0, 0.1)
    assert z.item() == pytest.approx(math.log(2), abs=1e-7)


def test_pair_selection_threshold_and_k():
    w, l, keep = select_pair(torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.2, 3.0]]), 0.4)
    assert w.tolist() == [0, 1, 1] and l.tolist() == [1, 0, 0]
    # p_w - p_l = tanh(gap / 2): 0.462 > 0.4 keep; 0.245 drop; 0.905 keep
    assert keep.tolist() == [True, False, True]
    gap = math.log(1.4 / 0.6)  # the threshold's raw score gap, about 0.847
    _, _, keep = select_pair(torch.tensor([[gap + 1e-3, 0.0], [gap - 1e-3, 0.0]]), 0.4)
    assert keep.tolist() == [True, False]
    w, l, _ = select_pair(torch.tensor([[0.2, 3.0, -1.0, 0.5]]), 0.4)
    assert (w.item(), l.item()) == (1, 2)


def test_transition_logprob_matches_the_notes(tiny_dir):
    pipe = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False))
    tr = SPOTrainer(pipe, TrainConfig(**FAST, scorer="brightness"), PROMPTS, "/tmp/unused-logprob")
    pairs, _ = tr.rollout(PROMPTS[:1])
    t = pairs[3].win
    cond = tr._round_cond
    lp = tr._logprobs([t], cond, tr.policy_scales)
    # direct: eps -> DDIM mean; std = eta * sqrt((1 - a_prev)/(1 - a_t) * (1 - a_t / a_prev)), prev_t = t - T/n clamped at 0
    ac = NoiseSchedule().alphas_cumprod.double()
    ts = int(make_schedule("ddim", 10).timesteps[t.step])
    a_t, a_prev = ac[ts], ac[max(ts - 100, 0)]
    with torch.no_grad():
        eps = tr.policy.eps(t.x_t[None], torch.tensor([t.step]), {k: v[:1] for k, v in cond.items()}, tr.policy_scales).double()[0]
    x = t.x_t.double()
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    std = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    direct = (-((t.x_prev.double() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)).mean()
    assert lp.item() == pytest.approx(direct.item(), abs=1e-4)
    # The first transition of a chunk starts both candidates from the shared latent.
    assert torch.equal(pairs[0].win.x_t, pairs[0].lose.x_t) and not torch.equal(pairs[0].win.x_prev, pairs[0].lose.x_prev)


def _brightness(pipe, scale):
    reqs = [dict(prompt=p, seed=1000 + i, num_inference_steps=10, width=32, height=32, adapter="train", lora_scale=scale)
            for i, p in enumerate(["a fox", "a castle", "an owl", "a city at night"] * 2)]  # 8 held-out seeds
    return np.array([np.asarray(r.image, dtype=np.float64).mean() / 255 for r in pipe.generate(reqs)])


@pytest.mark.slow
@pytest.mark.parametrize("scorer,sign", [("brightness", 1), ("darkness", -1)])
def test_training_follows_the_preference(tiny_dir, tmp_path, scorer, sign):
    pipe = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False))
    tr = SPOTrainer(pipe, TrainConfig(**FAST, scorer=scorer, max_rounds=10), PROMPTS, tmp_path)
    before = _brightness(pipe, 0.0)
    tr.train()
    after = _brightness(pipe, 1.0)
    delta = after - before
    print(f"{scorer}: mean brightness {before.mean():.4f} -> {after.mean():.4f} (delta {delta.mean():+.4f}; "
          f"seed-to-seed std {before.std():.4f}; per seed {np.round(delta, 4).tolist()})")
    assert sign * delta.mean() > 0
    assert (np.sign(delta) == sign).sum() >= 6  # most held-out seeds move the preferred way
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["pairs_kept"] > 0 and r["loss"] is not None for r in rows)
    assert {"loss", "kept_rate", "clamp_share", "score_w", "score_l", "seconds"} <= set(rows[0])


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(tiny_dir, tmp_path):
    cfg = TrainConfig(**{**FAST, "prompts_per_round": 2, "num_inference_steps": 6, "checkpoint_every": 1}, scorer="brightness", max_rounds=3)
    straight = SPOTrainer(load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False)), cfg, PROMPTS, tmp_path / "a")
    straight.train()
    first = SPOTrainer(load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False)),
                       cfg.model_copy(update={"max_rounds": 2}), PROMPTS, tmp_path / "b")
    first.train()
    resumed = SPOTrainer(load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False)), cfg, PROMPTS, tmp_path / "b")
    assert resumed.load_checkpoint() and resumed.round == 2 and resumed.position == 4
    resumed.train()
    a, b = straight.lora_modules(), resumed.lora_modules()
    assert a.keys() == b.keys()
    worst = max(float((a[m].up - b[m].up).abs().max()) for m in a)
    assert worst < 1e-6, worst
    ckpts = tmp_path / "b" / "checkpoints"
    latest = json.loads((ckpts / "latest.json").read_text())
    assert latest["round"] == 3 and not list(ckpts.glob(".*tmp*"))
    assert len(list(ckpts.glob("round-*"))) == cfg.keep_checkpoints
    saved = json.loads((ckpts / latest["dir"] / "config.json").read_text())
    assert saved["lr"] == cfg.lr and saved["targets"] == cfg.targets


@pytest.mark.slow
def test_exported_adapter_serves_with_per_sample_scales(tiny_dir, tmp_path):
    cfg = TrainConfig(**{**FAST, "num_inference_steps": 6}, scorer="brightness", max_rounds=2)
    tr = SPOTrainer(load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False)), cfg, PROMPTS, tmp_path)
    tr.train()
    out = tr.export(tmp_path / "adapters", "mine")
    serve = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir)))
    specs = module_specs(serve.unet)
    for layout in ("webui", "diffusers"):
        f = read_lora_file(tmp_path / "adapters" / out["files"][layout], specs)
        assert f.layout == layout and any(m.endswith("conv1") for m in f.modules) and any(m.endswith("ff.net.2") for m in f.modules)
    serve.load_adapter("mine", tmp_path / "adapters" / out["files"]["webui"])
    reqs = [dict(prompt="a fox", seed=3, num_inference_steps=4, adapter=a, lora_scale=s)
            for a, s in [("mine", 1.0), ("spo", 1.0), ("mine", 0.5), ("mine", 0.0)]]
    batch = serve.generate(reqs)
    for r, img in zip(reqs, batch):
        assert max_pixel_diff(img.image, serve.generate([r])[0].image) <= 1


def test_config_is_validated_with_field_names():
    with pytest.raises(InvalidRequestError) as e:
        TrainConfig.parse({"lr": -1})
    assert e.value.field == "config.lr"
    with pytest.raises(InvalidRequestError) as e:
        TrainConfig.parse({"bogus": 1})
    assert e.value.field == "config.bogus"


@pytest.mark.parametrize("field, value, rule", [
    ("width", 100000, "a multiple of 8 in 32..2048"), ("height", 7, "a multiple of 8 in 32..2048"),
    ("beta", 1e300, "(0.0, 1000.0]"), ("alpha", 1e9, "(0.0, 4096.0]"), ("epochs", 1e9, "(0.0, 1000.0]"),
    ("max_rounds", 10**12, "1..1000000"), ("seed", 2**70, "0..4294967295"), ("checkpoint_every", 10**9, "1..1000000"),
    ("keep_checkpoints", 10**6, "1..100"), ("grad_clip", 1e300, "(0.0, 1000.0]"), ("weight_decay", 1e9, "0.0..1.0"),
    ("adam_eps", 2.0, "(0.0, 1.0]"), ("lr", float("nan"), "finite"), ("guidance_scale", float("inf"), "finite"),
    ("targets", ["x"] * 1000, "1..64"), ("targets", [], "1..64"), ("targets", ["x" * 200], "1..128 characters"),
    ("betas", [0.9, 1.5], "[0, 1)"), ("betas", [float("nan"), 0.9], "[0, 1)"), ("spm_path", "x" * 5000, "4096"),
])
def test_every_number_and_list_of_the_config_is_bounded(field, value, rule):
    with pytest.raises(InvalidRequestError) as e:
        TrainConfig.parse({field: value})
    assert e.value.field == f"config.{field}" and rule in e.value.message, e.value.message


def test_spm_path_is_spo_spm_or_a_file_under_the_adapter_dir(tmp_path):
    adapters, elsewhere = tmp_path / "adapters", tmp_path / "models"
    (adapters / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for f in (adapters / "sub" / "spm.safetensors", adapters / "spm.bin", adapters / "notes.txt", elsewhere / "spm.safetensors",
              elsewhere / "other.safetensors"):
        f.write_bytes(b"x")
    (adapters / "out.safetensors").symlink_to(elsewhere / "other.safetensors")
    configured = str(elsewhere / "spm.safetensors")  # SPO_SPM

    def resolved(value):
        return TrainConfig.parse({"spm_path": value}).with_spm_under(adapters, configured).spm_path

    assert resolved("sub/spm.safetensors") == str((adapters / "sub" / "spm.safetensors").resolve())
    assert resolved(str(adapters / "spm.bin")) == str((adapters / "spm.bin").resolve())
    assert resolved(configured) == configured and resolved(str(elsewhere / "x" / ".." / "spm.safetensors")) == configured
    assert TrainConfig.parse({}).with_spm_under(adapters, None).spm_path is None
    for bad, needle in [("/etc/passwd", "must be SPO_SPM or a .safetensors or .bin file under SPO_ADAPTER_DIR"),
                        ("../models/other.safetensors", "under SPO_ADAPTER_DIR"), ("out.safetensors", "under SPO_ADAPTER_DIR"),
                        (str(elsewhere / "other.safetensors"), "under SPO_ADAPTER_DIR"), ("notes.txt", ".safetensors or .bin"),
                        ("missing.safetensors", "no such file"), ("a\x00b.safetensors", "SPO_SPM")]:
        with pytest.raises(InvalidRequestError) as e:
            resolved(bad)
        assert e.value.field == "config.spm_path" and needle in e.value.message, (bad, e.value.message)


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_adapter(tiny_dir, tmp_path):
    """A round with gradient checkpointing (backward recomputes the UNet under the policy's row
    scales) ends with the same adapter as a round without."""
    cfg = TrainConfig(**{**FAST, "prompts_per_round": 2, "num_inference_steps": 6}, scorer="brightness", max_rounds=1)
    out = {}
    for ckpt in (False, True):
        pipe = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False))
        tr = SPOTrainer(pipe, cfg.model_copy(update={"gradient_checkpointing": ckpt}), PROMPTS, tmp_path / str(ckpt))
        assert pipe.unet.is_gradient_checkpointing == ckpt
        stats = tr.train()
        assert stats["optimizer_steps"] >= 1
        out[ckpt] = tr.lora_modules()
    moved = max(float(w.up.abs().max()) for w in out[False].values())
    assert moved > 0  # up starts at zero: the round trained
    worst = max(float((out[False][m].up - out[True][m].up).abs().max()) for m in out[False])
    assert worst < 1e-6, worst


@pytest.mark.slow
def test_build_trainer_resumes_and_reads_checkpoints_of_the_old_name(tiny_dir, tmp_path, monkeypatch):
    """The one set-up of the CLI and of jobs: a pipeline from SPO_* settings, resumed from the last
    checkpoint (`checkpoint.pt`, or `train_state.pt` as checkpoints were named before)."""
    from spo_runtime.training.run import build_trainer, read_prompts

    monkeypatch.setenv("SPO_MODEL", "tiny")
    monkeypatch.setenv("SPO_BASE_MODEL", str(tiny_dir))
    monkeypatch.setenv("SPO_DEVICE", "cpu")
    # a serving fast path a server may run with: the trainer needs backward, so it builds neither
    monkeypatch.setenv("SPO_QUANT", "fp8")
    monkeypatch.setenv("SPO_COMPILE", "true")
    (tmp_path / "prompts.txt").write_text("a fox\n\n  \nan owl\n")
    prompts = read_prompts(tmp_path / "prompts.txt")
    assert prompts == ["a fox", "an owl"]
    cfg = TrainConfig(**{**FAST, "prompts_per_round": 1, "num_inference_steps": 4, "checkpoint_every": 1}, scorer="brightness")
    first = build_trainer(cfg.model_copy(update={"max_rounds": 1}), prompts, tmp_path / "run")
    assert first.resumed_from is None and first.pipe.registry.fused is None and list(first.pipe.registry.adapters) == ["train"]
    assert first.pipe.settings.quant == "none" and first.pipe.settings.compile is False and not first.pipe.compiled
    first.train()
    ckpt = tmp_path / "run" / "checkpoints" / json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["dir"]
    assert (ckpt / "checkpoint.pt").exists() and not (ckpt / "train_state.pt").exists()
    (ckpt / "checkpoint.pt").rename(ckpt / "train_state.pt")  # a checkpoint written before the rename
    second = build_trainer(cfg.model_copy(update={"max_rounds": 2}), prompts, tmp_path / "run")
    assert second.resumed_from == 1 and second.round == 1 and second.position == 1
    a, b = first.lora_modules(), second.lora_modules()
    assert all(torch.equal(a[m].up, b[m].up) and torch.equal(a[m].down, b[m].down) for m in a)
    second.train()
    assert second.round == 2


def test_the_rollout_scores_the_image_diffusers_would_decode(pipe):
    """With a VAE that has latents_mean/latents_std, x0 goes back to the VAE's scale as diffusers' pipelines
    do (z * std / s + mean), not by the scaling factor alone; the scorer sees that image."""
    from spo_runtime.training.config import TrainConfig
    from spo_runtime.training.policy import DdimPolicy
    from spo_runtime.training.rollout import BranchingRollout

    class Seen:
        def __call__(self, images, prompts, timesteps):
            self.images = images.clone()
            return images.mean(dim=(1, 2, 3))

    vae, seen = pipe.vae, Seen()
    c = vae.config.latent_channels
    mean, std = [0.1 * (i + 1) for i in range(c)], [0.5 + 0.25 * i for i in range(c)]
    old = (vae.config.get("latents_mean"), vae.config.get("latents_std"))
    vae.register_to_config(latents_mean=mean, latents_std=std)
    try:
        z = torch.randn(2, c, 8, 8, generator=torch.Generator().manual_seed(3))
        BranchingRollout(DdimPolicy(pipe, 2, 0.0), TrainConfig(), 0, seen)._score(z, ["a", "b"], 500.0)
        with torch.no_grad():
            m, sd = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
            want = vae.decode((z * sd / vae.config.scaling_factor + m).to(vae.dtype), return_dict=False)[0].float()
        assert torch.allclose(seen.images, want, atol=1e-5), (seen.images - want).abs().max()
    finally:
        vae.register_to_config(latents_mean=old[0], latents_std=old[1])
