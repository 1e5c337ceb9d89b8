"""Training mechanics every stage shares: ranks and devices (dist), DeepSpeed engines, checkpoints
and resume, W&B tracking, the supervised loop (train_loop), a stage's prologue and epilogue
(stage_kit), the NaN stop, Ctrl-C (interrupt) and the run's small helpers (runtime)."""
