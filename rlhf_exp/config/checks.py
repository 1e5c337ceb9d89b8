"""Checks of single keys and of sub-nodes that several stages share (optimizer, LoRA,
generation, rewards): one definition each, so that two stages' equal keys are judged alike."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.config.choices import COMPILE_MODES, SCHEDULERS
from rlhf_exp.errors import ConfigError


# ----------------------------------------------------------------------------- validation
def _allowed(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive(cfg: DictConfig, key: str, minimum: float = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None or value < minimum:
        raise ConfigError(f"{key}={value!r} must be >= {minimum}")


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


def _check_generation(cfg: DictConfig, node: str) -> None:
    check_generation(OmegaConf.select(cfg, node), node)


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


def _check_optimizer(cfg: DictConfig, node: str) -> None:
    """Optimizer keys every optimizer node shares (train-loop stages, ppo.actor, ppo.critic,
    grpo.actor; lr is checked apart)."""
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


def function_spec(item: DictConfig, key: str) -> str:
    """A reward function item's `fn`, or one line when it has none (OmegaConf would raise a
    MissingMandatoryValue traceback at the first read)."""
    if OmegaConf.is_missing(item, "fn") or item.fn is None:
        raise ConfigError(f"{key} has no fn: give each reward function as {{fn: "
                          "package.module:function, weight: 1.0} (e.g. fn: "
                          "rlhf_exp.tasks:gold_reward_fn)")
    return str(item.fn)


def check_rewards(cfg: DictConfig, node: str) -> None:
    """`<node>.reward_model_weight` / `reward_functions`: at least one reward, well-formed names
    (importing and calling them happens before training: rlhf_exp/rl/rewards.py)."""
    sc = cfg[node]
    if sc.reward_model_weight < 0:
        raise ConfigError(f"{node}.reward_model_weight={sc.reward_model_weight} must be >= 0 "
                          "(0 = no reward model)")
    for i, item in enumerate(sc.reward_functions):
        module, sep, name = function_spec(item, f"{node}.reward_functions[{i}]").partition(":")
        if not sep or not module or not name:
            raise ConfigError(f"{node}.reward_functions[{i}].fn={item.fn!r}: name a function as "
                              "'package.module:function' (e.g. rlhf_exp.tasks:gold_reward_fn)")
    if sc.reward_model_weight == 0 and not sc.reward_functions:
        raise ConfigError(f"{node}: no reward: {node}.reward_model_weight is 0 and "
                          f"{node}.reward_functions is empty")

def check_optimizer_node(cfg: DictConfig, node: str) -> None:
    """A model's optimizer node of an RL stage (ppo.actor, ppo.critic, grpo.actor): its lr,
    scheduler, the keys every optimizer shares, and its ZeRO stage."""
    opt = OmegaConf.select(cfg, node)
    if opt.lr <= 0:
        raise ConfigError(f"{node}.lr={opt.lr} must be > 0")
    _allowed(cfg, f"{node}.lr_scheduler", SCHEDULERS)
    _check_optimizer(cfg, node)
    if opt.zero_stage is not None and opt.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{node}.zero_stage={opt.zero_stage} must be 0, 1, 2, 3 or null "
                          "(= zero_stage.stage)")
