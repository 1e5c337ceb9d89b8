#!/usr/bin/env bash
# Hydra multirun: SFT learning rate x seed grid on the tiny default (4 jobs, one after the other).
# Each job has its own run dir and W&B run; all four share one W&B group. At the end a table
# lists every job, its overrides, status and sft/eval_loss.
#   bash sweeps/sft_lr_seed.sh [more overrides, e.g. sft.max_steps=100]
#   rlhf-exp-compare outputs/sft_lr_seed/multirun_*        # differing keys, final/best, PNG
set -euo pipefail
rlhf-exp -m experiment_name=sft_lr_seed stage=sft seed=1,2 sft.lr=1e-3,3e-3 "$@"
