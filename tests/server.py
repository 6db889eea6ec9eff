"""Start a real `bentoml serve <target>` in a subprocess and speak HTTP to it.

The one server harness of the repository: the test suite uses it for spo-serve, and the benchmarks
(benchmarks/bench_serving.py, soak.py, contention.py) for spo-serve and the baseline services under
benchmarks/baselines/.

For the test suite it also defines the servers that test modules share, as session-scoped pytest fixtures
(tests/conftest.py imports them): one start-up per configuration instead of one per module. A test that
changes a shared server's state (adapters, the default scale or adapter) puts it back, or uses names no
other test uses, so that the order of the tests does not matter.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SPO_TARGET = "service.service:SPOService"


STARTUPS: list[tuple[str, float]] = []  # (log file name, seconds to ready) of every start in this process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`bentoml serve target` on a loopback port, run from the repository root.

    env: added to this process's environment, over defaults (tiny preset, offline, no tracking).
    args: extra `bentoml serve` arguments. ready_path: polled until it answers 200; each poll's status
    (0: no answer) is kept in ready_history.
    """

    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None, *,
                 target: str = SPO_TARGET, args: Sequence[str] = (), ready_path: str = "/readyz"):
        self.target = target
        self.args = list(args)
        self.ready_path = ready_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SPO_MODEL": "tiny", "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true", **env}
        self.log_path = Path(log_path)
        # a BENTOML_HOME of its own: each `bentoml serve` empties its home's Prometheus multiprocess
        # directory at start, so servers sharing one would reset each other's metrics
        self.env.setdefault("BENTOML_HOME", str(self.log_path.parent / f".bentoml-home-{self.port}"))
        self.log = None
        self.proc: subprocess.Popen | None = None
        self.ready_history: list[int] = []
        self.startup_s: float | None = None  # from the process start to the first 200 of ready_path

    def start(self, timeout: float = 180.0) -> Server:
        self.log = open(self.log_path, "ab")
        bentoml = Path(sys.executable).with_name("bentoml")
        self.proc = subprocess.Popen(
            [str(bentoml), "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port), *self.args],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve {self.target} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                code = httpx.get(self.url + self.ready_path, timeout=2).status_code
                self.ready_history.append(code)
                if code == 200:
                    self.startup_s = time.time() - t0
                    STARTUPS.append((self.log_path.name, self.startup_s))
                    return self
            except httpx.HTTPError:
                self.ready_history.append(0)
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.target} not ready in {timeout}s; see {self.log_path}")

    def _tree(self) -> list[psutil.Process]:
        """bentoml's arbiter and every live descendant. BentoML (circus) starts each worker in a session
        of its own, so a process-group signal would miss them: the tree is walked by parent pid."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, grace: float = 60.0) -> None:
        """Stop the server and every process it started; safe to call twice.

        SIGTERM (default): graceful; only the arbiter is signalled, and it stops its workers, which
        finish what they are doing. SIGKILL: every process of the tree at once, as a crash would.
        No process outlives this call: if the arbiter is still up after `grace` seconds, the whole
        tree is SIGKILLed; a worker left behind by an arbiter that did exit gets a last `sig`, then
        SIGKILL after 5 s. psutil refuses to signal a pid since reused by an unrelated process.
        """
        if self.proc is not None and self.proc.poll() is None:
            tree = {p.pid: p for p in self._tree()}
            for p in tree.values():
                if sig == signal.SIGKILL or p.pid == self.proc.pid:
                    _signal(p, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self.proc.poll() is None:
                tree.update({p.pid: p for p in self._tree()})  # anything (re)spawned meanwhile
                time.sleep(0.1)
            if self.proc.poll() is None:  # the arbiter hung
                tree.update({p.pid: p for p in self._tree()})
                for p in tree.values():
                    _signal(p, signal.SIGKILL)
                self.proc.wait(10)
            left = [p for pid, p in tree.items() if pid != self.proc.pid and _alive(p)]
            if left and sig != signal.SIGKILL:
                for p in left:
                    _signal(p, sig)
                _wait_gone(left, 5.0)
            for p in left:
                _signal(p, signal.SIGKILL)
            _wait_gone(left, 10.0)
        if self.log is not None:
            self.log.close()
            self.log = None

    def metrics(self, prefix: str = "spo_") -> dict[str, float]:
        """Prometheus text -> {'name{labels}': value} for the series starting with `prefix`."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(prefix):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.1)


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


# -- servers shared by test modules (pytest fixtures) ---------------------------------------------

ADMIN_TOKEN = "standard-admin-token"
API_TOKEN = "standard-api-token"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
API_AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture(scope="session")
def adapter_dir(tiny_dir, tmp_path_factory):
    """SPO_ADAPTER_DIR of the standard server: the tiny LoRA (webui layout) as tiny_webui.safetensors and a
    conv-targeting adapter as sub/conv.safetensors; ../outside.safetensors lies outside it."""
    import torch

    from spo_runtime import Settings, load_pipeline
    from spo_runtime.lora.format import module_specs, save_lora_file
    from spo_runtime.training.adapter import init_lora_modules

    d = tmp_path_factory.mktemp("adapters")
    (d / "tiny_webui.safetensors").write_bytes((tiny_dir / "spo_tiny_lora_webui.safetensors").read_bytes())
    p = load_pipeline(Settings(model="tiny", base_model=str(tiny_dir), lora_fuse=False))
    g = torch.Generator().manual_seed(5)
    # the trainer's init, with a random up (the trainer's is zero) so that the adapter does something
    mods = init_lora_modules(module_specs(p.unet), ["resnets.0.conv1", "attn2.to_v", "ff.net.2"], 4, 4.0, g)
    for w in mods.values():
        w.up.normal_(0, 0.3, generator=g)
    (d / "sub").mkdir()
    save_lora_file(d / "sub" / "conv.safetensors", mods, "diffusers")
    (d.parent / "outside.safetensors").write_bytes((tiny_dir / "spo_tiny_lora_webui.safetensors").read_bytes())
    return d


@pytest.fixture(scope="session")
def standard_server(adapter_dir, tmp_path_factory):
    """The server of the HTTP tests whose configurations agree (tests/service/: test_service, test_adapter_files,
    test_openai, test_a1111, test_stream, test_contract, and test_train_service's first test): the tiny preset with
    SPO_ADMIN_TOKEN (ADMIN_TOKEN) and SPO_API_TOKEN (API_TOKEN: generation routes need it), the adapter_dir
    above, at most 16 waiting images and batches of 8, one torch thread (a training job it runs, and the
    test client, keep a core). `.data` is its SPO_DATA_DIR. Configurations that differ (faults, drain,
    restarts, two workers, other limits, Prometheus' port) start their own."""
    root = tmp_path_factory.mktemp("standard")
    env = {"SPO_DATA_DIR": str(root / "data"), "SPO_ADAPTER_DIR": str(adapter_dir), "SPO_ADMIN_TOKEN": ADMIN_TOKEN,
           "SPO_API_TOKEN": API_TOKEN, "SPO_MAX_QUEUE": "16", "SPO_MAX_BATCH": "8", "SPO_TORCH_THREADS": "1"}
    with Server(env, root / "server.log") as s:
        s.data = root / "data"
        yield s
