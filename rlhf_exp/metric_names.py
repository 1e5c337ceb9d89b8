"""The metric names each stage logs (W&B history, stepped on `<stage>/step`), as the README's
metrics table lists them: what `<stage>.keep_best_metric` (and `objective`) may name.

One function, `metric_names(stage)`, so that a stage registry can take these lists over as each
stage's own fact. Names ending in `/` stand for a family (`ppo/reward_fn/<function>`).
Torch-free: validation imports it.
"""

from __future__ import annotations

import difflib

# DPO's pair metrics (rlhf_exp/dpo_math.py pair_metrics), logged as dpo/<name> and dpo/eval_<name>
_DPO_PAIR = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
             "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
             "logits/rejected", "nll_loss")
_REWARD_PAIR = ("loss", "accuracy", "chosen_score", "rejected_score", "margin")
# every step of the shared loop (rlhf_exp/train_loop.py)
_LOOP = ("lr", "grad_norm", "epoch")

_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("sft/loss", "sft/eval_loss", *(f"sft/{k}" for k in _LOOP)),
    "reward": (*(f"reward/{k}" for k in _REWARD_PAIR),
               *(f"reward/eval_{k}" for k in _REWARD_PAIR), "reward/eval_gold_spearman",
               "reward/dropped_overlong", *(f"reward/{k}" for k in _LOOP)),
    "dpo": (*(f"dpo/{k}" for k in _DPO_PAIR), *(f"dpo/eval_{k}" for k in _DPO_PAIR),
            "dpo/eval_gold_reward", "dpo/eval_response_length", "dpo/dropped_overlong",
            *(f"dpo/{k}" for k in _LOOP)),
    "ppo": ("ppo/reward_score", "ppo/gold_reward", "ppo/kl", "ppo/kl_coef", "ppo/actor_loss",
            "ppo/critic_loss", "ppo/clipfrac", "ppo/vf_clipfrac", "ppo/approx_kl", "ppo/entropy",
            "ppo/response_length", "ppo/eos_rate", "ppo/value_explained_var", "ppo/ptx_loss",
            "ppo/reward_model_score", "ppo/reward_fn/", "ppo/eval_gold_reward",
            "ppo/eval_reward_score"),
    "grpo": ("grpo/reward", "grpo/reward_std", "grpo/gold_reward", "grpo/group_reward_std",
             "grpo/frac_zero_std", "grpo/advantage_abs", "grpo/kl", "grpo/non_score_reward",
             "grpo/loss", "grpo/pg_loss", "grpo/clipfrac", "grpo/clipfrac_low",
             "grpo/clipfrac_high", "grpo/approx_kl", "grpo/entropy", "grpo/response_length",
             "grpo/eos_rate", "grpo/skipped_minibatches", "grpo/reward_model_score",
             "grpo/reward_fn/", "grpo/actor_lr", "grpo/eval_gold_reward",
             "grpo/eval_reward_score", "grpo/eval_response_length"),
}
PERF = ("perf/tokens_per_s", "perf/samples_per_s")  # every training stage


def metric_names(stage: str) -> tuple[str, ...]:
    """The metrics `stage` logs during training (its own namespace; `perf/*` apart: PERF)."""
    return _METRICS.get(stage, ())


def is_logged(stage: str, name: str) -> bool:
    """`name` is one of `stage`'s metrics (or in one of its families, e.g. ppo/reward_fn/f)."""
    names = metric_names(stage)
    return name in names or any(n.endswith("/") and name.startswith(n) and len(name) > len(n)
                                for n in names)


def close_matches(stage: str, name: str, n: int = 3) -> list[str]:
    """The names of `stage` that look like `name` (a typo's likely meaning)."""
    return difflib.get_close_matches(name, metric_names(stage), n=n, cutoff=0.6)


def check_metric(key: str, stage: str, name: str) -> None:
    """`key=name` (e.g. dpo.keep_best_metric) names a metric `stage` logs; else one line with
    the close matches (a typo would otherwise keep no `best` checkpoint, without a word)."""
    from rlhf_exp.errors import ConfigError

    if is_logged(stage, name):
        return
    close = close_matches(stage, name)
    hint = (f"did you mean {' or '.join(close)}?" if close
            else f"e.g. {', '.join(metric_names(stage)[:4])}")
    raise ConfigError(f"{key}={name!r} must be a metric of this stage (the {stage} stage logs "
                      f"no such metric); {hint} (every name: the README's metrics table)")
