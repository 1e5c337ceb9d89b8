"""The `rlhf-exp` app: compose the run with Hydra, validate it, hand it to a stage runner.

    rlhf-exp stage=ppo model=opt-1.3b zero_stage=zero3 hardware=1gpu ppo.kl.coef=0.05

`main()` rewrites `resume=` (rlhf_exp/command/resume_argv.py) and settles the command line before
Hydra runs the app (rlhf_exp/command/settle.py: `--help`, one-line errors, validation, preflight).
Then, in `app()`: check() -> start the ranks (rlhf_exp/command/launch.py) or run the stage here
(its runner, from the stage registry, rlhf_exp/registry.py) -> the objective for sweepers
(rlhf_exp/command/objective.py).

Nothing here imports torch or DeepSpeed at module level: `--help` and `--cfg job` stay fast.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlhf_exp import registry
from rlhf_exp.command import composition, preflight, run_token
from rlhf_exp.command.composition import CONF_DIR
from rlhf_exp.command.launch import CONFIG_DIGEST_ENV, RanksFailed, launch_command, rank_argv
from rlhf_exp.command.launch import relaunch as _relaunch
from rlhf_exp.command.launch import same_config_as_launcher as _same_config_as_launcher
from rlhf_exp.command.objective import objective_key, objective_value
from rlhf_exp.command.quoting import quote_text_values
from rlhf_exp.command.resume_argv import resume_argv
from rlhf_exp.command.settle import fail as _fail
from rlhf_exp.command.settle import settle as _settle
from rlhf_exp.config import check, register_configs
from rlhf_exp.errors import UserError
from rlhf_exp.training import dist, interrupt

__all__ = ["CONFIG_DIGEST_ENV", "CONF_DIR", "app", "check", "launch_command", "main"]

register_configs()
run_token.register_resolvers()  # ${run_token:} in the default hydra.run.dir


def _execute(cfg: DictConfig, run_dir: Path, extra: list[str]) -> float | None:
    """check() -> start the ranks, or run the stage here; returns the objective. (The preflight
    of what the config points at ran before Hydra for a single run, and in _sweep_job for each
    job of a multirun.) Bad input raises UserError, failed ranks RanksFailed."""
    check(cfg)
    hw = cfg.hardware
    if hw.launcher == "submitit":  # each submitit task is one rank: no re-execution
        world = dist.adopt_submitit_env(hw.master_port)
        if world != hw.nproc_per_node * hw.nnodes:
            raise UserError(f"the submitit job has {world} tasks but hardware.nproc_per_node x "
                            f"hardware.nnodes = {hw.nproc_per_node * hw.nnodes}: set "
                            "hydra.launcher.tasks_per_node / hydra.launcher.nodes to match")
    elif dist.inside_launch():  # one of the ranks _relaunch started: its launcher checked all
        _same_config_as_launcher(cfg)
    elif hw.dry_run:
        print(shlex.join(launch_command(cfg, rank_argv(extra), str(run_dir))))
        return None
    elif hw.nproc_per_node > 1 or hw.nnodes > 1:
        return _relaunch(cfg, str(run_dir), extra)
    runner = importlib.import_module(registry.get(cfg.stage.name).runner)
    result = runner.run(cfg, run_dir)
    return objective_value(cfg, result.metrics if result is not None else {})


def _finish_wandb() -> str | None:
    """A failed job may leave its W&B run open; the next job of the sweep (same process) would
    log into it. Close it, marked failed; returns its id."""
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return None
    run_id = wandb.run.id
    wandb.finish(exit_code=1)
    return run_id


def _sweep_job(cfg: DictConfig, run_dir: Path, ctx: dict) -> float | None:
    """One job of a multirun. A failure is reported and recorded (job_status.json), never
    raised: the other jobs still run, and the end-of-sweep table shows it."""
    from rlhf_exp.command import sweep

    key = objective_key(cfg)
    try:
        preflight.preflight(cfg, run_dir)  # this job's inputs, before its W&B run exists
        extra = sweep.apply_to_config(cfg, ctx)
        value = _execute(cfg, run_dir, extra)
    except KeyboardInterrupt:  # the whole sweep stops, with one line
        interrupt.stop(cfg.stage.name, run_dir, sweep_dir=run_dir.parent)
    except Exception as exc:  # KeyboardInterrupt / SystemExit still stop the whole sweep
        expected = isinstance(exc, (UserError, RanksFailed))
        message = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        if not expected:
            traceback.print_exc()
        print(f"rlhf-exp: job {ctx['job']} failed: {message}", file=sys.stderr, flush=True)
        run_id = _finish_wandb()
        sweep.write_status(run_dir, ctx, status="failed", objective_key=key, objective=None,
                           error=message, wandb_run_id=run_id)
        return None
    result = run_dir / "result.json"
    run_id = json.loads(result.read_text()).get("wandb_run_id") if result.exists() else None
    sweep.write_status(run_dir, ctx, status="completed", objective_key=key, objective=value,
                       wandb_run_id=run_id)
    return value


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from rlhf_exp.command import sweep

    composition.fill_option_names(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    ctx = sweep.job_context()
    if ctx is not None:
        return _sweep_job(cfg, run_dir, ctx)
    try:
        return _execute(cfg, run_dir, [])
    except UserError as exc:
        _fail(str(exc))
    except RanksFailed as exc:
        raise SystemExit(exc.rc) from None
    except KeyboardInterrupt:  # Ctrl-C: where it stopped and how to continue, in one line
        interrupt.stop(cfg.stage.name, run_dir)


def main() -> None:
    """Console entry point (`rlhf-exp`, `python -m rlhf_exp`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not dist.inside_launch():  # a launched rank runs what its launcher already checked
        try:
            argv = _settle(quote_text_values(resume_argv(sys.argv[1:])))
        except UserError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            print("rlhf-exp: interrupted before the run started", file=sys.stderr)
            raise SystemExit(interrupt.EXIT_CODE) from None
        sys.argv = [sys.argv[0], *argv]
    app()


if __name__ == "__main__":
    main()
