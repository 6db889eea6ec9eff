"""Start the real `bentoml serve` in a subprocess and speak HTTP to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SPO_MODEL": "tiny", "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true", **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.ready_history: list[int] = []

    def start(self, timeout: float = 180.0) -> Server:
        self.log = open(self.log_path, "ab")
        bentoml = Path(sys.executable).with_name("bentoml")
        self.proc = subprocess.Popen(
            [str(bentoml), "serve", "service.service:SPOService", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                code = httpx.get(self.url + "/readyz", timeout=2).status_code
                self.ready_history.append(code)
                if code == 200:
                    return self
            except httpx.HTTPError:
                self.ready_history.append(0)
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout}s; see {self.log_path}")

    def stop(self, sig=signal.SIGTERM) -> None:
        """SIGTERM: graceful shutdown. SIGKILL: every process of the server at once (BentoML's workers
        run in sessions of their own, so a process-group kill would miss them), as a crash would."""
        import psutil

        if self.proc and self.proc.poll() is None:
            tree = [self.proc.pid] + [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
            targets = tree if sig == signal.SIGKILL else [self.proc.pid]
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                for pid in tree:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.wait(10)
        if getattr(self, "log", None):
            self.log.close()

    def metrics(self) -> dict[str, float]:
        """Prometheus text -> {'name{labels}': value} for our spo_ series."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("spo_"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
