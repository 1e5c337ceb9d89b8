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

from rlhf_exp.errors import UserError
from rlhf_exp.training import checkpoint, dist, runtime

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


# keys a resumed run may change: how long it runs, how often it logs, evaluates and saves,
# what it keeps, and where it reports; everything else must equal the run's own config
_MAY_CHANGE_IN_STAGE = ("max_steps", "epochs", "steps", "save_every", "keep_last",
                        "keep_best_metric", "keep_best_mode", "log_every", "eval_every")
_MAY_CHANGE_TOP = ("resume", "objective", "tags", "logger", "hardware.dry_run",
                   "hardware.master_addr", "hardware.master_port", "eval", "chat")
_SHARED_NODES = ("seed", "experiment_name", "model", "zero_stage", "hardware", "data_mix")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def check_compatible(cfg: DictConfig, run_dir: Path) -> None:
    """`resume=<run dir>` must continue the same run: the same stage, and the same config but for
    the keys that may change (max_steps, intervals, retention, logger, tags). Checked before
    Hydra writes anything into the run dir; one line otherwise."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    saved_file = next((f for f in (run_dir / "config_resolved.yaml",
                                   run_dir / ".hydra" / "config.yaml") if f.is_file()), None)
    if saved_file is None:
        return  # killed before its config was written: nothing to compare with
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=False)
    except Exception as exc:
        raise UserError(f"resume={run_dir}: cannot read {saved_file} ({exc})") from None
    saved_stage = (saved.get("stage") or {}).get("name")
    stage = cfg.stage.name
    if saved_stage != stage:
        raise UserError(f"resume={run_dir}: that run is a stage={saved_stage} run, not "
                        f"stage={stage}; resume it with stage={saved_stage}, or drop resume= to "
                        "start a new run")
    from rlhf_exp import registry
    from rlhf_exp.config import run_stages

    stages = run_stages(cfg)  # a pipeline's chain; every arm's stages for stage=algorithms
    relevant = (*_SHARED_NODES, "stage", *(registry.get(s).node or s for s in stages))
    # keys of another stage's node that a stage reads (StageSpec.also_reads: DPO's held-out
    # gold reward samples with PPO's eval settings; its final gold must compare with step 0's)
    also = tuple(k for s in stages for k in registry.get(s).also_reads)
    now = _flatten({key: OmegaConf.to_container(cfg[key], resolve=True)
                    if OmegaConf.is_config(cfg[key]) else cfg[key]
                    for key in cfg if key != "hydra"})  # (the CLI composes with hydra's node)
    before = _flatten(saved)
    diffs = []
    for key in sorted(set(now) | set(before)):
        top, _, rest = key.partition(".")
        if (top not in relevant and not key.startswith(also)) or key.startswith(
                _MAY_CHANGE_TOP) or (top in stages and rest in _MAY_CHANGE_IN_STAGE):
            continue
        if now.get(key) != before.get(key):
            diffs.append(f"{key}={before.get(key)!r} (now {now.get(key)!r})")
    if diffs:
        shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise UserError(f"resume={run_dir}: the run was made with another config: {shown}; a "
                        "resumed run may change only its length (max_steps, steps, epochs), "
                        "intervals, checkpoint retention, logger and tags; drop resume= to start "
                        "a new run")


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
         metric_value: float | None = None, engines: dict[str, Any] | None = None,
         files: dict[str, Any] | None = None) -> Path:
    """Write the training checkpoint of `step` atomically (every rank must call it), then keep
    the newest `keep_last` plus the best by `best_metric` (linked as checkpoints/best).
    `state` is rank 0's (JSON), `local` each rank's own (e.g. its partial loss window).
    `engine` is the model the checkpoint's HF files hold; `engines` are more DeepSpeed engines
    saved beside it under deepspeed/<name>/ (PPO's critic); `files` rank 0's tensors saved as
    <name>.pt (PPO's fp32 EMA weights)."""
    final = checkpoint.step_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}-train"  # one name every rank agrees on
    if dist.is_main() and tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed while saving
    dist.barrier()
    checkpoint.save_hf(engine, tokenizer, tmp, zero_stage=engine.zero_optimization_stage(),
                       lora_save=lora_save, metadata={"stage": stage, "step": step})
    engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, save_latest=False)
    for name, other in (engines or {}).items():
        other.save_checkpoint(str(tmp / DS_DIR / name), tag=DS_TAG, save_latest=False)
    if dist.is_main():
        for name, obj in (files or {}).items():
            torch.save(obj, tmp / f"{name}.pt")
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


def load(engine, ckpt: Path, name: str | None = None) -> dict[str, Any]:
    """Weights, optimizer and LR schedule into `engine` (every rank; `name`: one of the extra
    `engines` of `save`); returns the trainer state with this rank's `local` values merged in.
    RNG states are restored separately (`restore_rng`)."""
    where = Path(ckpt) / DS_DIR / (name or "")
    path, _ = engine.load_checkpoint(str(where), tag=DS_TAG,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{ckpt}: DeepSpeed found no state under {where}")
    local = torch.load(_rank_file(ckpt), weights_only=False)["local"]
    return {**read_state(ckpt), **local}


def load_file(ckpt: Path, name: str) -> Any:
    """A `files` entry of `save` (on any rank)."""
    return torch.load(Path(ckpt) / f"{name}.pt", weights_only=False)
