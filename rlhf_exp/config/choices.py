"""The allowed values of the config's choice keys, and the stage facts older code imports from
`rlhf_exp.config` (read from the stage registry, rlhf_exp/registry.py, which is where a stage is
declared). Torch-free: rlhf_exp/rl/ppo_math.py, grpo_math.py and dpo_math.py import their tuples
from here, and `--help` / `--cfg job` stay fast."""

from __future__ import annotations

from rlhf_exp import registry

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")
LAUNCHERS = ("torchrun", "deepspeed", "submitit")
OFFLOAD = ("none", "cpu")
SCHEDULERS = ("cosine", "linear", "constant")
FORMATS = ("prompt_response", "preference", "hh", "chat", "unpaired")
SOURCE_KINDS = ("synthetic", "local", "hub")
OVERLONG = ("truncate", "drop")
# the KL estimators of rlhf_exp/ppo_math.kl_per_token
KL_ESTIMATORS = ("k1", "k2", "k3")
GRPO_BASELINES = ("group_mean", "leave_one_out")
GRPO_SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_AGG = ("token_mean", "sequence_mean", "dr_grpo")
# group: baseline/scale_rewards per sequence; reinforce(_baseline): REINFORCE++ token returns
GRPO_ADVANTAGE_ESTIMATORS = ("group", "reinforce", "reinforce_baseline")
GRPO_IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")  # sequence = GSPO
GRPO_OVERLONG = ("none", "soft", "mask")  # DAPO overlong shaping
# the DPO losses of rlhf_exp/rl/dpo_math.py (TRL's DPOTrainer names; docs/dpo.md has the formulas)
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo")
# the losses that need no reference model (SimPO: length-normalised, reference-free)
REFERENCE_FREE_LOSSES = ("simpo",)
COMPILE_MODES = ("auto", "none", "cuda_graphs", "compile")
# a name that is safe as a folder name and inside W&B artifact names (<experiment_name>-sft-model)
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
SHARES = registry.SHARES  # the shares of data_mix.split, in its order

# The stage facts as they were importable before the registry (snapshots of the built-in
# stages; code in rlhf_exp reads the registry, so a stage registered later counts too).
STAGES = registry.names()
PIPELINE_HANDOFF: dict[str, dict[str, str]] = registry.pipeline_handoff()
POLICY_START_KEY = registry.policy_start_key()
POLICY_STAGES = registry.policy_stages()
STAGE_SHARES = {name: spec.shares for name, spec in registry.STAGES.items()}
SHARED_STAGES = registry.shared_stages()
