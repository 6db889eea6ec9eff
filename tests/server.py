"""Start a real `bentoml serve <target>` in a subprocess and speak HTTP to it.

The one server harness of the repository: the test suite uses it for spo-serve, and the benchmarks
(benchmarks/bench_serving.py) for spo-serve and the baseline services under benchmarks/baselines/.
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

ROOT = Path(__file__).resolve().parents[1]
SPO_TARGET = "service.service:SPOService"


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
