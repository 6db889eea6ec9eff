"""bentoml build works here, and the generated container file installs our pins, runs our service as a
non-root user with SPO_DATA_DIR on a writable volume, and exposes port 3000. Building and running the
image itself is `make container-test` (minutes, deploy/container/); these checks take seconds."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = ROOT / "deploy" / "container"


@pytest.mark.slow
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
    lines = [" ".join(line.split()) for line in containerfile.splitlines()]  # RUN lines may hold two spaces
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in containerfile
    assert 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]' in containerfile
    # The server runs as the non-root user bentoml: the last USER line, before the entrypoint.
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] == "USER bentoml", users
    assert lines.index(users[-1]) < lines.index('ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]')
    assert "EXPOSE 3000" in lines
    # SPO_DATA_DIR: set in the image, and created owned by bentoml by our setup script (run as root after
    # the packages) so that the volume mounted there is writable by the server.
    assert "ARG SPO_DATA_DIR=/home/bentoml/data" in lines and "ENV SPO_DATA_DIR=$SPO_DATA_DIR" in lines
    setup = [line for line in lines if re.fullmatch(r"RUN chmod \+x (\./env/docker/script__[0-9a-f]{32}) && \1", line)]
    assert len(setup) == 1, "the setup script (bentofile docker.setup_script) does not run"
    assert lines.index(setup[0]) < lines.index(users[-1])
    bento = next((tmp_path / "home" / "bentos" / "spo-serve").glob("*/bento.yaml")).parent
    script = bento / setup[0].split(" && ")[1]
    assert script.read_text() == (CONTAINER / "image-setup.sh").read_text()
    assert os.access(script, os.X_OK)
    assert '"${SPO_DATA_DIR:?}"' in script.read_text() and "chown bentoml:bentoml" in script.read_text()
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["service"] == "service.service:SPOService"
    envs = {e["name"]: e.get("value") for e in meta["envs"]}
    assert envs["SPO_DATA_DIR"] == "/home/bentoml/data" and envs["SPO_MODEL"] == "auto"
    assert [r["route"] for r in meta["schema"]["routes"]][:2] == ["/generate", "/generate_batch"]
    reqs = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    ours = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in reqs and set(ours) <= set(reqs)
    # the runtime only: none of the tests' or benchmarks' packages reach the image
    pins = _pins(bento / "env" / "python" / "requirements.txt")
    assert "accelerate" in pins and not DEV_ONLY & set(pins), DEV_ONLY & set(pins)
    assert not set(_pins(ROOT / "requirements-dev.txt")) & set(pins)
    assert (bento / "src" / "spo_runtime" / "model" / "weights.py").is_file()  # the image carries the pins
    for f in ["service/service.py", "spo_runtime/engine/engine.py", "spo_runtime/configs/unet.json", "spo_runtime/sampling/sampler.py",
              "service/ui/index.html", "service/ui/app.js", "service/ui/style.css"]:  # the last three: GET /ui's files
        assert (bento / "src" / f).is_file(), f
    assert not (bento / "src" / "tests").exists()
    assert not (bento / "src" / "deploy").exists()  # nor the container scripts or their build outputs
    assert "serve" in (bento / "env" / "docker" / "entrypoint.sh").read_text()


def test_container_variant_changes_only_base_and_torch(tmp_path):
    """make container's CPU/Debian-base variant: bentofile.yaml with another base image, and requirements.txt
    with torch pinned to the given wheel's exact version and the build-time wheel directory."""
    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.touch()
    out = tmp_path / "variant"
    r = subprocess.run(
        [sys.executable, str(CONTAINER / "variant.py"), str(out), "--base-image", "localhost/spo-serve-base:bookworm",
         "--torch-wheel", str(wheel)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    ours = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    variant = yaml.safe_load((out / "bentofile.yaml").read_text())
    assert variant["docker"]["base_image"] == "localhost/spo-serve-base:bookworm"
    assert variant["docker"]["setup_script"] == ours["docker"]["setup_script"]
    assert variant["python"]["requirements_txt"] != ours["python"]["requirements_txt"]
    for key in ("service", "name", "include", "exclude", "envs"):
        assert variant[key] == ours[key], key
    reqs = (out / "requirements.txt").read_text().splitlines()
    base = (ROOT / ours["python"]["requirements_txt"]).read_text().splitlines()
    assert reqs[0] == "--find-links /opt/spo-wheels" and "torch==2.13.0+cpu" in reqs
    assert set(reqs) - set(base) == {"--find-links /opt/spo-wheels", "torch==2.13.0+cpu"}
    assert set(base) - set(reqs) == {"torch==2.13.0"}


def test_container_scripts_parse_and_stay_out_of_make_test():
    for script in ("lib.sh", "base.sh", "build.sh", "test.sh"):
        r = subprocess.run(["bash", "-n", str(CONTAINER / script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^container:", makefile, re.M) and re.search(r"^container-test:", makefile, re.M)
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "container" not in test_recipe


DEV_ONLY = {"pytest", "locust", "schemathesis", "matplotlib", "hypothesis", "peft", "kubernetes-validate", "openai",
            "webuiapi", "httpx-sse", "playwright"}


def _pins(path: Path) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version
    return out


def test_runtime_and_development_requirements_are_apart():
    """requirements.txt is what the server imports and everything those packages need (per their metadata here);
    requirements-dev.txt adds the tests' and benchmarks' packages and repeats none of the runtime's."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    run, dev = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-dev.txt")
    assert not DEV_ONLY & set(run), DEV_ONLY & set(run)
    assert DEV_ONLY <= set(dev) and not set(run) & set(dev)
    assert {"accelerate", "huggingface-hub", "bentoml", "torch", "diffusers"} <= set(run)
    # every third-party module spo_runtime/ and service/ import comes from a runtime pin (optional: xformers)
    imported = set()
    for f in list((ROOT / "spo_runtime").rglob("*.py")) + list((ROOT / "service").rglob("*.py")):
        imported |= set(re.findall(r"^\s*(?:from|import) ([A-Za-z_]\w*)", f.read_text(), re.M))
    dists = md.packages_distributions()
    third = {canonicalize_name(d) for m in imported if m in dists for d in dists[m]} - {"spo-serve"}
    assert third - {"xformers"} <= set(run), third - set(run)
    # and the runtime pins are closed: each one's own requirements (for this platform) are pinned too
    for name in run:
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                assert canonicalize_name(r.name) in run or canonicalize_name(r.name) == "setuptools", (name, str(r))


def test_pyproject_bounds_scripts_and_the_makefile():
    import tomllib

    import torch

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=!~ ]", d)[0]: d for d in project["dependencies"]}
    assert deps["torch"] == "torch>=2.7"  # the portable compile cache of spo_runtime/speed/compiling.py
    assert hasattr(torch.compiler, "save_cache_artifacts") and hasattr(torch.compiler, "load_cache_artifacts")
    assert "accelerate" in deps and "huggingface_hub" in deps
    assert project["scripts"]["spo-serve"] == "spo_runtime.__main__:serve"
    makefile = (ROOT / "Makefile").read_text()
    serve = re.search(r"^serve:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "$(BIN)/spo-serve --host $(HOST) --port $(PORT)" in serve
    assert re.search(r"^HOST \?= 0\.0\.0\.0$", makefile, re.M) and re.search(r"^PORT \?= 3000$", makefile, re.M)
    assert re.search(r"^test: \$\(DEV_STAMP\) deps-system$", makefile, re.M)
    dev = re.search(r"^\$\(DEV_STAMP\):.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "-r requirements.txt -r requirements-dev.txt" in dev
    runtime = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "requirements-dev" not in runtime


def test_spo_serve_runs_bentoml_serve_with_make_serves_defaults(monkeypatch):
    from spo_runtime.__main__ import serve_command

    for var in ("HOST", "PORT", "SPO_TORCH_THREADS", "BENTOML_DO_NOT_TRACK"):
        monkeypatch.delenv(var, raising=False)
    cmd, env, root = serve_command(["--port", "3001"])
    assert cmd[0].endswith("bentoml") and cmd[1:] == ["serve", "service.service:SPOService", "--host", "0.0.0.0", "--port", "3001"]
    assert root == ROOT and env["SPO_TORCH_THREADS"] == "1" and env["BENTOML_DO_NOT_TRACK"] == "true"
    monkeypatch.setenv("SPO_TORCH_THREADS", "4")
    cmd, env, _ = serve_command(["--host", "127.0.0.1", "--reload"])
    assert cmd[-4:] == ["127.0.0.1", "--port", "3000", "--reload"] and env["SPO_TORCH_THREADS"] == "4"
