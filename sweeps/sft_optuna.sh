#!/usr/bin/env bash
# Optuna search (TPE) over the SFT schedule: conf/hparams_search/sft_optuna.yaml holds the
# search space. Prints the best trial; <sweep dir>/optimization_results.yaml keeps it.
#   bash sweeps/sft_optuna.sh [hydra.sweeper.n_trials=50 ...]
set -euo pipefail
rlhf-exp -m hparams_search=sft_optuna "$@"
