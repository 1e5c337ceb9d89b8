"""What `rlhf-exp ARGS` composes, worked out before Hydra runs the app.

The dispatcher checks a command line before any work starts (one error line, exit 2), prints
`--help` from the groups the run would see, and hands the launched ranks of a multi-process run
the same composition inputs. All three need the composition exactly as `@hydra.main` makes it:
the app's configs (`rlhf_exp/conf`, shipped in the package), a user's folder given with
`--config-dir DIR` or `hydra.searchpath=[file://DIR]`, `--config-path` / `--config-name`, and the
overrides. This module builds it with Hydra's own parser, search path and config loader, so
nothing here can drift from the run. Only hydra and omegaconf are imported (no torch).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.errors import UserError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
CONFIG_NAME = "config"
# groups whose option names the run's W&B tags and run dir (each option's `name` key)
NAMED_GROUPS = ("model", "stage", "zero_stage", "hardware", "data_mix", "logger")


class ArgumentError(UserError):
    """A command line Hydra's argument parser rejects (unknown flag, missing value)."""


@dataclass
class Invocation:
    """One command line, parsed as Hydra parses it."""

    argv: list[str]
    overrides: list[str] = field(default_factory=list)
    multirun: bool = False
    run: bool = False
    cfg: str | None = None  # --cfg job|hydra|all
    resolve: bool = False
    package: str | None = None
    help: bool = False
    hydra_help: bool = False
    shell_completion: bool = False
    info: str | None = None
    config_dir: str | None = None
    config_path: str | None = None
    config_name: str | None = None

    @property
    def primary_name(self) -> str:
        return self.config_name or CONFIG_NAME

    def to_argv(self) -> list[str]:
        """This command line in the order Hydra's parser needs: flags first, then the overrides
        (Hydra rejects `a=1 --cfg job b=2`; we accept it)."""
        flags = [("--config-dir", self.config_dir), ("--config-path", self.config_path),
                 ("--config-name", self.config_name), ("--cfg", self.cfg),
                 ("--package", self.package), ("--info", self.info)]
        argv = [f"{flag}={value}" for flag, value in flags if value is not None]
        argv += (["-m"] * self.multirun + ["--run"] * self.run + ["--resolve"] * self.resolve
                 + ["--hydra-help"] * self.hydra_help + ["-sc"] * self.shell_completion)
        return [*argv, *self.overrides]


def parse(argv: list[str]) -> Invocation:
    """`argv` through Hydra's own argument parser; a rejected flag raises ArgumentError."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str) -> None:
        raise ArgumentError(f"{message} (flags: rlhf-exp --help)")

    parser.error = error  # argparse would print its usage and exit 2 with several lines
    ns = parser.parse_intermixed_args(argv)  # overrides may come before and after flags
    if ns.experimental_rerun is not None:
        raise ArgumentError("--experimental-rerun is not supported by rlhf-exp; to continue a "
                            "run use resume=<run dir>")
    return Invocation(argv=list(argv), overrides=list(ns.overrides), multirun=ns.multirun,
                      run=ns.run, cfg=ns.cfg, resolve=ns.resolve, package=ns.package,
                      help=ns.help, hydra_help=ns.hydra_help,
                      shell_completion=ns.shell_completion, info=ns.info,
                      config_dir=ns.config_dir, config_path=ns.config_path,
                      config_name=ns.config_name)


def first_job(inv: Invocation) -> Invocation:
    """A multirun's command line as one run: each swept key at its first value (a search space
    such as interval(..) left to the config), and `hydra.mode=MULTIRUN` so `--cfg hydra` shows
    the multirun's own settings (sweeper, launcher, sweep dir)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = []
    for ov in OverridesParser.create().parse_overrides(inv.overrides):
        if not ov.is_sweep_override():
            overrides.append(ov.input_line)
        elif ov.is_choice_sweep() or ov.is_range_sweep():
            first = next(iter(ov.sweep_string_iterator()))
            overrides.append(f"{ov.get_key_element()}={first}")
    return replace(inv, multirun=False, overrides=[*overrides, "hydra.mode=MULTIRUN"])


def search_path(inv: Invocation):
    """The config search path `@hydra.main` builds for this command line (hydra's configs, the
    primary config dir, `--config-dir`, plugins' additions, the structured-config schemas)."""
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    # a relative `--config-path` is a folder of the package declaring @hydra.main, as in Hydra
    path = create_automatic_config_search_path(None, "rlhf_exp.cli",
                                                inv.config_path or CONF_DIR)
    if inv.config_dir is not None:
        folder = os.path.abspath(inv.config_dir)
        if not os.path.isdir(folder):
            raise UserError(f"--config-dir {inv.config_dir}: no such folder ({folder})")
        path.prepend(provider="command-line", path=f"file://{folder}",
                     anchor=SearchPathQuery(provider="schema"))
    return path


def compose(inv: Invocation, overrides: list[str] | None = None, *,
            multirun: bool = False) -> DictConfig:
    """The config (with its `hydra` node) that the app composes for `overrides` (default: the
    command line's). Every group choice must name an existing option, optional groups
    (`experiment`, `hparams_search`) included: Hydra itself drops a misspelt optional one."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.utils import setup_globals
    from hydra.types import RunMode

    from rlhf_exp.command import run_token
    from rlhf_exp.config import register_configs

    register_configs()
    setup_globals()  # Hydra's resolvers (${now:...} in hydra.run.dir), as Hydra registers them
    run_token.register_resolvers()  # ${run_token:} in hydra.run.dir
    loader = ConfigLoaderImpl(config_search_path=search_path(inv))
    overrides = inv.overrides if overrides is None else overrides
    with warnings.catch_warnings():
        # a hydra.searchpath entry that is no folder is only a warning to Hydra; it is ours below
        warnings.simplefilter("ignore", UserWarning)
        cfg = loader.load_configuration(config_name=inv.primary_name, overrides=overrides,
                                        run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN)
    repo = repository(cfg)
    for source in repo.get_sources():
        if source.provider.startswith("hydra.searchpath") and not source.available():
            raise UserError(f"hydra.searchpath: {source.full_path()} is not a folder (or "
                            "package) of configs; give file://<absolute or relative folder>")
    check_choices(cfg, repo)
    fill_option_names(cfg)
    return cfg


def repository(cfg: DictConfig):
    """The config sources a composed config came from, as one repository (to list options)."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    csp = ConfigSearchPathImpl()
    for src in cfg.hydra.runtime.config_sources:
        csp.append(provider=src.provider, path=f"{src.schema}://{src.path}")
    return ConfigRepository(config_search_path=csp)


def options(repo, group: str) -> list[str]:
    from hydra.core.object_type import ObjectType

    return sorted(repo.get_group_options(group, results_filter=ObjectType.CONFIG))


def check_choices(cfg: DictConfig, repo) -> None:
    """Each `group=option` the composition used names a config that exists."""
    for group, choice in cfg.hydra.runtime.choices.items():
        if choice is None or group.startswith("hydra/"):
            continue
        if not repo.config_exists(f"{group}/{choice}"):
            raise UserError(not_an_option(group, str(choice), options(repo, group)))


def not_an_option(group: str, choice: str, available: list[str]) -> str:
    return (f"{group}={choice} is not an option of group '{group}'; available: "
            f"{', '.join(available) or '(none)'}")


def fill_option_names(cfg: DictConfig) -> None:
    """A user's option file may leave out `name:`; it is the option's file name (what the run
    dir, the W&B tags and the README's tables call it)."""
    from hydra.core.hydra_config import HydraConfig

    choices = (cfg.hydra.runtime.choices if "hydra" in cfg
               else HydraConfig.get().runtime.choices)
    for group in NAMED_GROUPS:
        node = cfg.get(group)
        if node is not None and OmegaConf.is_missing(node, "name") and choices.get(group):
            node.name = str(choices[group]).rsplit("/", 1)[-1]


def rank_args(hydra_cfg: DictConfig) -> list[str]:
    """The composition flags of the command line that made `hydra_cfg` (HydraConfig.get()), for
    the ranks a multi-process run starts: the user's --config-dir, --config-path, --config-name
    and hydra.searchpath, so every rank composes exactly what the launching process did."""
    args = []
    for src in hydra_cfg.runtime.config_sources:
        where = src.path if src.schema == "file" else f"{src.schema}://{src.path}"
        if src.provider == "command-line":
            args.append(f"--config-dir={where}")
        elif src.provider == "main" and os.path.realpath(src.path) != os.path.realpath(CONF_DIR):
            args.append(f"--config-path={where}")
    if hydra_cfg.job.config_name not in (None, CONFIG_NAME):
        args.append(f"--config-name={hydra_cfg.job.config_name}")
    args += [o for o in hydra_cfg.overrides.hydra if o.split("=", 1)[0] == "hydra.searchpath"]
    return args


def digest(cfg: DictConfig) -> str:
    """A fingerprint of a composed job config (the launcher's and each rank's must match)."""
    return hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=False).encode()).hexdigest()[:16]
