"""The step-level batching engine: one thread owns the device; callers submit requests and await futures.
Each loop iteration is a step boundary: `schedule()` makes an immutable plan, `run(plan)` computes it on the
model (a `StepModel`: the pipeline, or a fake in tests), `update(plan, result)` applies it. The engine knows
the model only through that protocol."""
