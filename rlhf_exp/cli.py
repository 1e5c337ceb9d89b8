"""The `rlhf-exp` app: compose the run with Hydra, validate it, hand it to a stage runner.

    rlhf-exp stage=ppo model=opt-1.3b zero_stage=zero3 hardware=1gpu ppo.kl.coef=0.05

Before Hydra runs the app, `main()` settles the command line: `--help` is printed from the groups
the run would see, a command line Hydra would answer with a traceback gets one line, and what it
composes is checked (every group option, `experiment` and `hparams_search` included, and
`check()`), then what it points at is checked (rlhf_exp/preflight.py: run dir, GPUs, models,
starting points, data), so bad input exits 2 with one line before any work. Then, in `app()`:
check() -> start the ranks or run the stage here.

When `hardware` asks for more than one process and we are not yet inside a launch, the
dispatcher re-executes itself under torchrun or `deepspeed --no_local_rank` with the same
composition (the user's --config-dir / hydra.searchpath / --config-name and overrides) and the
run dir fixed once, so every rank composes the same config and writes to the same place.

Nothing here imports torch or DeepSpeed at module level: `--help` and `--cfg job` stay fast.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import signal
import sys
import traceback
from dataclasses import fields
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlhf_exp import arms, composition, dist, interrupt, preflight, preflight_checks, run_token
from rlhf_exp.composition import CONF_DIR
from rlhf_exp.config import ConfigError, RootConfig, check_rendezvous, register_configs, validate
from rlhf_exp.errors import UserError
from rlhf_exp.quoting import quote_text_values

RUNNERS = {name: f"rlhf_exp.stages.{name}" for name in
           ("sft", "reward", "ppo", "grpo", "dpo", "pipeline", "algorithms", "eval", "chat")}
CONFIG_DIGEST_ENV = "RLHF_EXP_CONFIG_DIGEST"
# pipeline: the last stage's objective (_objective_key)
DEFAULT_OBJECTIVE = {"sft": "sft/eval_loss", "reward": "reward/eval_accuracy",
                     "ppo": "ppo/eval_gold_reward", "grpo": "grpo/eval_gold_reward",
                     "dpo": "dpo/eval_gold_reward",
                     "algorithms": None, "eval": None, "chat": None}

register_configs()
run_token.register_resolvers()  # ${run_token:} in the default hydra.run.dir


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
            return composition.not_an_option(name, choice, options)
        return text.splitlines()[0]
    if isinstance(exc, OverrideParseException):
        return preflight_checks.override_parse_hint(exc)
    cause = exc.__cause__ or exc
    lines = str(cause).splitlines()
    full_key = next((ln.split(":", 1)[1].strip() for ln in lines if "full_key:" in ln), None)
    first = lines[0] if lines else type(cause).__name__
    if first.startswith("Key '") and "not in" in first:
        return f"unknown key {full_key or first}: {first} (check the spelling, or see conf/)"
    return f"{full_key}: {first}" if full_key else first


# ----------------------------------------------------------------------------- command line
SHELLS = ("bash", "zsh", "fish")


def _settle(argv: list[str]) -> list[str]:
    """The command line Hydra will run, checked first: `--help` answered here; a command line
    Hydra would answer with a traceback gets one line; `hparams_search` runs as a multirun; and
    what it composes is validated (every sample of a sweep, and `--cfg` too), so a mistake
    exits 2 with one line before any work. Raises UserError."""
    inv = composition.parse(argv)
    if inv.help:
        from rlhf_exp import usage

        print(usage.text(inv))
        raise SystemExit(0)
    if inv.hydra_help or inv.info is not None:
        return inv.to_argv()  # Hydra's own pages
    if inv.shell_completion:
        _check_shell_completion(inv)
        return inv.to_argv()
    if inv.cfg and inv.multirun:
        # what the user means: the config of the sweep's first job (Hydra refuses -m with --cfg)
        print("rlhf-exp: note: --cfg shows the config of the sweep's first job (-m dropped; "
              "swept keys at their first value)", file=sys.stderr)
        inv = composition.first_job(inv)
    if inv.resolve and not inv.cfg:
        raise UserError("--resolve only goes with --cfg job|hydra|all")
    if inv.run and (inv.multirun or inv.cfg):
        raise UserError("--run cannot be combined with -m/--multirun or --cfg")
    search = _hparams_search(inv.overrides)
    implied = bool(search) and not inv.multirun and not inv.cfg
    inv.multirun = inv.multirun or implied
    cfg = _validate(inv)
    if inv.cfg:
        _show_config(inv, cfg)
        raise SystemExit(0)
    if implied:
        print(f"rlhf-exp: note: hparams_search={search} is a search: running it as a multirun "
              "(-m)", file=sys.stderr)
    return inv.to_argv()


def _check_shell_completion(inv: composition.Invocation) -> None:
    actions = [o.split("=", 1) for o in inv.overrides]
    wanted = [(k, v) for k, v in (a for a in actions if len(a) == 2)
              if k in ("install", "uninstall", "query")]
    if len(wanted) != 1 or wanted[0][1] not in SHELLS:
        raise UserError("--shell-completion needs one of install=SHELL, uninstall=SHELL, "
                        f"query=SHELL with SHELL one of {', '.join(SHELLS)}; e.g. "
                        'eval "$(rlhf-exp -sc install=bash)"')


def _hparams_search(overrides: list[str]) -> str | None:
    """The Optuna preset a command line selects (hparams_search=<option>), if any."""
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key == "hparams_search" and value not in ("", "null"):
            return value
    return None


def _validate(inv: composition.Invocation) -> DictConfig:
    """Compose as the run will (a multirun: each value of each swept choice once), check();
    returns the first composed config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(inv.overrides)
    except Exception as exc:  # a malformed override
        raise UserError(_one_line(exc)) from None
    if not inv.multirun:
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if sweeps and not inv.cfg:
            raise UserError(f"{sweeps[0]} is a sweep: add -m to run one job per value (a list "
                            "is key=[a,b]; a string with a comma is quoted: key='a,b')")
        if sweeps:
            raise UserError(f"{sweeps[0]} is a sweep; --cfg shows one config: give one value")
    combos = _sweep_samples(inv.overrides) if inv.multirun else [inv.overrides]
    composed = []
    for combo in combos:
        cfg = _compose(inv, combo, multirun=inv.multirun)
        preflight_checks.refuse_merging_appends(combo, lambda o: _compose(inv, o, inv.multirun))
        check(cfg)
        check_rendezvous(cfg)  # a multi-node launch's settings, before Hydra makes a run dir
        if cfg.resume:  # the same stage and config as the run it continues, before Hydra
            from rlhf_exp import resume  # writes anything into that run dir

            resume.check_compatible(cfg, Path(cfg.resume))
        if cfg.stage.name == "algorithms":  # each arm is checked as the pipeline run it is
            arm_cfgs = arms.compose_arms(
                cfg, combo, lambda overrides: _compose(inv, overrides, multirun=inv.multirun))
            for name, arm_cfg in arm_cfgs.items():
                try:
                    check(arm_cfg)
                except UserError as exc:
                    raise UserError(f"stage.arms.{name}: {exc}") from None
        composed.append(cfg)
    if not inv.cfg:  # what the run points at (run dir, GPUs, models, data), before Hydra writes
        preflight.before_hydra(composed[0], inv.to_argv(),
                               lambda overrides: _compose(inv, overrides))
        if composed[0].stage.name == "algorithms" and not inv.multirun:
            run_dir = Path(str(composed[0].hydra.run.dir))
            for name, arm_cfg in arm_cfgs.items():
                preflight.preflight(arm_cfg, run_dir / name, arm_cfg.stage.stages[-1])
    return composed[0]


def _compose(inv: composition.Invocation, overrides: list[str],
             multirun: bool = False) -> DictConfig:
    """composition.compose, a Hydra/OmegaConf composition error worded as one line."""
    try:
        return composition.compose(inv, overrides, multirun=multirun)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(_one_line(exc)) from None


def _show_config(inv: composition.Invocation, cfg: DictConfig) -> None:
    """`--cfg job|hydra|all [--package P] [--resolve]`: the config just composed and checked,
    printed as Hydra prints it (hydra._internal.hydra.Hydra.show_cfg), without composing twice."""
    from hydra._internal.hydra import Hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import Container, OmegaConf, open_dict

    HydraConfig.instance().set_config(cfg)
    OmegaConf.set_readonly(cfg.hydra, None)
    if inv.cfg == "job":
        with open_dict(cfg):
            del cfg["hydra"]
    elif inv.cfg == "hydra":
        cfg = Hydra.get_sanitized_hydra_cfg(cfg)
    package = None if inv.package == "_global_" else inv.package
    shown = cfg if package is None else OmegaConf.select(cfg, package)
    if shown is None:
        raise UserError(f"--package {package}: no such node in the config")
    if not isinstance(shown, Container):
        print(shown)
        return
    if package is not None:
        print(f"# @package {package}")
    if inv.resolve:
        OmegaConf.resolve(shown)
    sys.stdout.write(OmegaConf.to_yaml(shown))


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
    """The command that starts the ranks of this node (printed by hardware.dry_run=true).

    torchrun: run on every node with that node's hardware.node_rank (static rendezvous at
    master_addr:master_port). deepspeed: run once, on node 0; with a hostfile its runner starts
    the other nodes over ssh (pdsh). Both re-run this app with the same overrides and the run dir
    fixed, so every rank writes to one place."""
    hw = cfg.hardware
    check_rendezvous(cfg)
    port = hw.master_port or dist.free_port()
    child = [o for o in overrides if not o.startswith("hardware.dry_run=")]
    child += [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    if hw.launcher == "deepspeed":
        # `python -m deepspeed.launcher.runner` is the `deepspeed` script, without needing the
        # venv's bin/ on PATH; --no_local_rank because Hydra rejects a --local_rank argument
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank",
               f"--num_nodes={hw.nnodes}",
               f"--{'num_gpus' if hw.device == 'cuda' else 'num_accelerators'}="
               f"{hw.nproc_per_node}",
               f"--master_addr={hw.master_addr}", f"--master_port={port}"]
        if hw.hostfile:
            cmd.append(f"--hostfile={hw.hostfile}")
        return [*cmd, "--module", "rlhf_exp", *child]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={hw.nproc_per_node}",
            f"--nnodes={hw.nnodes}", f"--node_rank={hw.node_rank}",
            f"--master_addr={hw.master_addr}", f"--master_port={port}",
            "-m", "rlhf_exp", *child]


class RanksFailed(RuntimeError):
    """The ranks a multi-process run started exited non-zero (their output says why)."""

    def __init__(self, rc: int):
        super().__init__(f"the launched ranks exited with code {rc}")
        self.rc = rc


def _stop_with_parent() -> None:
    """Runs in the launcher's process before exec (Linux): if this process dies, even by
    SIGKILL, the launcher gets SIGTERM and stops its ranks, instead of training on orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _rank_argv(extra: list[str]) -> list[str]:
    """The command line of each launched rank: this run's composition flags (--config-dir,
    --config-path, --config-name, hydra.searchpath) and overrides, plus `extra`."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    return [*composition.rank_args(hc), *hc.overrides.task, *extra]


def _relaunch(cfg: DictConfig, run_dir: str, extra: list[str] = ()) -> float | None:
    """Start the ranks of this node and wait for them; returns the objective they reported."""
    cmd = launch_command(cfg, _rank_argv(list(extra)), run_dir)
    print(f"rlhf-exp: launching {cfg.hardware.nproc_per_node * cfg.hardware.nnodes} ranks: "
          f"{shlex.join(cmd)}", flush=True)
    # each rank checks it composed this very config (CONFIG_DIGEST_ENV, _same_config_as_launcher)
    env = {**os.environ, "RLHF_EXP_RUN_DIR": run_dir,
           CONFIG_DIGEST_ENV: composition.digest(cfg)}
    rc = interrupt.run_launcher(cmd, env, preexec_fn=_stop_with_parent)  # Ctrl-C: one line
    if rc != 0:
        raise RanksFailed(rc)
    result = Path(run_dir) / "result.json"
    metrics = json.loads(result.read_text()).get("metrics", {}) if result.exists() else {}
    return _objective(cfg, metrics)


def _same_config_as_launcher(cfg: DictConfig) -> None:
    """In a launched rank: the config composed here must be the launcher's (a rank that lost the
    user's config folder would otherwise train the defaults without a word)."""
    expected = os.environ.get(CONFIG_DIGEST_ENV)
    if expected and composition.digest(cfg) != expected:
        raise RuntimeError(f"rank {dist.rank()} composed a different config than the process "
                           f"that launched it (digest {composition.digest(cfg)} != {expected}); "
                           f"its command line: {shlex.join(sys.argv)}")


def _objective_key(cfg: DictConfig) -> str | None:
    if cfg.objective or cfg.stage.name != "pipeline":
        return cfg.objective or DEFAULT_OBJECTIVE.get(cfg.stage.name)
    stages = list(cfg.stage.stages)
    return DEFAULT_OBJECTIVE.get(stages[-1]) if stages else None


def _objective(cfg: DictConfig, metrics: dict) -> float | None:
    """The value the app returns to sweepers: `objective` (or the stage's default) among the
    stage's final metrics. A named objective the stage did not report is said, not hidden."""
    key = _objective_key(cfg)
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


# ----------------------------------------------------------------------------- app
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
        print(shlex.join(launch_command(cfg, _rank_argv(extra), str(run_dir))))
        return None
    elif hw.nproc_per_node > 1 or hw.nnodes > 1:
        return _relaunch(cfg, str(run_dir), extra)
    runner = importlib.import_module(RUNNERS[cfg.stage.name])
    result = runner.run(cfg, run_dir)
    return _objective(cfg, result.metrics if result is not None else {})


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
    from rlhf_exp import sweep

    key = _objective_key(cfg)
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

    from rlhf_exp import sweep

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


# ----------------------------------------------------------------------------- resume
def _quote(value: str) -> str:
    """A path as a Hydra override value (quoted when it has characters the grammar splits on)."""
    if all(c.isalnum() or c in "/._-" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _resume_argv(argv: list[str]) -> list[str]:
    """`resume=<run dir>`: run again in that dir (hydra.run.dir) with the overrides it was
    started with; overrides given now win (e.g. a larger sft.max_steps). The stage then loads
    the newest training checkpoint there and continues the same W&B run."""
    given = [a for a in argv if a.startswith("resume=")]
    value = given[-1].split("=", 1)[1].strip("'\"") if given else ""
    if value in ("", "null", "None"):
        return argv
    if "-m" in argv or "--multirun" in argv:
        _fail("resume= continues one run; to continue a sweep, run the same sweep again with "
              "hydra.sweep.dir=<its sweep dir> (each job resumes from its own checkpoints)")
    run_dir = Path(value).expanduser().resolve()
    saved_file = run_dir / ".hydra" / "overrides.yaml"
    if not run_dir.is_dir() or not (saved_file.exists() or (run_dir / "checkpoints").is_dir()):
        _fail(f"resume={value}: not a run dir (expected {value}/.hydra/overrides.yaml or "
              f"{value}/checkpoints/)")
    from omegaconf import OmegaConf

    from rlhf_exp import sweep

    saved = [str(o) for o in OmegaConf.load(saved_file)] if saved_file.exists() else []
    status = run_dir / sweep.STATUS_FILE  # a job of a sweep: keep its W&B group and tags
    if status.exists():
        job = json.loads(status.read_text())
        info = run_dir.parent / sweep.SWEEP_FILE
        group = json.loads(info.read_text()).get("group") if info.exists() else None
        saved += [f"logger.group={group}"] if group else []
        saved += [f"tags=[{','.join(repr(t) for t in job.get('tags', []))}]"]
    now = [a for a in argv if not a.startswith("resume=")]
    keys = {sweep._key(a) for a in now if not a.startswith("-")}
    kept = [o for o in saved if sweep._key(o) not in keys | {"resume", "hydra.run.dir"}]
    return [*now, *kept, f"resume={_quote(str(run_dir))}",
            f"hydra.run.dir={_quote(str(run_dir))}"]


def main() -> None:
    """Console entry point (`rlhf-exp`, `python -m rlhf_exp`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not dist.inside_launch():  # a launched rank runs what its launcher already checked
        try:
            argv = _settle(quote_text_values(_resume_argv(sys.argv[1:])))
        except UserError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            print("rlhf-exp: interrupted before the run started", file=sys.stderr)
            raise SystemExit(interrupt.EXIT_CODE) from None
        sys.argv = [sys.argv[0], *argv]
    app()


if __name__ == "__main__":
    main()
