"""Parity with diffusers on generated LoRA files: every file `StableDiffusionXLPipeline.load_lora_weights`
loads we load, and every file it refuses we refuse (LoraFormatError naming the file and a key).

The files mix the layouts people have, one part each: the UNet (kohya/webui names, kohya with SGM block
names, diffusers names, PEFT names) and the text encoders (kohya names as kohya writes them,
`lora_te1_text_model_...`, and as our writer does for a flattened CLIPTextModel, `lora_te1_encoder_...`;
PEFT names with and without `text_model.`; diffusers' `lora_linear_layer` and old `to_q_lora` names),
te1 only, te2 only or both, attention (q/k/v/out) or MLP (fc1/fc2) layers or both, with `.alpha` or without.
"Loads" means the whole file: a load that silently leaves keys out (diffusers ignores keys outside its
naming family) counts as a refusal, and we refuse such a file. When both load, the same layers get the
same update, and our image at two scales equals diffusers' within
1/255: one batch of this adapter's rows alone, and one engine batch (`spo_runtime.engine.Engine`, stepped
here) that also holds a row of another adapter, submitted apart (each row compared with diffusers' image of
its adapter alone). Each case also pins the verdict (load or refuse) diffusers gives it, so the matrix
cannot pass by both sides refusing everything; a diffusers upgrade that changes one says which.

The file of the report is a case of its own (`test_the_reported_file_loads_and_draws_diffusers_images`): the
tiny model's webui LoRA (`lora_unet_*`) plus kohya q/k/v/out keys of both text encoders, each with `.alpha`.

One divergence is declared, not hidden: `.alpha` keys next to diffusers/PEFT names make diffusers refuse
the whole file (its keys must all contain 'lora'); we read them (test_lora_format relies on it), and our
image equals diffusers' for the same file with each alpha / rank folded into its up weight.
Outside the matrix, by design: DoRA (diffusers drops the magnitudes, we refuse; test_lora_layouts), and
alphas that differ between attention layers of one part (diffusers 0.42 applies the part's most common
alpha, we each layer's own).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import safetensors
import safetensors.torch
import torch
from prometheus_client import CollectorRegistry

from conftest import max_pixel_diff, reported_lora
from spo_runtime import LoraFormatError
from spo_runtime.engine import Engine, EngineConfig
from spo_runtime.lora.format import module_specs_of
from spo_runtime.metrics import Metrics
from test_lora_layouts import sgm_kohya_prefix

PROMPT = "a portrait of an astronaut, cinematic lighting"
STEPS = 2
SCALES = (0.6, 1.4)
KOHYA_UNET = ("kohya", "kohya-sgm")
KOHYA_TE = ("kohya", "kohya-flat")
TE_LAYERS = {
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "mlp": ("fc1", "fc2"),
    "all": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "qkv": ("q_proj", "k_proj", "v_proj"),
}
ENCODERS = {"te1": ("text_encoder",), "te2": ("text_encoder_2",), "both": ("text_encoder", "text_encoder_2")}
UNET_TARGETS = ("attn1.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.2", "resnets.0.conv1", "downsamplers.0.conv")
_OLD_TE = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}


@dataclass(frozen=True)
class Variant:
    unet: str | None  # kohya, kohya-sgm, diffusers, peft
    te: str | None  # kohya, kohya-flat, peft, peft-flat, diffusers, diffusers-old
    encoders: str = "both"
    layers: str = "all"
    alpha: bool = True
    loads: bool | None = None  # diffusers 0.42's verdict on the whole file, pinned (None: not pinned)

    @property
    def id(self) -> str:
        te = f"{self.te}-{self.encoders}-{self.layers}" if self.te else "no_te"
        return f"{self.unet or 'no_unet'}+{te}+{'alpha' if self.alpha else 'no_alpha'}"

    @property
    def declared_divergence(self) -> bool:
        """`.alpha` keys next to diffusers/PEFT names (see the module docstring)."""
        return self.alpha and (self.unet in ("diffusers", "peft") or self.te in ("peft", "peft-flat"))


MATRIX = [
    Variant("kohya", "kohya", "both", "attn", loads=True),  # the report's layout (its very file: a test below)
    Variant("kohya", "kohya", "te1", "all", alpha=False, loads=True),
    Variant("kohya-sgm", "kohya", "te2", "mlp", loads=True),
    Variant("kohya-sgm", None, alpha=False, loads=True),
    Variant(None, "kohya", "both", "qkv", loads=False),  # diffusers cannot classify a q/k/v-only part: refused
    Variant("kohya", "kohya-flat", "both", "all", loads=True),  # as our own writer names a flattened CLIPTextModel
    Variant("diffusers", None, alpha=False, loads=True),
    Variant("peft", "peft-flat", "both", "attn", alpha=False, loads=True),  # as diffusers' save_lora_weights writes
    Variant("diffusers", "peft", "te1", "all", alpha=False, loads=True),  # PEFT names with text_model. (transformers 4)
    Variant("peft", "peft", "te2", "mlp", alpha=False, loads=False),  # diffusers cannot classify PEFT MLP-only names
    Variant(None, "diffusers", "both", "all", alpha=False, loads=True),
    Variant("diffusers", "diffusers-old", "both", "all", alpha=False, loads=True),
    Variant(None, "diffusers-old", "te2", "qkv", alpha=False, loads=False),  # refused, as in kohya
    Variant("kohya", "peft", "both", "attn", loads=False),  # one file, two naming families: refused
    Variant("peft", "kohya", "te1", "attn", alpha=False, loads=False),  # diffusers drops the kohya half silently
    Variant("peft", "peft-flat", "both", "all", loads=True),  # the declared divergence
]
# so that every UNet layout (and none) loads with te1 only, te2 only, both and no text-encoder part
# (test_matrix_covers_every_layout checks it), in the text-encoder naming its trainers write beside it
MATRIX += [
    Variant("kohya", "kohya", "te2", "mlp", loads=True),
    Variant("kohya", None, loads=True),
    Variant("kohya-sgm", "kohya-flat", "te1", "attn", alpha=False, loads=True),
    Variant("kohya-sgm", "kohya", "both", "all", loads=True),
    Variant("diffusers", "diffusers", "te2", "mlp", alpha=False, loads=True),
    Variant("peft", "peft-flat", "te1", "all", alpha=False, loads=True),
    Variant("peft", "peft-flat", "te2", "attn", alpha=False, loads=True),
    Variant("peft", None, alpha=False, loads=True),
    Variant(None, "kohya", "te1", "attn", loads=True),
    Variant(None, "peft-flat", "te2", "all", alpha=False, loads=True),
]
# plus a few drawn from the whole product (seeded), beyond the cases picked by hand; their verdicts not pinned
_rng = random.Random(25)
for _ in range(3):
    MATRIX.append(Variant(_rng.choice(["kohya", "kohya-sgm", "diffusers", "peft", None]),
                          _rng.choice(["kohya", "kohya-flat", "peft", "peft-flat", "diffusers", "diffusers-old"]),
                          _rng.choice(list(ENCODERS)), _rng.choice(list(TE_LAYERS)), _rng.random() < 0.5))


def _te_path(module: str) -> tuple[str, str, str]:
    """(encoder, our path, kohya's canonical path with `text_model.`) of a text-encoder module."""
    te, _, path = module.partition(".")
    return te, path, path if path.startswith("text_model.") else "text_model." + path


def names(module: str, layout: str) -> tuple[str, str, str | None]:
    """(down key, up key, alpha key or None) of `module` in `layout`."""
    if not module.startswith("text_encoder"):
        base = {"kohya": lambda: "lora_unet_" + module.replace(".", "_"),
                "kohya-sgm": lambda: sgm_kohya_prefix(module, 1),
                "diffusers": lambda: "unet." + module, "peft": lambda: "unet." + module}[layout]()
        if layout in KOHYA_UNET:
            return base + ".lora_down.weight", base + ".lora_up.weight", base + ".alpha"
        ab = ("lora.down", "lora.up") if layout == "diffusers" else ("lora_A", "lora_B")
        return f"{base}.{ab[0]}.weight", f"{base}.{ab[1]}.weight", base + ".alpha"
    te, path, canonical = _te_path(module)
    kohya = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[te]
    if layout in KOHYA_TE:
        base = kohya + (canonical if layout == "kohya" else path).replace(".", "_")
        return base + ".lora_down.weight", base + ".lora_up.weight", base + ".alpha"
    if layout in ("peft", "peft-flat"):
        base = f"{te}.{canonical if layout == 'peft' else path}"
        return base + ".lora_A.weight", base + ".lora_B.weight", base + ".alpha"
    head, leaf = canonical.rsplit(".", 1)
    if layout == "diffusers-old" and leaf in _OLD_TE:
        base = f"{te}.{head}.{_OLD_TE[leaf]}"
    else:
        base = f"{te}.{canonical}.lora_linear_layer"
    return base + ".down.weight", base + ".up.weight", None


@dataclass
class Generated:
    state_dict: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]  # module -> alpha / rank * up @ down (float64), as meant
    twin: dict[str, torch.Tensor]  # the same update with alpha / rank folded into up, no alpha keys


def generate(v: Variant, specs: dict, seed: int) -> Generated:
    g = torch.Generator().manual_seed(seed)
    chosen = []
    if v.unet:  # UNet rank 4, alpha 2; text encoders rank 2, alpha 1 (ranks differ within one file)
        chosen += [(m, v.unet, 4, 2.0, 0.6) for m in specs if not m.startswith("text_encoder") and m.endswith(UNET_TARGETS)]
    if v.te:
        chosen += [(m, v.te, 2, 1.0, 1.5) for m in specs if m.split(".")[0] in ENCODERS[v.encoders]
                   and m.endswith(TE_LAYERS[v.layers])]
    sd, twin, deltas = {}, {}, {}
    for m, layout, rank, alpha, gain in chosen:
        s = specs[m]
        k = s.kernel_size if s.kind == "conv" else ()
        down = torch.randn(rank, s.in_features, *k, generator=g) / (s.in_features * (k[0] * k[1] if k else 1)) ** 0.5
        up = torch.randn(s.out_features, rank, *((1, 1) if k else ()), generator=g) * (gain / rank**0.5)
        dk, uk, ak = names(m, layout)
        sd[dk], sd[uk] = down, up
        twin[dk] = down
        if v.alpha and ak is not None:
            sd[ak] = torch.tensor(alpha)
        else:
            alpha = float(rank)
        twin[uk] = up * (alpha / rank)
        deltas[m] = (alpha / rank) * (up.double().flatten(1) @ down.double().flatten(1))
    return Generated(sd, deltas, twin)


def diffusers_deltas(dp, adapter: str) -> dict[str, torch.Tensor]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for part, model in (("unet", dp.unet), ("text_encoder", dp.text_encoder), ("text_encoder_2", dp.text_encoder_2)):
        for path, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer) and adapter in getattr(layer, "lora_A", {}):
                A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                out[path if part == "unet" else f"{part}.{path}"] = layer.scaling[adapter] * (
                    B.double().flatten(1) @ A.double().flatten(1))
    return out


def our_deltas(pipe, adapter: str) -> dict[str, torch.Tensor]:
    return {m: up.double().flatten(1) @ down.double().flatten(1) for m, down, up in pipe.registry.tensors(adapter)}


def diffusers_verdict(dp, path, adapter: str, meant: dict[str, torch.Tensor]) -> str | None:
    """None if diffusers loads the whole file at `path` as `adapter`, each layer with its meant update;
    else why not: its refusal, or what its silent partial load missed."""
    try:
        dp.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
    except Exception as e:  # noqa: BLE001 - whatever diffusers raises is its refusal
        return f"refused: {type(e).__name__}: {e}"
    got = diffusers_deltas(dp, adapter)
    if sorted(got) != sorted(meant):
        return f"loaded {len(got)} of the {len(meant)} layers, e.g. not {sorted(set(meant) - set(got))[:1]}"
    wrong = [m for m in got if not torch.allclose(got[m], meant[m], rtol=0, atol=1e-6)]
    return f"loaded {wrong[0]!r} with another update" if wrong else None


def diffusers_image(dp, adapter, scale, seed):
    dp.set_adapters([adapter], adapter_weights=[scale])
    return dp(PROMPT, num_inference_steps=STEPS, height=64, width=64, generator=torch.Generator().manual_seed(seed)).images[0]


def forget(dp, adapter):
    """Remove `adapter` from diffusers' pipeline, also after a refusal that left some part loaded."""
    if any(adapter in names for names in dp.get_list_adapters().values()):
        dp.delete_adapters(adapter)
    dp.set_adapters(["spo"], adapter_weights=[1.0])


@pytest.fixture(scope="module")
def spo_reference(diffusers_pipe):
    """diffusers' image of the tiny SPO adapter alone, for the rows of the other adapter in our batches."""
    return diffusers_image(diffusers_pipe, "spo", 1.0, 1)


def test_matrix_covers_every_layout(pipe):
    specs = module_specs_of(pipe.unet, pipe.registry.text_encoders)
    assert {v.unet for v in MATRIX} == {None, "kohya", "kohya-sgm", "diffusers", "peft"}
    assert {v.te for v in MATRIX} == {None, "kohya", "kohya-flat", "peft", "peft-flat", "diffusers", "diffusers-old"}
    assert {v.encoders for v in MATRIX if v.te} == set(ENCODERS) and {v.layers for v in MATRIX if v.te} == set(TE_LAYERS)
    assert {v.alpha for v in MATRIX if v.unet in KOHYA_UNET or v.te in KOHYA_TE} == {True, False}
    loaded = [v for v in MATRIX if v.loads]  # pinned: both load these
    for unet in (None, "kohya", "kohya-sgm", "diffusers", "peft"):
        assert {v.encoders if v.te else None for v in loaded if v.unet == unet} >= {"te1", "te2", "both"}, unet
        assert unet is None or any(v.te is None for v in loaded if v.unet == unet), unet
    kohya = {(v.alpha, v.te in KOHYA_TE) for v in loaded if v.unet in KOHYA_UNET}
    assert kohya == {(alpha, te) for alpha in (True, False) for te in (True, False)}  # with and without .alpha
    assert {v.layers for v in loaded if v.te} >= {"attn", "mlp", "all"}
    assert any(v.loads is False for v in MATRIX)  # and files both refuse
    # te1 is a flattened CLIPTextModel here (transformers 5): kohya's names carry a text_model. it lacks
    assert not any(m.startswith("text_encoder.text_model.") for m in specs)
    assert any(m.startswith("text_encoder_2.text_model.") for m in specs)
    reported = generate(MATRIX[0], specs, 0).state_dict
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in reported
    assert any(k.startswith("lora_te2_text_model_encoder_layers_1_self_attn_out_proj.") for k in reported)


def engine_batch(pipe, submissions: list[list[dict]]):
    """Run `submissions` through one engine (stepped here, no thread); their images and each step's rows."""
    eng = Engine(pipe, EngineConfig(max_batch=8), metrics=Metrics(CollectorRegistry()))
    subs = [eng.submit(s) for s in submissions]
    rows = []
    while not all(s.future.done() for s in subs) and len(rows) < 4 * STEPS:
        plan = eng.schedule()
        result = eng.run(plan)
        eng.update(plan, result)
        if result.step_seconds is not None:
            rows.append(result.batch_size)
    return [s.future.result(0) for s in subs], rows


def check_parity(pipe, dp, spo_reference, path, name: str, meant: dict, seed: int, twin=None) -> bool:
    """Assert our verdict on the file at `path` is diffusers' (loading it whole, as `meant`, or refusing it) and,
    when both load, our updates and images are diffusers'; whether both loaded. `twin`: the file with each
    alpha / rank folded into its up weight, for the declared divergence (diffusers refuses `path`)."""
    with safetensors.safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    verdict = diffusers_verdict(dp, path, name, meant)
    try:
        if twin is not None:
            assert verdict is not None and "'lora'" in verdict, verdict
            forget(dp, name)  # what diffusers makes of the same update without alpha keys is what we must match
            verdict = diffusers_verdict(dp, twin, name, meant)
        try:
            adapter = pipe.load_adapter(name, path)
        except LoraFormatError as e:
            ours = e
        else:
            ours = None
        try:
            if verdict is not None:
                assert ours is not None, f"diffusers does not load the file ({verdict}), we do"
                assert str(path) in str(ours) and ours.keys and ours.keys[0] in keys and ours.keys[0] in str(ours)
                assert name not in pipe.registry.adapters
                return False
            assert ours is None, f"diffusers loads the file, we refuse it: {ours}"
            parts = {p: sum(m.split(".")[0] == p for m in meant) for p in ("text_encoder", "text_encoder_2")}
            assert adapter.info()["layers_by_part"] == {"unet": len(meant) - sum(parts.values()), **parts}
            mine = our_deltas(pipe, name)
            assert sorted(mine) == sorted(meant)
            assert all(torch.allclose(mine[m], meant[m].float().double(), rtol=1e-5, atol=1e-6) for m in mine)

            refs = [diffusers_image(dp, name, s, seed) for s in SCALES]
            rows = [dict(prompt=PROMPT, seed=seed, num_inference_steps=STEPS, adapter=name, lora_scale=s) for s in SCALES]
            spo_row = dict(prompt=PROMPT, seed=1, num_inference_steps=STEPS, adapter="spo", lora_scale=1.0)
            alone = pipe.generate(rows)
            assert pipe.last_step.rows == 2
            # this adapter's rows and another adapter's, submitted apart, in one engine batch at every step; with
            # no cached prompt embedding, so that one text-encoder call also mixes the adapters' rows
            pipe.prompts._cache.clear()
            (mixed, [other]), batch_rows = engine_batch(pipe, [[rows[1], rows[0]], [spo_row]])
            assert batch_rows == [3] * STEPS, batch_rows
            diffs = [max_pixel_diff(a.image, r) for a, r in zip(alone, refs)]
            diffs += [max_pixel_diff(mixed[1].image, refs[0]), max_pixel_diff(mixed[0].image, refs[1]),
                      max_pixel_diff(other.image, spo_reference)]
            print(name, "max pixel diffs vs diffusers:", diffs)
            assert max(diffs) <= 1, diffs
            assert max_pixel_diff(alone[0].image, alone[1].image) > 5  # the adapter changes the image: not vacuous
            return True
        finally:
            if name in pipe.registry.adapters:
                pipe.unload_adapter(name)
    finally:
        forget(dp, name)


@pytest.mark.parametrize("i", range(len(MATRIX)), ids=[v.id for v in MATRIX])
def test_we_load_what_diffusers_loads_and_draw_its_images(pipe, diffusers_pipe, spo_reference, tmp_path, i):
    v = MATRIX[i]
    specs = module_specs_of(pipe.unet, pipe.registry.text_encoders)
    gen = generate(v, specs, seed=100 + i)
    path = tmp_path / f"{v.id}.safetensors"
    safetensors.torch.save_file(gen.state_dict, path)
    twin = None
    if v.declared_divergence:
        twin = tmp_path / f"{v.id}.twin.safetensors"
        safetensors.torch.save_file(gen.twin, twin)
    loaded = check_parity(pipe, diffusers_pipe, spo_reference, path, f"v{i}", gen.deltas, 7 + i, twin)
    if v.loads is not None:  # both agree; and on what diffusers 0.42 does with this file
        assert loaded == v.loads, f"diffusers {'loads' if loaded else 'refuses'} {v.id} now"


def test_the_reported_file_loads_and_draws_diffusers_images(pipe, diffusers_pipe, spo_reference, tiny_dir, tmp_path):
    """The file of the report, refused with 400 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight:
    names no nn.Linear or nn.Conv2d module" while diffusers loads it: te1 is a flattened CLIPTextModel here,
    and diffusers drops kohya's text_model. for it. Its UNet layers get the update diffusers gives the tiny
    LoRA (loaded from the diffusers-layout file), its text-encoder layers the generated one."""
    sd, te_deltas = reported_lora(tiny_dir, pipe.registry.text_encoders)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    assert {k.split("_", 2)[1] for k in sd if k.endswith(".alpha")} == {"unet", "te1", "te2"}
    path = tmp_path / "webui_plus_kohya_te.safetensors"
    safetensors.torch.save_file(sd, path)
    meant = {**diffusers_deltas(diffusers_pipe, "spo"), **te_deltas}
    assert {m.split(".")[0] for m in meant} >= {"down_blocks", "text_encoder", "text_encoder_2"}
    assert check_parity(pipe, diffusers_pipe, spo_reference, path, "reported", meant, 11)


def test_a_file_for_another_model_is_refused_naming_a_key(pipe, tmp_path):
    """Keys that all name layers this UNet does not have (an SD 1.5 kohya file here): refused, one named."""
    key = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = {f"{key}.lora_down.weight": torch.zeros(4, 320), f"{key}.lora_up.weight": torch.zeros(320, 4),
          f"{key}.alpha": torch.tensor(4.0)}
    path = tmp_path / "sd15.safetensors"
    safetensors.torch.save_file(sd, path)
    with pytest.raises(LoraFormatError, match="targets no layer of this model") as e:
        pipe.load_adapter("sd15", path)
    assert str(path) in str(e.value) and f"{key}.lora_down.weight" in str(e.value)
    assert "sd15" not in pipe.registry.adapters


def test_alphas_count_per_part(pipe, diffusers_pipe, tmp_path):
    """Alphas in the UNet part and none in the text encoders': each part keeps its own rule (file alphas; alpha =
    rank), as in diffusers. One module without an alpha among modules with theirs: refused, since there diffusers
    gives it the part's most common alpha while kohya means its rank."""
    specs = module_specs_of(pipe.unet, pipe.registry.text_encoders)
    gen = generate(Variant("kohya", "kohya", "both", "attn"), specs, seed=3)
    te_alphas = [k for k in gen.state_dict if k.startswith("lora_te") and k.endswith(".alpha")]
    sd = {k: t for k, t in gen.state_dict.items() if k not in te_alphas}
    meant = {m: d * (2 if m.startswith("text_encoder") else 1) for m, d in gen.deltas.items()}  # TE: rank 2, alpha 1
    path = tmp_path / "unet_alphas_only.safetensors"
    safetensors.torch.save_file(sd, path)
    try:
        assert diffusers_verdict(diffusers_pipe, path, "per_part", meant) is None
    finally:
        forget(diffusers_pipe, "per_part")
    pipe.load_adapter("per_part", path)
    try:
        mine = our_deltas(pipe, "per_part")
        assert sorted(mine) == sorted(meant) and all(torch.allclose(mine[m], meant[m], atol=1e-6) for m in mine)
    finally:
        pipe.unload_adapter("per_part")

    lacking = te_alphas[0]
    path = tmp_path / "one_alpha_missing.safetensors"
    safetensors.torch.save_file({k: t for k, t in gen.state_dict.items() if k != lacking}, path)
    with pytest.raises(LoraFormatError, match="ambiguous") as e:
        pipe.load_adapter("one_missing", path)
    down = lacking.replace(".alpha", ".lora_down.weight")
    assert e.value.keys == [down] and down in str(e.value) and str(path) in str(e.value)
