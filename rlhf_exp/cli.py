"""The `rlhf-exp` app: compose the run with Hydra, validate it, hand it to a stage runner.

    rlhf-exp stage=ppo model=opt-1.3b zero_stage=zero3 hardware=1gpu ppo.kl.coef=0.05

When `hardware` asks for more than one process and we are not yet inside a launch, the
dispatcher re-executes itself under torchrun or `deepspeed --no_local_rank` with the same
overrides and the run dir fixed once, so every rank writes to the same place.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlhf_exp import dist
from rlhf_exp.config import ConfigError, RootConfig, register_configs, validate
from rlhf_exp.errors import UserError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
RUNNERS = {name: f"rlhf_exp.stages.{name}" for name in
           ("sft", "reward", "ppo", "pipeline", "eval", "chat")}
DEFAULT_OBJECTIVE = {"sft": "sft/eval_loss", "reward": "reward/eval_accuracy",
                     "ppo": "ppo/gold_reward", "pipeline": "ppo/gold_reward",
                     "eval": None, "chat": None}

register_configs()


def check(cfg: DictConfig) -> None:
    """Everything composition cannot catch, before any heavy work."""
    known = {f.name for f in fields(RootConfig)} | {"hydra"}
    for key in cfg:
        if key not in known:
            raise ConfigError(f"unknown top-level key {key!r}; allowed: "
                              f"{', '.join(sorted(known - {'hydra'}))}")
    validate(cfg)


# ----------------------------------------------------------------------------- errors
def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf composition errors as one readable line."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException):
        text = str(exc)
        group = text.split("Could not find '", 1)[-1].split("'", 1)[0]
        options = [ln.strip() for ln in text.split("Available options in", 1)[-1].splitlines()[1:]
                   if ln.startswith("\t") and "provider=" not in ln]
        if "/" in group:
            name, choice = group.rsplit("/", 1)
            return (f"{name}={choice} is not an option of group '{name}'; available: "
                    f"{', '.join(options) or '(none)'}")
        return text.splitlines()[0]
    if isinstance(exc, OverrideParseException):
        return str(exc).splitlines()[0] + " (overrides look like key=value)"
    cause = exc.__cause__ or exc
    lines = str(cause).splitlines()
    full_key = next((ln.split(":", 1)[1].strip() for ln in lines if "full_key:" in ln), None)
    first = lines[0] if lines else type(cause).__name__
    if first.startswith("Key '") and "not in" in first:
        return f"unknown key {full_key or first}: {first} (check the spelling, or see conf/)"
    return f"{full_key}: {first}" if full_key else first


def _prevalidate(argv: list[str]) -> None:
    """Compose the overrides once with Hydra's compose API and validate, so a bad override
    exits 2 with one line before Hydra starts (Hydra itself exits 1 with a multi-line report)."""
    if any(a in ("-h", "--help", "--hydra-help", "--info", "-i", "--shell-completion", "-sc")
           or a.startswith(("--cfg", "-c", "--package", "-p", "--config-", "-cp", "-cn"))
           for a in argv):
        return
    overrides = [a for a in argv if not a.startswith("-")
                 and not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    multirun = "-m" in argv or "--multirun" in argv
    combos = [overrides]
    if multirun:
        combos = _sweep_samples(overrides)
    from hydra import compose, initialize_config_dir

    for combo in combos:
        try:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose("config", overrides=combo)
            check(cfg)
        except UserError as exc:
            _fail(str(exc))
        except Exception as exc:  # composition errors
            _fail(_one_line(exc))


def _sweep_samples(overrides: list[str]) -> list[list[str]]:
    """For multirun: each value of each choice sweep once, the other keys at their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        _fail(_one_line(exc))
    firsts, per_key = [], []
    for ov in parsed:
        if ov.is_sweep_override():
            if not ov.is_choice_sweep():  # ranges/intervals belong to a search sweeper
                per_key.append([])
                firsts.append(None)
                continue
            values = [v for v in ov.sweep_string_iterator()]
            per_key.append([f"{ov.get_key_element()}={v}" for v in values])
            firsts.append(per_key[-1][0])
        else:
            text = ov.input_line
            per_key.append([text])
            firsts.append(text)
    combos = []
    for i, options in enumerate(per_key):
        for option in options:
            combo = [option if j == i else f for j, f in enumerate(firsts) if f is not None]
            combos.append(combo)
    return combos or [[]]


def _fail(message: str) -> None:
    print(f"rlhf-exp: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ----------------------------------------------------------------------------- launch
def launch_command(cfg: DictConfig, overrides: list[str], run_dir: str) -> list[str]:
    """The command that starts every local rank of this run (also shown by hardware.dry_run)."""
    hw = cfg.hardware
    port = hw.master_port or dist.free_port()
    child = [*overrides, f"hydra.run.dir={run_dir}", "hydra.output_subdir=null",
             "hardware.dry_run=false"]
    if hw.launcher == "deepspeed":
        cmd = ["deepspeed", "--no_local_rank", f"--num_nodes={hw.nnodes}",
               f"--master_addr={hw.master_addr}", f"--master_port={port}"]
        if hw.hostfile:
            cmd.append(f"--hostfile={hw.hostfile}")
        else:
            cmd += [f"--num_gpus={hw.nproc_per_node}"] if hw.device == "cuda" else \
                   [f"--num_accelerators={hw.nproc_per_node}"]
        if hw.nnodes > 1 and not hw.hostfile:
            cmd.append(f"--node_rank={hw.node_rank}")
        return [*cmd, "--module", "rlhf_exp", *child]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={hw.nproc_per_node}",
            f"--nnodes={hw.nnodes}", f"--node_rank={hw.node_rank}",
            f"--master_addr={hw.master_addr}", f"--master_port={port}",
            "-m", "rlhf_exp", *child]


def _relaunch(cfg: DictConfig, run_dir: str) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    cmd = launch_command(cfg, overrides, run_dir)
    if cfg.hardware.dry_run:
        print(shlex.join(cmd))
        return None
    print(f"rlhf-exp: launching {cfg.hardware.nproc_per_node * cfg.hardware.nnodes} ranks: "
          f"{shlex.join(cmd)}", flush=True)
    env = {**os.environ, "RLHF_EXP_RUN_DIR": run_dir}
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise SystemExit(rc)
    return _objective(cfg, Path(run_dir))


def _objective(cfg: DictConfig, run_dir: Path) -> float | None:
    key = cfg.objective or DEFAULT_OBJECTIVE.get(cfg.stage.name)
    result = run_dir / "result.json"
    if not key or not result.exists():
        return None
    value = json.loads(result.read_text()).get("metrics", {}).get(key)
    return None if value is None else float(value)


# ----------------------------------------------------------------------------- app
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        check(cfg)
    except UserError as exc:
        _fail(str(exc))
    run_dir = HydraConfig.get().runtime.output_dir
    hw = cfg.hardware
    if (hw.nproc_per_node > 1 or hw.nnodes > 1 or hw.dry_run) and not dist.inside_launch():
        return _relaunch(cfg, run_dir)
    runner = importlib.import_module(RUNNERS[cfg.stage.name])
    try:
        result = runner.run(cfg, Path(run_dir))
    except UserError as exc:
        _fail(str(exc))
    key = cfg.objective or DEFAULT_OBJECTIVE.get(cfg.stage.name)
    value = result.metrics.get(key) if key and result is not None else None
    return None if value is None else float(value)


def main() -> None:
    """Console entry point (`rlhf-exp`, `python -m rlhf_exp`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not dist.inside_launch():
        _prevalidate(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
