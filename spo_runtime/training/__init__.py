"""SPO training: the step-aware preference model that scores candidates (`preference`), the trainer's round
(roll-out, branching, pair selection, the DPO-style loss, checkpoints) (`trainer`), durable jobs run by a
supervised subprocess (`jobs`), and data-parallel ranks over torch.distributed (`distributed`)."""
