"""The step-level batching engine: one thread owns the device; callers submit requests and await futures.
Each loop iteration is a step boundary: `schedule()` makes an immutable plan, `run(plan)` computes it on the
model (a `StepModel`: the pipeline, or a fake in tests), `update(plan, result)` applies it. The engine knows
the model only through that protocol. Its errors live in `spo_runtime.errors`."""

from spo_runtime.engine.config import EngineConfig
from spo_runtime.engine.engine import Engine
from spo_runtime.engine.plan import Progress, RunningImage, StepPlan, StepResult, Submission
from spo_runtime.engine.scheduler import Scheduler
from spo_runtime.engine.step_model import StepModel

__all__ = ["Engine", "EngineConfig", "Progress", "RunningImage", "Scheduler", "StepModel", "StepPlan", "StepResult", "Submission"]
