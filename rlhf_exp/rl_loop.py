"""The step loop of the RL stages (PPO, GRPO), as train_loop.py is for SFT, reward and DPO.

A stage runner (rlhf_exp/stages/grpo.py, ppo.py) supplies its own steps and hands them over:

    data = rl_loop.prompts_of_share(cfg, per_step, "grpo.prompts_per_step")
    steps = rl_loop.Steps(rollout=..., update=..., finish=..., evaluate=..., save=..., load=...)
    loop = rl_loop.prompt_loop("grpo", cfg, run_dir, tokenizer, data.train, per_step, ...)
    state = rl_loop.train(loop, steps, state, tracker, resume_from)
    result, ckpt = rl_loop.save_result(loop, state, tracker, meta=..., ...)

What the stage supplies (bind its models and settings with functools.partial):

    rollout(rows, prompt_tokens, state) -> (experience, stats, samples-table rows)
        sample responses to this rank's prompts of the step and make the experience (scores,
        advantages, ...); `experience` has `attention_mask` [n, T] (the tokens counted in
        perf/tokens_per_s)
    update(experience, state) -> stats          the optimizer steps on one rollout
    finish(stats, state) -> stats               statistics averaged over ranks
                                                (rl_steps.reduce_over_ranks) and anything the
                                                stage keeps from step to step (KL controller, EMA)
    evaluate() -> metrics                       the held-out eval (`<stage>/eval_*`)
    save(state) -> None                         a resumable training checkpoint of state.step
    load(state, checkpoint) -> None             its inverse (weights, state, RNG)

What the loop does, per step s = 1 .. `<stage>.steps`: the prompts of step s
(rollout.PromptSchedule: a function of s, so a resumed run continues exactly), rollout, update,
timing (`perf/train_s`, `perf/samples_per_s`, `perf/tokens_per_s`, `<stage>/actor_lr`), finish,
the NaN stop (nan_stop.py: the loss keys and the gradient norm of every trainable engine, the W&B
run ended as failed), the log (rl_steps.log_step), the progress bar, the held-out eval every
`eval_every` steps, a training checkpoint every `save_every` steps. Before the first step (not
on resume) and after the last: the held-out eval. Then `save_result`: the final policy, the
run's metrics (with `perf/loop_s`) and result.json.

Time, as in train_loop.py: `perf/samples_per_s` and `perf/tokens_per_s` are the sequences
(completions) and their real tokens (prompt + response, attention mask; all ranks) per second of
the step (rollout, experience and update); `perf/loop_s` is the wall time of this process's
steps; held-out evals and checkpoint writes count in neither.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from rlhf_exp import dist, rl_steps, rollout, runtime
from rlhf_exp.data import build_stage_data
from rlhf_exp.data.tokenize import prompt_ids
from rlhf_exp.errors import ConfigError
from rlhf_exp.nan_stop import stop_if_not_finite
from rlhf_exp.tracking import Tracker


@dataclass
class State:
    """Where an RL run is; a stage's own state extends it (`@dataclass(kw_only=True)`). Saved for
    resume by rl_steps.loop_state."""

    sample_gen: torch.Generator  # this rank's sampling noise
    shuffle_gen: torch.Generator  # this rank's minibatch order
    step: int = 0
    init_eval: dict = field(default_factory=dict)  # the held-out eval before the first step
    last_eval: dict = field(default_factory=dict)
    last_stats: dict = field(default_factory=dict)  # the last step's (averaged) statistics
    loop_s: float = 0.0  # this process's step time (evals, checkpoints left out; not saved)


def seeded_generators(seed: int) -> dict[str, torch.Generator]:
    """This rank's sampling and shuffling generators (the `State` fields)."""
    rank = dist.rank()
    return {"sample_gen": torch.Generator().manual_seed(seed * 7919 + rank),
            "shuffle_gen": torch.Generator().manual_seed(seed + 1 + rank)}


@dataclass
class Steps:
    """The stage's own steps (module docstring)."""

    rollout: Callable[[list[dict], list[list[int]], State], tuple[Any, dict, list[list]]]
    update: Callable[[Any, State], dict[str, float]]
    finish: Callable[[dict[str, float], State], dict[str, float]]
    evaluate: Callable[[], dict[str, float]]
    save: Callable[[State], None]
    load: Callable[[State, Path], None]  # restore a training checkpoint written by `save`


@dataclass
class Loop:
    """What the loop needs besides the stage's steps."""

    stage: str  # metric prefix, config node and checkpoint stage name: "ppo", "grpo"
    cfg: DictConfig
    run_dir: Path
    prompts: list[dict]  # the training prompts (rows)
    prompt_tokens: list[list[int]]  # their token ids
    schedule: rollout.PromptSchedule
    eval_rows: list[dict]  # this rank's held-out prompts ([] = no held-out eval)
    engines: Sequence  # the trainable engines, the actor first (its LR is logged)
    loss_keys: tuple[str, ...]  # averaged losses the NaN stop checks
    hint: str  # what to change when a loss or gradient went NaN
    postfix: dict[str, str] = field(default_factory=dict)  # progress-bar label -> metric

    @property
    def node(self) -> DictConfig:
        return self.cfg[self.stage]


def prompts_of_share(cfg: DictConfig, per_step: int, key: str):
    """The data_mix's RL share (its `ppo` share: PPO and GRPO train on the same prompts); a
    ConfigError when it holds fewer prompts than one step takes (`key`)."""
    data = build_stage_data(cfg.data_mix, "ppo", cfg.seed)
    if len(data.train) < per_step:
        raise ConfigError(f"{key.split('.')[0]}: the data_mix's ppo share has {len(data.train)} "
                          f"prompts, fewer than {key}={per_step}")
    return data


def prompt_loop(stage: str, cfg: DictConfig, run_dir: Path, tokenizer, prompts: list[dict],
                per_step: int, eval_rows: list[dict], **kw) -> Loop:
    """A Loop over `prompts` (tokenized here with `<stage>.max_prompt_len`), `per_step` of them
    per step (global; each rank its slice); `kw`: the other Loop fields."""
    node = cfg[stage]
    tokens = [prompt_ids(tokenizer, row, cfg.model.prompt_template, node.max_prompt_len)
              for row in prompts]
    schedule = rollout.PromptSchedule(len(prompts), per_step, seed=cfg.seed, rank=dist.rank(),
                                      world=dist.world_size())
    return Loop(stage=stage, cfg=cfg, run_dir=run_dir, prompts=prompts, prompt_tokens=tokens,
                schedule=schedule, eval_rows=eval_rows, **kw)


# ----------------------------------------------------------------------------- the loop
def train(loop: Loop, steps: Steps, state: State, tracker: Tracker,
          resume_from: Path | None = None) -> State:
    """Continue from `resume_from` (a training checkpoint) or evaluate the starting policy;
    run steps state.step + 1 .. `<stage>.steps`; the held-out eval after the last. Returns the
    state (state.loop_s: this process's step time)."""
    node = loop.node
    if resume_from:
        steps.load(state, resume_from)
        runtime.say(f"{loop.stage}: resumed from {resume_from} at step {state.step}/{node.steps}")
    elif loop.eval_rows:
        state.init_eval = state.last_eval = steps.evaluate()
        tracker.log(state.init_eval, 0)
    with runtime.progress(node.steps, loop.stage) as bar:  # closed on errors too
        bar.update(state.step)
        while state.step < node.steps:
            t0 = time.perf_counter()
            stats, table = run_step(loop, steps, state, tracker)
            state.loop_s += time.perf_counter() - t0
            state.step, state.last_stats = state.step + 1, stats
            rl_steps.log_step(tracker, loop.cfg, loop.stage, state.step, stats, table)
            bar.update(1)
            bar.set_postfix({label: f"{stats.get(key, float('nan')):.3f}"
                             for label, key in loop.postfix.items()})
            last = state.step >= node.steps
            if loop.eval_rows and node.eval_every > 0 and state.step % node.eval_every == 0 \
                    and not last:
                state.last_eval = steps.evaluate()
                tracker.log(state.last_eval, state.step)
            if node.save_every > 0 and state.step % node.save_every == 0 and not last:
                steps.save(state)
    if loop.eval_rows:
        state.last_eval = steps.evaluate()
        tracker.log(state.last_eval, node.steps)
    return state


def run_step(loop: Loop, steps: Steps, state: State, tracker: Tracker
             ) -> tuple[dict[str, float], list[list]]:
    """One step (state.step + 1): rollout, update, timing, finish, NaN stop. Returns the step's
    statistics (averaged over ranks) and the samples-table rows."""
    step, world = state.step + 1, dist.world_size()
    t0 = time.perf_counter()
    idx = loop.schedule.indices(step)
    exp, stats, table = steps.rollout([loop.prompts[i] for i in idx],
                                      [loop.prompt_tokens[i] for i in idx], state)
    t1 = time.perf_counter()
    stats.update(steps.update(exp, state))
    now = time.perf_counter()
    stats.update({"perf/train_s": now - t1,
                  f"{loop.stage}/actor_lr": loop.engines[0].get_lr()[0],
                  # this rank's share times the ranks: averaged over ranks, the global figure
                  "perf/samples_per_s": len(exp.attention_mask) * world / (now - t0),
                  "perf/tokens_per_s": float(exp.attention_mask.sum()) * world / (now - t0)})
    stats = steps.finish(stats, state)
    stop_if_not_finite({key: stats[key] for key in loop.loss_keys if key in stats},
                       loop.engines, stage=loop.stage, step=step, run_dir=loop.run_dir,
                       tracker=tracker, hint=loop.hint)
    return stats, table


# ----------------------------------------------------------------------------- the result
def save_result(loop: Loop, state: State, tracker: Tracker, *, actor, tokenizer,
                meta: dict[str, Any], final_keys: tuple[str, ...]
                ) -> tuple[runtime.StageResult, Path]:
    """The final policy (checkpoints/final, its `model` artifact), the run's metrics (the last
    step's `final_keys`, the evals, `perf/loop_s`) into the W&B summary and result.json.
    Returns (result, policy checkpoint)."""
    stage, steps = loop.stage, loop.node.steps
    ckpt = rl_steps.save_final_policy(actor, tokenizer, loop.cfg, stage, loop.run_dir, tracker,
                                      {"stage": stage, "step": steps, **meta}, state.last_eval)
    metrics = rl_steps.final_metrics(stage, state, final_keys, steps)
    metrics["perf/loop_s"] = state.loop_s  # this process's steps (a resumed run: the rest only)
    tracker.summary(metrics)
    result = runtime.StageResult(stage, str(loop.run_dir), str(ckpt), tracker.run_id,
                                 str(loop.run_dir / "wandb") if tracker.enabled else None,
                                 metrics)
    result.write()
    return result, ckpt


def gold_change(stage: str, state: State) -> str:
    """"held-out gold reward a -> b" for the closing line ("" without held-out gold)."""
    key = f"{stage}/eval_gold_reward"
    if key not in state.init_eval:
        return ""
    return f"held-out gold reward {state.init_eval[key]:.3f} -> {state.last_eval[key]:.3f}"
