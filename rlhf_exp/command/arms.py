"""The arms of `stage=algorithms` as the pipeline runs they are.

An arm (conf/stage/algorithms.yaml) is a chain of stages and a few overrides; its config is what
`rlhf-exp stage=pipeline stage.stages=<its chain> <the run's overrides> <its overrides>` would
compose. The dispatcher composes each arm before anything runs, so an arm's config gets every
check a pipeline run gets (config.validate, preflight); the runner composes them again the same
way from the running app's command line (HydraConfig). Only hydra and omegaconf are imported.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.config.validate import active_arms
from rlhf_exp.errors import ConfigError, UserError


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def arm_overrides(cfg: DictConfig, overrides: list[str]) -> dict[str, list[str]]:
    """Arm name -> the overrides that compose its config: the run's own (without its stage
    choice and stage.* keys), the arm's chain as a pipeline, then the arm's overrides."""
    base = [o for o in overrides if not (_key(o) == "stage" or _key(o).startswith("stage."))]
    return {str(name): [*base, "stage=pipeline",
                        f"stage.stages=[{','.join(str(s) for s in arm.stages)}]",
                        *[str(o) for o in arm.get("overrides", [])]]
            for name, arm in active_arms(cfg).items()}


def _outside(cfg: DictConfig, stage: str) -> dict:
    """The config an arm shares with the others: everything but `stage`, `hydra` and the arm's
    own stage's node."""
    data = OmegaConf.to_container(cfg, resolve=False)
    return {k: v for k, v in data.items() if k not in ("stage", "hydra", stage)}


def _differences(a: object, b: object, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def compose_arms(cfg: DictConfig, overrides: list[str],
                 compose: Callable[[list[str]], DictConfig]) -> dict[str, DictConfig]:
    """Each arm's config (`compose` turns a list of overrides into a config as the app would).
    An arm may change only its own stage's keys: the shared stages run once for all arms."""
    arms = {}
    for name, arm_args in arm_overrides(cfg, overrides).items():
        try:
            arm_cfg = compose(arm_args)
        except UserError as exc:  # which arm: its overrides are part of the command
            raise UserError(f"stage.arms.{name}: {exc}") from None
        stage = str(arm_cfg.stage.stages[-1])
        changed = _differences(_outside(arm_cfg, stage), _outside(cfg, stage))
        if changed:
            raise ConfigError(f"stage.arms.{name}.overrides change {changed[0]}: an arm may change "
                              f"only its own stage's keys ({stage}.*); the shared stages and the "
                              "run's settings are the same for every arm")
        arms[str(name)] = arm_cfg
    return arms
