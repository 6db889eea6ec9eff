"""CPU used by other processes while a benchmark runs (Linux /proc).

The benchmark machines are shared: a figure measured while someone else's job ran is worth less.
ForeignCpu says, for one measured interval, how much CPU the rest of the machine used besides this
process and its descendants; quiet_gate waits (bounded) for a quiet machine before a measurement.
Off Linux both report zeros.
"""

from __future__ import annotations

import os
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_snapshot() -> dict:
    """{(pid, start): (cpu ticks, ppid, ticks of waited-for children)} of every process."""
    out = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            out[(int(e), f[19])] = (int(f[11]) + int(f[12]), int(f[1]), int(f[13]) + int(f[14]))
        except (OSError, IndexError, ValueError):
            continue
    return out


def system_ticks() -> tuple[int, int]:
    """(busy ticks, steal ticks) of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


class ForeignCpu:
    """CPU used since construction by the whole machine minus this process's tree ("other": other
    users' work, short-lived processes included) and by our tree ("ours")."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.sys0 = system_ticks()
        self.snap0 = cpu_snapshot()

    def measure(self) -> tuple[float, float, float, float]:
        """(other CPU s, our CPU s, steal s, elapsed s)."""
        snap1 = cpu_snapshot()
        sys1 = system_ticks()
        elapsed = time.perf_counter() - self.t0
        ppid = {pid: pp for (pid, _), (_, pp, _) in snap1.items()}
        mine = {os.getpid()}
        changed = True
        while changed:  # descendants (circus workers keep their parent even after setsid)
            changed = False
            for pid, pp in ppid.items():
                if pp in mine and pid not in mine:
                    mine.add(pid)
                    changed = True
        ours = 0
        for key, (t1, _, c1) in snap1.items():
            if key[0] in mine:
                t0, _, c0 = self.snap0.get(key, (0, 0, 0))
                ours += t1 - t0
                if key[0] == os.getpid():
                    ours += c1 - c0  # children we waited for (the in-process replay)
        busy = sys1[0] - self.sys0[0]
        other = max(0, busy - ours)
        return other / _TICK, ours / _TICK, (sys1[1] - self.sys0[1]) / _TICK, elapsed

    def share(self) -> dict:
        """The interval's figures as they go into a level's summary."""
        other, ours, steal, elapsed = self.measure()
        cores = os.cpu_count() or 1
        return {"other_cpu_s": round(other, 1), "other_cpu_share": round(other / (elapsed * cores), 3),
                "our_cpu_share": round(ours / (elapsed * cores), 3), "steal_share": round(steal / (elapsed * cores), 3)}


def is_disturbed(level: dict, max_share: float, max_cpu_s: float) -> bool:
    """Other processes used more than `max_share` of all cores, or more than `max_cpu_s` CPU seconds in
    all (a short burst is enough to stall a 2-thread OpenMP team), during the level."""
    return level["other_cpu_share"] > max_share or level["other_cpu_s"] > max_cpu_s


def quiet_gate(max_wait: float, threshold: float, sample_s: float = 2.0) -> dict:
    """Wait (at most max_wait s) until, over one sample, other processes use under `threshold` of the
    cores and our own tree is idle (no request of a previous level still running)."""
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    while True:
        f = ForeignCpu()
        time.sleep(sample_s)
        other, ours, _, elapsed = f.measure()
        other_share, our_share = other / (elapsed * cores), ours / (elapsed * cores)
        waited = time.perf_counter() - t0
        quiet = other_share < threshold and our_share < 0.05
        if quiet or waited >= max_wait:
            return {"waited_s": round(waited, 1), "other_share": round(other_share, 3), "ours_share": round(our_share, 3),
                    "quiet": quiet}
