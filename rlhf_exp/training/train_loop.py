"""The optimizer-step loop of the supervised stages (SFT, reward, DPO), as plain functions.

A stage runner (rlhf_exp/stages/sft.py is the model) reads top to bottom:

    resume_from = resume.find(cfg, run_dir, "sft")          # None = from scratch
    tracker = Tracker(cfg, run_dir, "sft", run_id=<the checkpoint's W&B run id, or None>)
    data -> model -> features -> engine
    loop = train_loop.Loop(stage="sft", node=cfg.sft, total_steps=..., run_dir=..., ...)
    state = train_loop.train(eng, loader, sampler, loop, step_fn, eval_fn, tracker, resume_from)
    result = train_loop.save_final(eng, cfg, loop, state, tracker, init_from=..., ...)
    train_loop.finish(tracker, result)  # say where the checkpoint and the run are; close it

What a stage provides: two functions of its own module (bind extra inputs with
functools.partial, e.g. `partial(evaluate, loader=eval_loader, device=device)`):

    step_fn(eng, batch) -> (loss, stats)
        One micro-batch (already on the device) forward through the engine: the scalar loss the
        loop backpropagates, and named floats for the training log ({} or e.g.
        {"accuracy": 0.75}). Every `log_every` steps the loop logs the window mean over
        micro-batches and ranks of the loss and of each stat as `<stage>/loss`,
        `<stage>/<name>`, with `<stage>/lr`, `<stage>/grad_norm`, `<stage>/epoch`,
        `perf/tokens_per_s` (attention_mask tokens, or the batch's `num_tokens`) and
        `perf/samples_per_s`, per second of training steps (evals and checkpoint writes left
        out: the definition rl_loop.py uses too).
    eval_fn(eng) -> dict[str, float]
        Held-out metrics under their full names (`<stage>/eval_loss`, ...), the same on every
        rank. Under ZeRO-3 every forward is a collective: every rank must run the same number of
        forwards, so either score the whole held-out slice on every rank or give each rank an
        equal share (`rank_share` pads the last ones) and leave the padding out of the metric.
        None = no held-out data.

What the loop does, in this order within an optimizer step: backward/step per micro-batch
(`gradient_accumulation_steps` of them make one optimizer step; DeepSpeed steps the optimizer at
the boundary), `nan_stop.stop_if_not_finite` of the step's loss and gradient norm on all
ranks (NaN/inf stops the run with one line, the last checkpoint kept), the log window every
`log_every` steps (and at the last), eval every `eval_every` steps (`eval_every=0`: none
during training), a resumable checkpoint every `save_every` steps (`tracker.flush()` first, so
the W&B rows up to it survive a kill).
With `Loop.budget` (token-budget micro-batches, packing.TokenBudget) the loader yields the
sampler's micro-batches as row lists and each step's rows are re-cut by the budget
(`budget_step`): step_fn then gets the re-cut packed micro-batches, with `w_<name>` weights, and
returns their share of the step's loss and stats (weighted sums), not micro-batch means.
After the last step: one eval. `resume_from` (a checkpoint of rlhf_exp/training/resume.py) restores
weights, optimizer, LR schedule, loop counters, data position and RNG first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from rlhf_exp.errors import UserError
from rlhf_exp.training import checkpoint, dist, packing, resume, runtime
from rlhf_exp.training.nan_stop import check_finite, stop_if_not_finite  # noqa: F401 (check_finite: re-export)
from rlhf_exp.training.tracking import Tracker

StepFn = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[Any], dict[str, float]]


@dataclass
class Loop:
    """What the loop needs besides the engine and the data."""

    stage: str  # metric prefix and checkpoint stage name: "sft", "reward", "dpo"
    node: DictConfig  # the stage's config node (a config.TrainLoopConfig: cadence, retention)
    total_steps: int  # optimizer steps to run
    steps_per_epoch: int
    run_dir: Path
    tokenizer: Any  # saved with every checkpoint
    device: torch.device
    lora_save: str = "merged"  # model.lora.save
    # values of the stage's own saved with every resumable checkpoint (JSON; a resumed run reads
    # them back as resume.read_state(ckpt)["extra"]), e.g. DPO's step-0 held-out gold reward
    extra_state: dict[str, Any] = field(default_factory=dict)
    # token-budget micro-batches (`<stage>.micro_batch_tokens` > 0 with packing): the loader
    # yields the sampler's micro-batches as row lists (packing.raw_rows) and each optimizer
    # step's rows are re-cut by this budget (packing.TokenBudget); None = the loader's
    # micro-batches as they are
    budget: packing.TokenBudget | None = None


@dataclass
class LoopState:
    """Where the loop is; rank 0's part goes into a resumable checkpoint's trainer_state.json,
    each rank's partial log window into its rank<r>.pt."""

    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches done
    first_loss: float = math.nan  # the first logged training loss (window mean)
    last_loss: float = math.nan  # the last one
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the last eval
    window: dict[str, float] = field(default_factory=dict)  # sums since the last log (this rank)
    window_n: int = 0  # micro-batches in the window
    window_tokens: int = 0
    # wall seconds of this process's optimizer steps, without its evals and checkpoint writes
    # (a resumed run: its own steps only; not saved). Throughput figures (bench/) read it.
    loop_s: float = 0.0


# ----------------------------------------------------------------------------- the loop
def train(eng, loader, sampler, loop: Loop, step_fn: StepFn, eval_fn: EvalFn | None,
          tracker: Tracker, resume_from: Path | None = None) -> LoopState:
    """Run optimizer steps until `loop.total_steps`; returns the final state (eval included)."""
    node = loop.node
    state = restore(eng, sampler, resume_from, loop) if resume_from else LoopState()
    eng.module.train()
    t_window = t_loop = time.perf_counter()
    # seconds of evals and checkpoints, left out of state.loop_s and of the throughput figures
    paused = paused_window = 0.0
    step_loss = 0.0  # this rank's loss summed over the current step's micro-batches
    with runtime.progress(loop.total_steps, loop.stage) as bar:  # closed on errors too
        bar.update(state.step)
        while state.step < loop.total_steps:
            batches = iter(loader)  # the rest of the sampler's current epoch; then the next
            if resume_from:  # RNG after the iterator: creating one draws from torch's RNG
                resume.restore_rng(resume_from)
                resume_from = None
            pending: list = []  # token budget: the step's sampler micro-batches so far
            for batch in batches:
                if loop.budget is not None:
                    pending.append(batch)
                    if len(pending) < node.gradient_accumulation_steps:
                        continue
                    step_loss = budget_step(eng, loop, state, step_fn, pending)
                    pending = []
                else:
                    batch = {k: v.to(loop.device) for k, v in batch.items()}
                    loss, stats = step_fn(eng, batch)
                    eng.backward(loss)
                    eng.step()
                    value = float(loss.detach())
                    step_loss += value
                    _add_to_window(state, {"loss": value, **stats}, _tokens(batch))
                    state.micro += 1
                    if state.micro % node.gradient_accumulation_steps:  # mid-accumulation
                        continue
                state.step += 1
                bar.update(1)
                stop_if_not_finite({"training loss": step_loss}, [eng], stage=loop.stage,
                                   step=state.step, run_dir=loop.run_dir, tracker=tracker,
                                   hint=f"lower {loop.stage}.lr or check the data")
                step_loss = 0.0
                last = state.step >= loop.total_steps
                if state.step % node.log_every == 0 or last:
                    log_window(eng, loop, state, tracker,
                               time.perf_counter() - t_window - paused_window)
                    bar.set_postfix(loss=f"{state.last_loss:.4f}")
                    t_window, paused_window = time.perf_counter(), 0.0
                t_pause = time.perf_counter()
                if eval_fn and node.eval_every > 0 and state.step % node.eval_every == 0 \
                        and not last:
                    state.eval_metrics = eval_fn(eng)
                    tracker.log(state.eval_metrics, state.step)
                if node.save_every > 0 and state.step % node.save_every == 0 and not last:
                    save_resumable(eng, loop, state, tracker)
                paused += time.perf_counter() - t_pause
                paused_window += time.perf_counter() - t_pause
                if last:
                    break
    state.loop_s = time.perf_counter() - t_loop - paused
    if eval_fn:  # once, after the last step
        state.eval_metrics = eval_fn(eng)
        tracker.log(state.eval_metrics, state.step)
    return state


def budget_step(eng, loop: Loop, state: LoopState, step_fn: StepFn,
                micro_batches: list[list[dict]]) -> float:
    """One optimizer step of token-budget micro-batches (packing.TokenBudget): the step's rows
    re-cut by the budget, as many passes on every rank; each pass's loss is its share of the
    step's loss (weighted by the stage's step_fn), so DeepSpeed must neither divide it by the
    accumulation steps nor decide the boundary by counting: the boundary is set by hand on the
    last pass (as grpo_step does). Returns this rank's step loss; the log window gets the step's
    values as `accum` sampler micro-batches (what the padded loop adds), so `<stage>/loss` and
    the stats keep their meaning."""
    parts = loop.budget.cut(micro_batches, count=lambda n: int(
        dist.all_gather_cat(torch.tensor([n], device=loop.device)).max()))
    step_loss, sums, tokens = 0.0, {}, 0
    for j, batch in enumerate(parts):
        batch = {k: v.to(loop.device) for k, v in batch.items()}
        eng.set_gradient_accumulation_boundary(j == len(parts) - 1)
        loss, stats = step_fn(eng, batch)
        eng.backward(loss, scale_wrt_gas=False)
        eng.step()
        step_loss += float(loss.detach())
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + value
        tokens += _tokens(batch)
    accum = len(micro_batches)
    values = {"loss": step_loss, **sums}
    _add_to_window(state, {k: v * accum for k, v in values.items()}, tokens, n=accum)
    state.micro += accum
    return step_loss


def _tokens(batch: dict) -> int:
    if "num_tokens" in batch:  # a layout without one row per sequence (DPO's shared prompts)
        return int(batch["num_tokens"])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return 0


def _add_to_window(state: LoopState, values: dict[str, float], tokens: int, n: int = 1) -> None:
    """Add `values` (sums over `n` micro-batches) and `tokens` to the log window."""
    for name, value in values.items():
        state.window[name] = state.window.get(name, 0.0) + value
    state.window_n += n
    state.window_tokens += tokens


def log_window(eng, loop: Loop, state: LoopState, tracker: Tracker, elapsed: float) -> None:
    """Log the means of the loss and the step stats since the last log, over micro-batches and
    ranks, with the LR, the gradient norm and throughput; then start a new window."""
    names = list(state.window)  # the same order on every rank (same step_fn)
    means = dist.all_reduce_mean([state.window[k] / state.window_n for k in names]
                                 + [state.window_tokens], loop.device)
    world = dist.world_size()
    metrics = {f"{loop.stage}/{k}": v for k, v in zip(names, means)}
    metrics[f"{loop.stage}/lr"] = eng.get_lr()[0]
    metrics[f"{loop.stage}/epoch"] = state.step / loop.steps_per_epoch
    metrics["perf/tokens_per_s"] = means[-1] * world / elapsed
    metrics["perf/samples_per_s"] = (state.window_n * loop.node.micro_batch_size_per_device
                                     * world / elapsed)
    grad_norm = eng.get_global_grad_norm()
    if grad_norm is not None:
        metrics[f"{loop.stage}/grad_norm"] = float(grad_norm)
    tracker.log(metrics, state.step)
    state.last_loss = metrics[f"{loop.stage}/loss"]
    if math.isnan(state.first_loss):
        state.first_loss = state.last_loss
    state.window, state.window_n, state.window_tokens = {}, 0, 0


def loss_change(loop: Loop, state: LoopState) -> str:
    """The training loss for the closing line: "loss <first> -> <last>" (window means), or the
    one window's mean when the run logged only once (it is no longer than `log_every`)."""
    if state.step <= loop.node.log_every:
        return (f"loss {state.last_loss:.4f} (one log window: {state.step} step(s), "
                f"{loop.stage}.log_every={loop.node.log_every})")
    return f"loss {state.first_loss:.4f} -> {state.last_loss:.4f}"


# ----------------------------------------------------------------------------- eval sharding
def rank_share(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """Rank `rank`'s indices of n held-out items for a sharded eval: items rank, rank+world, ...,
    padded (with index 0) to ceil(n / world) so that every rank runs the same number of forwards
    (ZeRO-3 forwards are collectives). Returns (indices, how many are real); the padding must
    not count in the metric."""
    mine = list(range(rank, n, world))
    size = -(-n // world)
    return mine + [0] * (size - len(mine)), len(mine)


# ----------------------------------------------------------------------------- checkpoints
def save_resumable(eng, loop: Loop, state: LoopState, tracker: Tracker) -> Path:
    """A resumable checkpoint of this step (every rank calls it). The W&B rows are flushed to
    the run's .wandb file first: once the checkpoint exists, every row up to its step survives
    a kill."""
    tracker.flush()
    node = loop.node
    return resume.save(
        eng, loop.tokenizer, loop.run_dir, state.step, stage=loop.stage,
        state={"micro": state.micro, "first_loss": state.first_loss,
               "last_loss": state.last_loss, "eval_metrics": state.eval_metrics,
               "wandb_run_id": tracker.run_id, "extra": loop.extra_state},
        local={"window": state.window, "window_n": state.window_n,
               "window_tokens": state.window_tokens},
        lora_save=loop.lora_save, keep_last=node.keep_last, best_metric=node.keep_best_metric,
        best_mode=node.keep_best_mode, metric_value=tracker.latest.get(node.keep_best_metric))


def restore(eng, sampler, ckpt: Path, loop: Loop) -> LoopState:
    """Weights, optimizer and LR schedule into `eng`, the data position into `sampler`, and the
    loop state, from a checkpoint written by save_resumable. (The RNG states follow when the
    loop creates its data iterator.)"""
    saved = resume.load(eng, ckpt)
    if "first_loss" not in saved:
        raise UserError(f"{ckpt}: written by an older version of the training loop; it cannot be "
                        "resumed. Start the run again (its weights load with "
                        f"{loop.stage}.init_from={ckpt})")
    state = LoopState(step=saved["step"], micro=saved["micro"], first_loss=saved["first_loss"],
                      last_loss=saved["last_loss"], eval_metrics=saved["eval_metrics"],
                      window=saved["window"], window_n=saved["window_n"],
                      window_tokens=saved["window_tokens"])
    sampler.start_at(state.step)  # the next global batch is step `step`'s
    runtime.say(f"{loop.stage}: resumed from {ckpt} at step {state.step}/{loop.total_steps}")
    return state


def save_final(eng, cfg: DictConfig, loop: Loop, state: LoopState, tracker: Tracker, *,
               init_from: str | None, init_artifact: str | None,
               extra_metrics: dict[str, float] | None = None) -> runtime.StageResult:
    """The final HF checkpoint (marked `checkpoints/final`, older step checkpoints pruned), its
    `model` artifact, the W&B summary and result.json. Returns the result."""
    stage, step = loop.stage, state.step
    artifact = f"{cfg.experiment_name}-{stage}-model"
    ckpt = checkpoint.save_hf(
        eng, loop.tokenizer, checkpoint.step_dir(loop.run_dir, step),
        zero_stage=eng.zero_optimization_stage(), lora_save=loop.lora_save,
        metadata={"stage": stage, "step": step, "init_from": init_from,
                  "init_artifact": init_artifact,
                  "artifact": f"{cfg.logger.project}/{artifact}:latest"})
    checkpoint.mark_final(ckpt)
    checkpoint.prune(loop.run_dir, loop.node.keep_last)
    if cfg.logger.log_checkpoints:
        tracker.log_model(ckpt, artifact, aliases=["final", f"step-{step}"],
                          metadata={"stage": stage, "step": step, **state.eval_metrics})
    metrics = {f"{stage}/loss": state.last_loss, f"{stage}/first_loss": state.first_loss,
               f"{stage}/steps": step, **(extra_metrics or {}), **state.eval_metrics}
    tracker.summary(metrics)
    result = runtime.StageResult(stage, str(loop.run_dir), str(ckpt), tracker.run_id,
                                 str(loop.run_dir / "wandb") if tracker.enabled else None,
                                 metrics)
    result.write()
    return result


def finish(tracker: Tracker, result: runtime.StageResult) -> None:
    """Say where the checkpoint and the W&B run are, and close the run."""
    runtime.say(f"{result.stage}: checkpoint {result.checkpoint}")
    if tracker.enabled:
        runtime.say(tracker.where())
    tracker.finish()
