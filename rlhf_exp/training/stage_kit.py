"""The prologue and epilogue every training stage (sft, reward, dpo, ppo, grpo) shares.

A stage's `train()` reads:

    with stage_kit.begin(cfg, run_dir, "sft") as run:     # seed, ranks
        data = ...                                        # inputs first: bad data stops here
        tracker = run.open()                              # run config, resume point, W&B run
        start, artifact = stage_kit.start_point(node.init_from, <base model path>, tracker)
        ... model, data, engine (stage_kit.build_engine), the loop ...
        stage_kit.close(run, result, "<stage>: done. ...")    # the closing lines, W&B finished

and `run = stage_kit.runner("sft", train)` (a finished run dir is not trained again).

A run that fails after its W&B run exists (an exception anywhere in the `with` block, e.g. a
reward function that raises at step 1) is recorded as failed: the loops close their progress bars
first (context managers), then `begin`'s exit ends the W&B run with exit code 1, and the caller
prints the error line last, on its own line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from rlhf_exp.data.sampler import GlobalBatchSampler
from rlhf_exp.errors import DataError
from rlhf_exp.modeling import models
from rlhf_exp.training import dist, engine, resume, runtime
from rlhf_exp.training.tracking import Tracker, resolve_init


@dataclass
class StageRun:
    """One stage run in this process: where it writes, this rank's place, and (after `open`) the
    checkpoint it resumes from and its W&B run."""

    stage: str
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    resume_from: Path | None = None  # the training checkpoint to continue (None: from scratch)
    saved: dict[str, Any] = field(default_factory=dict)  # its trainer state (resume.read_state)
    tracker: Tracker | None = None

    def open(self) -> Tracker:
        """Write the run config, find the checkpoint to resume from (`resume=<run dir>` or this
        run dir's own), and start the W&B run (a resumed run continues its run id). Call it
        after the inputs are checked: nothing is written before."""
        runtime.save_run_config(self.cfg, self.run_dir)
        self.resume_from = resume.find(self.cfg, self.run_dir, self.stage)
        self.saved = resume.read_state(self.resume_from) if self.resume_from else {}
        self.tracker = Tracker(self.cfg, self.run_dir, self.stage,
                               run_id=self.saved.get("wandb_run_id"))
        return self.tracker

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.tracker is not None:
            self.tracker.finish(exit_code=1)  # no-op when the NaN stop already ended it


def begin(cfg: DictConfig, run_dir: Path, stage: str) -> StageRun:
    """Seed every RNG and join the ranks (a one-rank group when there are none)."""
    runtime.set_seed(cfg.seed)
    dist.init(cfg.hardware.device)
    return StageRun(stage, cfg, Path(run_dir), dist.device_for(cfg.hardware.device), dist.rank(),
                    dist.world_size())


def start_point(ref: str | None, fallback: str, tracker: Tracker | None = None
                ) -> tuple[str, str | None]:
    """(path, W&B artifact or None) of a starting point: `ref` (a path, run dir or artifact) or,
    when it is empty, `fallback` (e.g. the base model)."""
    if not ref:
        return fallback, None
    path, artifact = resolve_init(ref, tracker)
    return str(path), artifact


def load_model(cfg: DictConfig, path: str, *, reward: bool = False, dropout: bool = True
               ) -> tuple[Any, Any, int, int]:
    """(tokenizer, model, trainable parameters, all parameters): a causal LM, or with `reward`
    a one-label sequence classifier, from `path`, with `model.lora` applied; `dropout=False`
    turns dropout off (log-probs then are one function of the weights)."""
    tokenizer = models.load_tokenizer(path, cfg.model)
    load = models.load_reward_model if reward else models.load_causal_lm
    model = load(path, tokenizer, cfg.model, cfg.hardware.precision)
    model = models.apply_lora(model, cfg.model.lora, task_type="SEQ_CLS" if reward else
                              "CAUSAL_LM")
    if not dropout:
        model = engine.disable_dropout(model)
    return (tokenizer, model, *models.count_parameters(model))


def build_engine(model, cfg: DictConfig, node: DictConfig, *, total_steps: int,
                 micro_batch_size: int | None = None, grad_accum: int | None = None,
                 zero_stage: int | None = None):
    """A DeepSpeed training engine from a stage's optimizer node (lr, weight_decay, adam_betas /
    adam_eps where the node has them, max_grad_norm, lr_scheduler, warmup_steps, min_lr_ratio);
    the batch sizes default to the node's own."""
    extra = {"betas": node.adam_betas, "eps": node.adam_eps} if "adam_betas" in node else {}
    return engine.build_train_engine(
        model, cfg, lr=node.lr, weight_decay=node.weight_decay,
        micro_batch_size=micro_batch_size or node.micro_batch_size_per_device,
        grad_accum=grad_accum or node.gradient_accumulation_steps,
        max_grad_norm=node.max_grad_norm, scheduler=node.lr_scheduler,
        warmup_steps=node.warmup_steps, total_steps=total_steps,
        min_lr_ratio=node.min_lr_ratio, zero_stage=zero_stage, **extra)


@dataclass
class GlobalBatches:
    """The training batches of a supervised stage: the same global batches for any ranks x
    accumulation split (rlhf_exp/data/sampler.py), and the run's length in optimizer steps."""

    sampler: GlobalBatchSampler
    loader: DataLoader
    total_steps: int  # `max_steps`, or `epochs` x steps per epoch
    global_batch: int
    node: DictConfig
    world: int

    def describe(self, unit: str = "") -> str:
        node = self.node
        return (f"{self.total_steps} steps, global batch {self.global_batch}"
                f"{' ' + unit if unit else ''} (micro {node.micro_batch_size_per_device} x accum "
                f"{node.gradient_accumulation_steps} x {self.world} ranks)")


def global_batches(run: StageRun, node: DictConfig, train_set: list[dict], collate,
                   what: str) -> GlobalBatches:
    """The sampler and loader over `train_set` (`what` names its items in the error: "training
    examples"); DataError when they make no full optimizer step."""
    sampler = GlobalBatchSampler(len(train_set), micro_batch_size=node.micro_batch_size_per_device,
                                 grad_accum=node.gradient_accumulation_steps,
                                 world_size=run.world, rank=run.rank, seed=run.cfg.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate)
    total = node.max_steps if node.max_steps > 0 else node.epochs * sampler.steps_per_epoch
    if sampler.steps_per_epoch == 0 or total <= 0:
        s = run.stage
        raise DataError(f"{s}: {len(train_set)} {what} make no full optimizer step at global "
                        f"batch {sampler.global_batch_size} ({s}.micro_batch_size_per_device x "
                        f"{s}.gradient_accumulation_steps x ranks): lower them or add data")
    return GlobalBatches(sampler, loader, total, sampler.global_batch_size, node, run.world)


def close(run: StageRun, result: runtime.StageResult, *lines: str,
          checkpoint_line: str | None = None) -> None:
    """The closing lines: `lines` (e.g. "<stage>: done. loss a -> b"), the checkpoint
    (`checkpoint_line` or "<stage>: checkpoint <path>"), where the W&B run is; then finish it."""
    for line in lines:
        runtime.say(line)
    runtime.say(checkpoint_line or f"{result.stage}: checkpoint {result.checkpoint}")
    if run.tracker.enabled:
        runtime.say(run.tracker.where())
    run.tracker.finish()


def runner(stage: str, train: Callable[[DictConfig, Path], tuple]
           ) -> Callable[[DictConfig, Path], runtime.StageResult]:
    """A stage's `run(cfg, run_dir)`: its result when the run dir has already finished
    (checkpoints/final; nothing is trained again), else train(cfg, run_dir)'s."""
    def run(cfg: DictConfig, run_dir: Path) -> runtime.StageResult:
        done = resume.completed(run_dir, stage)
        if done is not None:
            runtime.say(f"{stage}: {run_dir} has already finished (checkpoints/final); not "
                        "training again")
            return done
        try:
            result = train(cfg, run_dir)[2]
        except BaseException:
            with contextlib.suppress(Exception):  # the run's own error is the one to show
                engine.release_engines()
            raise
        engine.release_engines()  # the next stage in this process gets the memory back
        return result

    run.__doc__ = f"Run stage {stage} in `run_dir` unless it has finished there."
    return run
