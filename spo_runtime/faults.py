"""Fault injection for tests only: `SPO_FAULTS`, ignored unless set, never for production.

Grammar: comma-separated faults, each `name` or `name:key=value[:key=value...]`, e.g.
`SPO_FAULTS=nan_row:step=2:seed=7,oom_above:batch=2`. Unknown names or keys, a missing required key, a
value of the wrong type or a fault named twice are a ConfigError at start, so a typo in a test cannot
silently test nothing.

    engine_crash:step=N          the engine thread dies (an exception no step handler catches) once N steps ran
    nan_row:step=K[:row=R|:seed=S]
                                 before a row's own denoising step K (0 = its first UNet call), its latent
                                 becomes NaN: the R-th row of the UNet batch (default 0), or the row of the
                                 request with seed S
    oom_above:batch=B[:seed=S]   every UNet call of more than B rows raises out-of-memory (B=0: every size,
                                 batch 1 included); with seed=S only during steps whose batch holds seed S
    decode_error[:seed=S]        the VAE decode raises; with seed=S only decodes holding seed S
    slow_step:s=X[:seed=S]       every engine step sleeps X seconds before its UNet call; with seed=S only
                                 steps whose batch holds seed S
    enospc_checkpoint:round=R    writing the training checkpoint of round R fails with ENOSPC part-way
                                 (training jobs get it through their environment)
    kill_rank:rank=R:round=N     training rank R kills itself with SIGKILL as it starts round N (a rank lost
                                 mid-job, as a crashed GPU host loses it)
    kill_checkpoint:round=R[:write=W]
                                 the trainer kills itself with SIGKILL as the W-th (default 1) checkpoint of round R
                                 it writes is about to be put in place: its files are written, the checkpoint
                                 before it is all a resume has (W=2: a stop right after a periodic checkpoint
                                 saves the same round again)

`seed=S` selects by the request's seed (a request's seed is in its reply), so a test can aim a fault at
one request whatever else shares its batch, and the server's warm-up image (seed 0) is never hit unless
a fault says seed=0.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from spo_runtime.errors import ConfigError

# name -> {key: (type, required)}
KNOWN: dict[str, dict[str, tuple[type, bool]]] = {
    "engine_crash": {"step": (int, True)},
    "nan_row": {"step": (int, True), "row": (int, False), "seed": (int, False)},
    "oom_above": {"batch": (int, True), "seed": (int, False)},
    "decode_error": {"seed": (int, False)},
    "slow_step": {"s": (float, True), "seed": (int, False)},
    "enospc_checkpoint": {"round": (int, True)},
    "kill_rank": {"rank": (int, True), "round": (int, True)},
    "kill_checkpoint": {"round": (int, True), "write": (int, False)},
}


class InjectedFault(BaseException):
    """Raised by an injected fault; a BaseException so that no `except Exception` handler absorbs it."""


class InjectedError(RuntimeError):
    """An ordinary exception raised by an injected fault (a failing decode): handlers catch it as they
    would a real one."""


def _oom(message: str) -> BaseException:
    """What a device allocator raises (torch.cuda.OutOfMemoryError exists on CPU builds too)."""
    try:
        import torch

        return torch.cuda.OutOfMemoryError(message)
    except (ImportError, AttributeError):  # pragma: no cover
        return RuntimeError(message)


@dataclass(frozen=True)
class Faults:
    active: dict[str, dict] = field(default_factory=dict)
    seen: dict = field(default_factory=dict, compare=False, repr=False)  # counters of the hooks that count

    @classmethod
    def parse(cls, text: str | None) -> Faults:
        active: dict[str, dict] = {}
        for item in filter(None, (t.strip() for t in (text or "").split(","))):
            name, *pairs = item.split(":")
            if name not in KNOWN:
                raise ConfigError("SPO_FAULTS", f"unknown fault {name!r} (known: {', '.join(KNOWN)})")
            if name in active:
                raise ConfigError("SPO_FAULTS", f"{name}: named twice")
            spec = KNOWN[name]
            params: dict[str, Any] = {}
            for pair in pairs:
                key, eq, value = pair.partition("=")
                if key not in spec:
                    known = ", ".join(spec) or "none"
                    raise ConfigError("SPO_FAULTS", f"{name}: unknown parameter {key!r} (known: {known})")
                if not eq or key in params:
                    raise ConfigError("SPO_FAULTS", f"{name}: {key} must appear once, as {key}=<value>")
                kind = spec[key][0]
                try:
                    params[key] = kind(value)
                except ValueError:
                    raise ConfigError("SPO_FAULTS", f"{name}: {key} must be {kind.__name__}, got {value!r}") from None
                if params[key] < 0:
                    raise ConfigError("SPO_FAULTS", f"{name}: {key} must be >= 0, got {value!r}")
            missing = sorted(k for k, (_, required) in spec.items() if required and k not in params)
            if missing:
                raise ConfigError("SPO_FAULTS", f"{name}: missing {', '.join(missing)}")
            if name == "nan_row" and "row" in params and "seed" in params:
                raise ConfigError("SPO_FAULTS", "nan_row: give row or seed, not both")
            active[name] = params
        return cls(active)

    def get(self, name: str) -> dict | None:
        return self.active.get(name)

    def __bool__(self) -> bool:
        return bool(self.active)

    # -- hooks (the engine and the trainer call these; each is a no-op unless its fault is set) ---

    def _aimed(self, name: str, seeds: Iterable[int]) -> dict | None:
        """The fault's parameters when it applies to a batch holding `seeds`, else None."""
        p = self.active.get(name)
        if p is None or ("seed" in p and p["seed"] not in set(seeds)):
            return None
        return p

    def before_step(self, states: list) -> None:
        """Once per engine step, before its first UNet call: slow_step, then nan_row. `states` are the
        step's rows in UNet order (objects with .seed, .row.step and .latents)."""
        if not self.active:
            return
        slow = self._aimed("slow_step", (s.seed for s in states))
        if slow is not None:
            time.sleep(slow["s"])
        nan = self.active.get("nan_row")
        if nan is not None:
            for i, s in enumerate(states):
                chosen = s.seed == nan["seed"] if "seed" in nan else i == nan.get("row", 0)
                if chosen and s.row.step == nan["step"]:
                    s.latents = s.latents.clone().fill_(float("nan"))

    def before_unet(self, step_states: list, call_states: list) -> None:
        """Before each UNet call (a halved batch is another call of the same step): oom_above."""
        if not self.active:
            return
        oom = self._aimed("oom_above", (s.seed for s in step_states))
        if oom is not None and len(call_states) > oom["batch"]:
            raise _oom(f"CUDA out of memory (injected by SPO_FAULTS oom_above:batch={oom['batch']}, "
                       f"call of {len(call_states)} rows)")

    def before_decode(self, states: list) -> None:
        if self.active and self._aimed("decode_error", (s.seed for s in states)) is not None:
            raise InjectedError(f"decode failed (injected by SPO_FAULTS decode_error, {len(states)} rows)")

    def checkpoint_write(self, round_: int, fh) -> None:
        """While the trainer writes checkpoint.pt of round `round_`: ENOSPC after a partial write."""
        p = self.active.get("enospc_checkpoint")
        if p is not None and p["round"] == round_:
            fh.write(b"PK\x03\x04partial")  # a torn file, as a full disk leaves it
            fh.flush()
            raise OSError(errno.ENOSPC, f"No space left on device (injected by SPO_FAULTS enospc_checkpoint:round={round_})")

    def checkpoint_in_place(self, round_: int) -> None:
        """As the trainer is about to put a written checkpoint of round `round_` in place: kill_checkpoint."""
        p = self.active.get("kill_checkpoint")
        if p is None or p["round"] != round_:
            return
        key = ("kill_checkpoint", round_)
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] == p.get("write", 1):
            os.kill(os.getpid(), signal.SIGKILL)

    def round_start(self, rank: int, round_: int) -> None:
        """As training rank `rank` starts round `round_` (1-based): kill_rank."""
        p = self.active.get("kill_rank")
        if p is not None and p["rank"] == rank and p["round"] == round_:
            os.kill(os.getpid(), signal.SIGKILL)


NONE = Faults()
