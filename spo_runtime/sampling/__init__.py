"""Sampler math as pure functions over per-row timesteps: the noise schedule and the three samplers' timestep
tables (DDIM, Euler, DPM++ 2M Karras), one step of each in the papers' notation, img2img's start, and
`SamplerRow`, a request's own progress (step index, schedule, multistep memory, generator). Imports nothing
of the package: the engine, the pipeline and the trainer share it."""
