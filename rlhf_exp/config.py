"""Config schemas: one dataclass per config node, registered with Hydra's ConfigStore.

`conf/config.yaml` lists `base_config` (the `RootConfig` below) first in its defaults, so every
YAML file of every group is merged onto a typed schema: an unknown key or a wrongly typed value
fails at composition. `validate()` then checks what types cannot (allowed values, ranges,
consistency) before any model is loaded. The YAML files under `conf/` are what users read and
edit; these dataclasses say what may appear there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rlhf_exp.errors import UserError

STAGES = ("sft", "reward", "ppo", "pipeline", "eval", "chat")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")
LAUNCHERS = ("torchrun", "deepspeed", "submitit")
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
    """A model built locally on first use (no download): `model=tiny` and `model=tiny-<family>`
    (rlhf_exp/tiny_models.py)."""

    family: str = "llama"  # llama | qwen2 | opt | gpt2
    # char: one token per character (llama only, model=tiny); bpe: the family's subword tokenizer
    tokenizer: str = "char"
    vocab_size: int = 1024  # bpe: target vocabulary size
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
    master_addr: str = "127.0.0.1"  # address of node 0 (every node must reach it)
    # 0 = pick a free port (single node; submitit: derived from the job id)
    master_port: int = 0
    # torchrun | deepspeed: the dispatcher re-executes itself under that launcher;
    # submitit: the ranks are the tasks of a submitit job (hydra/launcher=submitit_slurm or
    # submitit_local with tasks_per_node / nodes), no re-execution
    launcher: str = "torchrun"
    # deepspeed launcher, several nodes: one "host slots=N" line per node (MPI style), reached
    # over passwordless ssh (pdsh) from node 0
    hostfile: str | None = None
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
    """One data source (docs/data.md). Local paths: absolute, relative to the launch directory,
    or `pkg://rlhf_exp/...` for files shipped inside the package."""

    name: str = MISSING
    kind: str = "synthetic"  # synthetic | local | hub
    path: str | None = None  # local file/folder (.jsonl/.json/.parquet), or hub dataset id
    format: str = "preference"  # prompt_response | preference | hh | chat
    # internal field -> column name in the source (prompt, response, chosen, rejected, messages)
    columns: dict[str, str] = field(default_factory=dict)
    # share of the blended examples of every stage: weight / sum of the sources' weights
    weight: float = 1.0
    hub_split: str = "train"
    hub_subset: str | None = None
    max_examples: int | None = None  # cap on rows read from the source (null = all)
    # gold reward of this source's rows (a name in rlhf_exp.tasks, e.g. sort_digits); null = none
    task: str | None = None
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)


@dataclass
class DataMixConfig:
    name: str = MISSING
    sources: list[SourceConfig] = field(default_factory=list)
    # relative share of each source's examples for sft, reward, ppo (DeepSpeed-Chat's 2,4,4)
    split: list[float] = field(default_factory=lambda: [2.0, 4.0, 4.0])
    eval_fraction: float = 0.05  # held-out slice of each stage's share
    max_eval_examples: int = 512
    overlong: str = "truncate"  # truncate | drop (the number dropped is logged)
    cache: bool = True  # cache tokenized features on disk
    cache_dir: str | None = None  # tokenized-data cache; null = <RLHF_EXP_CACHE>/data


# ----------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    name: str = MISSING  # wandb | none
    project: str = "rlhf_exp"
    entity: str | None = None
    # W&B group; null = experiment_name (a multirun sets `<experiment_name>-<sweep dir name>`)
    group: str | None = None
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
    # also keep the checkpoint with the best value of this metric (e.g. sft/eval_loss), linked
    # as checkpoints/best; null = keep only the last `keep_last`
    keep_best_metric: str | None = None
    keep_best_mode: str = "min"  # min | max


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
    min_lr_ratio: float = 0.0
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
    # frozen reward model (path or artifact); null = the same checkpoint as critic_init
    reward_model: str | None = None
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
    # LoRA of the critic (the actor's is model.lora); same schema
    critic_lora: LoraConfig = field(default_factory=LoraConfig)
    log_every: int = 1
    eval_every: int = 20
    eval_num_prompts: int = 256  # held-out prompts (the ppo share's eval slice) per evaluation
    eval_batch_size: int = 64
    save_every: int = 0
    keep_last: int = 2


@dataclass
class EvalConfig:
    """`stage=eval`: compare policies on the PPO share's held-out prompts (docs/eval_chat.md)."""

    # name -> path, run dir or artifact; null entries are skipped. The YAML lists sft, ppo and
    # ppo_ema (set them as eval.policies.sft=...); other names need +eval.policies.<name>=...
    policies: dict[str, str | None] = field(default_factory=dict)
    # a pipeline run dir (or one stage's run dir): its sft / ppo / ppo_ema policies and reward
    # model are found from their result.json and checkpoints; `policies` entries add/override
    from_run: str | None = None
    include_base: bool = False  # also evaluate the untrained base model (policy `base`)
    # with from_run: take seed, model, data_mix, reward and ppo from the run's config, so the
    # held-out prompts are the run's own and the defaults follow its PPO eval
    match_run: bool = True
    reward_model: str | None = None  # path or artifact; null = the from_run reward model
    # KL reference: a policy name from `policies`, or a path/artifact; null = the policy `sft`
    reference: str | None = None
    kl_estimator: str = "k1"  # k1 | k2 | k3 (rlhf_exp/ppo_math.py)
    num_prompts: int | None = None  # first N held-out prompts; null = the whole slice
    num_pairs: int | None = None  # first N held-out preference pairs; null = all
    batch_size: int = 32
    max_prompt_len: int = 64
    generation: GenerationSettings = field(default_factory=GenerationSettings)


@dataclass
class ChatConfig:
    policy: str | None = None  # path, run dir or artifact; null = the base model
    prompt: str | None = None  # one scripted turn instead of the interactive loop
    system: str | None = None
    generation: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(max_new_tokens=64, temperature=0.7,
                                                   use_static_cache=False, compile="none")
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
    # resume / checkpoint retention
    if cfg[node].save_every < 0 or cfg[node].keep_last < 0:
        raise ConfigError(f"{node}.save_every and {node}.keep_last must be >= 0")
    _allowed(cfg, f"{node}.keep_best_mode", ("min", "max"))
    best = cfg[node].keep_best_metric
    if best is not None and not str(best).startswith(f"{node}/"):
        raise ConfigError(f"{node}.keep_best_metric={best!r} must be a metric of this stage "
                          f"(e.g. {node}/eval_loss)")
    if best is not None and cfg[node].save_every <= 0:
        raise ConfigError(f"{node}.keep_best_metric needs {node}.save_every > 0 (checkpoints "
                          "to choose from)")


def _check_generation(cfg: DictConfig, node: str) -> None:
    _positive(cfg, f"{node}.max_new_tokens")
    gen = OmegaConf.select(cfg, node)
    if gen.do_sample and not gen.temperature > 0:
        raise ConfigError(f"{node}.temperature={gen.temperature} must be > 0 when sampling "
                          f"(set {node}.do_sample=false for greedy)")
    if not 0 < gen.top_p <= 1:
        raise ConfigError(f"{node}.top_p={gen.top_p} must be in (0, 1]")
    if gen.top_k < 0:
        raise ConfigError(f"{node}.top_k={gen.top_k} must be >= 0 (0 = off)")
    _allowed(cfg, f"{node}.compile", ("auto", "none", "cuda_graphs", "compile"))


def _check_eval_chat(cfg: DictConfig) -> None:
    """eval.* and chat.*; only the stage that runs is checked, so a bad chat key never stops
    a training run."""
    if cfg.stage.name in ("eval", "chat") and (cfg.hardware.nproc_per_node > 1
                                               or cfg.hardware.nnodes > 1):
        raise ConfigError(f"stage={cfg.stage.name} runs in one process; set "
                          "hardware.nproc_per_node=1 hardware.nnodes=1 (e.g. hardware=cpu or "
                          "hardware=1gpu)")
    if cfg.stage.name == "eval":
        ev = cfg.eval
        for name in ev.policies:
            if not str(name).replace("_", "").replace("-", "").isalnum():
                raise ConfigError(f"eval.policies has the name {name!r}; use letters, digits, "
                                  "_ and - (it names the metrics eval/<name>/...)")
        _allowed(cfg, "eval.kl_estimator", KL_ESTIMATORS)
        for key in ("batch_size", "max_prompt_len"):
            _positive(cfg, f"eval.{key}")
        for key in ("num_prompts", "num_pairs"):
            if ev[key] is not None:
                _positive(cfg, f"eval.{key}")
        _check_generation(cfg, "eval.generation")
    if cfg.stage.name == "chat":
        _check_generation(cfg, "chat.generation")


def _check_ppo(cfg: DictConfig) -> None:
    """PPO keys: allowed values, ranges, and a batch geometry that splits evenly over ranks."""
    pc = cfg.ppo
    _allowed(cfg, "ppo.kl.estimator", KL_ESTIMATORS)
    for key in ("steps", "rollout_batch_size", "micro_batch_size_per_device", "ppo_epochs",
                "num_minibatches", "max_prompt_len", "log_every",
                "eval_num_prompts", "eval_batch_size", "kl.horizon"):
        _positive(cfg, f"ppo.{key}")
    world = cfg.hardware.nproc_per_node * cfg.hardware.nnodes
    if pc.rollout_batch_size % (pc.num_minibatches * world):
        raise ConfigError(f"ppo.rollout_batch_size={pc.rollout_batch_size} must be divisible by "
                          f"ppo.num_minibatches ({pc.num_minibatches}) x ranks ({world})")
    minibatch = pc.rollout_batch_size // (pc.num_minibatches * world)  # per rank
    micro = min(pc.micro_batch_size_per_device, minibatch)
    if minibatch % micro:
        raise ConfigError(f"ppo: a minibatch holds {minibatch} sequences per rank (rollout_batch_"
                          f"size / num_minibatches / ranks); ppo.micro_batch_size_per_device="
                          f"{pc.micro_batch_size_per_device} must divide it")
    _check_generation(cfg, "ppo.generation")
    for key in ("gamma", "lam"):
        if not 0.0 <= pc[key] <= 1.0:
            raise ConfigError(f"ppo.{key}={pc[key]} must be in [0, 1]")
    for key in ("clip_range", "clip_range_value", "reward_clip", "kl.target"):
        value = OmegaConf.select(cfg, f"ppo.{key}")
        if value <= 0:
            raise ConfigError(f"ppo.{key}={value} must be > 0")
    for key in ("kl.coef", "ptx_coef", "vf_coef", "eval_every", "save_every"):
        value = OmegaConf.select(cfg, f"ppo.{key}")
        if value < 0:
            raise ConfigError(f"ppo.{key}={value} must be >= 0")
    if pc.target_approx_kl is not None and pc.target_approx_kl <= 0:
        raise ConfigError(f"ppo.target_approx_kl={pc.target_approx_kl} must be > 0, or null (off)")
    if not 0.0 < pc.ema.decay < 1.0:
        raise ConfigError(f"ppo.ema.decay={pc.ema.decay} must be in (0, 1)")
    for model in ("actor", "critic"):
        node = pc[model]
        if node.lr <= 0:
            raise ConfigError(f"ppo.{model}.lr={node.lr} must be > 0")
        _allowed(cfg, f"ppo.{model}.lr_scheduler", SCHEDULERS)
        if node.zero_stage is not None and node.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"ppo.{model}.zero_stage={node.zero_stage} must be 0, 1, 2, 3 or "
                              "null (= zero_stage.stage)")
    if pc.critic_lora.save not in ("merged", "adapter"):
        raise ConfigError(f"ppo.critic_lora.save={pc.critic_lora.save!r} is not allowed; "
                          "choose one of: merged, adapter")


def _check_tiny(cfg: DictConfig) -> None:
    from rlhf_exp.tiny_models import FAMILIES, TOKENIZERS

    _allowed(cfg, "model.tiny.family", FAMILIES)
    _allowed(cfg, "model.tiny.tokenizer", TOKENIZERS)
    if cfg.model.tiny.tokenizer == "char" and cfg.model.tiny.family != "llama":
        raise ConfigError(f"model.tiny.tokenizer=char is only built for model.tiny.family=llama "
                          f"(model=tiny); use tokenizer=bpe with family="
                          f"{cfg.model.tiny.family}")
    if cfg.model.tiny.tokenizer == "bpe" and not 300 <= cfg.model.tiny.vocab_size <= 8192:
        raise ConfigError(f"model.tiny.vocab_size={cfg.model.tiny.vocab_size} must be in "
                          "[300, 8192] (the llama tokenizer alone holds 259 byte and special "
                          "tokens)")


def _check_hardware(cfg: DictConfig) -> None:
    """Launch geometry: a multi-node run needs a rendezvous every node can reach."""
    hw = cfg.hardware
    _allowed(cfg, "hardware.launcher", LAUNCHERS)
    _positive(cfg, "hardware.nproc_per_node")
    _positive(cfg, "hardware.nnodes")
    if not 0 <= hw.node_rank < hw.nnodes:
        raise ConfigError(f"hardware.node_rank={hw.node_rank} must be in "
                          f"[0, hardware.nnodes={hw.nnodes})")
    if not 0 <= hw.master_port < 65536:
        raise ConfigError(f"hardware.master_port={hw.master_port} must be in [0, 65535] "
                          "(0 = pick a free one)")
    if hw.dry_run and hw.launcher == "submitit":
        raise ConfigError("hardware.dry_run prints a torchrun/deepspeed command; with "
                          "hardware.launcher=submitit the job is hydra.launcher.* (print it "
                          "with --cfg hydra)")
    if hw.hostfile and hw.launcher != "deepspeed":
        raise ConfigError(f"hardware.hostfile is only read by hardware.launcher=deepspeed "
                          f"(launcher is {hw.launcher!r}); remove it or switch launcher")


def _check_source(src: DictConfig, key: str) -> None:
    """What can be known about a data source without reading it (the rows are checked when they
    are loaded, before training: rlhf_exp/data/sources.py)."""
    from rlhf_exp.data.sources import FIELDS, LOCAL_SUFFIXES, resolve_path
    from rlhf_exp.tasks import GOLD_REWARDS

    for field_name in src.columns:
        if field_name not in FIELDS:
            raise ConfigError(f"{key}.columns has {field_name!r}; keys are internal fields: "
                              f"{', '.join(FIELDS)} (values are your column names)")
    if src.task is not None and src.task not in GOLD_REWARDS:
        raise ConfigError(f"{key}.task={src.task!r} is not a known gold reward; choose one of: "
                          f"{', '.join(GOLD_REWARDS)} (or null)")
    if src.max_examples is not None and src.max_examples < 1:
        raise ConfigError(f"{key}.max_examples={src.max_examples} must be >= 1 (or null = all)")
    if src.kind == "hub" and src.path:
        from rlhf_exp.data.sources import local_hub_dir

        try:
            local_hub_dir(str(src.path))  # a local copy that is not there fails here
        except UserError as exc:
            raise ConfigError(f"{key}.path={exc}") from None
    if src.kind == "local":
        try:
            path = resolve_path(str(src.path))
        except UserError as exc:
            raise ConfigError(f"{key}.path: {exc}") from None
        if not path.exists():
            raise ConfigError(f"{key}.path={src.path!r}: no such file or folder ({path}); "
                              "relative paths start from the directory you launched in")
        if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
            raise ConfigError(f"{key}.path={src.path!r}: unsupported file type "
                              f"{path.suffix!r}; use {', '.join(LOCAL_SUFFIXES)}")


def check_rendezvous(cfg: DictConfig) -> None:
    """Before a multi-node launch (not at composition, so the multinode presets compose on their
    own and take the node-specific values on the command line): every node must reach the same
    master_addr:master_port, and DeepSpeed's runner needs a hostfile."""
    hw = cfg.hardware
    if hw.nnodes > 1 and hw.launcher != "submitit":
        if hw.master_addr in ("127.0.0.1", "localhost", ""):
            raise ConfigError(f"hardware.nnodes={hw.nnodes} needs hardware.master_addr set to "
                              f"the address of node 0 (not {hw.master_addr!r})")
        if hw.master_port == 0:
            raise ConfigError(f"hardware.nnodes={hw.nnodes} needs a fixed hardware.master_port "
                              "(the same on every node), e.g. 29500")
    if hw.launcher == "deepspeed" and hw.nnodes > 1:
        if not hw.hostfile:
            raise ConfigError("hardware.launcher=deepspeed with hardware.nnodes > 1 needs "
                              "hardware.hostfile (one 'host slots=N' line per node)")
        if not Path(hw.hostfile).is_file():
            raise ConfigError(f"hardware.hostfile={hw.hostfile!r}: no such file")


def validate(cfg: DictConfig) -> None:
    """Semantic checks on the composed config; raises ConfigError with one readable line."""
    _allowed(cfg, "stage.name", STAGES)
    for name in cfg.stage.stages:
        if name not in ("sft", "reward", "ppo"):
            raise ConfigError(f"stage.stages has {name!r}; each must be one of: sft, reward, ppo")
    _allowed(cfg, "hardware.device", DEVICES)
    _allowed(cfg, "hardware.precision", PRECISIONS)
    _check_hardware(cfg)
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
    if cfg.model.path is None:
        _check_tiny(cfg)
    if cfg.model.lora.save not in ("merged", "adapter"):
        raise ConfigError(f"model.lora.save={cfg.model.lora.save!r} is not allowed; "
                          "choose one of: merged, adapter")
    _allowed(cfg, "logger.name", ("wandb", "none"))
    _allowed(cfg, "logger.mode", ("offline", "online", "disabled"))
    _check_train_loop(cfg, "sft")
    _check_train_loop(cfg, "reward")
    _check_eval_chat(cfg)
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
        _check_source(src, key)
    names = [src.name for src in cfg.data_mix.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"data_mix.sources have duplicate names {names}; each needs its own "
                          "(it seeds the source's shuffle and tags its rows)")
    if cfg.data_mix.max_eval_examples < 0:
        raise ConfigError(f"data_mix.max_eval_examples={cfg.data_mix.max_eval_examples} must "
                          "be >= 0")
    # ppo
    _check_ppo(cfg)
