"""The real weights, pinned: each hub part (repository, files, revision) is declared here and only here.

Everything that fetches weights reads these pins: the loader (`loading.py`, `presets.hub_file`), the trainer's
step-aware preference model (`preference/spm.py`, `preference/spm_source.py`), `python -m spo_runtime download` and `make weights`,
the Kubernetes init container (it runs that command) and the container image (which carries this file).

- A revision is a full commit id, so a warm cache starts without asking the hub anything, and a restart never
  picks up a different file. `SPO_<PART>_REVISION` (Settings) overrides a pin on purpose; any hub revision
  (commit, tag or branch) is accepted there, and /info reports the commit it resolved to.
- A part whose `revision` is None is not pinned in this release (its commit could not be read when the pins
  were written): fetching it is refused, naming the variable to set, until someone fills the pin here or the
  user sets that variable. Nothing is fetched from a floating `main` by accident.
- A source the user points at (`SPO_BASE_MODEL`, `SPO_VAE`) that is a local path is used as it is; one that
  names another hub repository needs its `SPO_*_REVISION`.

`approx_bytes` is an estimate for the download plan (parameters x bytes per parameter of the files fetched);
`download` prints the real sizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from spo_runtime.errors import ConfigError, ModelLoadError
from spo_runtime.settings import Settings

COMMIT = re.compile(r"[0-9a-f]{40}")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PIN_FILE = "spo_runtime/model/weights.py"
# SPO_VAE=base: the base pipeline's own VAE instead of the preset's fp16-fix VAE
VAE_FROM_BASE = "base"

_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
_BASE_REVISION = "462165984030d82259a11f4367a4eed129e94a7b"
_BASE_CONFIGS = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*",
                 "unet/config.json", "text_encoder/config.json", "text_encoder_2/config.json")


@dataclass(frozen=True)
class Part:
    key: str
    repo: str
    revision: str | None  # a commit id; None: not pinned in this release (fetching is refused)
    files: tuple[str, ...]  # allow_patterns of a snapshot, or the one file of a file part
    approx_bytes: int
    what: str
    revision_field: str  # the Settings field (SPO_*_REVISION) that overrides `revision`
    local_variable: str  # the variable that points at a local copy instead of the hub
    single_file: bool = False

    @property
    def revision_variable(self) -> str:
        return Settings.variable(self.revision_field)


PARTS: dict[str, Part] = {p.key: p for p in (
    # SDXL base 1.0, the fp16 variant files only (what the fp16/bf16 GPU path loads; fp32 upcasts them).
    # 2.567 G UNet + 0.123 G + 0.695 G text-encoder parameters x 2 bytes.
    Part("base", _BASE_REPO, _BASE_REVISION,
         _BASE_CONFIGS + ("unet/*.fp16.safetensors", "text_encoder/*.fp16.safetensors", "text_encoder_2/*.fp16.safetensors"),
         6_771_000_000, "SDXL base 1.0 (UNet and both text encoders, fp16 files)", "base_revision", "SPO_BASE_MODEL"),
    # The base's own VAE, only with SPO_VAE=base (83.7 M parameters x 2 bytes).
    Part("base_vae", _BASE_REPO, _BASE_REVISION, ("vae/config.json", "vae/*.fp16.safetensors"),
         167_000_000, "SDXL base 1.0's own VAE (SPO_VAE=base)", "base_revision", "SPO_VAE"),
    # The structure of a single-file SPO_BASE_MODEL: configs, tokenizers and scheduler, no weights.
    Part("base_config", _BASE_REPO, _BASE_REVISION, _BASE_CONFIGS + ("vae/config.json",),
         5_000_000, "SDXL base 1.0's configs and tokenizers (structure of a single-file checkpoint)",
         "base_revision", "SPO_BASE_MODEL_CONFIG"),
    # The stock SDXL VAE overflows in fp16; this one does not. fp32 file: 83.7 M parameters x 4 bytes.
    Part("vae", "madebyollin/sdxl-vae-fp16-fix", "207b116dae70ace3637169f1ddd2434b91b3a8cd",
         ("config.json", "diffusion_pytorch_model.safetensors"),
         335_000_000, "the fp16-fix SDXL VAE", "vae_revision", "SPO_VAE"),
    # The SPO LoRA (rank 64 on 560 layers: 92.9 M parameters x 4 bytes).
    Part("lora", "SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep_LoRA", None,
         ("spo_sdxl_10ep_4k-data_lora_diffusers.safetensors",),
         372_000_000, "the SPO LoRA (diffusers layout)", "lora_revision", "SPO_LORA", single_file=True),
    # Training only: the step-aware preference model (1.31 G parameters x 4 bytes) and its CLIP tokenizer.
    Part("spm", "SPO-Diffusion-Models/Step-Aware_Preference_Models", None,
         ("sdxl_step-aware_preference_model.bin",),
         5_240_000_000, "the step-aware preference model (training)", "spm_revision", "SPO_SPM", single_file=True),
    Part("spm_tokenizer", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "1c2b8495b28150b8a4922ee1c8edee224c284c0c",
         ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"),
         4_000_000, "the preference model's CLIP tokenizer (training)", "spm_tokenizer_revision", "SPO_SPM_TOKENIZER"),
)}


@dataclass(frozen=True)
class Fetch:
    """One part to fetch: the repository (the part's, or the one SPO_BASE_MODEL / SPO_VAE names) at a revision."""

    part: Part
    repo: str
    revision: str | None
    how: str  # where the revision comes from: "pinned" or the SPO_*_REVISION variable

    @property
    def pinned(self) -> bool:
        return self.revision is not None

    def refusal(self) -> str:
        if self.repo != self.part.repo:
            return (f"{self.part.local_variable} names the hub repository {self.repo!r}, which {PIN_FILE} does not pin: "
                    f"set {self.part.revision_variable} to the commit to load (or a branch, on purpose), or point "
                    f"{self.part.local_variable} at a local copy")
        return (f"{self.part.what}, {self.repo}, is not pinned in this release: set {self.part.revision_variable} to a "
                f"commit of {self.repo} (https://huggingface.co/{self.repo}/commits/main; or `main` to follow it on "
                f"purpose), or point {self.part.local_variable} at a local file")

    def require(self) -> str:
        if self.revision is None:
            raise ConfigError(self.part.revision_variable, self.refusal())
        return self.revision


def is_local(source: str | None) -> bool:
    return bool(source) and Path(source).expanduser().exists()


def is_single_file(source: str) -> bool:
    """A single-file checkpoint the loader accepts (others, pickles among them, are refused by the loader)."""
    return Path(source).is_file() and source.lower().endswith(".safetensors")


def fetch_for(key: str, settings: Settings, repo: str | None = None) -> Fetch:
    """The Fetch of part `key`, from `repo` (default: the part's own), with the settings' revision override."""
    part = PARTS[key]
    repo = repo or part.repo
    override = getattr(settings, part.revision_field)
    if override:
        return Fetch(part, repo, override, part.revision_variable)
    revision = part.revision if repo == part.repo else None
    return Fetch(part, repo, revision, "pinned" if revision else "not pinned")


def _hub_source(value: str, variable: str) -> str:
    if not HUB_ID.fullmatch(value):
        raise ModelLoadError(f"{variable}: {value!r} is neither a local file or directory nor a hub repository id")
    return value


def plan(settings: Settings, preset: str, train: bool = False) -> list[Fetch]:
    """What `preset` (sdxl-spo, tiny, sdxl-random) loads from the hub under `settings`, plus the preference model's
    parts with `train`. Local sources (SPO_BASE_MODEL, SPO_VAE, SPO_LORA, SPO_SPM, SPO_SPM_TOKENIZER) fetch nothing."""
    out: list[Fetch] = []
    base, vae = settings.base_model, settings.vae
    base_hub = None if is_local(base) else (_hub_source(base, "SPO_BASE_MODEL") if base else None)
    if preset == "sdxl-spo":
        if not is_local(base):
            out.append(fetch_for("base", settings, base_hub))
        elif is_single_file(base) and not settings.base_model_config:
            out.append(fetch_for("base_config", settings))
        if vae == VAE_FROM_BASE:
            if not is_local(base):
                out.append(fetch_for("base_vae", settings, base_hub))
        elif not is_local(vae):
            out.append(fetch_for("vae", settings, _hub_source(vae, "SPO_VAE") if vae else None))
        if not settings.lora:
            out.append(fetch_for("lora", settings))
    elif preset == "tiny":  # built in code; hub sources only when SPO_BASE_MODEL / SPO_VAE name them
        if base_hub:
            out.append(fetch_for("base", settings, base_hub))
        elif is_local(base) and is_single_file(base) and not settings.base_model_config:
            out.append(fetch_for("base_config", settings))
        if vae and vae != VAE_FROM_BASE and not is_local(vae):
            out.append(fetch_for("vae", settings, _hub_source(vae, "SPO_VAE")))
    if train:
        if not settings.spm:
            out.append(fetch_for("spm", settings))
        if not settings.spm_tokenizer:
            out.append(fetch_for("spm_tokenizer", settings))
    return out


def download(item: Fetch, local_dir: str | Path | None = None) -> Path:
    """The part's local path: a snapshot directory (or the one file of a file part) in the Hugging Face cache
    (HF_HOME), or under `local_dir`. A pinned commit whose files are cached is answered without the network;
    HF_HUB_OFFLINE=1 never asks it. Raises ConfigError for an unpinned part, ModelLoadError when fetching fails."""
    revision = item.require()
    from huggingface_hub import hf_hub_download, snapshot_download

    part = item.part
    try:
        if part.single_file:
            path = hf_hub_download(item.repo, part.files[0], revision=revision,
                                   local_dir=str(local_dir) if local_dir else None)
        else:
            path = snapshot_download(item.repo, revision=revision, allow_patterns=list(part.files),
                                     local_dir=str(local_dir) if local_dir else None)
    except Exception as e:  # offline without the files, gated, missing revision, disk full
        raise ModelLoadError(
            f"{part.local_variable}: could not fetch {part.what} from the Hugging Face hub ({item.repo} at {revision}; "
            f"{type(e).__name__}: {e}); `python -m spo_runtime download` fills the cache, or set {part.local_variable} "
            f"to a local copy") from e
    return Path(path)


def resolved_commit(path: str | Path, item: Fetch) -> str:
    """The commit a cache path belongs to (`.../snapshots/<commit>/...`), else the revision asked for."""
    parts = Path(path).parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts) and COMMIT.fullmatch(parts[i + 1]):
            return parts[i + 1]
    return str(item.revision)


def hub_id(item: Fetch, path: str | Path) -> str:
    """`repo@commit` (a file part: `repo@commit/file`): what /info reports for a part fetched from the hub."""
    ident = f"{item.repo}@{resolved_commit(path, item)}"
    return f"{ident}/{item.part.files[0]}" if item.part.single_file else ident


def locate(key: str, source: str | None, settings: Settings) -> tuple[str, str]:
    """(local path, id for /info) of a source: `source` itself when it is a local path, else part `key` of the hub
    repository `source` names (default: the part's own), fetched at its pinned or overridden revision."""
    if is_local(source):
        return str(Path(source).expanduser()), str(source)
    variable = PARTS[key].local_variable
    item = fetch_for(key, settings, _hub_source(source, variable) if source else None)
    path = download(item)
    return str(path), hub_id(item, path)


def local_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and ".cache" not in f.relative_to(path).parts)


def env_settings() -> Settings:
    """The revision overrides (SPO_*_REVISION) alone, for a caller that holds no Settings (the trainer's SPM)."""
    import os

    names = {p.revision_variable for p in PARTS.values()}
    return Settings.from_env({k: v for k, v in os.environ.items() if k in names})
