"""The run's config: its schema, the allowed values of its keys, and their validation.

    choices.py       allowed values of choice keys (torch-free; the math modules import them)
    schema.py        one dataclass per config node (Hydra's typed `base_config`)
    checks.py        checks of single keys and of sub-nodes several stages share
    stage_checks.py  each stage's own node (named by the stage registry, rlhf_exp/registry.py)
    validate.py      validate(): what is checked when, and the checks of the shared nodes

Everything importable from `rlhf_exp.config` before it became a package still is.
"""

from __future__ import annotations

from rlhf_exp.config.checks import check_generation, check_rewards, is_control
from rlhf_exp.config.choices import (
    COMPILE_MODES,
    DEVICES,
    DPO_LOSS_TYPES,
    FORMATS,
    GRPO_BASELINES,
    GRPO_LOSS_AGG,
    GRPO_SCALE_REWARDS,
    KL_ESTIMATORS,
    LAUNCHERS,
    NAME_CHARS,
    OFFLOAD,
    OVERLONG,
    PIPELINE_HANDOFF,
    POLICY_STAGES,
    POLICY_START_KEY,
    PRECISIONS,
    SCHEDULERS,
    SHARED_STAGES,
    SOURCE_KINDS,
    STAGE_SHARES,
    STAGES,
)
from rlhf_exp.config.schema import (
    AlarmConfig,
    ChatConfig,
    DataMixConfig,
    DPOConfig,
    EMAConfig,
    EvalConfig,
    GenerationSettings,
    GRPOConfig,
    HardwareConfig,
    KLConfig,
    LoggerConfig,
    LoraConfig,
    ModelConfig,
    PPOConfig,
    PPOModelOptim,
    RewardConfig,
    RewardFunctionConfig,
    RootConfig,
    SFTConfig,
    SourceConfig,
    StageConfig,
    SyntheticTaskConfig,
    TinyModelConfig,
    TrainLoopConfig,
    ZeroConfig,
    register_configs,
    root_nodes,
)
from rlhf_exp.config.validate import check, check_rendezvous, run_stages, validate
from rlhf_exp.errors import ConfigError, UserError

__all__ = [
    "COMPILE_MODES", "DEVICES", "DPO_LOSS_TYPES", "FORMATS", "GRPO_BASELINES", "GRPO_LOSS_AGG",
    "GRPO_SCALE_REWARDS", "KL_ESTIMATORS", "LAUNCHERS", "NAME_CHARS", "OFFLOAD", "OVERLONG",
    "PIPELINE_HANDOFF", "POLICY_STAGES", "POLICY_START_KEY", "PRECISIONS", "SCHEDULERS",
    "SHARED_STAGES", "SOURCE_KINDS", "STAGES", "STAGE_SHARES", "AlarmConfig", "ChatConfig",
    "ConfigError",
    "DPOConfig", "DataMixConfig", "EMAConfig", "EvalConfig", "GRPOConfig", "GenerationSettings",
    "HardwareConfig", "KLConfig", "LoggerConfig", "LoraConfig", "ModelConfig", "PPOConfig",
    "PPOModelOptim", "RewardConfig", "RewardFunctionConfig", "RootConfig", "SFTConfig",
    "SourceConfig", "StageConfig", "SyntheticTaskConfig", "TinyModelConfig", "TrainLoopConfig",
    "UserError", "ZeroConfig", "check", "check_generation", "check_rendezvous", "check_rewards",
    "is_control", "register_configs", "root_nodes", "run_stages", "validate",
]
