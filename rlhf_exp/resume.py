"""Training checkpoints a killed run restarts from exactly where it stopped.

`<stage>.save_every=N` writes, every N optimizer steps, one directory that holds both the plain
HF checkpoint and everything needed to continue:

    checkpoints/step_000040/
        config.json, model.safetensors, tokenizer files   (from_pretrained loads it as usual)
        deepspeed/state/...        DeepSpeed save_checkpoint: weights, optimizer, LR schedule
                                   (every rank's ZeRO shard)
        rank<r>.pt                 rank r's RNG states (python, numpy, torch CPU and CUDA) and
                                   its share of the loop state (e.g. a partial loss window)
        trainer_state.json         step, loop counters, W&B run id, the keep-best metric value;
                                   written last: a dir without it is not a training checkpoint

It is written under a hidden temp name and renamed into place, so a run killed at any moment
leaves either the complete previous checkpoint or the complete new one. `rlhf-exp ...
resume=<run dir>` (or simply running again in a run dir that has one) loads the newest such
checkpoint: the sampler restarts at the saved step (data position), the RNGs are restored, and
the W&B run with the saved id is continued (`wandb.init(id=..., resume="allow")`; offline this
writes a second offline-run dir with the same id, which `wandb sync` merges).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from rlhf_exp import checkpoint, dist, runtime
from rlhf_exp.errors import UserError

STATE_FILE = "trainer_state.json"
DS_DIR = "deepspeed"
DS_TAG = "state"


# ----------------------------------------------------------------------------- finding
def latest(run_dir: Path) -> Path | None:
    """The newest complete training checkpoint of a run dir, or None."""
    found = [p for _, p in checkpoint.list_checkpoints(run_dir) if (p / STATE_FILE).exists()]
    return found[-1] if found else None


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def find(cfg: DictConfig, run_dir: Path, stage: str) -> Path | None:
    """The checkpoint this run continues from: the newest one in this run dir (`resume=<dir>`
    makes that dir the run dir; without it, resume is automatic), else in `resume` itself (a
    caller that passes another run dir); None = start from scratch. A pipeline's stages look in
    their own sub-run dirs, so `resume=<pipeline run dir>` resumes the stage that was cut."""
    sources = [Path(run_dir)] + ([Path(cfg.resume).expanduser()] if cfg.resume else [])
    found = [(src, ckpt) for src in sources if (ckpt := latest(src)) is not None]
    source, ckpt = found[0] if found else (sources[-1], None)
    if ckpt is None:
        if cfg.resume:
            runtime.say(f"{stage}: resume={cfg.resume} has no training checkpoint yet (they are "
                        f"written every {stage}.save_every steps): starting from step 0")
        return None
    state = read_state(ckpt)
    if state.get("stage") != stage:
        raise UserError(f"resume={source}: its checkpoint {ckpt.name} is from stage "
                        f"{state.get('stage')!r}, not {stage!r}")
    if state.get("world_size") != dist.world_size():
        raise UserError(f"resume={source}: saved with {state.get('world_size')} ranks, now "
                        f"{dist.world_size()}; resume with the same hardware.nproc_per_node x "
                        "hardware.nnodes (ZeRO shards the optimizer state per rank)")
    return ckpt


def completed(run_dir: Path, stage: str) -> runtime.StageResult | None:
    """The result of a run dir whose stage already finished (final checkpoint + result.json):
    running it again returns this instead of training again."""
    result = Path(run_dir) / "result.json"
    if checkpoint.final_checkpoint(run_dir) is None or not result.exists():
        return None
    data = json.loads(result.read_text())
    return runtime.StageResult(**data) if data.get("stage") == stage else None


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rank_file(ckpt: Path) -> Path:
    return Path(ckpt) / f"rank{dist.rank()}.pt"


def restore_rng(ckpt: Path) -> None:
    """This rank's RNG states as saved. Call it after creating the epoch's data iterator:
    creating one draws a seed from torch's RNG, so the uninterrupted run drew it before saving."""
    state = torch.load(_rank_file(ckpt), weights_only=False)["rng"]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- save / load
def save(engine, tokenizer, run_dir: Path, step: int, state: dict[str, Any], *, stage: str,
         local: dict[str, Any] | None = None, lora_save: str = "merged", keep_last: int = 2,
         best_metric: str | None = None, best_mode: str = "min",
         metric_value: float | None = None) -> Path:
    """Write the training checkpoint of `step` atomically (every rank must call it), then keep
    the newest `keep_last` plus the best by `best_metric` (linked as checkpoints/best).
    `state` is rank 0's (JSON), `local` each rank's own (e.g. its partial loss window)."""
    final = checkpoint.step_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}-train"  # one name every rank agrees on
    if dist.is_main() and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while saving
    dist.barrier()
    checkpoint.save_hf(engine, tokenizer, tmp, zero_stage=engine.zero_optimization_stage(),
                       lora_save=lora_save, metadata={"stage": stage, "step": step})
    engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, save_latest=False)
    torch.save({"rng": rng_state(), "local": local or {}}, tmp / _rank_file(tmp).name)
    dist.barrier()
    if dist.is_main():
        full = {**state, "stage": stage, "step": step, "world_size": dist.world_size(),
                "best_metric": best_metric, "metric_value": metric_value}
        (tmp / STATE_FILE).write_text(json.dumps(full, indent=2))
        if final.exists() or final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if best_metric:
            _mark_best(run_dir, best_mode)
    dist.barrier()
    checkpoint.prune(run_dir, keep_last)
    return final


def _mark_best(run_dir: Path, mode: str) -> None:
    """Point checkpoints/best at the checkpoint with the best recorded metric value."""
    scored = []
    for _, path in checkpoint.list_checkpoints(run_dir):
        if (path / STATE_FILE).exists():
            value = read_state(path).get("metric_value")
            if value is not None:
                scored.append((value, path))
    if scored:
        pick = min if mode == "min" else max
        checkpoint.mark(pick(scored, key=lambda s: s[0])[1], "best")


def load(engine, ckpt: Path) -> dict[str, Any]:
    """Weights, optimizer and LR schedule into `engine` (every rank); returns the trainer
    state with this rank's `local` values merged in. RNG states are restored separately
    (`restore_rng`)."""
    path, _ = engine.load_checkpoint(str(Path(ckpt) / DS_DIR), tag=DS_TAG,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{ckpt}: DeepSpeed found no state under {ckpt / DS_DIR}")
    local = torch.load(_rank_file(ckpt), weights_only=False)["local"]
    return {**read_state(ckpt), **local}
