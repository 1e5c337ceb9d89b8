"""Config schemas: one dataclass per config node, registered with Hydra's ConfigStore.

`conf/config.yaml` lists `base_config` (the `RootConfig` below) first in its defaults, so every
YAML file of every group is merged onto a typed schema: an unknown key or a wrongly typed value
fails at composition. `validate()` then checks what types cannot (allowed values, ranges,
consistency) before any model is loaded. The YAML files under `conf/` are what users read and
edit; these dataclasses say what may appear there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from rlhf_exp.errors import ConfigError, UserError

STAGES = ("sft", "reward", "ppo", "grpo", "dpo", "pipeline", "algorithms", "eval", "chat")
# `stage=pipeline`: the stages it may chain, and where each one starts from when its key is left
# unset: key -> the output of the latest earlier stage of that name, or of the latest earlier
# stage that trains a policy ("policy": sft or a stage with a "policy" key). A new stage is one
# entry here (e.g. "dpo": {"dpo.init_from": "policy"}); the stage named by a "policy" key is a
# policy-training stage whose start and result the pipeline's summary compares.
PIPELINE_HANDOFF: dict[str, dict[str, str]] = {
    "sft": {},
    "reward": {"reward.init_from": "sft"},
    "ppo": {"ppo.actor_init": "policy", "ppo.critic_init": "reward"},
    "grpo": {"grpo.actor_init": "policy", "grpo.reward_model": "reward"},
    "dpo": {"dpo.init_from": "policy"},
}
# stage -> the key naming the policy it starts from (ppo.actor_init, grpo.actor_init, ...)
POLICY_START_KEY = {stage: key for stage, keys in PIPELINE_HANDOFF.items()
                    for key, source in keys.items() if source == "policy"}
POLICY_STAGES = ("sft", *POLICY_START_KEY)  # stages whose output is a policy (a causal LM)
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")
LAUNCHERS = ("torchrun", "deepspeed", "submitit")
OFFLOAD = ("none", "cpu")
SCHEDULERS = ("cosine", "linear", "constant")
FORMATS = ("prompt_response", "preference", "hh", "chat")
SOURCE_KINDS = ("synthetic", "local", "hub")
OVERLONG = ("truncate", "drop")
# the KL estimators of rlhf_exp/ppo_math.kl_per_token (which imports this tuple: this module must
# stay torch-free so that `--help` and `--cfg job` start fast). ConfigError lives in
# rlhf_exp/errors.py and is importable from here as before.
KL_ESTIMATORS = ("k1", "k2", "k3")
GRPO_BASELINES = ("group_mean", "leave_one_out")
GRPO_SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSS_AGG = ("token_mean", "sequence_mean", "dr_grpo")
# the DPO losses of rlhf_exp/dpo_math.py (TRL's DPOTrainer names; docs/dpo.md has the formulas)
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
# the shares of data_mix.split each stage reads (eval: the ppo share's held-out prompts)
# (dpo: the reward share's pairs; its held-out gold reward reads the ppo share's held-out
# prompts when that share is there, as PPO's does)
STAGE_SHARES = {"sft": ("sft",), "reward": ("reward",), "ppo": ("ppo",), "grpo": ("ppo",),
                "dpo": ("reward",), "eval": ("ppo",), "chat": ()}
# a name that is safe as a folder name and inside W&B artifact names (<experiment_name>-sft-model)
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


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
    # an `rlhf-exp-fetch` recipe that gives a local copy of the hub id `path` (rlhf_exp/fetch.py):
    # used where the hub copy is neither cached nor reachable; null = path as it is
    fetch: str | None = None
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
    name: str = MISSING  # the runner: sft, reward, ppo, grpo, dpo, pipeline, algorithms, eval, chat
    # pipeline only: the stages run in order, each starting from the previous one's output
    # (PIPELINE_HANDOFF above)
    stages: list[str] = field(default_factory=lambda: ["sft", "reward", "ppo"])
    # algorithms only: arm name -> {stages: [...], overrides: [...]}: a pipeline whose last
    # stage is the arm's own, the stages before it (sft, reward) shared by every arm and trained
    # once, and command-line overrides of that stage's keys (conf/stage/algorithms.yaml).
    # Untyped so that `+stage.arms.x={stages:[sft,grpo]}` adds one; _check_algorithms checks it
    arms: dict[str, Any] = field(default_factory=dict)


SHARED_STAGES = ("sft", "reward")  # stages an arm of stage=algorithms may share with the others


def run_stages(cfg: DictConfig) -> list[str]:
    """The training stages a run goes through: a pipeline's chain, the union of the arms'
    chains of stage=algorithms (shared stages once), else the stage itself."""
    if cfg.stage.name == "pipeline":
        return list(cfg.stage.stages)
    if cfg.stage.name == "algorithms":
        return list(dict.fromkeys(s for arm in cfg.stage.arms.values() for s in arm.stages))
    return [cfg.stage.name]


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
    """Keys shared by the SFT and reward stages (rlhf_exp/train_loop.py). Batch sizes:
    `micro_batch_size_per_device` is per device per forward; one optimizer step sees the
    *global* batch micro_batch_size_per_device * gradient_accumulation_steps * world_size.
    Defaults are conf/sft/default.yaml's; RewardConfig sets the ones its YAML changes
    (tests/test_config_defaults.py keeps them equal)."""

    init_from: str | None = None  # local path or W&B artifact name; null = model base
    epochs: int = 4
    max_steps: int = -1  # optimizer steps; -1 = epochs over the data
    micro_batch_size_per_device: int = 32
    gradient_accumulation_steps: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_prompt_len: int = 32
    max_len: int = 48  # prompt + response tokens
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
class DPOConfig(TrainLoopConfig):
    """`stage=dpo` (rlhf_exp/stages/dpo.py, docs/dpo.md): the train-loop keys, counted in
    preference pairs, plus the DPO loss. Its held-out gold reward uses PPO's eval settings
    (ppo.generation, ppo.eval_num_prompts, ppo.eval_batch_size, ppo.max_prompt_len), so the
    numbers compare with PPO's for the same policy."""

    # frozen reference policy (path, run dir or artifact); null = the starting policy (init_from)
    reference: str | None = None
    beta: float = 0.1  # strength of the pull to the reference (IPO: its tau); TRL's default
    loss_type: str = "sigmoid"  # sigmoid (DPO) | hinge | ipo | robust
    # sigmoid: conservative DPO (cDPO), the share of labels taken as flipped; robust: the
    # flip rate of rDPO; both in [0, 0.5). hinge / ipo: must be 0
    label_smoothing: float = 0.0
    # weight of the NLL of the chosen response (RPO; its paper's 1.0): it anchors the policy to
    # the chosen answers; without it DPO drifts off on the demo (docs/dpo.md); 0 = plain DPO
    rpo_alpha: float = 1.0
    # compute each pair's prompt once for its two responses (KV cache repeated; the same
    # numbers, fewer tokens); off with model.gradient_checkpointing (no cache in training)
    shared_prompt: bool = True
    epochs: int = 1
    lr: float = 1e-3
    warmup_steps: int = 10
    eval_every: int = 50


@dataclass
class RewardConfig(TrainLoopConfig):
    epochs: int = 6
    lr: float = 1e-3
    warmup_steps: int = 50
    log_every: int = 20
    eval_every: int = 200


COMPILE_MODES = ("auto", "none", "cuda_graphs", "compile")


@dataclass
class GenerationSettings:
    """Sampling settings: the schema of `ppo.generation`, `eval.generation` and `chat.generation`,
    and the object `rlhf_exp.generation.generate` takes (imported there as GenerationConfig).
    Declared once; chat's node overrides the defaults its YAML changes (ChatConfig below)."""

    max_new_tokens: int = 12  # max response tokens; stops at EOS
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    use_static_cache: bool = True  # fixed-shape KV cache
    # "auto": cuda_graphs on CUDA, none on CPU; "none": eager loop; "cuda_graphs": capture the
    # decode step with torch.cuda.CUDAGraph; "compile": torch.compile(mode="reduce-overhead")
    compile: str = "auto"

    def __post_init__(self) -> None:
        check_generation(vars(self), "generation")


def check_generation(gen: Any, node: str) -> None:
    """Raise ConfigError naming `<node>.<key>` for a setting generate() cannot use. `gen` is a
    GenerationSettings' fields or a composed config node (the same check for both)."""
    if not gen["max_new_tokens"] >= 1:
        raise ConfigError(f"{node}.max_new_tokens={gen['max_new_tokens']!r} must be >= 1")
    if gen["do_sample"] and not gen["temperature"] > 0:
        raise ConfigError(f"{node}.temperature={gen['temperature']} must be > 0 when sampling "
                          f"(set {node}.do_sample=false for greedy)")
    if not 0 < gen["top_p"] <= 1:
        raise ConfigError(f"{node}.top_p={gen['top_p']} must be in (0, 1]")
    if gen["top_k"] < 0:
        raise ConfigError(f"{node}.top_k={gen['top_k']} must be >= 0 (0 = off)")
    if gen["compile"] not in COMPILE_MODES:
        raise ConfigError(f"{node}.compile={gen['compile']!r} is not allowed; choose one of: "
                          f"{', '.join(COMPILE_MODES)}")


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
class RewardFunctionConfig:
    """One reward function of an RL stage (rlhf_exp/rewards.py)."""

    fn: str = MISSING  # "package.module:function", e.g. rlhf_exp.tasks:gold_reward_fn
    weight: float = 1.0


@dataclass
class PPOConfig:
    actor_init: str | None = None  # SFT output (path or artifact); null = model base
    critic_init: str | None = None  # reward-model output (path or artifact)
    # frozen reward model (path or artifact); null = the same checkpoint as critic_init
    reward_model: str | None = None
    reward_model_weight: float = 1.0  # 0 = no reward model (reward_functions only)
    reward_functions: list[RewardFunctionConfig] = field(default_factory=list)
    steps: int = 100  # rollouts (PPO iterations)
    rollout_batch_size: int = 64  # prompts per rollout, global
    micro_batch_size_per_device: int = 32  # per forward/backward during the update
    ppo_epochs: int = 1
    num_minibatches: int = 1
    max_prompt_len: int = 32
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
class GRPOConfig:
    """`stage=grpo`: critic-free policy gradient with group baselines (GRPO, RLOO, Dr. GRPO,
    DAPO-style options). conf/grpo/default.yaml documents every key; docs/grpo.md the math."""

    actor_init: str | None = None  # SFT output (path, run dir or artifact); null = model base
    reward_model: str | None = None  # frozen reward model (path or artifact); null = none
    reward_model_weight: float = 1.0
    # null = the task's gold reward (rlhf_exp.tasks:gold_reward_fn) when there is no
    # reward_model, none when there is one; [] = none
    reward_functions: list[RewardFunctionConfig] | None = None
    steps: int = 100  # rollouts (optimisation rounds)
    prompts_per_step: int = 8  # prompts per rollout, GLOBAL (split over ranks)
    num_generations: int = 8  # completions per prompt (the group), sampled on one rank
    micro_batch_size_per_device: int = 64  # completions per forward/backward
    num_iterations: int = 1  # passes over each rollout (TRL's num_iterations, GRPO's mu)
    num_minibatches: int = 1  # optimizer steps per pass
    epsilon: float = 0.2  # ratio clip: 1 - epsilon
    epsilon_high: float | None = None  # ratio clip: 1 + epsilon_high; null = epsilon
    beta: float = 0.3  # KL(policy || reference) coefficient; 0 = no reference model at all
    # k1 | k2 | k3; null = k3 as a loss term, k1 in the reward (docs/grpo.md says why)
    kl_estimator: str | None = None
    kl_in_reward: bool = False  # false: beta * KL is a loss term; true: folded into the reward
    baseline: str = "group_mean"  # group_mean (GRPO) | leave_one_out (RLOO)
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    loss_agg: str = "token_mean"  # token_mean (DAPO) | sequence_mean (GRPO) | dr_grpo
    entropy_coef: float = 0.0  # entropy bonus
    filter_zero_std: bool = False  # leave groups whose rewards are all equal out of the update
    # compute each group's prompt once in the forwards (exact; needs micro-batches of whole
    # groups and no gradient checkpointing, else off)
    shared_prompt: bool = True
    max_prompt_len: int = 32
    # eager decoding (CPU) over a dynamic cache: faster there, and it prefills each group's
    # prompt once; CUDA (compile: auto) decodes over a static cache as CUDA graphs either way
    generation: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(use_static_cache=False))
    actor: PPOModelOptim = field(default_factory=lambda: PPOModelOptim(lr=3e-4))
    offload_reference: bool = False
    offload_reward_model: bool = False
    log_every: int = 1
    eval_every: int = 20
    eval_num_prompts: int = 256
    eval_batch_size: int = 64
    save_every: int = 0
    keep_last: int = 2


@dataclass
class EvalConfig:
    """`stage=eval`: compare policies on the PPO share's held-out prompts (docs/eval_chat.md)."""

    # name -> path, run dir or artifact; null entries are skipped. The YAML lists sft, ppo and
    # ppo_ema (set them as eval.policies.sft=...); other names need +eval.policies.<name>=...
    policies: dict[str, str | None] = field(
        default_factory=lambda: {"sft": None, "ppo": None, "ppo_ema": None})
    # a pipeline run dir (or one stage's run dir): its sft / ppo / ppo_ema policies and reward
    # model are found from their result.json and checkpoints; `policies` entries add/override
    from_run: str | None = None
    include_base: bool = False  # also evaluate the untrained base model (policy `base`)
    # with from_run: take seed, model, data_mix, reward, ppo and grpo from the run's config, so
    # the held-out prompts are the run's own and the defaults follow its PPO (or GRPO) eval
    match_run: bool = True
    reward_model: str | None = None  # path or artifact; null = the from_run reward model
    # KL reference: a policy name from `policies`, or a path/artifact; null = the policy `sft`
    reference: str | None = None
    kl_estimator: str = "k1"  # k1 | k2 | k3 (rlhf_exp/ppo_math.py)
    # the defaults below follow PPO's held-out eval (conf/eval/default.yaml interpolates them)
    num_prompts: int | None = 256  # first N held-out prompts; null = the whole slice
    num_pairs: int | None = None  # first N held-out preference pairs; null = all
    batch_size: int = 64
    max_prompt_len: int = 32
    generation: GenerationSettings = field(default_factory=GenerationSettings)


@dataclass
class ChatConfig:
    policy: str | None = None  # path, run dir or artifact; null = the base model
    prompt: str | None = None  # one scripted turn instead of the interactive loop
    system: str | None = None
    generation: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(max_new_tokens=64, temperature=0.7, top_p=0.9,
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
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
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
    init = cfg[node].init_from
    if init is not None and not str(init).strip():
        raise ConfigError(f"{node}.init_from is empty; give a path, run dir or artifact, or null")
    for key in ("micro_batch_size_per_device", "gradient_accumulation_steps", "epochs",
                "max_prompt_len", "max_len", "log_every"):
        _positive(cfg, f"{node}.{key}")
    _allowed(cfg, f"{node}.lr_scheduler", SCHEDULERS)
    if cfg[node].max_prompt_len >= cfg[node].max_len:
        raise ConfigError(f"{node}.max_prompt_len ({cfg[node].max_prompt_len}) must be smaller "
                          f"than {node}.max_len ({cfg[node].max_len})")
    if cfg[node].lr <= 0:
        raise ConfigError(f"{node}.lr={cfg[node].lr} must be > 0")
    if cfg[node].max_steps == 0 or cfg[node].max_steps < -1:
        raise ConfigError(f"{node}.max_steps={cfg[node].max_steps} must be >= 1, or -1 (train "
                          f"{node}.epochs epochs over the data)")
    _check_optimizer(cfg, node)
    for key in ("eval_every", "warmup_steps"):
        if cfg[node][key] < 0:
            raise ConfigError(f"{node}.{key}={cfg[node][key]} must be >= 0")
    betas = list(cfg[node].adam_betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{node}.adam_betas={betas} must be two numbers in [0, 1), e.g. "
                          "[0.9, 0.95]")
    if cfg[node].adam_eps <= 0:
        raise ConfigError(f"{node}.adam_eps={cfg[node].adam_eps} must be > 0")
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


def _check_optimizer(cfg: DictConfig, node: str) -> None:
    """Optimizer keys shared by sft, reward, ppo.actor and ppo.critic (lr is checked apart)."""
    opt = OmegaConf.select(cfg, node)
    if opt.weight_decay < 0:
        raise ConfigError(f"{node}.weight_decay={opt.weight_decay} must be >= 0")
    if opt.warmup_steps < 0:
        raise ConfigError(f"{node}.warmup_steps={opt.warmup_steps} must be >= 0")
    if not 0.0 <= opt.min_lr_ratio <= 1.0:
        raise ConfigError(f"{node}.min_lr_ratio={opt.min_lr_ratio} must be in [0, 1] (the "
                          "final LR as a share of the peak)")
    if opt.max_grad_norm < 0:
        raise ConfigError(f"{node}.max_grad_norm={opt.max_grad_norm} must be >= 0 (0 = no "
                          "clipping)")


def _check_lora(cfg: DictConfig, node: str) -> None:
    lora = OmegaConf.select(cfg, node)
    if lora.save not in ("merged", "adapter"):
        raise ConfigError(f"{node}.save={lora.save!r} is not allowed; choose one of: merged, "
                          "adapter")
    if not lora.enabled:
        return
    _positive(cfg, f"{node}.r")
    if lora.alpha <= 0:
        raise ConfigError(f"{node}.alpha={lora.alpha} must be > 0")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"{node}.dropout={lora.dropout} must be in [0, 1)")
    if not lora.target_modules or not all(str(m).strip() for m in lora.target_modules):
        raise ConfigError(f"{node}.target_modules={list(lora.target_modules)} must name modules "
                          "(e.g. [q_proj, v_proj]) or be [all-linear]")


def _check_text(cfg: DictConfig, key: str, allow_empty: bool = False) -> None:
    """A free-text key: non-blank (unless allowed), no control characters but tab/newline."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    if not allow_empty and not str(value).strip():
        raise ConfigError(f"{key} is empty; give some text or leave it null")
    bad = next((c for c in str(value) if is_control(c)), None)
    if bad is not None:
        raise ConfigError(f"{key} holds the control character {bad!r}; use plain text")


def is_control(char: str) -> bool:
    """A control character other than tab, newline and carriage return."""
    import unicodedata

    return char not in "\t\n\r" and unicodedata.category(char) == "Cc"


def _check_model(cfg: DictConfig) -> None:
    m = cfg.model
    if not m.path and m.tiny is None:
        raise ConfigError("model.path is missing: give a hub id or a local directory "
                          "(or use model=tiny)")
    for key in ("path", "reward_path", "tokenizer_path"):
        if m[key] is not None and not str(m[key]).strip():
            raise ConfigError(f"model.{key} is empty; give a hub id or a local directory, or "
                              "null")
    if m.tiny is not None:
        t = m.tiny
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _positive(cfg, f"model.tiny.{key}")
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError(f"model.tiny: hidden_size ({t.hidden_size}) must be divisible by "
                              f"num_attention_heads ({t.num_attention_heads}), and that by "
                              f"num_key_value_heads ({t.num_key_value_heads})")
    if not str(m.attn_implementation).strip():
        raise ConfigError("model.attn_implementation is empty; e.g. sdpa or eager")
    template = str(m.prompt_template)
    try:
        filled = template.format(prompt="<<PROMPT>>")
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ConfigError(f"model.prompt_template={template!r} is not a template with only "
                          f"{{prompt}} ({type(exc).__name__}: {exc}); write literal braces as "
                          "{{ and }}") from None
    if "<<PROMPT>>" not in filled:
        raise ConfigError(f"model.prompt_template={template!r} has no {{prompt}}: the prompt "
                          "would be dropped; e.g. 'Question: {prompt} Answer:'")
    if m.tiny is not None and not m.path:
        _check_tiny(cfg)
    _check_lora(cfg, "model.lora")


def _check_run_names(cfg: DictConfig) -> None:
    """experiment_name names folders and W&B groups/artifacts; tags are W&B tags; the seed
    seeds torch."""
    name = str(cfg.experiment_name)
    if not name or not set(name) <= NAME_CHARS or name.startswith((".", "-")) or len(name) > 96:
        raise ConfigError(f"experiment_name={name!r}: use 1-96 letters, digits, _ . and - (not "
                          "starting with . or -); it names the run folders and W&B artifacts")
    for tag in cfg.tags:
        if not str(tag).strip() or len(str(tag)) > 64:
            raise ConfigError(f"tags has {str(tag)!r}; each tag must be 1-64 characters (W&B)")
    if not -2**63 < cfg.seed < 2**63:
        raise ConfigError(f"seed={cfg.seed} must fit in 64 bits (torch's RNG takes no larger)")
    if not str(cfg.logger.project).strip():
        raise ConfigError("logger.project is empty; name the W&B project (default rlhf_exp)")
    if cfg.logger.table_every < 0:
        raise ConfigError(f"logger.table_every={cfg.logger.table_every} must be >= 0 (0 = off)")


def _check_objective(cfg: DictConfig) -> None:
    """`objective` must be a metric the stage reports (docs: the README's metrics table)."""
    if cfg.objective is None:
        return
    stage = cfg.stage.name
    prefixes = {"pipeline": (*(f"{s}/" for s in PIPELINE_HANDOFF), "pipeline/", "perf/"),
                "algorithms": ("algorithms/",),
                "eval": ("eval/",), "chat": ()}.get(stage, (f"{stage}/", "perf/"))
    if not str(cfg.objective).startswith(prefixes):
        allowed = ", ".join(f"{p}..." for p in prefixes) or "none (chat returns no metric)"
        raise ConfigError(f"objective={cfg.objective!r} is not a metric of stage={stage}; "
                          f"allowed: {allowed} (the README lists the metrics)")


def _check_stage_shares(cfg: DictConfig) -> None:
    """Every stage that runs needs a positive share of data_mix.split."""
    split = list(cfg.data_mix.split)
    index = {"sft": 0, "reward": 1, "ppo": 2}
    stages = run_stages(cfg)
    needs = [(s, share) for s in stages for share in STAGE_SHARES[s]]
    if ("ppo" in stages) and cfg.ppo.ptx_coef > 0:
        needs.append(("ppo (ppo.ptx_coef > 0 trains on the sft share too)", "sft"))
    for who, share in needs:
        if split[index[share]] <= 0:
            raise ConfigError(f"data_mix.split={split} gives the {share} share 0, but stage "
                              f"{who} reads it; give it a positive share (sft, reward, ppo), "
                              "e.g. data_mix.split=[2,4,4]")


def _check_generation(cfg: DictConfig, node: str) -> None:
    check_generation(OmegaConf.select(cfg, node), node)


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
        for name, ref in ev.policies.items():
            if not str(name).replace("_", "").replace("-", "").isalnum():
                raise ConfigError(f"eval.policies has the name {name!r}; use letters, digits, "
                                  "_ and - (it names the metrics eval/<name>/...)")
            if ref is not None and not str(ref).strip():
                raise ConfigError(f"eval.policies.{name} is empty; give a path, run dir or "
                                  "artifact, or null")
        for key in ("from_run", "reward_model", "reference"):
            if ev[key] is not None and not str(ev[key]).strip():
                raise ConfigError(f"eval.{key} is empty; give a path or leave it null")
        _allowed(cfg, "eval.kl_estimator", KL_ESTIMATORS)
        for key in ("batch_size", "max_prompt_len"):
            _positive(cfg, f"eval.{key}")
        for key in ("num_prompts", "num_pairs"):
            if ev[key] is not None:
                _positive(cfg, f"eval.{key}")
        _check_generation(cfg, "eval.generation")
    if cfg.stage.name == "chat":
        _check_generation(cfg, "chat.generation")
        _check_text(cfg, "chat.prompt")
        _check_text(cfg, "chat.system", allow_empty=True)
        if cfg.chat.policy is not None and not str(cfg.chat.policy).strip():
            raise ConfigError("chat.policy is empty; give a path, run dir or artifact, or null "
                              "(the base model)")


def _check_dpo(cfg: DictConfig) -> None:
    """DPO keys: the train-loop keys, the loss, and the reference."""
    _check_train_loop(cfg, "dpo")
    dc = cfg.dpo
    if dc.reference is not None and not str(dc.reference).strip():
        raise ConfigError("dpo.reference is empty; give a path, run dir or artifact, or null "
                          "(the starting policy)")
    _allowed(cfg, "dpo.loss_type", DPO_LOSS_TYPES)
    if dc.beta <= 0:
        raise ConfigError(f"dpo.beta={dc.beta} must be > 0")
    if not 0.0 <= dc.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing={dc.label_smoothing} must be in [0, 0.5) (the "
                          "share of preference labels taken as flipped)")
    if dc.label_smoothing > 0 and dc.loss_type not in ("sigmoid", "robust"):
        raise ConfigError(f"dpo.label_smoothing={dc.label_smoothing} only applies to "
                          f"dpo.loss_type=sigmoid (cDPO) or robust (rDPO), not "
                          f"{dc.loss_type}; set it to 0")
    if dc.rpo_alpha < 0:
        raise ConfigError(f"dpo.rpo_alpha={dc.rpo_alpha} must be >= 0 (0 = no NLL term)")


def _check_ppo(cfg: DictConfig) -> None:
    """PPO keys: allowed values, ranges, and a batch geometry that splits evenly over ranks."""
    pc = cfg.ppo
    for key in ("actor_init", "critic_init", "reward_model"):
        if pc[key] is not None and not str(pc[key]).strip():
            raise ConfigError(f"ppo.{key} is empty; give a path, run dir or artifact, or null")
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
        _check_optimizer(cfg, f"ppo.{model}")
        if node.zero_stage is not None and node.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"ppo.{model}.zero_stage={node.zero_stage} must be 0, 1, 2, 3 or "
                              "null (= zero_stage.stage)")
    check_rewards(cfg, "ppo")
    _check_lora(cfg, "ppo.critic_lora")


def _check_grpo(cfg: DictConfig) -> None:
    """GRPO keys (only when a grpo stage runs): allowed values, ranges, whole groups on every
    rank, and a batch geometry that splits evenly."""
    if "grpo" not in run_stages(cfg):
        return
    gc = cfg.grpo
    for key in ("steps", "prompts_per_step", "micro_batch_size_per_device", "num_iterations",
                "num_minibatches", "max_prompt_len", "log_every", "eval_num_prompts",
                "eval_batch_size"):
        _positive(cfg, f"grpo.{key}")
    _positive(cfg, "grpo.num_generations", 2)
    _allowed(cfg, "grpo.baseline", GRPO_BASELINES)
    _allowed(cfg, "grpo.scale_rewards", GRPO_SCALE_REWARDS)
    _allowed(cfg, "grpo.loss_agg", GRPO_LOSS_AGG)
    if gc.kl_estimator is not None:
        _allowed(cfg, "grpo.kl_estimator", KL_ESTIMATORS)
    world = cfg.hardware.nproc_per_node * cfg.hardware.nnodes
    if gc.prompts_per_step % world:
        raise ConfigError(f"grpo.prompts_per_step={gc.prompts_per_step} must be divisible by the "
                          f"ranks ({world}): each rank samples whole groups")
    local = gc.prompts_per_step // world * gc.num_generations  # completions per rank
    if local % gc.num_minibatches:
        raise ConfigError(f"grpo: a rank's {local} completions per step (prompts_per_step / "
                          f"ranks x num_generations) do not split into grpo.num_minibatches="
                          f"{gc.num_minibatches}")
    minibatch = local // gc.num_minibatches
    if minibatch % min(gc.micro_batch_size_per_device, minibatch):
        raise ConfigError(f"grpo: a minibatch holds {minibatch} completions per rank; "
                          f"grpo.micro_batch_size_per_device={gc.micro_batch_size_per_device} "
                          "must divide it")
    _check_generation(cfg, "grpo.generation")
    if not gc.generation.do_sample:
        raise ConfigError("grpo.generation.do_sample=false makes a prompt's num_generations "
                          "completions identical (no group signal); GRPO samples")
    if gc.epsilon <= 0 or (gc.epsilon_high is not None and gc.epsilon_high <= 0):
        raise ConfigError(f"grpo.epsilon={gc.epsilon} and grpo.epsilon_high={gc.epsilon_high} "
                          "must be > 0 (epsilon_high null = epsilon)")
    for key in ("beta", "entropy_coef", "eval_every", "save_every", "keep_last"):
        if gc[key] < 0:
            raise ConfigError(f"grpo.{key}={gc[key]} must be >= 0")
    if gc.kl_in_reward and gc.beta == 0:
        raise ConfigError("grpo.kl_in_reward=true folds beta * KL into the reward, but "
                          "grpo.beta=0; set grpo.beta > 0 or grpo.kl_in_reward=false")
    if gc.actor.lr <= 0:
        raise ConfigError(f"grpo.actor.lr={gc.actor.lr} must be > 0")
    _allowed(cfg, "grpo.actor.lr_scheduler", SCHEDULERS)
    if gc.actor.zero_stage is not None and gc.actor.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"grpo.actor.zero_stage={gc.actor.zero_stage} must be 0, 1, 2, 3 or "
                          "null (= zero_stage.stage)")
    if gc.reward_model_weight < 0:
        raise ConfigError(f"grpo.reward_model_weight={gc.reward_model_weight} must be >= 0")
    functions = gc.reward_functions if gc.reward_functions is not None else []
    for i, item in enumerate(functions):
        module, sep, name = str(item.fn).partition(":")
        if not sep or not module or not name:
            raise ConfigError(f"grpo.reward_functions[{i}].fn={item.fn!r}: name a function as "
                              "'package.module:function' (e.g. rlhf_exp.tasks:gold_reward_fn)")
    pipeline_rm = cfg.stage.name == "pipeline" and "reward" in cfg.stage.stages
    has_rm = (gc.reward_model is not None or pipeline_rm) and gc.reward_model_weight > 0
    if gc.reward_functions is not None and not gc.reward_functions and not has_rm:
        raise ConfigError("grpo: no reward: grpo.reward_functions is empty and there is no "
                          "reward model (grpo.reward_model null or grpo.reward_model_weight 0)")


def check_rewards(cfg: DictConfig, node: str) -> None:
    """`<node>.reward_model_weight` / `reward_functions`: at least one reward, well-formed names
    (importing and calling them happens before training: rlhf_exp/rewards.py)."""
    sc = cfg[node]
    if sc.reward_model_weight < 0:
        raise ConfigError(f"{node}.reward_model_weight={sc.reward_model_weight} must be >= 0 "
                          "(0 = no reward model)")
    for i, item in enumerate(sc.reward_functions):
        module, sep, name = str(item.fn).partition(":")
        if not sep or not module or not name:
            raise ConfigError(f"{node}.reward_functions[{i}].fn={item.fn!r}: name a function as "
                              "'package.module:function' (e.g. rlhf_exp.tasks:gold_reward_fn)")
    if sc.reward_model_weight == 0 and not sc.reward_functions:
        raise ConfigError(f"{node}: no reward: {node}.reward_model_weight is 0 and "
                          f"{node}.reward_functions is empty")


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
    for field_name, column in src.columns.items():
        if not str(column).strip():
            raise ConfigError(f"{key}.columns.{field_name} is empty; give the column's name")
    if src.kind == "hub" and not str(src.hub_split).strip():
        raise ConfigError(f"{key}.hub_split is empty; name the dataset split, e.g. train")
    if src.kind == "hub" and src.path:
        from rlhf_exp.data.sources import local_hub_dir

        try:
            local_hub_dir(str(src.path))  # a local copy that is not there fails here
        except UserError as exc:
            raise ConfigError(f"{key}.path={exc}") from None
    if src.kind == "synthetic":
        task = src.synthetic
        if task.num_examples < 1:
            raise ConfigError(f"{key}.synthetic.num_examples={task.num_examples} must be >= 1")
        if not 1 <= task.min_digits <= task.max_digits:
            raise ConfigError(f"{key}.synthetic: min_digits={task.min_digits} and max_digits="
                              f"{task.max_digits} need 1 <= min_digits <= max_digits")
        if not 0.0 <= task.demo_noise <= 1.0:
            raise ConfigError(f"{key}.synthetic.demo_noise={task.demo_noise} must be in [0, 1]")
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


def _check_finite(node: Any, key: str = "") -> None:
    """No nan or inf anywhere: every comparison with them is False, so range checks pass them."""
    if OmegaConf.is_dict(node):
        for k in node:
            if k != "hydra" and not OmegaConf.is_missing(node, k):
                _check_finite(node[k], f"{key}.{k}" if key else str(k))
    elif OmegaConf.is_list(node):
        for i, item in enumerate(node):
            _check_finite(item, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{key}={node} must be a finite number")


def _check_chain(stages: list[str], key: str) -> None:
    """A pipeline's chain: each stage starts from what the stages before it produced
    (PIPELINE_HANDOFF): SFT comes first, a reward model before the stages that use it, no stage
    twice."""
    for name in stages:
        if name not in PIPELINE_HANDOFF:
            raise ConfigError(f"{key} has {name!r}; each must be one of: "
                              f"{', '.join(PIPELINE_HANDOFF)}")
    wrong = (not stages or len(set(stages)) != len(stages)
             or ("sft" in stages and stages[0] != "sft")
             or any("reward" in keys.values() and "reward" in stages
                    and stages.index("reward") > i
                    for i, keys in enumerate(PIPELINE_HANDOFF[s] for s in stages)))
    if wrong:
        raise ConfigError(f"{key}={stages} must list stages of "
                          f"{', '.join(PIPELINE_HANDOFF)} once each, sft first and reward "
                          "before the stages that use its model (e.g. [sft, reward, ppo], "
                          "[sft, grpo], [sft, dpo])")


def _check_algorithms(cfg: DictConfig) -> None:
    """stage=algorithms: at least one arm; each a chain of shared stages (sft, reward) ending
    in a stage that trains a policy from them, named like a folder."""
    if cfg.stage.name != "algorithms":
        return
    if not cfg.stage.arms:
        raise ConfigError("stage=algorithms has no arms: give stage.arms.<name>.stages, e.g. "
                          "'+stage.arms.grpo.stages=[sft,grpo]' (conf/stage/algorithms.yaml)")
    for name, arm in cfg.stage.arms.items():
        key = f"stage.arms.{name}"
        if not set(str(name)) <= NAME_CHARS or name in SHARED_STAGES:
            raise ConfigError(f"{key}: an arm's name is its folder and W&B run name: letters, "
                              f"digits, _ . - only, and not {' or '.join(SHARED_STAGES)}")
        if not isinstance(arm, DictConfig) or set(arm) - {"stages", "overrides"} or \
                not isinstance(arm.get("stages"), ListConfig) or \
                not isinstance(arm.get("overrides", []), (list, ListConfig)):
            shown = OmegaConf.to_container(arm) if OmegaConf.is_config(arm) else arm
            raise ConfigError(f"{key}={shown}: an arm is {{stages: [sft, ..., <stage>], "
                              "overrides: [<key>=<value>, ...]} (overrides optional)")
        stages = [str(s) for s in arm.stages]
        _check_chain(stages, f"{key}.stages")
        if stages[-1] not in POLICY_START_KEY or not set(stages[:-1]) <= set(SHARED_STAGES):
            raise ConfigError(f"{key}.stages={stages}: an arm is shared stages "
                              f"({', '.join(SHARED_STAGES)}) then one stage that trains a policy "
                              f"from them ({', '.join(POLICY_START_KEY)}), e.g. [sft, reward, ppo]")
        for override in arm.get("overrides", []):
            if str(override).split("=", 1)[0].lstrip("+~") in ("stage", "experiment") or \
                    str(override).startswith("stage."):
                raise ConfigError(f"{key}.overrides has {override!r}: an arm's stages are "
                                  f"{key}.stages; its overrides set that stage's keys")


def validate(cfg: DictConfig) -> None:
    """Semantic checks on the composed config; raises ConfigError with one readable line."""
    _check_finite(cfg)
    _allowed(cfg, "stage.name", STAGES)
    if cfg.stage.name == "pipeline":
        _check_chain(list(cfg.stage.stages), "stage.stages")
    _check_algorithms(cfg)
    _check_run_names(cfg)
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
    _check_model(cfg)
    _allowed(cfg, "logger.name", ("wandb", "none"))
    _allowed(cfg, "logger.mode", ("offline", "online", "disabled"))
    _check_train_loop(cfg, "sft")
    _check_train_loop(cfg, "reward")
    _check_dpo(cfg)
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
    _check_stage_shares(cfg)
    if cfg.data_mix.cache_dir is not None and not str(cfg.data_mix.cache_dir).strip():
        raise ConfigError("data_mix.cache_dir is empty; give a folder, or null (the default)")
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
        if not str(src.name).strip():
            raise ConfigError(f"{key}.name is empty; each source needs a name")
        _check_source(src, key)
    names = [src.name for src in cfg.data_mix.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"data_mix.sources have duplicate names {names}; each needs its own "
                          "(it seeds the source's shuffle and tags its rows)")
    if cfg.data_mix.max_eval_examples < 0:
        raise ConfigError(f"data_mix.max_eval_examples={cfg.data_mix.max_eval_examples} must "
                          "be >= 0")
    # ppo, grpo
    _check_ppo(cfg)
    _check_objective(cfg)
    _check_grpo(cfg)
