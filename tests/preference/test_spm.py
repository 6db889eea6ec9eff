"""Step-aware preference model (SPM): checkpoint format, full-size structure, numerics, scorers. CPU only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

from spo_runtime.errors import CheckpointFormatError
from spo_runtime.preference.scorers import BrightnessScorer, PreferenceScorer, SpmScorer
from spo_runtime.preference.spm import StepAwarePreferenceModel, build_spm, spm_config, timestep_embedding
from spo_runtime.preference.spm_weights import load_spm_weights, save_spm_weights

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
EOT = 999  # highest id of the tiny vocab: the legacy (eos_token_id == 2) pooling takes the argmax id


def _tiny(seed: int = 0, adaln_std: float = 0.3) -> StepAwarePreferenceModel:
    model = build_spm("tiny", seed=seed)
    torch.manual_seed(1000 + seed)
    model.reset_timestep_parameters(std=adaln_std)  # make the time conditioning matter
    return model


def _inputs(batch: int = 3, h: int = 64, w: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, h, w, generator=g) * 2 - 1
    ids = torch.zeros(batch, 77, dtype=torch.long)
    for i in range(batch):
        n = 3 + 2 * i
        ids[i, 0] = 998
        ids[i, 1:n] = torch.randint(3, 990, (n - 1,), generator=g)
        ids[i, n] = EOT
    timesteps = torch.tensor([0, 500, 999][:batch])
    return images, timesteps, ids


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny(0)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("spm")
    st, bn = d / "spm.safetensors", d / "spm.bin"
    save_spm_weights(tiny_model, st)
    save_spm_weights(tiny_model, bn)
    return st, bn


# ---------------------------------------------------------------------------------------- 1. checkpoints


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_roundtrip_reproduces_scores(tiny_model, tiny_ckpt, fmt):
    path = tiny_ckpt[0] if fmt == "safetensors" else tiny_ckpt[1]
    sd = load_file(str(path)) if fmt == "safetensors" else torch.load(path, weights_only=True)
    assert all(k.startswith("model.") for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert set(sd) == {"model." + k for k in tiny_model.model.state_dict()}

    other = build_spm("tiny", seed=7)
    images, timesteps, ids = _inputs()
    with torch.no_grad():
        ref = tiny_model(images, timesteps, ids)
        assert not torch.allclose(other(images, timesteps, ids), ref)
        load_spm_weights(other, path)
        assert torch.equal(other(images, timesteps, ids), ref)


def test_load_into_meta_model(tiny_model, tiny_ckpt):
    meta = build_spm("tiny", device="meta")
    load_spm_weights(meta, tiny_ckpt[0])
    assert not any(t.is_meta for t in list(meta.parameters()) + list(meta.buffers()))
    images, timesteps, ids = _inputs()
    with torch.no_grad():
        assert torch.equal(meta(images, timesteps, ids), tiny_model(images, timesteps, ids))


def _variant(tiny_ckpt, tmp_path, edit, suffix=".safetensors"):
    sd = load_file(str(tiny_ckpt[0]))
    edit(sd)
    path = tmp_path / f"variant{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_position_ids_extras_are_accepted(tiny_model, tiny_ckpt, tmp_path, suffix):
    def add(sd):
        sd["model.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
        sd["model.vision_model.embeddings.position_ids"] = torch.arange(5).unsqueeze(0)

    model = build_spm("tiny", seed=3)
    load_spm_weights(model, _variant(tiny_ckpt, tmp_path, add, suffix))
    images, timesteps, ids = _inputs()
    with torch.no_grad():
        assert torch.equal(model(images, timesteps, ids), tiny_model(images, timesteps, ids))


def test_unprefixed_keys_are_accepted(tiny_model, tiny_ckpt, tmp_path):
    def strip(sd):
        for k in list(sd):
            sd[k[len("model."):]] = sd.pop(k)

    model = build_spm("tiny", seed=3)
    load_spm_weights(model, _variant(tiny_ckpt, tmp_path, strip))
    for a, b in zip(model.state_dict().values(), tiny_model.state_dict().values()):
        assert torch.equal(a, b)


def test_renamed_key_is_refused(tiny_ckpt, tmp_path):
    old = "model.vision_model.encoder.layers.1.adaLN_modulation.1.weight"
    new = "model.vision_model.encoder.layers.1.adaLN.1.weight"

    def rename(sd):
        sd[new] = sd.pop(old)

    model = build_spm("tiny", seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointFormatError) as info:
        load_spm_weights(model, _variant(tiny_ckpt, tmp_path, rename))
    assert sorted(info.value.keys) == sorted([old, new])
    assert old in str(info.value) and new in str(info.value)
    # nothing was loaded
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_missing_key_is_refused(tiny_ckpt, tmp_path):
    key = "model.t_embedder.mlp.2.bias"
    with pytest.raises(CheckpointFormatError) as info:
        load_spm_weights(build_spm("tiny"), _variant(tiny_ckpt, tmp_path, lambda sd: sd.pop(key)))
    assert info.value.keys == [key]
    assert key in str(info.value)


def test_unexpected_key_is_refused(tiny_ckpt, tmp_path):
    key = "model.vision_model.extra_head.weight"

    def add(sd):
        sd[key] = torch.zeros(2)

    with pytest.raises(CheckpointFormatError) as info:
        load_spm_weights(build_spm("tiny"), _variant(tiny_ckpt, tmp_path, add, ".bin"))
    assert info.value.keys == [key]


def test_shape_mismatch_is_refused(tiny_ckpt, tmp_path):
    key = "model.vision_model.adaLN_modulation.1.bias"

    def shrink(sd):
        sd[key] = sd[key][:-1].clone()

    with pytest.raises(CheckpointFormatError) as info:
        load_spm_weights(build_spm("tiny"), _variant(tiny_ckpt, tmp_path, shrink))
    assert info.value.keys == [key]
    assert key in str(info.value)


class _NotAllowed:  # a pickle that weights_only=True must refuse
    def __init__(self):
        self.payload = 1


def test_pickle_needing_more_than_weights_only_is_refused(tiny_ckpt, tmp_path):
    sd = torch.load(tiny_ckpt[1], weights_only=True)
    sd["model.extra"] = _NotAllowed()
    path = tmp_path / "evil.bin"
    torch.save(sd, path)
    with pytest.raises(CheckpointFormatError, match="weights_only"):
        load_spm_weights(build_spm("tiny"), path)


def test_bad_files_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointFormatError):
        load_spm_weights(build_spm("tiny"), junk)
    other = tmp_path / "weights.ckpt"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointFormatError):
        load_spm_weights(build_spm("tiny"), other)
    with pytest.raises(FileNotFoundError):
        load_spm_weights(build_spm("tiny"), tmp_path / "absent.safetensors")


# -------------------------------------------------------------------------------------- 2. full size


def test_full_size_structure_on_meta():
    model = build_spm("sdxl-random", device="meta")
    sd = model.model.state_dict()
    assert all(t.is_meta for t in sd.values())

    # exactly the released names: plain CLIPModel names + the SPM additions
    with torch.device("meta"):
        plain = CLIPModel(spm_config("sdxl"))
    added = {f"vision_model.encoder.layers.{i}.adaLN_modulation.1.{p}" for i in range(32) for p in ("weight", "bias")}
    added |= {f"vision_model.adaLN_modulation.1.{p}" for p in ("weight", "bias")}
    added |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert set(sd) == set(plain.state_dict()) | added
    for name, t in plain.state_dict().items():
        assert sd[name].shape == t.shape, name

    shapes = {
        "vision_model.adaLN_modulation.1.weight": (2560, 1280),
        "vision_model.adaLN_modulation.1.bias": (2560,),
        "t_embedder.mlp.0.weight": (1280, 256),
        "t_embedder.mlp.0.bias": (1280,),
        "t_embedder.mlp.2.weight": (1280, 1280),
        "t_embedder.mlp.2.bias": (1280,),
        "visual_projection.weight": (1024, 1280),
        "text_projection.weight": (1024, 1024),
        "logit_scale": (),
        "vision_model.embeddings.patch_embedding.weight": (1280, 3, 14, 14),
        "vision_model.embeddings.position_embedding.weight": (257, 1280),
        "text_model.embeddings.token_embedding.weight": (49408, 1024),
        "text_model.embeddings.position_embedding.weight": (77, 1024),
        "vision_model.encoder.layers.0.mlp.fc1.weight": (5120, 1280),
        "text_model.encoder.layers.0.mlp.fc1.weight": (4096, 1024),
    }
    for i in range(32):
        shapes[f"vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"] = (7680, 1280)
        shapes[f"vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"] = (7680,)
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name

    assert len(model.model.vision_model.encoder.layers) == 32
    assert len(model.model.text_model.encoder.layers) == 24
    assert not any(k.startswith("vision_model.encoder.layers.32.") for k in sd)
    assert not any(k.startswith("text_model.encoder.layers.24.") for k in sd)
    assert not any("adaLN" in k for k in sd if k.startswith("text_model."))

    n = sum(p.numel() for p in model.parameters())
    print(f"full-size SPM parameters: {n:,}")
    assert 1.25e9 <= n <= 1.36e9

    vc, tc = model.config.vision_config, model.config.text_config
    assert (vc.hidden_act, tc.hidden_act) == ("gelu", "gelu")
    assert vc.layer_norm_eps == tc.layer_norm_eps == 1e-5


# ----------------------------------------------------------------------------------------- 3. numbers


@pytest.mark.parametrize("t", [0, 751])
def test_timestep_embedding_matches_formula(t):
    emb = timestep_embedding(torch.tensor([t]))
    assert emb.shape == (1, 256)
    expected = []
    for i in range(128):
        expected.append(math.cos(t * math.exp(-math.log(10000) * i / 128)))
    for i in range(128):
        expected.append(math.sin(t * math.exp(-math.log(10000) * i / 128)))
    expected = torch.tensor(expected, dtype=torch.float32)
    assert torch.allclose(emb[0], expected, atol=1e-4, rtol=0)
    if t == 0:
        assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))


def test_t_embedder_is_mlp_of_embedding(tiny_model):
    mlp = tiny_model.model.t_embedder.mlp
    t = torch.tensor([0.0, 751.0])
    freq = timestep_embedding(t)
    expected = F.linear(F.silu(F.linear(freq, mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)
    with torch.no_grad():
        assert torch.allclose(tiny_model.model.t_embedder(t), expected, atol=1e-6)


def _set_adaln(model, layer_bias, final_bias):
    width = model.config.vision_config.hidden_size
    with torch.no_grad():
        for layer in model.model.vision_model.encoder.layers:
            layer.adaLN_modulation[1].weight.zero_()
            layer.adaLN_modulation[1].bias.copy_(layer_bias(width))
        model.model.vision_model.adaLN_modulation[1].weight.zero_()
        model.model.vision_model.adaLN_modulation[1].bias.copy_(final_bias(width))


def test_identity_adaln_equals_plain_clip():
    model = _tiny(1)
    z, o = torch.zeros, torch.ones
    # chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp / final: shift, scale
    _set_adaln(model, lambda w: torch.cat([z(w), z(w), o(w), z(w), z(w), o(w)]), lambda w: z(2 * w))

    plain = CLIPModel(spm_config("tiny")).eval()
    state = {k: v for k, v in model.model.state_dict().items() if "adaLN" not in k and not k.startswith("t_embedder.")}
    plain.load_state_dict(state, strict=True)

    images, _, _ = _inputs()
    pixels = model.preprocess(images)
    with torch.no_grad():
        out = plain.get_image_features(pixel_values=pixels)
        ref = out if isinstance(out, torch.Tensor) else out.pooler_output
        ref = ref / ref.norm(dim=-1, keepdim=True)
        for t in (0, 751, 999):
            assert torch.allclose(model.image_embeds(pixels, torch.full((3,), t)), ref, atol=1e-5, rtol=0)


def test_chunk_order_gates_and_final_shift_scale():
    """Gates at chunks 2 and 5 closed -> encoder layers are skipped; the final adaLN is (shift, scale)."""
    model = _tiny(2)
    g = torch.Generator().manual_seed(5)
    shift = 0.3 * torch.randn(32, generator=g)
    scale = 0.2 * torch.randn(32, generator=g)
    noise = lambda w: torch.randn(w, generator=g)  # noqa: E731  (shifts/scales that must not matter)
    z = torch.zeros
    _set_adaln(model, lambda w: torch.cat([noise(w), noise(w), z(w), noise(w), noise(w), z(w)]),
               lambda w: torch.cat([shift, scale]))

    images, timesteps, _ = _inputs()
    vision = model.model.vision_model
    with torch.no_grad():
        pixels = model.preprocess(images)
        hidden = vision.pre_layrnorm(vision.embeddings(pixels))
        pooled = vision.post_layernorm(hidden[:, 0]) * (1 + scale) + shift
        ref = model.model.visual_projection(pooled)
        ref = ref / ref.norm(dim=-1, keepdim=True)
        assert torch.allclose(model.image_embeds(pixels, timesteps), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("branch", ["msa", "mlp"])
def test_chunk_order_shift_scale(branch):
    """scale = -1 zeroes the normed input of a branch, so it sees its shift at every token: attention then
    returns out_proj(v_proj(shift)) and the MLP fc2(gelu(fc1(shift))) exactly, added to the residual stream
    (the other branch's gate is 0)."""
    model = _tiny(3)
    g = torch.Generator().manual_seed(6)
    shifts = [torch.randn(32, generator=g) for _ in model.model.vision_model.encoder.layers]
    it = iter(shifts)
    z, o = torch.zeros, torch.ones
    noise = lambda w: torch.randn(w, generator=g)  # noqa: E731  (chunks that must not matter)
    if branch == "msa":
        layer_bias = lambda w: torch.cat([next(it), -o(w), o(w), noise(w), noise(w), z(w)])  # noqa: E731
    else:
        layer_bias = lambda w: torch.cat([noise(w), noise(w), z(w), next(it), -o(w), o(w)])  # noqa: E731
    _set_adaln(model, layer_bias, lambda w: z(2 * w))

    images, timesteps, _ = _inputs()
    vision = model.model.vision_model
    with torch.no_grad():
        pixels = model.preprocess(images)
        hidden = vision.pre_layrnorm(vision.embeddings(pixels))
        for layer, s in zip(vision.encoder.layers, shifts):
            if branch == "msa":
                attn = layer.self_attn
                hidden = hidden + F.linear(F.linear(s, attn.v_proj.weight, attn.v_proj.bias),
                                           attn.out_proj.weight, attn.out_proj.bias)
            else:
                mlp = layer.mlp
                hidden = hidden + F.linear(F.gelu(F.linear(s, mlp.fc1.weight, mlp.fc1.bias)),
                                           mlp.fc2.weight, mlp.fc2.bias)
        ref = model.model.visual_projection(vision.post_layernorm(hidden[:, 0]))
        ref = ref / ref.norm(dim=-1, keepdim=True)
        assert torch.allclose(model.image_embeds(pixels, timesteps), ref, atol=1e-5, rtol=0)


def test_timesteps_change_scores(tiny_model):
    images, _, ids = _inputs()
    with torch.no_grad():
        s0 = tiny_model(images, torch.zeros(3, dtype=torch.long), ids)
        s1 = tiny_model(images, torch.full((3,), 999), ids)
        s_scalar = tiny_model(images, 999, ids)
    assert s0.shape == (3,)
    assert (s0 - s1).abs().min() > 1e-3
    assert torch.equal(s1, s_scalar)
    # score = exp(logit_scale) * cosine
    with torch.no_grad():
        img = tiny_model.image_embeds(tiny_model.preprocess(images), 999)
        txt = tiny_model.text_embeds(ids)
        cos = F.cosine_similarity(img, txt, dim=-1)
        assert torch.allclose(s1, tiny_model.model.logit_scale.exp() * cos, atol=1e-5)


def test_build_is_deterministic():
    a, b, c = build_spm("tiny", seed=4), build_spm("tiny", seed=4), build_spm("tiny", seed=5)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def _reference_preprocess(images, size, new_hw, top, left):
    x = F.interpolate(images, size=new_hw, mode="bicubic", align_corners=False)
    x = x[:, :, top:top + size, left:left + size]
    x = ((x + 1) / 2).clamp(0, 1)
    return (x - MEAN) / STD


def test_preprocess_tiny(tiny_model):
    assert tiny_model.image_size == 28
    images, _, _ = _inputs(h=64, w=96)
    out = tiny_model.preprocess(images)
    assert out.shape == (3, 3, 28, 28)
    # short side 64 -> 28, long side 96 * 28 / 64 = 42; centre crop from column 7
    assert torch.allclose(out, _reference_preprocess(images, 28, (28, 42), 0, 7), atol=1e-6)


def test_preprocess_full_size_crop_and_grad():
    model = build_spm("sdxl-random", device="meta")  # preprocess uses only the config
    images, _, _ = _inputs(batch=2, h=96, w=64)
    images.requires_grad_(True)
    out = model.preprocess(images)
    assert out.shape == (2, 3, 224, 224) and out.device.type == "cpu"
    # tall image: 64 -> 224, 96 -> 336; centre crop from row 56
    assert torch.allclose(out, _reference_preprocess(images, 224, (336, 224), 56, 0), atol=1e-5)
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    square = model.preprocess(torch.zeros(1, 3, 224, 224))
    assert torch.allclose(square, ((0.5 - MEAN) / STD).expand(1, 3, 224, 224), atol=1e-6)


# ------------------------------------------------------------------------------------------- scorers


def test_brightness_scorer():
    images = torch.stack([torch.full((3, 8, 8), v) for v in (-0.5, 0.0, 0.75)])
    images[0, 0, 0, 0] = 1.0
    up, down = BrightnessScorer(), BrightnessScorer(sign=-1)
    assert isinstance(up, PreferenceScorer)
    t = torch.tensor([10, 20, 30])
    expected = images.mean(dim=(1, 2, 3))
    assert torch.allclose(up(images, ["a", "b", "c"], t), expected)
    assert torch.allclose(down(images, ["a", "b", "c"], t), -expected)
    assert up(images, ["a"] * 3, t).argmax() == 2 and down(images, ["a"] * 3, t).argmax() == 0
    with pytest.raises(ValueError):
        BrightnessScorer(sign=2)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"!": 0, "<unk>": 1, "<|startoftext|>": 998, "<|endoftext|>": EOT}
    vocab.update({w: 10 + i for i, w in enumerate("a photo of the red blue cat dog".split())})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 998), ("<|endoftext|>", EOT)],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", pad_token="!", unk_token="<unk>")


def test_spm_scorer_matches_model_and_caches(tiny_model):
    tokenizer = _tokenizer()
    scorer = SpmScorer(tiny_model, tokenizer)
    assert isinstance(scorer, PreferenceScorer)
    prompts = ["a red cat", "a photo of the blue dog", "a red cat"]
    images, timesteps, _ = _inputs()
    scores = scorer(images, prompts, timesteps)
    assert scores.shape == (3,) and not scores.requires_grad
    assert scorer.cache_len == 2

    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(scores, tiny_model(images, timesteps, ids), atol=1e-6)
    assert torch.equal(scorer(images, prompts, timesteps), scores)  # from the cache
    assert scorer.cache_len == 2

    grad_scorer = SpmScorer(tiny_model, tokenizer, grad=True)
    images.requires_grad_(True)
    out = grad_scorer(images, prompts, timesteps)
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        scorer(images.detach(), ["a", "b"], timesteps)
