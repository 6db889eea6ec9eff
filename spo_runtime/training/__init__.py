"""SPO training: the step-aware preference model (`spm`; its checkpoint files `spm_weights`, where they come
from `spm_source`) and the scorers that rank candidates with it (`scorers`), the trainer's round (roll-out,
branching, pair selection, the DPO-style loss, checkpoints) (`trainer`), durable jobs run by a supervised
subprocess (`jobs`), and data-parallel ranks over torch.distributed (`distributed`)."""
