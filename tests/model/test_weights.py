"""Pinned weights (spo_runtime/model/weights.py): the download plan offline, `python -m spo_runtime download
--dry-run` without the network, a start from a filled Hugging Face cache that makes no network call (the cache
written in the hub's own layout: blobs, snapshots/<commit> symlinks, refs), the fp16-fix VAE that stays when
SPO_BASE_MODEL names the hub base or a local mirror, and a local directory of fp16-variant files only."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import max_pixel_diff
from server import ROOT
from spo_runtime import ConfigError, ModelLoadError, Settings, load_pipeline
from spo_runtime.model import weights
from spo_runtime.model.fingerprint import params_hash
from spo_runtime.model.tiny import TINY_LORA_DIFFUSERS, VAE_CONFIG

LORA_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the LoRA is not pinned yet: the tests name a commit
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


# -- a Hugging Face cache in the hub's own layout ------------------------------------------------------------

def hub_snapshot(cache: Path, repo: str, commit: str, src: Path, patterns) -> list[str]:
    """Write `src`'s files that `patterns` select as the hub would cache them: content-addressed blobs, the
    snapshot of `commit` as relative symlinks to them, and refs/main naming the commit."""
    from huggingface_hub.utils import filter_repo_objects

    folder = cache / ("models--" + repo.replace("/", "--"))
    files = sorted(str(f.relative_to(src)) for f in src.rglob("*") if f.is_file())
    chosen = list(filter_repo_objects(files, allow_patterns=list(patterns)))
    for rel in chosen:
        data = (src / rel).read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return chosen


def save_fp16_tiny(tiny_dir: Path, directory: Path, variant: str | None = "fp16") -> None:
    """The tiny pipeline with fp16 weights, as `*.fp16.safetensors` (variant) or under the plain names."""
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    p.to(torch.float16)
    p.save_pretrained(directory, safe_serialization=True, variant=variant)


def fix_vae_dir(directory: Path) -> Path:
    """A stand-in for the fp16-fix VAE: same architecture as the tiny model's, other weights (so images differ)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(7)
    AutoencoderKL(**VAE_CONFIG).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def hub_home(tiny_dir, tmp_path_factory):
    """HF_HOME holding the pinned parts of sdxl-spo: the tiny model as SDXL base 1.0 (fp16 variant files, the base
    part's patterns), a different tiny VAE as the fp16-fix VAE, the tiny LoRA as the SPO LoRA at LORA_COMMIT."""
    root = tmp_path_factory.mktemp("hub")
    fp16 = root / "src-fp16"
    save_fp16_tiny(tiny_dir, fp16)
    cache = root / "home" / "hub"
    base = weights.PARTS["base"]
    got = hub_snapshot(cache, base.repo, base.revision, fp16, base.files + weights.PARTS["base_vae"].files)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in got and not any(f.endswith("/diffusion_pytorch_model.safetensors") for f in got)
    vae = weights.PARTS["vae"]
    hub_snapshot(cache, vae.repo, vae.revision, fix_vae_dir(root / "src-vae"), vae.files)
    lora = weights.PARTS["lora"]
    (root / "src-lora").mkdir()
    (root / "src-lora" / lora.files[0]).write_bytes((tiny_dir / TINY_LORA_DIFFUSERS).read_bytes())
    hub_snapshot(cache, lora.repo, LORA_COMMIT, root / "src-lora", lora.files)
    return root / "home", fp16, root / "src-vae"


class NoNetwork:
    """Every TCP/UDP connect and name lookup is recorded and refused (Unix sockets stay allowed)."""

    def __init__(self, monkeypatch):
        self.attempts: list = []
        real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self.attempts.append(("connect", address))
                raise OSError("network disabled by the test")
            return real_connect(sock, address)

        def getaddrinfo(host, *a, **kw):
            self.attempts.append(("getaddrinfo", host))
            raise socket.gaierror("network disabled by the test")

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        self._keep = (real_connect, real_getaddrinfo)


@pytest.fixture
def offline_hub(hub_home, monkeypatch):
    import huggingface_hub.constants as hc

    home, _, _ = hub_home
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return NoNetwork(monkeypatch)


# -- the plan -------------------------------------------------------------------------------------------------

def test_every_part_is_pinned_in_one_place_by_a_commit_or_refused():
    for part in weights.PARTS.values():
        assert part.revision is None or weights.COMMIT.fullmatch(part.revision), part.key
        assert part.revision_field in Settings.model_fields and part.revision_variable.startswith("SPO_")
        assert part.files and part.approx_bytes > 0
    plan = weights.plan(Settings(), "sdxl-spo")
    assert [i.part.key for i in plan] == ["base", "vae", "lora"]
    base, vae, lora = plan
    assert (base.repo, vae.repo, lora.repo) == ("stabilityai/stable-diffusion-xl-base-1.0", "madebyollin/sdxl-vae-fp16-fix",
                                                "SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep_LoRA")
    assert base.revision == "462165984030d82259a11f4367a4eed129e94a7b" and base.how == "pinned"
    assert "unet/*.fp16.safetensors" in base.part.files and not any(f.startswith("vae/") for f in base.part.files)
    # 7.5 GB estimated for the serving preset (parameters x bytes per parameter)
    assert 7.0e9 < sum(i.part.approx_bytes for i in plan) < 8.0e9
    if lora.revision is None:  # not pinned in this release: refused, naming the variable that pins it
        with pytest.raises(ConfigError, match="SPO_LORA_REVISION") as e:
            lora.require()
        assert e.value.variable == "SPO_LORA_REVISION" and "SPO_LORA" in e.value.message
    over = weights.plan(Settings(lora_revision="v1", base_revision=OTHER_COMMIT), "sdxl-spo")
    assert over[0].revision == OTHER_COMMIT and over[0].how == "SPO_BASE_REVISION"
    assert over[2].revision == "v1" and over[2].how == "SPO_LORA_REVISION"
    assert weights.plan(Settings(), "tiny") == [] and weights.plan(Settings(), "sdxl-random") == []
    assert [i.part.key for i in weights.plan(Settings(lora="/x.safetensors"), "sdxl-spo", train=True)] == \
        ["base", "vae", "spm", "spm_tokenizer"]


def test_the_plan_follows_local_sources_and_other_repositories(tmp_path):
    (tmp_path / "mirror").mkdir()
    local = weights.plan(Settings(base_model=str(tmp_path / "mirror"), lora="/l.safetensors"), "sdxl-spo")
    assert [i.part.key for i in local] == ["vae"]  # the fp16-fix VAE stays with a local base
    own = weights.plan(Settings(base_model=str(tmp_path / "mirror"), vae="base", lora="/l.safetensors"), "sdxl-spo")
    assert own == []
    hub_own = weights.plan(Settings(vae="base", lora="/l.safetensors"), "sdxl-spo")
    assert [i.part.key for i in hub_own] == ["base", "base_vae"]
    (tmp_path / "one.safetensors").write_bytes(b"")
    single = weights.plan(Settings(base_model=str(tmp_path / "one.safetensors"), lora="/l.safetensors"), "sdxl-spo")
    assert [i.part.key for i in single] == ["base_config", "vae"]
    other = weights.plan(Settings(base_model="someone/sdxl-finetune", lora="/l.safetensors"), "sdxl-spo")
    assert other[0].repo == "someone/sdxl-finetune" and other[0].revision is None
    with pytest.raises(ConfigError, match="someone/sdxl-finetune.*SPO_BASE_REVISION"):
        other[0].require()
    pinned = weights.plan(Settings(base_model="someone/sdxl-finetune", base_revision=OTHER_COMMIT, lora="/l.safetensors"),
                          "sdxl-spo")
    assert pinned[0].revision == OTHER_COMMIT
    with pytest.raises(ModelLoadError, match="SPO_BASE_MODEL.*neither a local"):
        weights.plan(Settings(base_model="/no/such/dir"), "sdxl-spo")
    with pytest.raises(ConfigError, match="SPO_BASE_REVISION"):
        Settings.from_env({"SPO_BASE_REVISION": "no spaces"})


def test_download_dry_run_prints_the_pinned_plan_without_the_network(monkeypatch, capsys):
    from spo_runtime.__main__ import main

    guard = NoNetwork(monkeypatch)
    monkeypatch.delenv("SPO_LORA_REVISION", raising=False)
    monkeypatch.setenv("SPO_MODEL", "auto")
    pinned = weights.PARTS["lora"].revision is not None
    assert main(["download", "--dry-run", "--json"]) == (0 if pinned else 2)
    out = capsys.readouterr()
    plan = json.loads(out.out)
    assert plan["preset"] == "sdxl-spo"
    rows = {r["part"]: r for r in plan["parts"]}
    assert rows["base"]["revision"] == weights.PARTS["base"].revision and rows["base"]["files"] == list(weights.PARTS["base"].files)
    assert rows["vae"]["revision"] == weights.PARTS["vae"].revision
    if not pinned:
        assert rows["lora"]["revision"] is None and "SPO_LORA_REVISION" in out.err
    monkeypatch.setenv("SPO_LORA_REVISION", LORA_COMMIT)
    assert main(["download", "--dry-run", "--train", "--dir", "/srv/models"]) == (0 if weights.PARTS["spm"].revision else 2)
    text = capsys.readouterr().out
    assert f"SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep_LoRA@{LORA_COMMIT} (SPO_LORA_REVISION)" in text
    assert "into /srv/models" in text and "spm_tokenizer" in text
    # --dir: one directory per part, the base's own VAE (SPO_VAE=base) inside the base's pipeline directory
    monkeypatch.setenv("SPO_VAE", "base")
    monkeypatch.setenv("SPO_LORA", "/x.safetensors")
    assert main(["download", "--dry-run", "--json", "--dir", "/srv/models"]) == 0
    dirs = {r["part"]: r["dir"] for r in json.loads(capsys.readouterr().out)["parts"]}
    assert dirs == {"base": "/srv/models/base", "base_vae": "/srv/models/base"}
    assert guard.attempts == []


def test_download_reports_each_part_of_a_filled_cache_offline(offline_hub, monkeypatch, capsys):
    """`download` with the parts cached and HF_HUB_OFFLINE: each part's commit and size, no network call."""
    from spo_runtime.__main__ import main

    monkeypatch.setenv("SPO_LORA_REVISION", LORA_COMMIT)
    monkeypatch.setenv("SPO_MODEL", "sdxl-spo")
    assert main(["download", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert {r["part"]: r["commit"] for r in done["parts"]} == {
        "base": weights.PARTS["base"].revision, "vae": weights.PARTS["vae"].revision, "lora": LORA_COMMIT}
    assert done["bytes"] == sum(r["bytes"] for r in done["parts"]) > 0
    assert offline_hub.attempts == []


# -- loading from the cache -----------------------------------------------------------------------------------

def test_an_offline_start_with_a_filled_cache_makes_no_network_call(hub_home, tmp_path):
    """A fresh process, as the server starts in the cluster: HF_HOME on the filled cache, HF_HUB_OFFLINE=1, every
    socket connect and name lookup refused and recorded; the preset loads its pinned parts and makes an image."""
    home, _, _ = hub_home
    script = r'''
import json, socket, sys
attempts = []
def refuse(*a, **kw):
    attempts.append(repr(a[1:] or a))
    raise OSError("network disabled by the test")
real_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        return refuse(self, address)
    return real_connect(self, address)
socket.socket.connect = connect
socket.getaddrinfo = refuse
from spo_runtime import Settings, load_pipeline
pipe = load_pipeline(Settings.from_env())
[r] = pipe.generate([{"prompt": "a fox", "seed": 3, "num_inference_steps": 2, "width": 256, "height": 256}])
print(json.dumps({"sources": pipe.info()["sources"], "adapters": [a["name"] for a in pipe.info()["adapters"]],
                  "size": list(r.image.size), "attempts": attempts}))
'''
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPO_", "HF_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", SPO_MODEL="sdxl-spo", SPO_DEVICE="cpu",
               SPO_LORA_REVISION=LORA_COMMIT, SPO_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["attempts"] == []
    assert out["size"] == [256, 256] and out["adapters"] == ["spo"]
    src = out["sources"]
    assert src["base"]["id"] == f"stabilityai/stable-diffusion-xl-base-1.0@{weights.PARTS['base'].revision}"
    assert src["vae"]["id"] == f"madebyollin/sdxl-vae-fp16-fix@{weights.PARTS['vae'].revision}"
    assert src["lora"]["id"] == f"SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep_LoRA@{LORA_COMMIT}/{weights.PARTS['lora'].files[0]}"
    assert len(src["base"]["sha256"]) == 64 and len(src["lora"]["sha256"]) == 64


def test_the_fp16_fix_vae_stays_when_SPO_BASE_MODEL_names_the_hub_base_or_a_mirror(offline_hub, hub_home):
    """SPO_BASE_MODEL set to the hub base id itself, or to a local mirror of fp16 files, keeps the preset's fp16-fix
    VAE (it used to drop it and change the images); SPO_VAE=base is the only way to the base's own VAE."""
    from diffusers import AutoencoderKL

    _, mirror, fix = hub_home
    fix_hash = params_hash(AutoencoderKL.from_pretrained(fix))
    own_hash = params_hash(AutoencoderKL.from_pretrained(mirror, subfolder="vae", variant="fp16", torch_dtype=torch.float32))
    assert fix_hash != own_hash
    common = dict(model="sdxl-spo", device="cpu", lora_revision=LORA_COMMIT)
    req = {"prompt": "a fox", "seed": 5, "num_inference_steps": 1, "width": 256, "height": 256}
    preset = load_pipeline(Settings(**common))
    assert params_hash(preset.vae) == fix_hash
    for name, extra in [("hub id", {"base_model": weights.PARTS["base"].repo}), ("mirror", {"base_model": str(mirror)})]:
        pipe = load_pipeline(Settings(**common, **extra))
        assert params_hash(pipe.vae) == fix_hash, name
        assert params_hash(pipe.unet) == params_hash(preset.unet), name
    own = load_pipeline(Settings(**common, vae="base"))
    assert params_hash(own.vae) == own_hash
    # the VAE is what the trap changed: same latents, other pixels
    assert max_pixel_diff(preset.generate([req])[0].image, own.generate([req])[0].image) > 10
    assert offline_hub.attempts == []


def test_an_unpinned_part_is_refused_before_loading(offline_hub, monkeypatch):
    if weights.PARTS["lora"].revision is not None:
        pytest.skip("the SPO LoRA is pinned")
    with pytest.raises(ConfigError, match="SPO_LORA_REVISION"):
        load_pipeline(Settings(model="sdxl-spo", device="cpu"))
    with pytest.raises(ModelLoadError, match="SPO_BASE_MODEL.*could not fetch"):  # the cache lacks this commit
        load_pipeline(Settings(model="sdxl-spo", device="cpu", base_revision=OTHER_COMMIT, lora_revision=LORA_COMMIT))


def test_a_local_directory_of_fp16_variant_files_loads(tiny_dir, hub_home, tmp_path):
    """What the init container and `download --dir` write (only `*.fp16.safetensors`) loads as a pipeline directory,
    and gives the image of the same fp16 weights saved under the plain names; with both present, fp32 picks the
    plain files and half precision the variant."""
    from spo_runtime.model.loading import _variant

    _, variant, _ = hub_home
    plain = tmp_path / "plain"
    save_fp16_tiny(tiny_dir, plain, variant=None)
    assert not list(variant.rglob("diffusion_pytorch_model.safetensors")) and list(variant.rglob("*.fp16.safetensors"))
    lora = str(tiny_dir / TINY_LORA_DIFFUSERS)
    req = {"prompt": "a castle", "seed": 2, "num_inference_steps": 2}
    a = load_pipeline(Settings(model="tiny", base_model=str(variant), lora=lora))
    b = load_pipeline(Settings(model="tiny", base_model=str(plain), lora=lora))
    assert params_hash(a.unet) == params_hash(b.unet) and params_hash(a.text_encoders[1]) == params_hash(b.text_encoders[1])
    assert max_pixel_diff(a.generate([req])[0].image, b.generate([req])[0].image) == 0
    both = tmp_path / "both" / "unet"
    both.mkdir(parents=True)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        (both / name).touch()
    assert _variant(both.parent, "unet", torch.float32) is None and _variant(both.parent, "unet", torch.float16) == "fp16"
    assert _variant(variant, "unet", torch.float32) == "fp16" and _variant(plain, "unet", torch.float16) is None
