#!/usr/bin/env bash
# Hydra multirun: the whole pipeline (SFT -> reward -> PPO) for three KL coefficients x two
# seeds; each job optimises ppo/gold_reward (the synthetic task's true reward).
#   bash sweeps/ppo_kl.sh [overrides]
#   rlhf-exp-compare outputs/ppo_kl/multirun_* --metrics ppo/gold_reward,ppo/kl
set -euo pipefail
rlhf-exp -m experiment_name=ppo_kl stage=pipeline ppo.kl.coef=0.02,0.05,0.1 seed=1,2 "$@"
