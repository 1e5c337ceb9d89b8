"""The value the app returns to sweepers (Hydra's multirun, the Optuna sweeper): `objective`, or
the stage's default (StageSpec.objective in rlhf_exp/registry.py; a pipeline: its last stage's),
among the stage's final metrics."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from rlhf_exp import registry
from rlhf_exp.training import dist


def default_objective(stage: str) -> str | None:
    return registry.get(stage).objective if stage in registry.STAGES else None


def objective_key(cfg: DictConfig) -> str | None:
    """`objective`, or the stage's default (a pipeline: its last stage's)."""
    if cfg.objective or cfg.stage.name != "pipeline":
        return cfg.objective or default_objective(cfg.stage.name)
    stages = list(cfg.stage.stages)
    return default_objective(stages[-1]) if stages else None


def objective_value(cfg: DictConfig, metrics: dict) -> float | None:
    """The value the app returns to sweepers: `objective` (or the stage's default) among the
    stage's final metrics. A named objective the stage did not report is said, not hidden."""
    key = objective_key(cfg)
    if not key:
        return None
    if key not in metrics:
        if cfg.objective and dist.is_main():
            print(f"rlhf-exp: warning: objective={key} is not among the {cfg.stage.name} "
                  f"stage's final metrics ({', '.join(sorted(metrics)) or 'none'})",
                  file=sys.stderr, flush=True)
        return None
    value = metrics[key]
    return None if value is None else float(value)
