"""The checks of each stage's own config node, named by the stage registry (StageSpec.node_check)
and run by validate() for the stages a run goes through (rlhf_exp/config/validate.py says the
rule)."""

from __future__ import annotations

import difflib

from omegaconf import DictConfig, OmegaConf

from rlhf_exp import registry
from rlhf_exp.config.checks import (
    _allowed,
    _check_generation,
    _check_lora,
    _check_optimizer,
    _check_text,
    _positive,
    check_optimizer_node,
    check_rewards,
    function_spec,
)
from rlhf_exp.config.choices import (
    DPO_LOSS_TYPES,
    GRPO_ADVANTAGE_ESTIMATORS,
    GRPO_BASELINES,
    GRPO_IMPORTANCE_SAMPLING_LEVELS,
    GRPO_LOSS_AGG,
    GRPO_OVERLONG,
    GRPO_SCALE_REWARDS,
    KL_ESTIMATORS,
    REFERENCE_FREE_LOSSES,
    SCHEDULERS,
)
from rlhf_exp.errors import ConfigError


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
    if cfg[node].micro_batch_tokens < 0:
        raise ConfigError(f"{node}.micro_batch_tokens={cfg[node].micro_batch_tokens} must be >= 0"
                          " (0 = micro_batch_size_per_device rows per pass)")
    if cfg[node].save_every < 0 or cfg[node].keep_last < 0:
        raise ConfigError(f"{node}.save_every and {node}.keep_last must be >= 0")
    _allowed(cfg, f"{node}.keep_best_mode", ("min", "max"))
    best = cfg[node].keep_best_metric
    spec = registry.get(registry.node_stages()[node])
    if best is not None and not spec.logs(str(best)):
        # a typo would keep no `best` checkpoint, without a word
        close = difflib.get_close_matches(str(best), spec.metrics, n=3, cutoff=0.6)
        known = ", ".join(m for m in spec.metrics if f"{node}/eval_" in m
                          and not m.endswith("_examples"))
        hint = f"did you mean {' or '.join(close)}?" if close else f"e.g. {known}"
        raise ConfigError(f"{node}.keep_best_metric={best!r} must be a metric of this stage "
                          f"(the {spec.name} stage logs no such metric); {hint}")
    if best is not None and cfg[node].save_every <= 0:
        raise ConfigError(f"{node}.keep_best_metric needs {node}.save_every > 0 (checkpoints "
                          "to choose from)")


def check_sft(cfg: DictConfig) -> None:
    _check_train_loop(cfg, "sft")


def check_reward(cfg: DictConfig) -> None:
    _check_train_loop(cfg, "reward")


def _one_process(cfg: DictConfig, stage: str) -> None:
    if cfg.hardware.nproc_per_node > 1 or cfg.hardware.nnodes > 1:
        raise ConfigError(f"stage={stage} runs in one process; set "
                          "hardware.nproc_per_node=1 hardware.nnodes=1 (e.g. hardware=cpu or "
                          "hardware=1gpu)")


def check_eval(cfg: DictConfig) -> None:
    """eval.*, and one process."""
    _one_process(cfg, "eval")
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
    check_pass_at_k(cfg)


def check_pass_at_k(cfg: DictConfig) -> None:
    """eval.num_samples, eval.pass_k, eval.pass_threshold: read by stage=eval, the pipeline
    summary and the shoot-out."""
    ev = cfg.eval
    _positive(cfg, "eval.num_samples")
    for k in ev.pass_k or []:
        if not 1 <= k <= ev.num_samples:
            raise ConfigError(f"eval.pass_k={list(ev.pass_k)} has k={k}; each k must be in "
                              f"[1, eval.num_samples={ev.num_samples}] (pass@k needs k of the N "
                              "samples per prompt)")
    if ev.pass_k is not None and not ev.pass_k:
        raise ConfigError("eval.pass_k=[] is empty; give k values (e.g. [1, 4]) or null "
                          "(= [1, eval.num_samples])")
    if not 0.0 < ev.pass_threshold <= 1.0:
        raise ConfigError(f"eval.pass_threshold={ev.pass_threshold} must be in (0, 1]: a "
                          "sample passes when its gold reward (in [0, 1]) is >= it")


def check_chat(cfg: DictConfig) -> None:
    """chat.*, and one process."""
    _one_process(cfg, "chat")
    _check_generation(cfg, "chat.generation")
    _check_text(cfg, "chat.prompt")
    _check_text(cfg, "chat.system", allow_empty=True)
    if cfg.chat.policy is not None and not str(cfg.chat.policy).strip():
        raise ConfigError("chat.policy is empty; give a path, run dir or artifact, or null "
                          "(the base model)")


def check_dpo(cfg: DictConfig) -> None:
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
    if dc.label_smoothing > 0 and dc.loss_type not in ("sigmoid", "robust", "simpo"):
        raise ConfigError(f"dpo.label_smoothing={dc.label_smoothing} only applies to "
                          f"dpo.loss_type=sigmoid (cDPO), robust (rDPO) or simpo, not "
                          f"{dc.loss_type}; set it to 0")
    _check_simpo(dc)
    if dc.rpo_alpha < 0:
        raise ConfigError(f"dpo.rpo_alpha={dc.rpo_alpha} must be >= 0 (0 = no NLL term)")


def check_kto(cfg: DictConfig) -> None:
    """KTO keys: the train-loop keys, beta, the two weights, the reference, and a micro-batch of
    at least 2 rows (the KL estimate pairs each row with another row's completion)."""
    _check_train_loop(cfg, "kto")
    kc = cfg.kto
    if kc.reference is not None and not str(kc.reference).strip():
        raise ConfigError("kto.reference is empty; give a path, run dir or artifact, or null "
                          "(the starting policy)")
    if not 0.0 < kc.beta < float("inf"):
        raise ConfigError(f"kto.beta={kc.beta} must be > 0")
    for key in ("desirable_weight", "undesirable_weight"):
        if not 0.0 < kc[key] < float("inf"):
            raise ConfigError(f"kto.{key}={kc[key]} must be > 0 (the weight of those rows' "
                              "loss; 1.0 for balanced data)")
    if kc.micro_batch_size_per_device < 2:
        raise ConfigError(f"kto.micro_batch_size_per_device={kc.micro_batch_size_per_device} "
                          "must be >= 2: the KL estimate pairs each row's prompt with another "
                          "row's completion in its chunk (TRL's rule)")


def _check_simpo(dc: DictConfig) -> None:
    """SimPO (dpo.loss_type=simpo) is reference-free: no dpo.reference; simpo_gamma (its target
    margin) is >= 0 and is left at its default with the other losses, which ignore it."""
    from rlhf_exp.config.schema import DPOConfig

    if dc.loss_type in REFERENCE_FREE_LOSSES:
        if dc.reference is not None:
            raise ConfigError(f"dpo.reference={dc.reference} is set but dpo.loss_type="
                              f"{dc.loss_type} uses no reference model; set dpo.reference=null")
        if not 0.0 <= dc.simpo_gamma < float("inf"):
            raise ConfigError(f"dpo.simpo_gamma={dc.simpo_gamma} must be a finite number >= 0 "
                              "(SimPO's target reward margin)")
    elif dc.simpo_gamma != DPOConfig.simpo_gamma:
        raise ConfigError(f"dpo.simpo_gamma={dc.simpo_gamma} only applies to dpo.loss_type="
                          f"simpo, not {dc.loss_type}; leave it at {DPOConfig.simpo_gamma}")


def check_ppo(cfg: DictConfig) -> None:
    """PPO keys: allowed values, ranges, and a batch geometry that splits evenly over ranks."""
    pc = cfg.ppo
    for key in ("actor_init", "critic_init", "reward_model"):
        if pc[key] is not None and not str(pc[key]).strip():
            raise ConfigError(f"ppo.{key} is empty; give a path, run dir or artifact, or null")
    _allowed(cfg, "ppo.kl.estimator", KL_ESTIMATORS)
    for key in ("steps", "rollout_batch_size", "micro_batch_size_per_device", "ppo_epochs",
                "num_minibatches", "max_prompt_len", "log_every",
                "eval_num_prompts", "eval_batch_size", "kl.horizon", "micro_batch_tokens"):
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
        check_optimizer_node(cfg, f"ppo.{model}")
    check_rewards(cfg, "ppo")
    _check_lora(cfg, "ppo.critic_lora")
    check_alarm(cfg, "ppo")


def check_grpo(cfg: DictConfig) -> None:
    """GRPO keys: allowed values, ranges, whole groups on every rank, and a batch geometry
    that splits evenly."""
    gc = cfg.grpo
    for key in ("steps", "prompts_per_step", "micro_batch_size_per_device", "num_iterations",
                "num_minibatches", "max_prompt_len", "log_every", "eval_num_prompts",
                "eval_batch_size", "micro_batch_tokens"):
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
    _check_grpo_arms(cfg)
    if gc.kl_in_reward and gc.beta == 0:
        raise ConfigError("grpo.kl_in_reward=true folds beta * KL into the reward, but "
                          "grpo.beta=0; set grpo.beta > 0 or grpo.kl_in_reward=false")
    check_optimizer_node(cfg, "grpo.actor")
    check_alarm(cfg, "grpo")
    if gc.reward_model_weight < 0:
        raise ConfigError(f"grpo.reward_model_weight={gc.reward_model_weight} must be >= 0")
    functions = gc.reward_functions if gc.reward_functions is not None else []
    for i, item in enumerate(functions):
        module, sep, name = function_spec(item, f"grpo.reward_functions[{i}]").partition(":")
        if not sep or not module or not name:
            raise ConfigError(f"grpo.reward_functions[{i}].fn={item.fn!r}: name a function as "
                              "'package.module:function' (e.g. rlhf_exp.tasks:gold_reward_fn)")
    pipeline_rm = cfg.stage.name == "pipeline" and "reward" in cfg.stage.stages
    has_rm = (gc.reward_model is not None or pipeline_rm) and gc.reward_model_weight > 0
    if gc.reward_functions is not None and not gc.reward_functions and not has_rm:
        raise ConfigError("grpo: no reward: grpo.reward_functions is empty and there is no "
                          "reward model (grpo.reward_model null or grpo.reward_model_weight 0)")


def _check_grpo_arms(cfg: DictConfig) -> None:
    """The REINFORCE++, GSPO and DAPO keys of the grpo node (docs/grpo.md)."""
    gc = cfg.grpo
    _allowed(cfg, "grpo.advantage_estimator", GRPO_ADVANTAGE_ESTIMATORS)
    _allowed(cfg, "grpo.importance_sampling_level", GRPO_IMPORTANCE_SAMPLING_LEVELS)
    _allowed(cfg, "grpo.overlong", GRPO_OVERLONG)
    if gc.advantage_estimator != "group" and (gc.baseline != "group_mean"
                                              or gc.scale_rewards != "group"):
        raise ConfigError(f"grpo.advantage_estimator={gc.advantage_estimator} whitens token "
                          "returns over the batch itself; grpo.baseline and grpo.scale_rewards "
                          "apply only to advantage_estimator=group (leave them at group_mean, "
                          "group)")
    if gc.refill_max_rounds < 0:
        raise ConfigError(f"grpo.refill_max_rounds={gc.refill_max_rounds} must be >= 0")
    if gc.refill_max_rounds > 0 and not gc.filter_zero_std:
        raise ConfigError("grpo.refill_max_rounds > 0 refills the step with groups that have a "
                          "reward spread; set grpo.filter_zero_std=true so that the zero-spread "
                          "groups left after the last round stay out of the update")
    if gc.overlong == "soft":
        if not 0 < gc.overlong_buffer <= gc.generation.max_new_tokens:
            raise ConfigError(f"grpo.overlong_buffer={gc.overlong_buffer} must be in [1, "
                              f"grpo.generation.max_new_tokens={gc.generation.max_new_tokens}]")
        if gc.overlong_penalty < 0:
            raise ConfigError(f"grpo.overlong_penalty={gc.overlong_penalty} must be >= 0")


def check_alarm(cfg: DictConfig, node: str) -> None:
    """`<node>.alarm` of an RL stage (rlhf_exp/rl/alarm.py): allowed values and ranges."""
    a = f"{node}.alarm"
    _allowed(cfg, f"{a}.action", ("warn", "stop"))
    _allowed(cfg, f"{a}.keep_best", ("gold", "proxy"))
    for key in ("patience", "window", "ngram"):
        _positive(cfg, f"{a}.{key}")
    al = cfg[node].alarm
    ranges = {"gold_drop": (al.gold_drop, "must be >= 0", lambda v: v >= 0),
              "proxy_rise": (al.proxy_rise, "must be >= 0", lambda v: v >= 0),
              "length_ratio": (al.length_ratio, "must be > 1 (a factor either way)",
                               lambda v: v > 1),
              "entropy_ratio": (al.entropy_ratio, "must be in (0, 1)", lambda v: 0 < v < 1),
              "kl_budget": (al.kl_budget, "must be > 0 (nats)", lambda v: v > 0),
              "repeat_share": (al.repeat_share, "must be in [0, 1)", lambda v: 0 <= v < 1)}
    for key, (value, rule, ok) in ranges.items():
        if value is not None and not ok(value):
            raise ConfigError(f"{a}.{key}={value} {rule}, or null (that alarm off)")
