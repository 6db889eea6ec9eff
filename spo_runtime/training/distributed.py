"""Data-parallel SPO training: which devices a job's ranks use, the collectives the trainer needs, and
the launcher that starts the ranks and watches them.

- `resolve_world(nproc, settings)`: how many ranks and on which devices. `nproc` (a job's config)
  wins over SPO_TRAIN_NPROC; unset, a CUDA job takes every training GPU (SPO_TRAIN_DEVICES, else
  every visible GPU) and a CPU job 1. A CUDA job never runs two ranks on one GPU.
- `Group`: this process's rank in the job. Gradients are summed with one all-reduce per optimiser
  step (NCCL on GPUs, gloo on CPU, through `torch.distributed`); with one rank every collective is a
  local no-op and torch.distributed is never initialised.
- `launch(...)`: starts N rank processes (torch.multiprocessing, spawn) that meet at a file
  rendezvous, forwards a stop request (SIGTERM) to them, and when one rank dies (an exception, a
  signal) stops the others and reports which rank failed and why: a job fails as a whole. The ranks'
  environment has no SPO_ADMIN_TOKEN or SPO_API_TOKEN, and their collectives bind to loopback
  (`loopback_env`): jobs are single-host.
"""

from __future__ import annotations

import datetime
import multiprocessing.connection
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from spo_runtime.errors import InvalidRequestError, failure_reason
from spo_runtime.fsutil import atomic_write

T = TypeVar("T")

ERROR_FILE = "rank-{rank}.error"  # one line: why rank N failed (written by the rank itself)


def _devices_of(text: str) -> list[str]:
    out = []
    for item in (t.strip() for t in text.split(",")):
        out.append(item if item == "cpu" or item.startswith("cuda:") else f"cuda:{item}")
    return out


def resolve_world(nproc: int | None, settings, field: str = "config.nproc") -> tuple[int, list[str]]:
    """(ranks, device of each rank) for a training job under `settings` (its SPO_TRAIN_* and the
    training device: SPO_TRAIN_DEVICE, else SPO_DEVICE, else cuda when available). Raises
    InvalidRequestError naming `field` when a CUDA job asks for more ranks than training GPUs."""
    if settings.train_devices:
        pool = _devices_of(settings.train_devices)
    else:
        dev = settings.train_device or settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dev == "cuda":
            pool = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        else:
            pool = [dev]
    cuda = any(d.startswith("cuda") for d in pool)
    if cuda and not all(d.startswith("cuda") for d in pool):
        raise InvalidRequestError("SPO_TRAIN_DEVICES", "must list GPUs only, or be cpu")
    n = nproc or settings.train_nproc or (len(pool) if cuda else 1)
    if cuda:
        if n > len(pool):
            raise InvalidRequestError(field, f"must be at most {len(pool)}, the training GPUs ({', '.join(pool)}; "
                                             f"SPO_TRAIN_DEVICES), got {n}")
        return n, pool[:n]
    return n, [pool[0]] * n


class Group:
    """This process's place in a data-parallel training job. With world 1, everything is local.
    `device`: the rank's device (None: the one the settings give)."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | str | None = None):
        self.rank, self.world = rank, world
        self.device = torch.device(device) if device is not None else None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks of a few numbers (statistics, counts), in float64."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_concat(self, values: Sequence[int]) -> tuple[list[int], int]:
        """Every rank's list of integers, concatenated in rank order, and where this rank's begins."""
        if not self.distributed:
            return list(values), 0
        import torch.distributed as dist

        counts = torch.zeros(self.world, dtype=torch.float64, device=self._comm_device())
        counts[self.rank] = len(values)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        counts = [int(c) for c in counts.tolist()]
        offset = sum(counts[: self.rank])
        out = torch.zeros(sum(counts), dtype=torch.float64, device=self._comm_device())
        out[offset : offset + len(values)] = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return [int(v) for v in out.tolist()], offset

    def any(self, flag: bool) -> bool:
        """Whether any rank's `flag` is set (every rank gets the same answer)."""
        if not self.distributed:
            return bool(flag)
        return self.all_sum([1.0 if flag else 0.0])[0] > 0

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the parameters' gradients over the ranks, in one all-reduce of one flat buffer. A rank
        with no gradient for a parameter (no pairs this step) contributes zeros."""
        if not self.distributed:
            return
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        i = 0
        for p in params:
            n = p.numel()
            g = flat[i : i + n].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            i += n

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


LOCAL = Group()
SECRETS = ("SPO_ADMIN_TOKEN", "SPO_API_TOKEN")  # a rank answers no request: never in its environment


def loopback_env() -> dict[str, str]:
    """What keeps a single-host job's collectives on loopback: MASTER_ADDR=127.0.0.1, and the loopback
    interface for the sockets of gloo (GLOO_SOCKET_IFNAME) and NCCL (NCCL_SOCKET_IFNAME), which otherwise
    bind to the address the host name resolves to; no rank listens on a network interface."""
    env = {"MASTER_ADDR": "127.0.0.1"}
    try:
        names = [n for _, n in socket.if_nameindex()]
    except OSError:
        names = []
    lo = "lo" if "lo" in names else next((n for n in names if n.startswith("lo")), None)
    if lo:
        env.update(GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)
    return env


def join_group(rank: int, world: int, rendezvous: str | Path | None, device: str | None, timeout_s: float = 600.0) -> Group:
    """Join the job's process group: NCCL on GPUs, gloo on CPU, meeting at a shared file."""
    if world == 1:
        return Group(0, 1, device)
    import torch.distributed as dist

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    os.environ.update(loopback_env())  # read when the process group is made (launch set them already)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"file://{Path(rendezvous).resolve()}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return Group(rank, world, dev)


def run_rank(rank: int, world: int, rendezvous: str | Path | None, device: str | None, error_dir: str | Path,
             body: Callable[[Group], T]) -> T:
    """One rank's life: join the job's group (world 1: a local group on `device`, None: the settings'),
    return `body(group)`, leave the group. In a job of several ranks an error is first written to
    `error_dir/rank-N.error` (one line, OOM marked) for `launch` to report, then raised."""
    group = None
    try:
        group = join_group(rank, world, rendezvous, device)
        return body(group)
    except BaseException as e:
        if world > 1:
            atomic_write(Path(error_dir) / ERROR_FILE.format(rank=rank), failure_reason(e).encode())
        raise
    finally:
        if group is not None:
            group.close()


@dataclass
class LaunchResult:
    ok: bool
    reason: str | None  # why the job failed: the first rank(s) to fail, with their error or signal
    exit_codes: list[int | None]


def _describe(rank: int, code: int | None, error_dir: Path | None) -> str:
    msg = None
    if error_dir is not None:
        f = error_dir / ERROR_FILE.format(rank=rank)
        if f.exists():
            msg = f.read_text().strip() or None
    if msg:
        return f"rank {rank}: {msg}"
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"rank {rank} was killed by signal {-code} ({name})"
    return f"rank {rank} exited with code {code}"


def launch(nproc: int, target: Callable, args: tuple, rendezvous: str | Path, error_dir: str | Path | None = None,
           should_stop: Callable[[], bool] = lambda: False, grace_s: float = 10.0) -> LaunchResult:
    """Run `target(rank, nproc, rendezvous, *args)` in `nproc` spawned processes and wait for them.

    While they run, a True `should_stop()` is forwarded to every rank once as SIGTERM (they stop together
    at the next round boundary). When a rank exits with an error, the others get `grace_s` to end by
    themselves (they fail too once a collective misses the dead rank), then SIGKILL; the reason names
    the rank(s) that failed first, with the line their error file holds or the signal that killed them."""
    import torch.multiprocessing as mp

    rendezvous = Path(rendezvous)
    rendezvous.unlink(missing_ok=True)  # a file rendezvous must start absent
    err = Path(error_dir) if error_dir is not None else None
    if err is not None:
        for r in range(nproc):
            (err / ERROR_FILE.format(rank=r)).unlink(missing_ok=True)
    changes = {**loopback_env(), **{k: None for k in SECRETS}}  # the ranks' environment: loopback, no tokens
    saved = {k: os.environ.get(k) for k in changes}
    try:
        _set_env(changes)
        ctx = mp.start_processes(target, args=(nproc, str(rendezvous), *args), nprocs=nproc, join=False, start_method="spawn")
    finally:
        _set_env(saved)
    procs = ctx.processes
    forwarded = False
    first_failed: list[int] = []
    while True:
        live = [p for p in procs if p.exitcode is None]
        failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            first_failed = failed
            break
        if not live:
            break
        if not forwarded and should_stop():
            forwarded = True
            for p in live:
                _signal(p.pid, signal.SIGTERM)
        multiprocessing.connection.wait([p.sentinel for p in live], timeout=0.5)
    if first_failed:
        deadline = time.monotonic() + grace_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.exitcode is None:
                _signal(p.pid, signal.SIGKILL)
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    rendezvous.unlink(missing_ok=True)
    if not first_failed:
        return LaunchResult(True, None, codes)
    # the first failures, signal deaths first (a killed rank makes its peers' collectives fail after it)
    first_failed.sort(key=lambda r: (not (codes[r] or 0) < 0, r))
    reason = "; ".join(_describe(r, codes[r], err) for r in first_failed)
    others = [r for r in range(nproc) if r not in first_failed]
    if others:
        reason += f" (then the other rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} stopped)"
    return LaunchResult(False, reason, codes)


def _set_env(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def rank_threads(world: int) -> int:
    """Intra-op threads of one CPU rank: the cores shared among the ranks."""
    return max(1, (os.cpu_count() or 1) // world)
