"""SPO training, one concept a module:

- `config`: TrainConfig, every hyperparameter of a job and its checks.
- `trainer`: SPOTrainer, the round (prompts, roll-out, optimiser steps) and the loop; `run`: its one
  set-up (`build_trainer`), the prompt file, the CLI as one rank.
- `policy`: the UNet + LoRA as a DDIM policy; `rollout`: sampling with branching into pairs;
  `loss`: pair selection and the DPO-style loss; `adapter`: the trainable LoRA; `checkpoint`: the
  trainer's files (checkpoints, exported adapter).
- `scorers`: the scorer a job's config names (`default_scorer`); the preference model itself (the SPM, its
  files, the `PreferenceScorer` interface) is `spo_runtime.preference`, which serving uses too.
- `jobs`: durable jobs on the server side (JobStore, Supervisor); `job_process`: the trainer process
  of a job (`python -m spo_runtime train-job`).
- `evaluation`: adapter evaluation jobs (a job kind: generate, score, report, contact sheet);
  `eval_stats`: their statistics (t interval, exact sign test, Wilson interval).
- `distributed`: data-parallel ranks over torch.distributed.

Nothing is re-exported here: each name is imported from the one module that defines it.
"""
