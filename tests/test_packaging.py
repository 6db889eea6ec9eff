"""bentoml build works here, and the generated container file installs our pins and starts our service."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_bentoml_build_and_containerfile(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml = Path(sys.executable).with_name("bentoml")
    r = subprocess.run([str(bentoml), "build", "--output", "tag"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    tag = r.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("spo-serve:")
    code = (
        "import bentoml, sys; "
        f"bentoml.container.get_containerfile({tag!r}, output_path={str(tmp_path / 'Containerfile')!r})"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    containerfile = (tmp_path / "Containerfile").read_text()
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in containerfile
    assert 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]' in containerfile
    bento = next((tmp_path / "home" / "bentos" / "spo-serve").glob("*/bento.yaml")).parent
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["service"] == "service.service:SPOService"
    assert {e["name"] for e in meta["envs"]} >= {"SPO_MODEL", "SPO_DATA_DIR"}
    assert [r["route"] for r in meta["schema"]["routes"]][:2] == ["/generate", "/generate_batch"]
    reqs = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    ours = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in reqs and set(ours) <= set(reqs)
    for f in ["service/service.py", "spo_runtime/engine.py", "spo_runtime/configs/unet.json", "spo_runtime/sampler.py"]:
        assert (bento / "src" / f).is_file(), f
    assert not (bento / "src" / "tests").exists()
    assert "serve" in (bento / "env" / "docker" / "entrypoint.sh").read_text()
