#!/usr/bin/env bash
# Hydra multirun: the same SFT run under each ZeRO stage (throughput and memory side by side).
# On a GPU add hardware=1gpu (or hardware=8gpu and a real model, e.g. model=opt-1.3b).
#   bash sweeps/zero_stages.sh [overrides]
#   rlhf-exp-compare outputs/zero_stages/multirun_* --metrics sft/loss,perf/tokens_per_s
set -euo pipefail
rlhf-exp -m experiment_name=zero_stages stage=sft zero_stage=zero0,zero1,zero2,zero3 \
  sft.max_steps=50 "$@"
