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
    GRPO_BASELINES,
    GRPO_LOSS_AGG,
    GRPO_SCALE_REWARDS,
    KL_ESTIMATORS,
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
                          " (0 = one packed forward per micro-batch)")
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
    if dc.label_smoothing > 0 and dc.loss_type not in ("sigmoid", "robust"):
        raise ConfigError(f"dpo.label_smoothing={dc.label_smoothing} only applies to "
                          f"dpo.loss_type=sigmoid (cDPO) or robust (rDPO), not "
                          f"{dc.loss_type}; set it to 0")
    if dc.rpo_alpha < 0:
        raise ConfigError(f"dpo.rpo_alpha={dc.rpo_alpha} must be >= 0 (0 = no NLL term)")


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
    if gc.kl_in_reward and gc.beta == 0:
        raise ConfigError("grpo.kl_in_reward=true folds beta * KL into the reward, but "
                          "grpo.beta=0; set grpo.beta > 0 or grpo.kl_in_reward=false")
    check_optimizer_node(cfg, "grpo.actor")
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
