"""Steps the RL stage runners (PPO, GRPO) share after the rollout: the score of each response,
the samples table, per-step statistics averaged over ranks, the NaN stop, the held-out eval,
logging, the loop state a training checkpoint keeps, the final policy checkpoint and its W&B
artifact, and the run's final metrics.

Each function takes the stage's name (`ppo`, `grpo`): metrics are `<stage>/...`, settings are
read from the `<stage>` config node (its `generation`, `eval_*`, `log_every`, `keep_last`, ...).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from rlhf_exp.errors import NonFiniteLossError
from rlhf_exp.rl import evaluation, rewards, rollout
from rlhf_exp.rl.rollout import Trajectory
from rlhf_exp.training import checkpoint, dist
from rlhf_exp.training.tracking import Tracker

TABLE_ROWS = 16  # rows of the periodic W&B samples table
TABLE_COLUMNS = ["prompt", "response", "reward_score", "gold_reward"]


def sampling_temperature(gen: DictConfig) -> float:
    """The temperature the rollout was sampled at (1 for greedy): log-probs use it, so ratios
    and KL are those of the sampling policy."""
    return gen.temperature if gen.do_sample else 1.0


@torch.no_grad()
def score(traj: Trajectory, reward_model, reward_functions: list[rewards.RewardFunction],
          reward_model_weight: float, *, micro: int, stage: str,
          token_budget: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """[n] each response's score: reward_model_weight x the reward model's score (when there is
    one) plus the weighted reward functions; and their means for logging
    (`<stage>/reward_model_score`, `<stage>/reward_fn/<name>`). token_budget: the reward
    model's forwards on packed rows of that many tokens (packed_rows)."""
    device = traj.sequences.device
    total = torch.zeros(len(traj.rows), device=device)
    stats: dict[str, float] = {}
    if reward_model is not None:
        rm = rollout.reward_model_scores(reward_model, traj, micro_batch=micro,
                                         token_budget=token_budget)
        total += reward_model_weight * rm
        stats[f"{stage}/reward_model_score"] = rm.mean().item()
    if reward_functions:
        fn_total, means = rewards.function_scores(reward_functions, traj.rows, traj.texts,
                                                  device)
        total += fn_total
        stats.update({f"{stage}/reward_fn/{name}": v for name, v in means.items()})
    return total, stats


def gold_stats(rows: list[dict], texts: list[str]) -> tuple[list[float | None], dict[str, float]]:
    """Each response's gold reward (None where the row's source has none) and the sums
    `reduce_over_ranks` turns into `<stage>/gold_reward` over every rank's rows."""
    golds = evaluation.gold_scores(rows, texts)
    known = [g for g in golds if g is not None]
    return golds, {"_gold_sum": float(sum(known)), "_gold_n": float(len(known))}


def samples_table(rows: list[dict], texts: list[str], scores: torch.Tensor,
                  golds: list[float | None]) -> list[list]:
    """The first TABLE_ROWS rows of the `<stage>/samples` table (TABLE_COLUMNS)."""
    return [[row["prompt"], text, float(s), g]
            for row, text, s, g in zip(rows, texts, scores, golds)][:TABLE_ROWS]


def reduce_over_ranks(stats: dict[str, float], stage: str, device: torch.device
                      ) -> dict[str, float]:
    """Every statistic averaged over ranks (each rank's keys must be the same); the gold sums of
    `gold_stats` become `<stage>/gold_reward` over every rank's rows that have one."""
    keys = sorted(stats)  # the same order on every rank
    stats = dict(zip(keys, dist.all_reduce_mean([stats[k] for k in keys], device)))
    gold_sum, gold_n = stats.pop("_gold_sum"), stats.pop("_gold_n")
    if gold_n > 0:
        stats[f"{stage}/gold_reward"] = gold_sum / gold_n
    return stats


def check_finite(stats: dict[str, float], keys: tuple[str, ...], step: int, hint: str) -> None:
    """Stop the run with one line when a loss went NaN or infinite."""
    for key in keys:
        if key in stats and not math.isfinite(stats[key]):
            stage = key.split("/", 1)[0]
            raise NonFiniteLossError(f"{stage}: {key} is {stats[key]} at step {step}; stopped "
                                     f"(the last training checkpoint, if any, is intact). {hint}")


def heldout_eval(policy, tokenizer, cfg: DictConfig, stage: str, rows: list[dict], *,
                 zero_stage: int, reward_model=None) -> dict[str, float]:
    """`<stage>/eval_*` on this rank's held-out rows, sampled with `<stage>.generation` from a
    generator seeded with seed + rank (evaluation.heldout_eval: the same numbers as
    `stage=eval` and the other RL stages for the same policy and settings)."""
    return evaluation.heldout_eval(policy, tokenizer, rows,
                                   evaluation.stage_settings(cfg, cfg[stage], zero_stage),
                                   prefix=stage, reward_model=reward_model)


def log_step(tracker: Tracker, cfg: DictConfig, stage: str, step: int, stats: dict[str, float],
             table: list[list]) -> None:
    """The step's metrics every `<stage>.log_every` steps (and at the last); the samples table
    at step 1 and every `logger.table_every` steps."""
    node = cfg[stage]
    if step % node.log_every == 0 or step == node.steps:
        tracker.log(stats, step)
    if cfg.logger.table_every > 0 and (step % cfg.logger.table_every == 0 or step == 1):
        tracker.log_table(f"{stage}/samples", TABLE_COLUMNS, table, step)


# ----------------------------------------------------------------------------- checkpoints
def loop_state(state, tracker: Tracker) -> tuple[dict[str, Any], dict[str, Any]]:
    """What every RL stage's training checkpoint keeps of its loop: (rank 0's JSON part: the
    evals and last stats, the W&B run id; this rank's part: its sampling and shuffling
    generators). `state` has step, init_eval, last_eval, last_stats, sample_gen, shuffle_gen."""
    shared = {"init_eval": state.init_eval, "last_eval": state.last_eval,
              "last_stats": state.last_stats, "wandb_run_id": tracker.run_id}
    local = {"sample_gen": state.sample_gen.get_state(),
             "shuffle_gen": state.shuffle_gen.get_state()}
    return shared, local


def restore_loop_state(state, saved: dict[str, Any]) -> None:
    """The inverse of `loop_state` (saved = resume.load's merged dict)."""
    state.step = saved["step"]
    state.init_eval, state.last_eval = saved["init_eval"], saved["last_eval"]
    state.last_stats = saved["last_stats"]
    state.sample_gen.set_state(saved["sample_gen"])
    state.shuffle_gen.set_state(saved["shuffle_gen"])


def save_final_policy(actor, tokenizer, cfg: DictConfig, stage: str, run_dir: Path,
                      tracker: Tracker, meta: dict[str, Any], eval_metrics: dict[str, float],
                      step: int | None = None) -> Path:
    """The trained policy as checkpoints/step_N (HF format) linked as `final`, older ones pruned
    to `<stage>.keep_last`; logged as the `model` artifact <experiment_name>-<stage>-model
    (aliases final, step-N) when logger.log_checkpoints. N: `step` (a run the alarm stopped),
    else `<stage>.steps`."""
    steps = cfg[stage].steps if step is None else step
    artifact = f"{cfg.experiment_name}-{stage}-model"
    ckpt = checkpoint.save_hf(
        actor, tokenizer, checkpoint.step_dir(run_dir, steps),
        zero_stage=actor.zero_optimization_stage(), lora_save=cfg.model.lora.save,
        metadata={**meta, "artifact": f"{cfg.logger.project}/{artifact}:latest"})
    checkpoint.mark_final(ckpt)
    checkpoint.prune(run_dir, cfg[stage].keep_last)
    if cfg.logger.log_checkpoints:
        tracker.log_model(ckpt, artifact, aliases=["final", f"step-{steps}"],
                          metadata={**meta, **eval_metrics})
    return ckpt


def final_metrics(stage: str, state, keys: tuple[str, ...], steps: int) -> dict[str, float]:
    """The run's result: the last step's `keys`, the last held-out eval, the one before the
    first step as `<stage>/init_eval_*`, and `<stage>/steps`."""
    last = state.last_stats
    metrics = {k: last[k] for k in keys if k in last}
    metrics.update(state.last_eval)
    for k, v in state.init_eval.items():
        metrics[k.replace(f"{stage}/eval_", f"{stage}/init_eval_")] = v
    metrics[f"{stage}/steps"] = steps
    return metrics
