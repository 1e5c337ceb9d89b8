"""Checkpoints: plain HF model dirs (safetensors + config + tokenizer), written atomically.

Layout of a stage run dir:
    checkpoints/step_000120/      one checkpoint (loadable with from_pretrained)
    checkpoints/final -> step_000300   the final one, marked by a symlink
    checkpoints/best -> step_000200    the best by <stage>.keep_best_metric (if set)
Each checkpoint is written to a hidden temp dir beside its target and renamed into place, so a
run killed mid-save never leaves a half-written checkpoint under its real name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from rlhf_exp.training import dist

STEP_DIR = re.compile(r"^step_(\d+)$")


def _state_dict(engine_or_model, zero_stage: int):
    """Full weights on rank 0 (None elsewhere); a collective call under ZeRO-3."""
    if hasattr(engine_or_model, "module") and zero_stage == 3:
        return engine_or_model._zero3_consolidated_16bit_state_dict()  # gathers on all ranks
    module = getattr(engine_or_model, "module", engine_or_model)
    return module.state_dict() if dist.is_main() else None


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "merge_and_unload")


def _merged_copy(module, state: dict, *, shares_storage: bool):
    """A plain HF model with the LoRA weights of `state` merged into the base weights.

    Rebuilt on the meta device and filled from the full state dict (rather than deep-copying the
    live module): under ZeRO-3 the live module's parameters are empty partitions."""
    import copy

    import torch

    from rlhf_exp.modeling.models import peft_wrap

    base = module.get_base_model()
    with torch.device("meta"):
        fresh = type(base)(copy.deepcopy(base.config))
    peft_cfg = copy.deepcopy(module.peft_config[module.active_adapter])
    fresh = peft_wrap(fresh, peft_cfg)
    if shares_storage:  # merging writes into the base weights: never into the live model's
        state = {k: v.detach().clone() for k, v in state.items()}
    fresh.load_state_dict(state, strict=True, assign=True)
    merged = fresh.merge_and_unload()
    merged.tie_weights()
    if getattr(base, "generation_config", None) is not None:  # seq-cls models have none
        merged.generation_config = copy.deepcopy(base.generation_config)
    return merged


def save_hf(engine_or_model, tokenizer, out_dir: Path, *, zero_stage: int = 0,
            lora_save: str = "merged", metadata: dict | None = None) -> Path:
    """Write an HF checkpoint to `out_dir` atomically; every rank must call it.

    Under ZeRO-3 the partitioned weights are gathered into one full state dict first. A LoRA
    model is saved merged (`lora_save="merged"`: a plain checkpoint any HF code loads) or as the
    adapter alone (`"adapter"`: adapter_config.json + adapter_model.safetensors, naming its base;
    models.load_causal_lm / load_reward_model merge it back on load)."""
    out_dir = Path(out_dir)
    state = _state_dict(engine_or_model, zero_stage)
    if dist.is_main():
        module = getattr(engine_or_model, "module", engine_or_model)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
        try:
            if _is_peft(module) and lora_save == "merged":
                gathered = hasattr(engine_or_model, "module") and zero_stage == 3
                merged = _merged_copy(module, state, shares_storage=not gathered)
                merged.save_pretrained(tmp, safe_serialization=True)
            else:  # a PeftModel writes only its adapter (and modules_to_save) from `state`
                module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "rlhf_exp.json").write_text(json.dumps(metadata or {}, indent=2))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    dist.barrier()
    return out_dir


def is_checkpoint(path: Path) -> bool:
    """A full HF checkpoint (config.json) or a LoRA adapter checkpoint (adapter_config.json)."""
    path = Path(path)
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def mark(ckpt: Path, name: str) -> Path:
    """Point `checkpoints/<name>` (final, best) at `ckpt` by an atomic symlink swap. Rank 0
    only, no barrier (callers sync)."""
    link = ckpt.parent / name
    tmp = ckpt.parent / f".{name}-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(ckpt.name)
    os.replace(tmp, link)
    return link


def mark_final(ckpt: Path) -> Path:
    """Point `checkpoints/final` at `ckpt` (atomic symlink swap); returns the link."""
    link = ckpt.parent / "final"
    if dist.is_main():
        mark(ckpt, "final")
    dist.barrier()
    return link


def final_checkpoint(run_dir: Path) -> Path | None:
    link = Path(run_dir) / "checkpoints" / "final"
    return link.resolve() if link.exists() else None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and is_checkpoint(p)]
    return sorted(found)


TRASH_PREFIX = ".trash-"  # a checkpoint being deleted (never matches STEP_DIR)


def prune(run_dir: Path, keep_last: int, protect: set[Path] = frozenset()) -> None:
    """Delete all but the newest `keep_last` step checkpoints (never a protected one, nor the
    ones `checkpoints/final` and `checkpoints/best` point at). Rank 0 only.

    Each is first renamed away (`checkpoints/.trash-step_N`, atomic) and only then deleted, so a
    run killed half-way through never leaves a `step_N` dir that looks like a checkpoint but
    lacks its weights; what a kill leaves under the trash name is removed by the next prune
    (every checkpoint save prunes)."""
    if not dist.is_main():
        return
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for trash in root.glob(f"{TRASH_PREFIX}*"):  # left by a run killed while deleting
        shutil.rmtree(trash, ignore_errors=True)
    if keep_last <= 0:
        return
    keep = {p.resolve() for p in protect}
    keep |= {(root / name).resolve() for name in ("final", "best") if (root / name).exists()}
    ckpts = list_checkpoints(run_dir)
    for _, path in ckpts[:-keep_last]:
        if path.resolve() not in keep:
            trash = root / f"{TRASH_PREFIX}{path.name}"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
