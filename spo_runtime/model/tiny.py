"""The `tiny` preset: a small SDXL-shaped model built in code, deterministically, with no download.

Same classes as SDXL (UNet2DConditionModel with text_time conditioning, CLIPTextModel +
CLIPTextModelWithProjection, AutoencoderKL with an 8x latent scale) at toy widths, a byte-level BPE
tokenizer whose vocabulary is defined here, and a small LoRA on SPO's target layers. 64x64 images.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from spo_runtime.lora.format import LoraFile, LoraModuleWeights, save_lora_file
from spo_runtime.model.fingerprint import lora_bytes_hash
from spo_runtime.sampling.sampler import SDXL_SCHEDULER_CONFIG

TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
TIME_EMBED_DIM = 8

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' hidden states, concatenated
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    # 6 add_time_ids (original size, crop, target size) x TIME_EMBED_DIM + pooled projection
    projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_PROJECTION,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32),  # 4 blocks: 3 downsamples, the usual 8x latent scale
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.13025,
    force_upcast=False,
)

LORA_RANK = 4
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# Words that become whole tokens; anything else falls back to characters.
_WORDS = """
a an the of and in on with at by for to from under over beside near into through
photo painting drawing illustration portrait landscape sketch render watercolor oil digital concept art
cat dog fox owl wolf horse bird fish dragon robot astronaut knight wizard girl boy woman man child
forest mountain river lake ocean sea beach desert city street castle village garden field sky space
snowy sunny rainy foggy misty night day sunset sunrise morning evening winter summer autumn spring
red orange yellow green blue purple pink white black golden silver dark bright colorful pastel
beautiful detailed intricate cinematic dramatic soft sharp highly realistic photorealistic epic
lighting light shadow volumetric glow neon studio bokeh 4k 8k hdr masterpiece best quality
small large tiny giant old young ancient futuristic cyberpunk steampunk fantasy magical cute
sitting standing running flying walking wearing holding looking playing reading
hat coat dress armor sword book flower flowers tree trees house car boat train cloud clouds moon sun stars
blurry ugly low worst bad deformed lowres jpeg artifacts text watermark
""".split()


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the tiny tokenizer: bytes, bytes + '</w>', whole-word merges, specials last."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if merged not in seen:
                seen.add(merged)
                tokens.append(merged)
                merges.append((parts[0], parts[1]))
            parts = [merged] + parts[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # as in CLIP: the end token has the highest id
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """(tokenizer, tokenizer_2); the second pads with '!' as SDXL's second tokenizer does."""
    vocab, merges = tiny_vocab()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
    tok2 = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token="!")
    return tok, tok2


def text_encoder_config(projection: bool) -> CLIPTextConfig:
    vocab, _ = tiny_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if projection else "quick_gelu",
        projection_dim=TEXT_PROJECTION,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


def build_components(seed: int = 0) -> dict:
    """The tiny model's components with fixed-seed random weights (float32, CPU)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_encoder_config(projection=False))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(projection=True))
    tokenizer, tokenizer_2 = build_tokenizers()
    for m in (unet, vae, text_encoder, text_encoder_2):
        m.eval().requires_grad_(False)
    return dict(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
    )


def build_lora_state(unet: torch.nn.Module, seed: int = 1, rank: int = LORA_RANK, targets=LORA_TARGETS) -> dict:
    """A random LoRA on `targets` of every attention, as {module: (down, up, alpha)}; alpha = rank (scale 1).

    Sized so that scale 1.0 visibly changes the image without swamping the base weights.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in unet.named_modules():
        if not isinstance(mod, torch.nn.Linear) or not any(name.endswith("." + t) for t in targets):
            continue
        if ".attn1." not in name and ".attn2." not in name:
            continue
        down = torch.randn(rank, mod.in_features, generator=g) / mod.in_features**0.5
        up = torch.randn(mod.out_features, rank, generator=g) * (0.6 / rank**0.5)
        out[name] = (down, up, float(rank))
    return out


TINY_LORA_WEBUI = "spo_tiny_lora_webui.safetensors"
TINY_LORA_DIFFUSERS = "spo_tiny_lora_diffusers.safetensors"


def tiny_lora_file(unet: torch.nn.Module) -> LoraFile:
    """The built-in tiny LoRA; its sha256 is that of the diffusers-layout file save-tiny writes."""
    modules = {m: LoraModuleWeights(m, d, u, a) for m, (d, u, a) in build_lora_state(unet).items()}
    return LoraFile("diffusers", modules, sha256=lora_bytes_hash(modules))


def save_tiny(directory: str | Path) -> dict[str, str]:
    """Write the tiny model as a diffusers SDXL pipeline directory, plus its LoRA in both layouts."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    directory = Path(directory)
    parts = build_components()
    pipe = StableDiffusionXLPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
        tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"], unet=parts["unet"],
        scheduler=DDIMScheduler.from_config(SDXL_SCHEDULER_CONFIG), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    lora = tiny_lora_file(parts["unet"])
    return {
        "pipeline": str(directory),
        "webui": save_lora_file(directory / TINY_LORA_WEBUI, lora.modules, "webui"),
        "diffusers": save_lora_file(directory / TINY_LORA_DIFFUSERS, lora.modules, "diffusers"),
    }
