"""Config schemas: one dataclass per config node, registered with Hydra's ConfigStore.

`conf/config.yaml` lists `base_config` (the `RootConfig` below) first in its defaults, so every
YAML file of every group is merged onto a typed schema: an unknown key or a wrongly typed value
fails at composition. `validate()` (rlhf_exp/config/validate.py) then checks what types cannot
(allowed values, ranges, consistency) before any model is loaded. The YAML files under `conf/`
are what users read and edit; these dataclasses say what may appear there. A stage registered
with a schema of its own (rlhf_exp/registry.py, StageSpec.schema) adds its node at
register_configs().
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf, open_dict

from rlhf_exp import registry
from rlhf_exp.config.checks import check_generation


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
    (rlhf_exp/modeling/tiny_models.py)."""

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
    # an `rlhf-exp-fetch` recipe that gives a local copy of the hub id `path`
    # (rlhf_exp/modeling/fetch.py): used where the hub copy is neither cached nor reachable; null =
    # path as it is
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
    name: str = MISSING  # the runner: a stage of rlhf_exp/registry.py (sft, reward, ppo, ...)
    # pipeline only: the stages run in order, each starting from the previous one's output
    # (the registry's hand-off)
    stages: list[str] = field(default_factory=lambda: ["sft", "reward", "ppo"])
    # algorithms only: arm name -> {stages: [...], overrides: [...]}: a pipeline whose last
    # stage is the arm's own, the stages before it (sft, reward) shared by every arm and trained
    # once, and command-line overrides of that stage's keys (conf/stage/algorithms.yaml).
    # Untyped so that `+stage.arms.x={stages:[sft,grpo]}` adds one; _check_algorithms checks it
    arms: dict[str, Any] = field(default_factory=dict)
    # algorithms only: also compare the base model (model.path, untrained) on the held-out
    # prompts, and measure every policy's KL to it (kl_to_base) instead of to the SFT policy
    compare_base: bool = False


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
    format: str = "preference"  # prompt_response | preference | hh | chat | unpaired (kto)
    # internal field -> column name in the source (prompt, response, chosen, rejected, messages)
    columns: dict[str, str] = field(default_factory=dict)
    # share of the blended examples of every stage: weight / sum of the sources' weights
    weight: float = 1.0
    hub_split: str = "train"
    hub_subset: str | None = None
    max_examples: int | None = None  # cap on rows read from the source (null = all)
    # gold reward of this source's rows (a name in rlhf_exp.tasks, e.g. sort_digits); null = none
    task: str | None = None
    # true: evaluation only (e.g. prompts of held-out topics): its rows, up to its weight share of
    # max_eval_examples, go to every stage's held-out eval and none to training
    eval_only: bool = False
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
    """Keys shared by the SFT and reward stages (rlhf_exp/training/train_loop.py). Batch sizes:
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
    # packed micro-batches (rlhf_exp/training/packing.py): a micro-batch's sequences end to end
    # in one row, no forward/backward on padding; the same loss and gradients as the padded
    # batch (to fp32 rounding). Families that cannot pack exactly (OPT) train padded, with a
    # line in the log. false = always padded
    packing: bool = True
    # with packing: token-budget micro-batches: each optimizer step's rows (micro x accum per
    # rank, the sampler's, in order) re-cut into packed passes of at most this many tokens, the
    # step's loss unchanged (training/packing.TokenBudget); 0 = micro_batch_size_per_device
    # rows per pass
    micro_batch_tokens: int = 0


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
    loss_type: str = "sigmoid"  # sigmoid (DPO) | hinge | ipo | robust | simpo (no reference)
    # sigmoid: conservative DPO (cDPO), the share of labels taken as flipped; robust: the
    # flip rate of rDPO; simpo: as sigmoid's; all in [0, 0.5). hinge / ipo: must be 0
    label_smoothing: float = 0.0
    # simpo only: the target reward margin gamma (SimPO, Meng et al. 2024; TRL CPOConfig's
    # simpo_gamma, its default 0.5); must stay 0.5 with the other losses
    simpo_gamma: float = 0.5
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
class KTOConfig(TrainLoopConfig):
    """`stage=kto` (rlhf_exp/stages/kto.py, docs/kto.md): the train-loop keys, counted in
    unpaired rows (a preference pair gives two), plus the KTO loss (TRL 1.16's KTOTrainer,
    loss_type="kto"). Its held-out gold reward uses PPO's eval settings, as DPO's."""

    # frozen reference policy (path, run dir or artifact); null = the starting policy (init_from)
    reference: str | None = None
    beta: float = 0.1  # strength of the pull to the reference (TRL's default)
    # weights of the desirable / undesirable rows' losses (TRL's; both 1.0 for balanced data,
    # as a preference share gives); > 0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # score each row's prompt once for its completion and its KL sequence (as dpo.shared_prompt)
    shared_prompt: bool = True
    epochs: int = 1
    # 1e-3 (DPO's) drifts off on the demo: both sides' log-probs fall, held-out gold too
    lr: float = 1e-4
    warmup_steps: int = 10
    eval_every: int = 50


@dataclass
class RewardConfig(TrainLoopConfig):
    epochs: int = 6
    lr: float = 1e-3
    warmup_steps: int = 50
    log_every: int = 20
    eval_every: int = 200


@dataclass
class GenerationSettings:
    """Sampling settings: the schema of `ppo.generation`, `eval.generation` and `chat.generation`,
    and the object `rlhf_exp.rl.generation.generate` takes (imported there as GenerationConfig).
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
    """One reward function of an RL stage (rlhf_exp/rl/rewards.py)."""

    fn: str = MISSING  # "package.module:function", e.g. rlhf_exp.tasks:gold_reward_fn
    weight: float = 1.0


@dataclass
class AlarmConfig:
    """`<stage>.alarm` of the RL stages (ppo, grpo): the reward-hacking alarm
    (rlhf_exp/rl/alarm.py, docs/alarm.md). A threshold of null turns that alarm off."""

    enabled: bool = True
    action: str = "warn"  # warn | stop (end training; keep the best eval's checkpoint)
    keep_best: str = "gold"  # gold | proxy: what `stop` keeps the best checkpoint by
    gold_drop: float | None = 0.05  # proxy_gold: gold below its best eval by more than this
    proxy_rise: float | None = 0.0  # ... while the proxy rose more than this since that eval
    patience: int = 2  # ... on this many held-out evals in a row
    window: int = 5  # steps of the rolling means (and of the start) the step alarms compare
    length_ratio: float | None = 2.0  # response length / start outside [1/x, x]
    entropy_ratio: float | None = 0.2  # entropy / start below this
    kl_budget: float | None = 10.0  # sequence KL to the reference (nats) above this
    ngram: int = 3  # repeat_ngrams: the n of the n-grams
    repeat_share: float | None = 0.5  # share of repeated n-grams in a response above this


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
    # packed rows in every forward (no compute on padding; exact). The update keeps its
    # micro_batch_size_per_device sequences per micro-batch (the PPO losses are micro-batch
    # means), in packed rows of at most micro_batch_tokens; the scoring forwards are cut by it.
    # Off by default: on CPU not faster on the bundled task's short rows (docs/benchmarks.md)
    packing: bool = False
    micro_batch_tokens: int = 256  # most tokens in one packed row (packing: true)
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
    alarm: AlarmConfig = field(default_factory=AlarmConfig)


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
    # group (baseline/scale_rewards) | reinforce | reinforce_baseline (REINFORCE++, OpenRLHF)
    advantage_estimator: str = "group"
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    refill_max_rounds: int = 0  # DAPO dynamic sampling: extra generation rounds per step; 0 = off
    overlong: str = "none"  # none | soft (DAPO's length penalty) | mask (truncated out of the loss)
    overlong_buffer: int = 4  # soft: the last tokens before max_new_tokens the penalty ramps over
    overlong_penalty: float = 1.0  # soft: the penalty at max_new_tokens
    # compute each group's prompt once in the forwards (exact; needs micro-batches of whole
    # groups and no gradient checkpointing, else off)
    shared_prompt: bool = True
    # packed rows in every forward (no compute on padding; exact): a micro-batch of the update is
    # whole groups cut by micro_batch_tokens, not micro_batch_size_per_device rows
    packing: bool = True
    # token budget of one packed forward (packing: true); on CPU the block mask is dense, so
    # attention grows with it (bench/bench_packing.py: 512 measured fastest)
    micro_batch_tokens: int = 512
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
    alarm: AlarmConfig = field(default_factory=AlarmConfig)


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
    kl_estimator: str = "k1"  # k1 | k2 | k3 (rlhf_exp/rl/ppo_math.py)
    # the defaults below follow PPO's held-out eval (conf/eval/default.yaml interpolates them)
    num_prompts: int | None = 256  # first N held-out prompts; null = the whole slice
    num_pairs: int | None = None  # first N held-out preference pairs; null = all
    batch_size: int = 64
    max_prompt_len: int = 32
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    # pass@k and mean@N on the prompts with a gold reward (docs/eval_chat.md), also in the
    # pipeline summary and the shoot-out: N samples per prompt, the first the usual one
    num_samples: int = 1  # N >= 1
    pass_k: list[int] | None = None  # each k in [1, N]; null = [1, N]
    pass_threshold: float = 1.0  # a sample passes when its gold reward >= this; in (0, 1]


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
    kto: KTOConfig = field(default_factory=KTOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)


def root_nodes() -> set[str]:
    """The top-level keys of the config: RootConfig's and the registered stages' nodes."""
    return {f.name for f in fields(RootConfig)} | {s.node for s in registry.STAGES.values()
                                                   if s.node}


def register_configs() -> None:
    """`base_config`: RootConfig, plus the node of each registered stage that brings its own
    schema (StageSpec.schema)."""
    root = OmegaConf.structured(RootConfig)
    known = {f.name for f in fields(RootConfig)}
    extra = {s.node: s.schema for s in registry.STAGES.values()
             if s.node and s.node not in known and s.schema}
    with open_dict(root):
        for node, schema in extra.items():
            root[node] = OmegaConf.structured(registry.load(schema))
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=root if extra else RootConfig)
