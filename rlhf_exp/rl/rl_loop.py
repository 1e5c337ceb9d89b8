"""The step loop of the RL stages (PPO, GRPO), as train_loop.py is for SFT, reward and DPO.

A stage runner (rlhf_exp/stages/grpo.py, ppo.py) supplies its own steps and hands them over:

    with stage_kit.begin(cfg, run_dir, "grpo") as run:            # seed, ranks
        prompts = rl_loop.read_prompts(cfg, "grpo", "prompts_per_step")
        ... the starting points, the reward functions (checked before anything is written)
        tracker = rl_loop.open_run(run, inputs)                     # run config, W&B run
        ... models (rl_loop.load_actor, rl_loop.frozen), the stage's State
        loop = rl_loop.prompt_loop("grpo", cfg, run_dir, tokenizer, prompts, per_step, ...)
        steps = rl_loop.Steps(rollout=..., update=..., finish=..., evaluate=..., save=...,
                              load=...)
        state = rl_loop.train(loop, steps, state, tracker, run.resume_from)
        result, ckpt = rl_loop.save_result(loop, state, tracker, actor=..., ...)
        stage_kit.close(run, result, ...)                           # closing lines, W&B done

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
run ended as failed), the reward-hacking alarm on the step's statistics (alarm.py), the log
(rl_steps.log_step), the progress bar, the held-out eval every `eval_every` steps (and the alarm
on it), a training checkpoint every `save_every` steps (and, with `<stage>.alarm.action=stop`, at
every eval that is the best so far). Before the first step (not on resume) and after the last:
the held-out eval. The loop ends early when the alarm fires with `action=stop`. Then
`save_result`: the final policy, the run's metrics (with `perf/loop_s`) and result.json.

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

from rlhf_exp.data import build_stage_data
from rlhf_exp.data.tokenize import prompt_ids
from rlhf_exp.errors import ConfigError
from rlhf_exp.modeling import models
from rlhf_exp.rl import alarm, evaluation, rl_steps, rollout
from rlhf_exp.training import checkpoint, dist, engine, resume, runtime, stage_kit
from rlhf_exp.training.nan_stop import stop_if_not_finite
from rlhf_exp.training.tracking import Tracker


# ----------------------------------------------------------------------------- what a run holds
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
    alarm: alarm.Watch | None = None  # the reward-hacking alarm (set by train())
    loop_s: float = 0.0  # this process's step time (evals, checkpoints left out; not saved)


def seeded_generators(seed: int) -> dict[str, torch.Generator]:
    """This rank's sampling and shuffling generators (the `State` fields)."""
    rank = dist.rank()
    return {"sample_gen": torch.Generator().manual_seed(seed * 7919 + rank),
            "shuffle_gen": torch.Generator().manual_seed(seed + 1 + rank)}


@dataclass
class Rollout:
    """One rank's rollout, the fields every RL stage's experience starts with ([n, ...];
    R = response columns); a stage's Experience extends it with what its update needs."""

    sequences: torch.Tensor  # [n, P+R]
    attention_mask: torch.Tensor  # [n, P+R]
    position_ids: torch.Tensor  # [n, P+R]
    mask: torch.Tensor  # [n, R] float, 1 up to and including EOS

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, -self.mask.shape[1]:]

    def select(self, idx: torch.Tensor):
        """The rows `idx` of every field (a None field stays None)."""
        return type(self)(*(None if getattr(self, f) is None else getattr(self, f)[idx]
                            for f in self.__dataclass_fields__))


# ----------------------------------------------------------------------------- set-up
@dataclass
class Prompts:
    """An RL stage's prompts: the data_mix's RL share (its `ppo` share: PPO and GRPO train on
    the same prompts) and this rank's held-out slice."""

    train: list[dict]
    eval_rows: list[dict]


def read_prompts(cfg: DictConfig, stage: str, per_step_key: str) -> Prompts:
    """The prompts; a ConfigError when the share holds fewer than one step takes
    (`<stage>.<per_step_key>`)."""
    per_step = cfg[stage][per_step_key]
    data = build_stage_data(cfg.data_mix, "ppo", cfg.seed)
    if len(data.train) < per_step:
        raise ConfigError(f"{stage}: the data_mix's ppo share has {len(data.train)} prompts, "
                          f"fewer than {stage}.{per_step_key}={per_step}")
    return Prompts(data.train, evaluation.heldout_shard(cfg, cfg[stage].eval_num_prompts,
                                                        dist.rank(), dist.world_size()))


def open_run(run: stage_kit.StageRun, inputs: dict[str, str | None]) -> Tracker:
    """run.open() (run config, resume point, W&B run), then the checkpoints the run starts
    from recorded in its config and summary."""
    tracker = run.open()
    tracker.record_inputs(inputs, prefix=run.stage)
    return tracker


def load_actor(cfg: DictConfig, stage: str, actor_init: str, reward_model: str | None):
    """(tokenizer, actor model with `model.lora`, dropout off; its ZeRO stage): the actor's
    tokenizer must be the reward model's, which scores the actor's tokens directly."""
    tokenizer = models.load_tokenizer(actor_init, cfg.model)
    if reward_model is not None:
        rm_tokenizer = models.load_tokenizer(reward_model, cfg.model)
        if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"{stage}: the reward model at {reward_model} uses a different "
                              f"tokenizer than the actor at {actor_init}; {stage.upper()} scores "
                              "the actor's tokens directly")
    node = cfg[stage].actor
    zero = cfg.zero_stage.stage if node.zero_stage is None else node.zero_stage
    actor = models.load_causal_lm(actor_init, tokenizer, cfg.model, cfg.hardware.precision)
    return tokenizer, engine.disable_dropout(models.apply_lora(actor, cfg.model.lora)), zero


def frozen(cfg: DictConfig, path: str, tokenizer, *, reward: bool, zero_stage: int,
           offload: bool):
    """A frozen, inference-only model (a reference policy, or with `reward` a reward model) on
    engine.build_frozen (ZeRO-3 with CPU offload when `offload`)."""
    load = models.load_reward_model if reward else models.load_causal_lm
    return engine.build_frozen(load(path, tokenizer, cfg.model, cfg.hardware.precision), cfg,
                               zero_stage=zero_stage, offload=offload)


# ----------------------------------------------------------------------------- the loop's parts
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


def prompt_loop(stage: str, cfg: DictConfig, run_dir: Path, tokenizer, prompts: Prompts,
                per_step: int, **kw) -> Loop:
    """A Loop over the training prompts (tokenized here with `<stage>.max_prompt_len`),
    `per_step` of them per step (global; each rank its slice); `kw`: the other Loop fields."""
    node = cfg[stage]
    tokens = [prompt_ids(tokenizer, row, cfg.model.prompt_template, node.max_prompt_len)
              for row in prompts.train]
    schedule = rollout.PromptSchedule(len(prompts.train), per_step, seed=cfg.seed,
                                      rank=dist.rank(), world=dist.world_size())
    return Loop(stage=stage, cfg=cfg, run_dir=run_dir, prompts=prompts.train,
                prompt_tokens=tokens, schedule=schedule, eval_rows=prompts.eval_rows, **kw)


# ----------------------------------------------------------------------------- the loop
def train(loop: Loop, steps: Steps, state: State, tracker: Tracker,
          resume_from: Path | None = None) -> State:
    """Continue from `resume_from` (a training checkpoint) or evaluate the starting policy;
    run steps state.step + 1 .. `<stage>.steps`; the held-out eval after the last. Returns the
    state (state.loop_s: this process's step time)."""
    node = loop.node
    watch = state.alarm = alarm.Watch(loop.stage, node.alarm)
    evaluated_at = None  # the step of the last held-out eval
    if resume_from:
        steps.load(state, resume_from)
        runtime.say(f"{loop.stage}: resumed from {resume_from} at step {state.step}/{node.steps}")
    elif loop.eval_rows:
        state.init_eval = state.last_eval = steps.evaluate()
        evaluated_at = 0
        tracker.log({**state.init_eval, **watch.on_eval(0, state.init_eval, {})}, 0)
        if watch.keeps_best and watch.is_new_best(0):  # the starting policy may stay the best
            steps.save(state)
    with runtime.progress(node.steps, loop.stage) as bar:  # closed on errors too
        bar.update(state.step)
        while state.step < node.steps and not watch.stop:
            t0 = time.perf_counter()
            stats, table = run_step(loop, steps, state, tracker)
            state.loop_s += time.perf_counter() - t0
            state.step, state.last_stats = state.step + 1, stats
            stats.update(watch.on_step(state.step, stats))
            rl_steps.log_step(tracker, loop.cfg, loop.stage, state.step, stats, table)
            bar.update(1)
            bar.set_postfix({label: f"{stats.get(key, float('nan')):.3f}"
                             for label, key in loop.postfix.items()})
            last = state.step >= node.steps or watch.stop
            if loop.eval_rows and node.eval_every > 0 and state.step % node.eval_every == 0 \
                    and not last:
                state.last_eval, evaluated_at = steps.evaluate(), state.step
                tracker.log({**state.last_eval,
                             **watch.on_eval(state.step, state.last_eval, stats)}, state.step)
                last = watch.stop
            best = watch.keeps_best and watch.is_new_best(state.step)
            if (node.save_every > 0 and state.step % node.save_every == 0 or best) and not last:
                steps.save(state)
    if loop.eval_rows and evaluated_at != state.step:
        state.last_eval = steps.evaluate()
        tracker.log({**state.last_eval,
                     **watch.on_eval(state.step, state.last_eval, state.last_stats)}, state.step)
    if watch.stop:
        runtime.say(f"{loop.stage}: stopped by the alarm at step {state.step}/{node.steps}"
                    + (f"; best held-out eval by {node.alarm.keep_best}: step "
                       f"{watch.best['step']}" if watch.best else ""))
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
    if loop.node.alarm.enabled:  # this rank's responses; averaged over ranks by finish()
        stats["alarm/repeat_ngram_share"] = alarm.repeated_ngram_share(
            exp.responses, exp.mask, loop.node.alarm.ngram)
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


# ----------------------------------------------------------------------------- evals, checkpoints
def evaluate(cfg: DictConfig, stage: str, m, rows: list[dict]) -> dict[str, float]:
    """`<stage>/eval_*` of the actor on this rank's held-out prompts, sampled with
    `<stage>.generation` and a fixed seed (rl_steps.heldout_eval: the numbers `stage=eval` and
    the other stages report). `m`: the stage's models (actor, tokenizer, actor_stage,
    reward_model)."""
    return rl_steps.heldout_eval(m.actor, m.tokenizer, cfg, stage, rows,
                                 zero_stage=m.actor_stage, reward_model=m.reward_model)


def save_checkpoint(cfg: DictConfig, stage: str, run_dir: Path, tracker: Tracker, actor,
                    tokenizer, state: State, *, shared: dict | None = None,
                    local: dict | None = None, **more) -> None:
    """A resumable training checkpoint of state.step (rlhf_exp/training/resume.py): the actor, the
    loop's state (rl_steps.loop_state) with the stage's `shared` (rank 0, JSON) and `local` (this
    rank's) additions; `more`: resume.save's `engines` / `files`. The W&B rows are flushed
    first: every row up to this step survives a kill right after the checkpoint. With
    `<stage>.alarm.action=stop` the checkpoint records its held-out eval's gold (or proxy)
    reward, and checkpoints/best points at the best one (resume.save)."""
    loop_shared, loop_local = rl_steps.loop_state(state, tracker)
    if state.alarm is not None:
        loop_shared["alarm"] = state.alarm.state_dict()
    keep_best = state.alarm is not None and state.alarm.keeps_best
    tracker.flush()
    resume.save(actor, tokenizer, run_dir, state.step, {**loop_shared, **(shared or {})},
                stage=stage, local={**loop_local, **(local or {})},
                lora_save=cfg.model.lora.save, keep_last=cfg[stage].keep_last,
                best_metric=f"alarm/best_{cfg[stage].alarm.keep_best}" if keep_best else None,
                best_mode="max",
                metric_value=state.alarm.value_at(state.step) if keep_best else None, **more)


def load_checkpoint(actor, state: State, ckpt: Path) -> dict[str, Any]:
    """The inverse of save_checkpoint for the actor and the loop's state, then every RNG (load
    the stage's other parts first). Returns the saved state for the stage's own parts."""
    saved = resume.load(actor, ckpt)
    rl_steps.restore_loop_state(state, saved)
    if state.alarm is not None and "alarm" in saved:
        state.alarm.load_state_dict(saved["alarm"])
    resume.restore_rng(ckpt)
    return saved


# ----------------------------------------------------------------------------- the result
def save_result(loop: Loop, state: State, tracker: Tracker, *, actor, tokenizer,
                meta: dict[str, Any], final_keys: tuple[str, ...]
                ) -> tuple[runtime.StageResult, Path]:
    """The final policy (checkpoints/final, its `model` artifact), the run's metrics (the last
    step's `final_keys`, the evals, `perf/loop_s`) into the W&B summary and result.json.
    Returns (result, policy checkpoint).

    A run the alarm stopped (`<stage>.alarm.action=stop`) ends at state.step; its result's
    checkpoint is then the best held-out eval's (checkpoints/best), `final` the last step's."""
    stage, steps, watch = loop.stage, state.step, state.alarm
    ckpt = rl_steps.save_final_policy(actor, tokenizer, loop.cfg, stage, loop.run_dir, tracker,
                                      {"stage": stage, "step": steps, **meta}, state.last_eval,
                                      step=steps)
    metrics = rl_steps.final_metrics(stage, state, final_keys, steps)
    metrics["perf/loop_s"] = state.loop_s  # this process's steps (a resumed run: the rest only)
    policy = ckpt
    if watch is not None:
        metrics.update(watch.flags())
        if watch.stop:
            metrics["alarm/stopped_step"] = steps
            policy = kept_best(watch, ckpt)
    tracker.summary(metrics)
    result = runtime.StageResult(stage, str(loop.run_dir), str(policy), tracker.run_id,
                                 str(loop.run_dir / "wandb") if tracker.enabled else None,
                                 metrics, alarms=dict(watch.fired) if watch is not None else {})
    result.write()
    return result, policy


def kept_best(watch: alarm.Watch, final: Path) -> Path:
    """The checkpoint of the best held-out eval by `alarm.keep_best` of a stopped run:
    checkpoints/best (written at that eval), or `final` when the last eval was the best (or
    there was none) and marked best too."""
    if watch.best is None:
        return final
    link = final.parent / "best"
    if watch.best["step"] == int(final.name.removeprefix("step_")) or not link.exists():
        if dist.is_main():
            checkpoint.mark(final, "best")
        dist.barrier()
        return final
    return link.resolve()


def gold_change(stage: str, state: State) -> str:
    """"held-out gold reward a -> b" for the closing line ("" without held-out gold)."""
    key = f"{stage}/eval_gold_reward"
    if key not in state.init_eval:
        return ""
    return f"held-out gold reward {state.init_eval[key]:.3f} -> {state.last_eval[key]:.3f}"
