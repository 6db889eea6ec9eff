"""Typed errors of the runtime. Every message names the offending field, key or file."""

from __future__ import annotations


class SpoError(Exception):
    """Base class of every error the runtime raises on purpose."""


class InvalidRequestError(SpoError, ValueError):
    """A request field is out of range or of the wrong type."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class LoraFormatError(SpoError, ValueError):
    """A LoRA file is not structurally whole, or is not a safetensors file."""

    def __init__(self, message: str, keys: list[str] | None = None):
        self.keys = list(keys or [])
        super().__init__(message)


class CheckpointFormatError(SpoError, ValueError):
    """A model checkpoint (e.g. the preference model) does not match the architecture."""

    def __init__(self, message: str, keys: list[str] | None = None):
        self.keys = list(keys or [])
        super().__init__(message)


class AdapterNotFoundError(SpoError, KeyError):
    """A request or admin call names an adapter that is not loaded."""

    def __init__(self, name: str, loaded: list[str]):
        self.name = name
        self.loaded = list(loaded)
        super().__init__(f"adapter: {name!r} is not loaded (loaded: {', '.join(self.loaded) or 'none'})")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class AdapterMemoryError(SpoError):
    """Loading an adapter would exceed the configured adapter memory cap."""


class AdapterInUseError(SpoError):
    """An adapter cannot be unloaded while requests use it."""


class NonFiniteError(SpoError, FloatingPointError):
    """A latent or decoded image holds NaN or Inf (never returned as a black image)."""


class ModelLoadError(SpoError):
    """The model or one of its sources could not be loaded."""


class QueueFullError(SpoError):
    """More images wait than SPO_MAX_QUEUE allows (HTTP 429)."""

    def __init__(self, message: str, retry_after: float):
        self.retry_after = retry_after
        super().__init__(message)


class DeadlineExceededError(SpoError):
    """The request's deadline passed before it finished (HTTP 504)."""


class RequestCancelledError(SpoError):
    """The caller went away; the request left the batch."""


class EngineUnavailableError(SpoError):
    """A step failed (e.g. out of device memory even alone) or the engine stopped (HTTP 503)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        self.retry_after = retry_after
        super().__init__(message)


class JobNotFoundError(SpoError, KeyError):
    """No job (of the kind the route serves: `what`, e.g. "training") has this id (HTTP 404)."""

    def __init__(self, job_id: str, what: str | None = None):
        super().__init__(f"job_id: no {what + ' ' if what else ''}job {job_id!r}")

    def __str__(self) -> str:
        return self.args[0]


class JobStateError(SpoError):
    """The job is in a state that does not allow the operation (resuming a running job)."""


def is_oom(e: BaseException) -> bool:
    """True when `e` is a device (or host allocator) out-of-memory error: the one test, shared by the
    engine's batch halving and the training job's failure reason."""
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


class ConfigError(SpoError, ValueError):
    """An SPO_* variable (or a Settings field) holds a value outside what it allows: the server exits at
    start with one line naming the variable."""

    def __init__(self, variable: str, message: str):
        self.variable = variable
        self.message = message
        super().__init__(f"{variable}: {message}")


def failure_reason(e: BaseException) -> str:
    """One line for a job record or a rank's error file: the exception, flagged when it is an OOM."""
    return ("out of memory: " if is_oom(e) else "") + f"{type(e).__name__}: {e}"
