"""Settling the command line before Hydra runs the app: `--help` is printed from the groups the
run would see, a command line Hydra would answer with a traceback gets one line, and what it
composes is checked (every group option, `experiment` and `hparams_search` included, and
`check()`), then what it points at (rlhf_exp/command/preflight.py: run dir, GPUs, models, starting
points, data), so bad input exits 2 with one line before any work. Torch-free."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from rlhf_exp.command import arms, composition, preflight, preflight_checks
from rlhf_exp.config import check, check_rendezvous
from rlhf_exp.errors import UserError


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


SHELLS = ("bash", "zsh", "fish")


def settle(argv: list[str]) -> list[str]:
    """The command line Hydra will run, checked first: `--help` answered here; a command line
    Hydra would answer with a traceback gets one line; `hparams_search` runs as a multirun; and
    what it composes is validated (every sample of a sweep, and `--cfg` too), so a mistake
    exits 2 with one line before any work. Raises UserError."""
    inv = composition.parse(argv)
    if inv.help:
        from rlhf_exp.command import usage

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
    combos = sweep_samples(inv.overrides) if inv.multirun else [inv.overrides]
    composed = []
    for combo in combos:
        cfg = _compose(inv, combo, multirun=inv.multirun)
        preflight_checks.refuse_merging_appends(combo, lambda o: _compose(inv, o, inv.multirun))
        check(cfg)
        check_rendezvous(cfg)  # a multi-node launch's settings, before Hydra makes a run dir
        if cfg.resume:  # the same stage and config as the run it continues, before Hydra
            from rlhf_exp.training import resume

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


def sweep_samples(overrides: list[str]) -> list[list[str]]:
    """For multirun: each value of each choice sweep once, the other keys at their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        fail(_one_line(exc))
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


def fail(message: str) -> None:
    print(f"rlhf-exp: error: {message}", file=sys.stderr)
    raise SystemExit(2)
