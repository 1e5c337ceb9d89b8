"""Small pieces every stage runner uses: seeding, saving the run's config, results, printing."""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_exp.training import dist


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def say(*parts) -> None:
    """Print on rank 0 only."""
    if dist.is_main():
        print(*parts, flush=True)


def config_tree(cfg: DictConfig) -> str:
    from rlhf_exp.training.tracking import group_choices

    head = "  ".join(f"{g}={v}" for g, v in group_choices(cfg).items())
    return f"# groups: {head}\n" + OmegaConf.to_yaml(cfg, resolve=True)


def save_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config (YAML) and the config tree with the group choices, in the run dir."""
    if not dist.is_main():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "config_tree.txt").write_text(config_tree(cfg))


@dataclass
class StageResult:
    stage: str
    run_dir: str
    checkpoint: str | None = None
    wandb_run_id: str | None = None
    wandb_dir: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    # RL stages: the reward-hacking alarms that fired -> the step each first fired at
    alarms: dict[str, int] = field(default_factory=dict)

    def write(self) -> None:
        """`result.json` in the run dir: what the pipeline, sweeps and the parent launcher read."""
        if dist.is_main():
            path = Path(self.run_dir) / "result.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(asdict(self), indent=2))
            os.replace(tmp, path)


def progress(total: int, desc: str):
    """A tqdm bar on rank 0 (disabled elsewhere and when stderr is not a terminal in CI)."""
    from tqdm.auto import tqdm

    from rlhf_exp.training import interrupt

    return interrupt.track(tqdm(total=total, desc=desc, disable=not dist.is_main(),
                                dynamic_ncols=True, mininterval=1.0, file=sys.stderr))
