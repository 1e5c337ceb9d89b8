"""Config schemas: one dataclass per config node, registered with Hydra's ConfigStore.

`conf/config.yaml` lists `base_config` (the `RootConfig` below) first in its defaults, so every
YAML file of every group is merged onto a typed schema: an unknown key or a wrongly typed value
fails at composition. `validate()` then checks what types cannot (allowed values, ranges,
consistency) before any model is loaded. The YAML files under `conf/` are what users read and
edit; these dataclasses say what may appear there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rlhf_exp.errors import UserError

STAGES = ("sft", "reward", "ppo", "pipeline", "eval", "chat")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")
LAUNCHERS = ("torchrun", "deepspeed")
OFFLOAD = ("none", "cpu")
SCHEDULERS = ("cosine", "linear", "constant")
FORMATS = ("prompt_response", "preference", "hh", "chat")
SOURCE_KINDS = ("synthetic", "local", "hub")
OVERLONG = ("truncate", "drop")
KL_ESTIMATORS = ("k1", "k2", "k3")


class ConfigError(UserError, ValueError):
    """A composed config that cannot run; the message names the key and what is allowed."""


# ----------------------------------------------------------------------------- model
@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # module names (e.g. [q_proj, v_proj]) or ["all-linear"]
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # how the trained weights are saved: "merged" into a plain HF checkpoint, or the "adapter"
    save: str = "merged"


@dataclass
class TinyModelConfig:
    """Shape of the locally built Llama model used by `model=tiny` (no download needed)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256


@dataclass
class ModelConfig:
    name: str = MISSING
    # hub id or local directory; null with `tiny` set = build the tiny model in the cache
    path: str | None = None
    tokenizer_path: str | None = None  # null = same as path
    # base of the reward model and critic (DeepSpeed-Chat uses a smaller one); null = path
    reward_path: str | None = None
    tiny: TinyModelConfig | None = None
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # chat models render prompts with the tokenizer's chat template; others with this template
    prompt_template: str = "{prompt}"
    lora: LoraConfig = field(default_factory=LoraConfig)


# ----------------------------------------------------------------------------- stage
@dataclass
class StageConfig:
    name: str = MISSING  # which runner: sft, reward, ppo, pipeline, eval, chat
    # pipeline only: the stages run in order, each starting from the previous one's output
    stages: list[str] = field(default_factory=lambda: ["sft", "reward", "ppo"])


# ----------------------------------------------------------------------------- zero
@dataclass
class ZeroConfig:
    name: str = MISSING
    stage: int = 2
    offload_optimizer: str = "none"  # none | cpu
    offload_param: str = "none"  # none | cpu (stage 3 only)
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    # extra keys merged verbatim into the DeepSpeed `zero_optimization` block
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- hardware
@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0 = pick a free port on this node
    launcher: str = "torchrun"  # torchrun | deepspeed
    hostfile: str | None = None  # deepspeed launcher: one "host slots=N" line per node
    # print the launch command the dispatcher would run, and exit
    dry_run: bool = False


# ----------------------------------------------------------------------------- data
@dataclass
class SyntheticTaskConfig:
    """The bundled sorting task (see rlhf_exp/tasks/sort_digits.py and the README)."""

    num_examples: int = 20000
    min_digits: int = 3
    max_digits: int = 7
    # share of SFT demonstrations that carry 1-2 deliberate mistakes (room for RL to improve)
    demo_noise: float = 0.6


@dataclass
class SourceConfig:
    name: str = MISSING
    kind: str = "synthetic"  # synthetic | local | hub
    path: str | None = None  # local file/folder, or hub dataset id
    format: str = "preference"  # prompt_response | preference | hh | chat
    # internal field -> column name in the source (prompt, response, chosen, rejected, messages)
    columns: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    hub_split: str = "train"
    hub_subset: str | None = None
    max_examples: int | None = None
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)


@dataclass
class DataMixConfig:
    name: str = MISSING
    sources: list[SourceConfig] = field(default_factory=list)
    # relative share of each source's examples for sft, reward, ppo (DeepSpeed-Chat's 2,4,4)
    split: list[float] = field(default_factory=lambda: [2.0, 4.0, 4.0])
    eval_fraction: float = 0.05  # held-out slice of each stage's share
    max_eval_examples: int = 512
    overlong: str = "truncate"  # truncate | drop
    cache_dir: str | None = None  # tokenized-data cache; null = <cache>/data


# ----------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    name: str = MISSING  # wandb | none
    project: str = "rlhf_exp"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled (WANDB_MODE overrides)
    log_checkpoints: bool = True  # final checkpoint logged as a `model` artifact
    table_every: int = 20  # ppo: a W&B Table of samples every N steps


# ----------------------------------------------------------------------------- training
@dataclass
class TrainLoopConfig:
    """Keys shared by the SFT and reward stages. Batch sizes: `micro_batch_size_per_device` is
    per device per forward; one optimizer step sees the *global* batch
    micro_batch_size_per_device * gradient_accumulation_steps * world_size."""

    init_from: str | None = None  # local path or W&B artifact name; null = model base
    epochs: int = 1
    max_steps: int = -1  # optimizer steps; -1 = epochs over the data
    micro_batch_size_per_device: int = 16
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_prompt_len: int = 64
    max_len: int = 128  # prompt + response tokens
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    save_every: int = 0  # checkpoint every N steps; 0 = only the final one
    keep_last: int = 2


@dataclass
class SFTConfig(TrainLoopConfig):
    pass


@dataclass
class RewardConfig(TrainLoopConfig):
    lr: float = 5e-4


@dataclass
class GenerationSettings:
    max_new_tokens: int = 16
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    use_static_cache: bool = True
    compile: str = "auto"  # auto (on for cuda) | none


@dataclass
class KLConfig:
    coef: float = 0.1  # DeepSpeed-Chat beta
    estimator: str = "k1"  # k1 | k3
    adaptive: bool = False
    target: float = 6.0  # adaptive controller target KL (Ziegler et al.)
    horizon: int = 10000


@dataclass
class PPOModelOptim:
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "constant"
    max_grad_norm: float = 1.0
    zero_stage: int | None = None  # null = the run's zero_stage


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.992  # DeepSpeed-Chat default


@dataclass
class PPOConfig:
    actor_init: str | None = None  # SFT output (path or artifact); null = model base
    critic_init: str | None = None  # reward-model output (path or artifact)
    steps: int = 100  # rollouts (PPO iterations)
    rollout_batch_size: int = 64  # prompts per rollout, global
    micro_batch_size_per_device: int = 16  # per forward/backward during the update
    ppo_epochs: int = 1
    num_minibatches: int = 1
    max_prompt_len: int = 64
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    kl: KLConfig = field(default_factory=KLConfig)
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    reward_clip: float = 5.0
    normalize_reward: bool = False
    whiten_advantages: bool = True
    target_approx_kl: float | None = None  # early-stop the epochs above this approx KL
    vf_coef: float = 1.0
    actor: PPOModelOptim = field(default_factory=lambda: PPOModelOptim(lr=5e-5))
    critic: PPOModelOptim = field(default_factory=lambda: PPOModelOptim(lr=1e-4))
    ema: EMAConfig = field(default_factory=EMAConfig)
    ptx_coef: float = 0.0  # pretraining/SFT loss mixed into the actor update
    offload_reference: bool = False
    offload_reward_model: bool = False
    log_every: int = 1
    eval_every: int = 20
    save_every: int = 0
    keep_last: int = 2


@dataclass
class EvalConfig:
    policies: dict[str, str] = field(default_factory=dict)  # name -> path or artifact
    reward_model: str | None = None
    num_prompts: int = 128
    batch_size: int = 32
    generation: GenerationSettings = field(default_factory=GenerationSettings)


@dataclass
class ChatConfig:
    policy: str | None = None  # path or artifact
    prompt: str | None = None  # one scripted turn instead of the interactive loop
    system: str | None = None
    generation: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(max_new_tokens=64, temperature=0.7)
    )


# ----------------------------------------------------------------------------- root
@dataclass
class RootConfig:
    seed: int = 1234
    experiment_name: str = "default"
    tags: list[str] = field(default_factory=list)
    resume: str | None = None  # a run dir to continue
    # the metric the app returns to sweepers (e.g. sft/eval_loss, ppo/gold_reward)
    objective: str | None = None
    model: ModelConfig = MISSING
    stage: StageConfig = MISSING
    zero_stage: ZeroConfig = MISSING
    hardware: HardwareConfig = MISSING
    data_mix: DataMixConfig = MISSING
    logger: LoggerConfig = MISSING
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RootConfig)


# ----------------------------------------------------------------------------- validation
def _allowed(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive(cfg: DictConfig, key: str, minimum: float = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None or value < minimum:
        raise ConfigError(f"{key}={value!r} must be >= {minimum}")


def _check_train_loop(cfg: DictConfig, node: str) -> None:
    for key in ("micro_batch_size_per_device", "gradient_accumulation_steps", "epochs",
                "max_prompt_len", "max_len", "log_every"):
        _positive(cfg, f"{node}.{key}")
    _allowed(cfg, f"{node}.lr_scheduler", SCHEDULERS)
    if cfg[node].max_prompt_len >= cfg[node].max_len:
        raise ConfigError(f"{node}.max_prompt_len ({cfg[node].max_prompt_len}) must be smaller "
                          f"than {node}.max_len ({cfg[node].max_len})")
    if cfg[node].lr <= 0:
        raise ConfigError(f"{node}.lr={cfg[node].lr} must be > 0")


def validate(cfg: DictConfig) -> None:
    """Semantic checks on the composed config; raises ConfigError with one readable line."""
    _allowed(cfg, "stage.name", STAGES)
    for name in cfg.stage.stages:
        if name not in ("sft", "reward", "ppo"):
            raise ConfigError(f"stage.stages has {name!r}; each must be one of: sft, reward, ppo")
    _allowed(cfg, "hardware.device", DEVICES)
    _allowed(cfg, "hardware.precision", PRECISIONS)
    _allowed(cfg, "hardware.launcher", LAUNCHERS)
    _positive(cfg, "hardware.nproc_per_node")
    _positive(cfg, "hardware.nnodes")
    if not 0 <= cfg.hardware.node_rank < cfg.hardware.nnodes:
        raise ConfigError(f"hardware.node_rank={cfg.hardware.node_rank} must be in "
                          f"[0, hardware.nnodes={cfg.hardware.nnodes})")
    if cfg.hardware.device == "cpu" and cfg.hardware.precision == "fp16":
        raise ConfigError("hardware.precision=fp16 needs hardware.device=cuda; use fp32 or bf16")
    if cfg.zero_stage.stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage.stage={cfg.zero_stage.stage} must be 0, 1, 2 or 3")
    _allowed(cfg, "zero_stage.offload_optimizer", OFFLOAD)
    _allowed(cfg, "zero_stage.offload_param", OFFLOAD)
    if cfg.zero_stage.offload_param != "none" and cfg.zero_stage.stage != 3:
        raise ConfigError("zero_stage.offload_param needs zero_stage.stage=3")
    if cfg.model.path is None and cfg.model.tiny is None:
        raise ConfigError("model.path is missing: give a hub id or a local directory "
                          "(or use model=tiny)")
    if cfg.model.lora.save not in ("merged", "adapter"):
        raise ConfigError(f"model.lora.save={cfg.model.lora.save!r} is not allowed; "
                          "choose one of: merged, adapter")
    _allowed(cfg, "logger.name", ("wandb", "none"))
    _allowed(cfg, "logger.mode", ("offline", "online", "disabled"))
    _check_train_loop(cfg, "sft")
    _check_train_loop(cfg, "reward")
    # data
    _allowed(cfg, "data_mix.overlong", OVERLONG)
    if not cfg.data_mix.sources:
        raise ConfigError("data_mix.sources is empty: list at least one source")
    split = list(cfg.data_mix.split)
    if len(split) != 3 or any(s < 0 for s in split) or sum(split) <= 0:
        raise ConfigError(f"data_mix.split={split} must be 3 non-negative shares "
                          "(sft, reward, ppo), e.g. [2, 4, 4]")
    if not 0.0 <= cfg.data_mix.eval_fraction < 1.0:
        raise ConfigError(f"data_mix.eval_fraction={cfg.data_mix.eval_fraction} must be in [0, 1)")
    for i, src in enumerate(cfg.data_mix.sources):
        key = f"data_mix.sources[{i}]"
        if src.kind not in SOURCE_KINDS:
            raise ConfigError(f"{key}.kind={src.kind!r} is not allowed; choose one of: "
                              f"{', '.join(SOURCE_KINDS)}")
        if src.format not in FORMATS:
            raise ConfigError(f"{key}.format={src.format!r} is not allowed; choose one of: "
                              f"{', '.join(FORMATS)}")
        if src.kind != "synthetic" and not src.path:
            raise ConfigError(f"{key}.path is missing: a {src.kind} source needs a path")
        if src.weight <= 0:
            raise ConfigError(f"{key}.weight={src.weight} must be > 0")
    # ppo
    _allowed(cfg, "ppo.kl.estimator", KL_ESTIMATORS)
    for key in ("steps", "rollout_batch_size", "micro_batch_size_per_device", "ppo_epochs",
                "num_minibatches", "generation.max_new_tokens"):
        _positive(cfg, f"ppo.{key}")
    if cfg.ppo.rollout_batch_size % cfg.ppo.num_minibatches:
        raise ConfigError(f"ppo.rollout_batch_size={cfg.ppo.rollout_batch_size} must be "
                          f"divisible by ppo.num_minibatches={cfg.ppo.num_minibatches}")
    if cfg.ppo.generation.temperature <= 0:
        raise ConfigError("ppo.generation.temperature must be > 0 (use do_sample=false for greedy)")
    if not 0 < cfg.ppo.generation.top_p <= 1:
        raise ConfigError(f"ppo.generation.top_p={cfg.ppo.generation.top_p} must be in (0, 1]")
