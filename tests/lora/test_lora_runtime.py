"""Per-sample LoRA scales, adapters and the fused fast path, on the tiny model."""

import time

import pytest
import torch

from conftest import max_pixel_diff
from spo_runtime import AdapterMemoryError, AdapterNotFoundError, LoraFormatError, Settings, load_pipeline
from spo_runtime.lora.format import module_specs, save_lora_file
from spo_runtime.training.adapter import init_lora_modules

PROMPT = "a portrait of an astronaut, cinematic lighting"


def solo(p, **kw):
    return p.generate([dict(prompt=PROMPT, num_inference_steps=4, **kw)])[0]


def test_batch_invariance_mixed_parameters(pipe):
    """8 requests, mixed seeds, guidance, steps, schedulers, scales, negatives: each equals itself alone."""
    reqs = [
        dict(prompt=PROMPT, seed=1, num_inference_steps=3, scheduler="ddim", guidance_scale=5.0, lora_scale=1.0),
        dict(prompt="a red fox", seed=2, num_inference_steps=6, scheduler="euler", guidance_scale=7.5, lora_scale=0.3),
        dict(prompt="a castle", seed=3, num_inference_steps=5, scheduler="dpmpp_2m_karras", guidance_scale=1.0, lora_scale=0.0),
        dict(prompt="a castle", seed=4, num_inference_steps=8, scheduler="ddim", guidance_scale=3.0, lora_scale=-0.5, negative_prompt="blurry"),
        dict(prompt="an owl", seed=5, num_inference_steps=4, scheduler="ddim", guidance_scale=5.0, lora_scale=1.5, eta=1.0),
        dict(prompt="an owl", seed=6, num_inference_steps=7, scheduler="dpmpp_2m_karras", guidance_scale=9.0, lora_scale=1.0, negative_prompt=""),
        dict(prompt="a city at night", seed=7, num_inference_steps=2, scheduler="euler", guidance_scale=0.0, lora_scale=0.7),
        dict(prompt=PROMPT, seed=8, num_inference_steps=5, scheduler="ddim", guidance_scale=5.0, lora_scale=2.0),
    ]
    together = pipe.generate(reqs)
    worst = 0
    for r, img in zip(reqs, together):
        alone = pipe.generate([r])[0]
        worst = max(worst, max_pixel_diff(img.image, alone.image))
        assert img.seed == r["seed"] and img.lora_scale == r["lora_scale"]
    print(f"batch invariance: max pixel diff {worst}/255")
    assert worst <= 1


def test_per_sample_scale_equals_global_scale(tiny_dir):
    """One batch with scales [-1, 0, 0.5, 1, 2] equals each scale set globally (fused) alone."""
    p = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False))
    scales = [-1.0, 0.0, 0.5, 1.0, 2.0]
    batch = p.generate([dict(prompt=PROMPT, seed=9, num_inference_steps=4, lora_scale=s) for s in scales])
    for s, img in zip(scales, batch):
        p.registry.fuse("spo", s)  # the scale as a global property of the weights
        p.default_lora_scale = s
        glob = solo(p, seed=9)
        p.registry.unfuse()
        assert max_pixel_diff(img.image, glob.image) <= 1, s


def test_fused_equals_unfused(tiny_dir):
    p = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False))
    pristine = {n: m.weight.detach().clone() for n, m in p.registry._layers.items()}
    unfused = [solo(p, seed=21, lora_scale=s) for s in (0.0, 1.0, 0.6)]
    p.registry.fuse("spo", 1.0)
    assert p.registry.ctx.terms == {}
    fused = [solo(p, seed=21, lora_scale=s) for s in (0.0, 1.0, 0.6)]
    assert p.last_step.adapters == ["spo"]  # 0.6 runs the residual branch only
    solo(p, seed=21, lora_scale=1.0)
    assert p.last_step.adapters == []  # at the fused scale: no LoRA compute at all
    for a, b in zip(unfused, fused):
        assert max_pixel_diff(a.image, b.image) <= 1
    # Re-fusing many times restores from the pristine copy: the base weights are bit-identical after.
    for s in (0.3, -1.7, 2.0, 0.9, 1.0):
        p.registry.fuse("spo", s)
    p.registry.unfuse()
    for n, m in p.registry._layers.items():
        assert torch.equal(m.weight, pristine[n]), n


def _conv_lora(unet, rank=4, seed=0):
    """A LoRA on resnet convolutions, feed-forward and attention layers (alpha = rank): the trainer's
    init, with a random up (the trainer's is zero) so that the adapter does something."""
    g = torch.Generator().manual_seed(seed)
    specs = module_specs(unet)
    out = init_lora_modules(specs, ["resnets.0.conv1", "resnets.0.conv2", "ff.net.2", "attn2.to_v"], rank, float(rank), g)
    for w in out.values():
        w.up.normal_(0, 0.3, generator=g)
    assert any(specs[m].kind == "conv" for m in out)
    return out


def test_conv_adapter_per_sample_scales_and_diffusers_oracle(tiny_dir, tmp_path, diffusers_pipe):
    p = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir)))
    modules = _conv_lora(p.unet)
    path = tmp_path / "conv_lora.safetensors"
    save_lora_file(path, modules, "webui")
    p.load_adapter("conv", path)
    reqs = [dict(prompt=PROMPT, seed=31, num_inference_steps=4, adapter=a, lora_scale=s)
            for a, s in [("conv", 0.7), ("spo", 1.0), ("conv", -1.0), ("conv", 0.0)]]
    batch = p.generate(reqs)
    for r, img in zip(reqs, batch):
        assert max_pixel_diff(img.image, p.generate([r])[0].image) <= 1
    assert max_pixel_diff(batch[0].image, batch[3].image) > 10  # the conv adapter does something
    # diffusers, loading the same webui file, agrees at scale 0.7 (only that adapter active).
    diffusers_pipe.load_lora_weights(str(tmp_path), weight_name="conv_lora.safetensors", adapter_name="conv")
    try:
        diffusers_pipe.set_adapters(["conv"], adapter_weights=[0.7])
        ref = diffusers_pipe("a portrait of an astronaut, cinematic lighting", num_inference_steps=4, height=64, width=64,
                             generator=torch.Generator().manual_seed(31)).images[0]
    finally:
        diffusers_pipe.delete_adapters("conv")
        diffusers_pipe.set_adapters(["spo"], adapter_weights=[1.0])
    assert max_pixel_diff(batch[0].image, ref) <= 1


def test_both_layouts_give_the_same_weights_and_images(tiny_dir):
    a = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora=str(tiny_dir / "spo_tiny_lora_webui.safetensors")))
    b = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora=str(tiny_dir / "spo_tiny_lora_diffusers.safetensors")))
    wa, wb = a.registry.module_weights("spo"), b.registry.module_weights("spo")
    assert wa.keys() == wb.keys() and len(wa) == 64
    for m in wa:
        assert torch.equal(wa[m].down, wb[m].down) and torch.allclose(wa[m].up, wb[m].up, atol=1e-7)
    assert max_pixel_diff(solo(a, seed=4, lora_scale=0.8).image, solo(b, seed=4, lora_scale=0.8).image) == 0
    # The built-in tiny LoRA hashes as the diffusers-layout file save-tiny wrote.
    from spo_runtime.fsutil import file_sha256

    builtin = load_pipeline(Settings(model="tiny"))
    assert builtin.registry.get("spo").sha256 == file_sha256(tiny_dir / "spo_tiny_lora_diffusers.safetensors")
    assert max_pixel_diff(solo(builtin, seed=4).image, solo(b, seed=4).image) <= 1


def test_broken_files_are_refused_and_leave_the_registry_alone(pipe, tmp_path):
    unet_specs = module_specs(pipe.unet)
    before = dict(pipe.registry.adapters)
    name = next(m for m in unet_specs if m.endswith("attn1.to_q"))
    cases = {
        "dangling.safetensors": {f"lora_unet_{name.replace('.', '_')}.lora_down.weight": torch.zeros(4, unet_specs[name].in_features),
                                 f"lora_unet_{name.replace('.', '_')}.alpha": torch.tensor(4.0)},
        "unknown.safetensors": {"unet.down_blocks.9.attn.to_q.lora.down.weight": torch.zeros(4, 8),
                                "unet.down_blocks.9.attn.to_q.lora.up.weight": torch.zeros(8, 4)},
        "shape.safetensors": {f"unet.{name}.lora.down.weight": torch.zeros(4, 3), f"unet.{name}.lora.up.weight": torch.zeros(unet_specs[name].out_features, 4)},
    }
    from safetensors.torch import save_file

    for fname, sd in cases.items():
        save_file(sd, tmp_path / fname)
        with pytest.raises(LoraFormatError) as e:
            pipe.load_adapter("broken", tmp_path / fname)
        assert e.value.keys and e.value.keys[0] in str(e.value)
    torch.save({"x": torch.zeros(1)}, tmp_path / "evil.bin")
    with pytest.raises(LoraFormatError, match="pickle"):
        pipe.load_adapter("broken", tmp_path / "evil.bin")
    assert pipe.registry.adapters == before


def test_memory_cap_unload_and_hot_swap(tiny_dir):
    p = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir)))
    spo_bytes = p.registry.get("spo").nbytes
    p.registry.memory_limit_bytes = int(spo_bytes * 1.5)
    with pytest.raises(AdapterMemoryError, match="SPO_ADAPTER_MEMORY_MB"):
        p.load_adapter("second", tiny_dir / "spo_tiny_lora_webui.safetensors")
    assert list(p.registry.adapters) == ["spo"]
    p.registry.memory_limit_bytes = spo_bytes * 2
    p.load_adapter("second", tiny_dir / "spo_tiny_lora_webui.safetensors")
    assert p.registry.nbytes == 2 * spo_bytes
    p.unload_adapter("second")
    assert p.registry.nbytes == spo_bytes
    assert all("second" not in layer.adapters for layer in p.registry._layers.values())
    with pytest.raises(AdapterNotFoundError):
        p.generate([dict(prompt="x", adapter="second")])
    # The default scale hot-swaps in milliseconds and applies to requests prepared afterwards.
    [running] = p.prepare([dict(prompt=PROMPT, seed=1, num_inference_steps=2)])
    t0 = time.perf_counter()
    swap = p.set_default_lora_scale(0.25)
    assert time.perf_counter() - t0 < 0.05 and swap["previous"] == 1.0 and swap["scale"] == 0.25
    [after] = p.prepare([dict(prompt=PROMPT, seed=1, num_inference_steps=2)])
    assert running.lora_scale == 1.0 and after.lora_scale == 0.25
    assert p.registry.fused == ("spo", 1.0)  # weights untouched


def test_row_scales_context_sets_and_restores(tiny_dir):
    p = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False))
    reg = p.registry
    assert reg.ctx.terms == {}
    with reg.row_scales([{"spo": 0.5}, {}]) as terms:
        assert list(terms) == ["spo"] and terms["spo"].tolist() == [0.5, 0.0] and reg.ctx.terms is terms
        with reg.row_scales([{"spo": 2.0}]):  # nested: the inner block's scales, then the outer's again
            assert reg.ctx.terms["spo"].tolist() == [2.0]
        assert reg.ctx.terms is terms
    assert reg.ctx.terms == {}
    with pytest.raises(RuntimeError):  # an exception inside still restores
        with reg.row_scales([{"spo": 1.0}]):
            raise RuntimeError("boom")
    assert reg.ctx.terms == {}
    with pytest.raises(AdapterNotFoundError):
        with reg.row_scales([{"nope": 1.0}]):
            pass
    assert reg.ctx.terms == {}
    reg.fuse("spo", 1.0)  # rows at the fused scale run no branch; others run the residual
    with reg.row_scales([{"spo": 1.0}, {"spo": 0.25}, {}]) as terms:
        assert terms["spo"].tolist() == [0.0, -0.75, -1.0]
    with reg.row_scales([{"spo": 1.0}]) as terms:
        assert terms == {}


def _grads(p, params, x, t, cond, rows):
    for d, u in params.values():
        d.grad = u.grad = None
    p.unet.train()
    try:
        eps = p.guided_eps(x, t, cond, rows)  # the row scales are gone once this returns
        assert p.registry.ctx.terms == {}
        eps.square().mean().backward()
    finally:
        p.unet.eval()
    return torch.cat([q.grad.flatten() for pair in params.values() for q in pair])


def test_row_scales_survive_gradient_checkpointing(tiny_dir):
    """Backward after the row_scales block: checkpointed recomputation runs with the forward's scales."""
    p = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False))
    reg = p.registry
    params = reg.make_trainable("spo")
    assert all(d.requires_grad and u.requires_grad and d.dtype == torch.float32 for d, u in params.values())
    states = p.prepare([dict(prompt="a fox", seed=1, width=32, height=32), dict(prompt="an owl", seed=2, width=32, height=32)])
    cond = {k: v.clone() for k, v in p.conditioning(states).items()}  # out of inference mode
    x = torch.cat([s.latents for s in states]).clone()
    t = torch.tensor([500, 300])
    rows = [{"spo": 0.5}, {"spo": 2.0}]
    plain = _grads(p, params, x, t, cond, rows)
    # count the calls of one LoRA layer: twice per forward when its block is recomputed in backward
    calls = []
    layer = p.unet.get_submodule(reg.get("spo").modules[0])
    hook = layer.register_forward_pre_hook(lambda m, a: calls.append(dict(p.registry.ctx.terms)))
    try:
        reg.enable_gradient_checkpointing()
        checkpointed = _grads(p, params, x, t, cond, rows)
    finally:
        hook.remove()
        p.unet.disable_gradient_checkpointing()
    assert len(calls) == 2, "the block was not recomputed: checkpointing is off"
    # the recomputation saw the forward's scales (uncond rows of CFG first, then the cond rows)
    assert calls[0]["spo"].tolist() == calls[1]["spo"].tolist() == [0.5, 2.0, 0.5, 2.0]
    assert plain.abs().max() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
    # per-row scales matter to the gradient (so equality above is not vacuous)
    other = _grads(p, params, x, t, cond, [{"spo": 2.0}, {"spo": 0.5}])
    assert (other - plain).abs().max() > 1e-4


def test_trainable_adapter_exports_copies(tiny_dir):
    p = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False))
    reg = p.registry
    params = reg.make_trainable("spo")
    assert list(params) == reg.get("spo").modules
    live = {m: (d, u) for m, d, u in reg.tensors("spo")}
    assert all(live[m][0] is d and live[m][1] is u for m, (d, u) in params.items())
    exported = reg.module_weights("spo")
    m0, (d0, _) = next(iter(params.items()))
    with torch.no_grad():
        d0.add_(1.0)
    assert not torch.equal(exported[m0].down, d0.detach())  # a copy, not a view of the parameter
