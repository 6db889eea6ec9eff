"""The engine's limits (`EngineConfig`): batch size, queue length and cost, deadline and batching mode, each
field named after the SPO_* variable that sets it and checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from spo_runtime.engine.cost import ORDINARY_COST


@dataclass(frozen=True)
class EngineConfig:
    """The engine's limits. Built from the service's Settings; each field names its variable."""

    max_batch: int = 8  # SPO_MAX_BATCH: images per UNet call
    max_queue: int = 64  # SPO_MAX_QUEUE: waiting images before 429
    request_timeout_s: float = 300.0  # SPO_REQUEST_TIMEOUT_S
    batching: Literal["step", "request"] = "step"  # SPO_BATCHING
    # SPO_MAX_QUEUE_COST: waiting and running work before 429, in passes over a default-size image (engine/cost.py);
    # None: what SPO_MAX_QUEUE waiting and SPO_MAX_BATCH running ordinary requests cost (today's limit for those)
    max_queue_cost: float | None = None

    def __post_init__(self) -> None:
        if not self.max_batch >= 1:
            raise ValueError(f"SPO_MAX_BATCH: must be >= 1, got {self.max_batch}")
        if not self.max_queue >= 0:
            raise ValueError(f"SPO_MAX_QUEUE: must be >= 0, got {self.max_queue}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"SPO_REQUEST_TIMEOUT_S: must be > 0, got {self.request_timeout_s}")
        if self.batching not in ("step", "request"):
            raise ValueError(f"SPO_BATCHING: must be 'step' or 'request', got {self.batching!r}")
        if self.max_queue_cost is not None and not 0 < self.max_queue_cost < float("inf"):
            raise ValueError(f"SPO_MAX_QUEUE_COST: must be a finite number > 0, got {self.max_queue_cost}")

    @property
    def queue_cost_limit(self) -> float:
        """SPO_MAX_QUEUE_COST, or (SPO_MAX_QUEUE + SPO_MAX_BATCH) ordinary requests' cost when it is unset."""
        if self.max_queue_cost is not None:
            return self.max_queue_cost
        return float((self.max_queue + self.max_batch) * ORDINARY_COST)

    @classmethod
    def from_settings(cls, settings) -> EngineConfig:
        """The limits a server's Settings (SPO_* variables) give."""
        return cls(max_batch=settings.max_batch, max_queue=settings.max_queue,
                   request_timeout_s=settings.request_timeout_s, batching=settings.batching,
                   max_queue_cost=settings.max_queue_cost)
