"""The engine's limits (`EngineConfig`): batch size, queue length, deadline and batching mode, each field
named after the SPO_* variable that sets it and checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class EngineConfig:
    """The engine's limits. Built from the service's Settings; each field names its variable."""

    max_batch: int = 8  # SPO_MAX_BATCH: images per UNet call
    max_queue: int = 64  # SPO_MAX_QUEUE: waiting images before 429
    request_timeout_s: float = 300.0  # SPO_REQUEST_TIMEOUT_S
    batching: Literal["step", "request"] = "step"  # SPO_BATCHING

    def __post_init__(self) -> None:
        if not self.max_batch >= 1:
            raise ValueError(f"SPO_MAX_BATCH: must be >= 1, got {self.max_batch}")
        if not self.max_queue >= 0:
            raise ValueError(f"SPO_MAX_QUEUE: must be >= 0, got {self.max_queue}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"SPO_REQUEST_TIMEOUT_S: must be > 0, got {self.request_timeout_s}")
        if self.batching not in ("step", "request"):
            raise ValueError(f"SPO_BATCHING: must be 'step' or 'request', got {self.batching!r}")

    @classmethod
    def from_settings(cls, settings) -> EngineConfig:
        """The limits a server's Settings (SPO_* variables) give."""
        return cls(max_batch=settings.max_batch, max_queue=settings.max_queue,
                   request_timeout_s=settings.request_timeout_s, batching=settings.batching)
