"""Start a real `bentoml serve <target>` in its own process group on a free loopback port.

Same approach as tests/server.py, generalised to any service target (ours or a baseline).
"""

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
    def __init__(self, target: str, env: dict[str, str], log_path: Path, port: int | None = None):
        self.target = target
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true", **env}
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.log = None
        self.stopped = False

    def start(self, timeout: float = 300.0) -> Server:
        self.log = open(self.log_path, "ab")
        bentoml = Path(sys.executable).with_name("bentoml")
        self.proc = subprocess.Popen(
            [str(bentoml), "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve {self.target} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{self.target} not ready in {timeout}s; see {self.log_path}")

    def stop(self, sig=signal.SIGTERM, grace: float = 20.0) -> None:
        """Stop bentoml's arbiter and every process it started.

        circus starts each service worker with setsid(), so the workers are not in the arbiter's
        process group: we note all descendants first, signal the group, then signal and finally
        SIGKILL every noted descendant still alive (a worker with a dependency was seen hanging on
        SIGTERM). Processes are identified by (pid, start time), so a reused pid is never touched.
        """
        if self.proc is not None and not self.stopped:
            self.stopped = True
            procs = set(_descendants(self.proc.pid))
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, sig)  # the arbiter stops its watchers gracefully
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace
            while time.time() < deadline and self.proc.poll() is None:
                procs |= set(_descendants(self.proc.pid))  # anything (re)spawned meanwhile
                time.sleep(0.2)
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
            left = [p for p in procs if _alive(p)]
            for p in left:
                _signal(p, sig)
            deadline = time.time() + 5
            while time.time() < deadline and any(_alive(p) for p in left):
                time.sleep(0.2)
            for p in left:
                _signal(p, signal.SIGKILL)
        if self.log is not None:
            self.log.close()
            self.log = None

    def pids(self) -> list[int]:
        return [p for p, _ in _descendants(self.proc.pid)] if self.proc and not self.stopped else []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of every live descendant of `root` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        for c in children.get(stack.pop(), []):
            st = _start_time(c)
            if st is not None:
                out.append((c, st))
                stack.append(c)
    return out


def _alive(p: tuple[int, str]) -> bool:
    st = _start_time(p[0])
    if st is None or st != p[1]:
        return False
    try:
        with open(f"/proc/{p[0]}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(p: tuple[int, str], sig) -> None:
    if _alive(p):
        try:
            os.kill(p[0], sig)
        except ProcessLookupError:
            pass
