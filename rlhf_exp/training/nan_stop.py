"""The NaN/inf stop of every training loop (train_loop.py for SFT, reward and DPO; rl_loop.py for
PPO and GRPO): after each step, the step's losses and the gradient norm of each trainable engine
are checked on all ranks; a non-finite one ends the W&B run as failed and stops the run with one
line that names the step, what went wrong and which checkpoint is kept (a loop never saves after
a bad step)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as torch_dist

from rlhf_exp.errors import NonFiniteLossError
from rlhf_exp.training import dist, resume
from rlhf_exp.training.tracking import Tracker


def check_finite(value: float | torch.Tensor, step: int, stage: str,
                 what: str = "training loss") -> None:
    """Raise NonFiniteLossError (one line naming the step) when `value` (the step's loss) is
    NaN or inf on ANY rank. A collective: every rank must call it at the same point, and then
    every rank raises together (none is left waiting in the next collective)."""
    value = float(value)
    bad = not math.isfinite(value)
    if dist.world_size() > 1:
        flag = torch.tensor([1.0 if bad else 0.0], device=_collective_device())
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        bad = bool(flag.item())
    if bad:
        seen = f"{value}" if not math.isfinite(value) else "not finite on another rank"
        raise NonFiniteLossError(f"{stage}: the {what} is {seen} at step {step}; stopped")


def _collective_device() -> torch.device:
    """Where a tensor for a collective lives: CUDA for nccl, CPU for gloo."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def stop_if_not_finite(losses: dict[str, float], engines: Sequence, *, stage: str, step: int,
                       run_dir: Path, tracker: Tracker, hint: str) -> None:
    """check_finite of each of the step's `losses` (name -> value, the same on every rank or each
    rank's own) and of the gradient norm DeepSpeed reports for each engine (ZeRO 1-3; it skips an
    update whose gradients overflowed, so a run would go on without learning; not with fp16,
    whose loss scaler expects overflows). On NaN/inf: end the W&B run as failed and raise one
    line saying which checkpoint is kept, then `hint` (what to change)."""
    try:
        for what, value in losses.items():
            check_finite(value, step, stage, what=what)
        for eng in engines:
            norm = eng.get_global_grad_norm()  # None with ZeRO 0; the same on every rank
            if norm is not None and not eng.fp16_enabled():
                check_finite(norm, step, stage, what="gradient norm")
    except NonFiniteLossError as exc:
        tracker.finish(exit_code=1)
        kept = resume.latest(run_dir)
        where = (f"The last checkpoint {kept} is kept (resume={run_dir} continues from it)"
                 if kept else f"No checkpoint to resume from ({stage}.save_every)")
        raise NonFiniteLossError(f"{exc}. {where}; {hint}") from None
