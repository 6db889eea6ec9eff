"""SPO training: the step-aware preference model (`spm`; its checkpoint files `spm_weights`, where they come
from `spm_source`) and the scorers that rank candidates with it (`scorers`), the trainer's round (roll-out,
branching, pair selection, the DPO-style loss, checkpoints) (`trainer`), durable jobs on the server side
(`jobs`) and their trainer process (`job_process`), and data-parallel ranks over torch.distributed (`distributed`)."""
