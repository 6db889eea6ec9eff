"""The GPU speed paths on CPU (issue 18): their settings, batch buckets, LoRA row subsets, the compile cache,
the SDPA pick, FP8 (torchao's float8 on CPU) and its refusal. Compiled images against eager run in the GPU
suite's smoke (tests/deploy/test_gpu_suite.py), which shares its graph tracing with this file's budget."""

import numpy as np
import pytest
import torch

from conftest import max_pixel_diff
from spo_runtime import ConfigError, Settings, load_pipeline
from spo_runtime.speed import compiling
from spo_runtime.speed import fp8
from spo_runtime.lora.runtime import LoraLinear

PROMPT = "a lighthouse on a cliff, storm clouds"


def tiny(tmp_path, **kw):
    return load_pipeline(Settings(model="tiny", data_dir=tmp_path, **kw))


# -- settings ------------------------------------------------------------------------------------


def test_speed_settings_defaults_and_errors():
    s = Settings.from_env({})
    assert (s.compile, s.quant, s.sdpa_backend, s.batch_buckets, s.compile_mode, s.lora_row_subset) == (
        False, "none", "default", "auto", "default", 0.0)
    assert Settings.from_env({"SPO_COMPILE": "auto"}).compile == "auto"
    assert Settings.from_env({"SPO_COMPILE": "on"}).compile is True and Settings.from_env({"SPO_COMPILE": "0"}).compile is False
    for env, var, words in [({"SPO_COMPILE": "sometimes"}, "SPO_COMPILE", "true, false or auto"),
                            ({"SPO_QUANT": "int4"}, "SPO_QUANT", "none, fp8"),
                            ({"SPO_SDPA_BACKEND": "xformers"}, "SPO_SDPA_BACKEND", "cudnn, flash, efficient, math"),
                            ({"SPO_COMPILE_MODE": "fast"}, "SPO_COMPILE_MODE", "reduce-overhead"),
                            ({"SPO_BATCH_BUCKETS": "4"}, "SPO_BATCH_BUCKETS", "true, false or auto"),
                            ({"SPO_LORA_ROW_SUBSET": "2"}, "SPO_LORA_ROW_SUBSET", "0.0..1.0")]:
        with pytest.raises(ConfigError) as e:
            Settings.from_env(env)
        assert e.value.variable == var and words in str(e.value), str(e.value)


def test_compile_auto_is_on_only_with_cuda_and_a_writable_cache(tmp_path):
    assert compiling.enabled("auto", torch.device("cpu"), tmp_path) == (False, "SPO_COMPILE=auto: off on cpu")
    assert compiling.enabled("auto", torch.device("cuda"), tmp_path / "cache")[0] is True
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the directory should be: not writable as a directory
    assert compiling.enabled("auto", torch.device("cuda"), blocked / "cache")[0] is False
    assert compiling.enabled(False, torch.device("cuda"), tmp_path)[0] is False
    assert compiling.buckets(16) == (1, 2, 4, 8, 16) and compiling.buckets(6) == (1, 2, 4, 8)
    assert [compiling.bucket(n, (1, 2, 4, 8)) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, 9]


# -- batch buckets --------------------------------------------------------------------------------


def test_bucket_padding_gives_the_unpadded_images(tmp_path):
    """3 requests, one unguided: 5 UNet rows padded to 8 (and 3 VAE rows to 4); each image within 1/255."""
    reqs = [dict(prompt=PROMPT, seed=1, num_inference_steps=3, lora_scale=1.0),
            dict(prompt="a red fox", seed=2, num_inference_steps=3, lora_scale=0.4),
            dict(prompt="a castle", seed=3, num_inference_steps=3, guidance_scale=1.0)]
    plain = tiny(tmp_path, batch_buckets=False)
    padded = tiny(tmp_path, batch_buckets=True)
    assert plain.unet_buckets is None and padded.unet_buckets == (1, 2, 4, 8, 16) and padded.vae_buckets == (1, 2, 4, 8)
    seen = {"unet": [], "vae": []}
    padded.unet.register_forward_pre_hook(lambda m, a, kw: seen["unet"].append(a[0].shape[0]), with_kwargs=True)
    padded.vae.register_forward_pre_hook(lambda m, a: None)  # decode is not forward: count through the decoder
    padded.vae.decoder.register_forward_pre_hook(lambda m, a: seen["vae"].append(a[0].shape[0]))
    a, b = plain.generate(reqs), padded.generate(reqs)
    assert set(seen["unet"]) == {8} and seen["vae"] == [4], seen
    worst = max(max_pixel_diff(x.image, y.image) for x, y in zip(a, b))
    assert worst <= 1, worst


# -- LoRA: only the rows at another scale run the branch ------------------------------------------


def test_lora_row_subset_equals_the_full_branch(tmp_path):
    """Rows at the fused scale skip the branch; the other rows' output equals the all-rows branch (1e-5 rel)."""
    p = tiny(tmp_path, lora_row_subset=0.5)
    assert p.registry.fused == ("spo", 1.0) and p.info()["speed"]["lora_row_subset"] == 0.5
    assert tiny(tmp_path).registry.row_subset_share == 0.0  # off unless SPO_LORA_ROW_SUBSET is set
    states = p.prepare([dict(prompt=PROMPT, seed=s, num_inference_steps=4, lora_scale=v)
                        for s, v in [(1, 1.0), (2, 1.0), (3, 1.0), (4, 0.3)]])
    cond = p.conditioning(states)
    x = torch.cat([s.latents for s in states])
    t = torch.full((4,), 801.0)
    scales = [s.scales for s in states]
    rows_seen = []
    orig = LoraLinear.add_branch

    def spy(self, out, x_, *a):
        rows_seen.append(x_.shape[0])
        return orig(self, out, x_, *a)

    LoraLinear.add_branch = spy
    try:
        with torch.inference_mode():
            p.registry.row_subset_share = 0.0  # the previous path: the branch on every row
            full = p.guided_eps(x, t, cond, scales)
            full_rows, rows_seen[:] = set(rows_seen), []
            p.registry.row_subset_share = 0.5
            subset = p.guided_eps(x, t, cond, scales)
    finally:
        LoraLinear.add_branch = orig
    assert full_rows == {8} and set(rows_seen) == {2}, (full_rows, set(rows_seen))  # CFG: 2 of 8 UNet rows
    rel = ((subset - full).norm() / full.norm()).item()
    assert rel <= 1e-5, rel
    assert torch.equal(subset[:3], full[:3]) or ((subset[:3] - full[:3]).abs().max() <= 1e-5 * full.abs().max())


def test_trainable_fp32_adapter_keeps_the_full_branch_with_grad(tmp_path):
    """With gradients (the trainer), a float32 adapter on a bf16 base runs `_fp32_branch` on every row."""
    p = tiny(tmp_path, dtype="bfloat16", lora_fuse=False)
    params = p.registry.make_trainable("spo")
    states = p.prepare([dict(prompt=PROMPT, seed=s, num_inference_steps=4, lora_scale=v) for s, v in [(1, 0.0), (2, 1.0)]])
    cond = p.conditioning(states)
    x = torch.cat([s.latents for s in states]).detach()
    eps = p.guided_eps(x, torch.full((2,), 801.0), cond, [s.scales for s in states])
    eps.float().pow(2).mean().backward()
    down, up = next(iter(params.values()))
    assert down.grad is not None and up.grad is not None and torch.isfinite(up.grad).all() and up.grad.abs().sum() > 0


# -- the compile cache ----------------------------------------------------------------------------


def test_compile_cache_lives_under_data_dir_and_is_reused(tmp_path, monkeypatch):
    saved, loaded = b"portable-artifacts-v1", []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (saved, None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data))
    p = tiny(tmp_path, compile=True, compile_backend="eager", lora_row_subset=0.5)  # compiles lazily: nothing traced here
    root = tmp_path / "compile_cache"
    assert p.registry.row_subset_share == 0.0  # a row subset's size would be one more graph
    assert p.compiled and (root / "inductor").is_dir() and (root / "artifacts").is_dir()
    assert torch._inductor.runtime.cache_dir_utils.cache_dir() == str((root / "inductor").resolve())
    assert p.info()["speed"]["compile"]["cache"]["loaded"] is None and loaded == []
    assert "dir" not in p.info()["speed"]["compile"]["cache"] and p.info(show_paths=True)["speed"]["compile"]["cache"]["dir"] == str(root)
    assert p.compile_cache.save() == len(saved)
    assert p.compile_cache.artifacts.read_bytes() == saved and p.compile_cache.artifacts.parent == root / "artifacts"
    again = tiny(tmp_path, compile=True, compile_backend="eager")  # a restart on the same SPO_DATA_DIR
    assert loaded == [saved] and again.info()["speed"]["compile"]["cache"]["loaded"] == f"artifacts ({len(saved)} bytes)"
    other = tiny(tmp_path, compile=True, compile_backend="aot_eager")  # other graphs: another key, nothing loaded
    assert other.compile_cache.key != again.compile_cache.key and loaded == [saved]
    assert tiny(tmp_path).info()["speed"]["compile"]["on"] is False


# -- attention ------------------------------------------------------------------------------------


def test_sdpa_auto_measures_picks_and_reports(tmp_path):
    p = tiny(tmp_path, sdpa_backend="auto")
    sd = p.info()["speed"]["sdpa"]
    measured = {k: v for k, v in sd["ms"].items() if v is not None}
    assert set(measured) >= {"math"} and sd["backend"] == min(measured, key=measured.get)
    assert sd["ms"]["cudnn"] is None  # not on a CPU
    base = tiny(tmp_path)
    assert base.info()["speed"]["sdpa"]["backend"] == "default"
    req = [dict(prompt=PROMPT, seed=5, num_inference_steps=3)]
    assert max_pixel_diff(p.generate(req)[0].image, base.generate(req)[0].image) <= 1


# -- FP8 ------------------------------------------------------------------------------------------


def test_fp8_is_refused_on_cpu_naming_spo_quant():
    with pytest.raises(ConfigError) as e:
        load_pipeline(Settings(model="tiny", quant="fp8"))
    assert e.value.variable == "SPO_QUANT" and "CUDA GPU with FP8" in str(e.value) and "SPO_QUANT=none" in str(e.value)


@pytest.fixture
def fp8_on_cpu(monkeypatch):
    """torchao's float8 kernels run on CPU; only its (and our) hardware checks stand in the way."""
    pytest.importorskip("torchao")
    import torchao.quantization.quant_api as qa

    monkeypatch.setattr(qa, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(fp8, "check_supported", lambda device, dtype: None)


def test_fp8_quantizes_the_transformer_linears_and_stays_finite_on_zero_embeddings(tmp_path, fp8_on_cpu):
    ref = tiny(tmp_path, dtype="bfloat16")
    p = tiny(tmp_path, dtype="bfloat16", quant="fp8")
    names = fp8.selected(ref.unet)
    linears = [n for n, m in ref.unet.named_modules() if type(m) is torch.nn.Linear and ".transformer_blocks." in n]
    kept = [n for n in linears if ".attn2.to_k" in n or ".attn2.to_v" in n]
    assert kept and set(names) == set(linears) - set(kept)
    assert p.quant["layers"] == len(names) and p.info()["speed"]["quant"]["quant"] == "fp8"
    for n in names:
        w = p.unet.get_submodule(n).weight
        assert w.qdata.dtype == torch.float8_e4m3fn and w.scale.shape == (w.shape[0], 1) and w.dtype == torch.bfloat16
    for n in kept:
        assert type(p.unet.get_submodule(n).weight) is torch.nn.Parameter
    # CFG's unconditional row is an all-zero embedding (force_zeros_for_empty_prompt): finite, close to bf16;
    # the second request runs its LoRA branch (bf16) on the quantized base
    reqs = [dict(prompt=PROMPT, seed=11, num_inference_steps=3), dict(prompt=PROMPT, seed=11, num_inference_steps=3, lora_scale=0.2)]
    a, b = ref.generate(reqs), p.generate(reqs)
    diffs = [max_pixel_diff(x.image, y.image) for x, y in zip(a, b)]
    assert max(diffs) <= 40 and max_pixel_diff(b[0].image, b[1].image) > 0, diffs
    mse = np.mean([(np.asarray(x.image, float) - np.asarray(y.image, float)) ** 2 for x, y in zip(a, b)])
    assert 10 * np.log10(255**2 / mse) >= 28


def test_fp8_without_the_activation_floor_gives_nan(tmp_path, fp8_on_cpu):
    """The guard: per-row scaling of a zero row divides by zero; the floor is what keeps it finite."""
    p = tiny(tmp_path, dtype="bfloat16")
    fp8.quantize(p.unet, fp8.selected(p.unet), floor=None)
    states = p.prepare([dict(prompt=PROMPT, seed=11, num_inference_steps=3)])
    p.denoise(states)
    assert not torch.isfinite(states[0].latents).all()


def test_fp8_unloading_the_fused_adapter_requantizes_the_restored_weights(tmp_path, fp8_on_cpu):
    p = tiny(tmp_path, dtype="bfloat16", quant="fp8")
    layer = p.registry._layers[next(n for n in p.registry._layers if n.endswith("attn1.to_q"))]
    pristine = layer.pristine.clone()
    p.unload_adapter("spo")
    w = layer.base_layer.weight
    assert p.registry.fused is None and w.qdata.dtype == torch.float8_e4m3fn
    deq = w.dequantize().float()
    assert ((deq - pristine.float()).norm() / pristine.float().norm()).item() < 0.05  # the base weight, in float8
    out = p.generate([dict(prompt=PROMPT, seed=3, num_inference_steps=2)])[0]
    assert np.isfinite(np.asarray(out.image, float)).all()
