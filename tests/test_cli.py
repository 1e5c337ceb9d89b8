"""The command line: one-line errors for every mistake, --help, --cfg, a user's own config
folder (validated like the built-in options, handed on to every rank), the job name."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from rlhf_exp import cli
from rlhf_exp.command import composition
from tests.conftest import CHILD_DROP_ENV, make_user_conf


@pytest.fixture
def user_conf(tmp_path) -> Path:
    return make_user_conf(tmp_path / "my_project")


def one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rlhf-exp: error: ") and "Traceback" not in proc.stderr
    return lines[0]


# ----------------------------------------------------------------------------- mistakes
@pytest.mark.parametrize("args, needle", [
    (["experiment=demoo"], "experiment=demoo is not an option of group 'experiment'; "
                           "available: algorithms, demo, dschat_opt1.3b, llama1b_8gpu, "
                           "smollm2_instructions"),
    (["-m", "hparams_search=sft_optunaa"], "hparams_search=sft_optunaa is not an option of "
                                           "group 'hparams_search'; available: reward_optuna"),
    (["hparams_search=sft_optunaa"], "hparams_search=sft_optunaa is not an option"),
    (["model=tinyy", "--cfg", "job"], "model=tinyy is not an option of group 'model'"),
    (["sft=defualt"], "sft=defualt is not an option of group 'sft'; available: default"),
    (["-m", "stage=sft", "experiment=demo,demoo"], "experiment=demoo is not an option"),
    (["ppo.rollout_batch_size=7", "ppo.num_minibatches=2", "--cfg", "job"],
     "ppo.rollout_batch_size=7 must be divisible by ppo.num_minibatches (2)"),
    (["--shell-completion"], "--shell-completion needs one of install=SHELL"),
    (["-sc", "install=tcsh"], "SHELL one of bash, zsh, fish"),
    (["seed=1,2"], "seed=1,2 is a sweep: add -m"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--cfg", "jobs"], "invalid choice: 'jobs'"),
    (["--config-dir", "/nonexistent/my_conf"], "--config-dir /nonexistent/my_conf: no such "
                                                "folder"),
    (["hydra.searchpath=[file:///nonexistent/my_conf]"], "hydra.searchpath: "
                                                         "file:///nonexistent/my_conf is not"),
    (["--run", "-m"], "--run cannot be combined"),
    (["stage=sft", "hardware=multinode_torchrun"], "hardware.master_addr"),
])
def test_mistakes_exit_2_with_one_line(args, needle, rlhf_exp, tmp_path):
    proc = rlhf_exp(*args, f"hydra.run.dir={tmp_path}/run")
    assert needle in one_error_line(proc)
    assert not (tmp_path / "run").exists()


def test_cfg_job_prints_the_validated_config(rlhf_exp):
    proc = rlhf_exp("stage=sft", "sft.lr=3e-4", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.0003" in proc.stdout and "name: sft" in proc.stdout


def test_multirun_cfg_shows_the_first_job(rlhf_exp):
    """Hydra refuses -m with --cfg (a traceback); we show the sweep's first job, in the
    multirun's own Hydra settings (here the Slurm launcher of hardware=slurm)."""
    proc = rlhf_exp("-m", "hardware=slurm", "stage=sft", "seed=3,4", "--cfg", "hydra")
    assert proc.returncode == 0, proc.stderr
    assert "SlurmLauncher" in proc.stdout and "mode: MULTIRUN" in proc.stdout
    assert "- seed=3" in proc.stdout and "seed=4" not in proc.stdout
    assert "first job" in proc.stderr


def test_hparams_search_runs_as_a_multirun(capsys):
    assert cli._settle(["hparams_search=sft_optuna", "stage=sft"])[0] == "-m"
    assert "running it as a multirun" in capsys.readouterr().err
    assert cli._settle(["-m", "hparams_search=sft_optuna"]) == ["-m", "hparams_search=sft_optuna"]



def test_hparams_search_with_cfg_shows_the_search(rlhf_exp):
    proc = rlhf_exp("hparams_search=sft_optuna", "--cfg", "hydra")  # runs nothing
    assert proc.returncode == 0, proc.stderr
    assert "OptunaSweeper" in proc.stdout and "sft.lr: tag(log, interval(" in proc.stdout


def test_shell_completion_script(rlhf_exp):
    proc = rlhf_exp("-sc", "install=bash")
    assert proc.returncode == 0, proc.stderr
    assert "complete -o nospace" in proc.stdout


# ----------------------------------------------------------------------------- help, name
def test_help_names_the_app_and_each_group_on_one_line(rlhf_exp, user_conf):
    proc = rlhf_exp("--config-dir", str(user_conf), "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("rlhf-exp: ") and "powered by Hydra" not in text
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ") and
             not ln.strip().startswith("rlhf-exp")}
    for group in ("stage", "model", "data_mix", "hardware", "zero_stage", "logger", "experiment",
                  "hparams_search", "sft", "reward", "ppo", "eval", "chat"):
        assert group in lines, text
    assert "tiny*" in lines["model"] and "mytiny" in lines["model"]  # the user's own option
    assert "myexp" in lines["experiment"] and "demo" in lines["experiment"]
    assert "seed:" not in text  # not the whole config


def test_the_hydra_job_is_named_rlhf_exp():
    cfg = composition.compose(composition.parse(["stage=sft"]))
    assert cfg.hydra.job.name == "rlhf-exp"  # log file <run dir>/rlhf-exp.log
    assert cfg.hydra.launcher.get("name", "rlhf-exp") == "rlhf-exp"


def test_the_default_run_dir_resolves_in_a_fresh_process():
    """`${now:...}` in hydra.run.dir is Hydra's resolver, registered when Hydra starts: the
    dispatcher's preflight reads the run dir before that (a fresh `rlhf-exp stage=sft` crashed
    with UnsupportedInterpolationType)."""
    from omegaconf import OmegaConf

    OmegaConf.clear_resolver("now")  # as in a fresh process: no Hydra app ran yet
    cfg = composition.compose(composition.parse(["stage=sft"]))
    assert re.fullmatch(r"outputs/default/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}_sft",
                        str(cfg.hydra.run.dir)), cfg.hydra.run.dir


# ----------------------------------------------------------------------------- user folder
@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_user_options_compose_and_are_validated(how, user_conf, rlhf_exp):
    where = (["--config-dir", str(user_conf)] if how == "--config-dir"
             else [f"hydra.searchpath=[file://{user_conf}]"])
    proc = rlhf_exp(*where, "experiment=myexp", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "name: mytiny" in proc.stdout and "hidden_size: 64" in proc.stdout
    assert "name: mysort" in proc.stdout and "seed: 4242" in proc.stdout
    # the user's options are checked like the built-in ones
    line = one_error_line(rlhf_exp(*where, "model=mytinyy", "--cfg", "job"))
    assert "model=mytinyy is not an option of group 'model'" in line and "mytiny" in line
    line = one_error_line(rlhf_exp(*where, "experiment=myexp", "sft.max_len=8"))
    assert re.search(r"sft\.max_prompt_len \(\d+\) must be smaller than sft\.max_len \(8\)", line)


def test_user_option_without_a_name_is_named_after_its_file(tmp_path):
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "nameless.yaml").write_text("path: /models/my-llama\n")
    cfg = composition.compose(composition.parse(["--config-dir", str(conf), "model=nameless"]))
    assert cfg.model.name == "nameless"


def _launched_rank_argv(stdout: str) -> list[str]:
    """The rank command line from a dry run's printed launch command (after `-m rlhf_exp`)."""
    cmd = shlex.split(stdout.strip().splitlines()[-1])
    return cmd[cmd.index("rlhf_exp") + 1:]


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_every_rank_composes_what_the_launcher_composed(how, user_conf, rlhf_exp, tmp_path,
                                                       monkeypatch):
    """The ranks' command line carries the user's folder: composed from it, a rank's config is
    the launcher's (the parent passes its digest; a rank that differs stops, next test)."""
    monkeypatch.chdir(user_conf.parent)  # a relative folder, as users type it
    where = (["--config-dir", "conf"] if how == "--config-dir"
             else ["hydra.searchpath=[file://conf]"])
    args = [*where, "experiment=myexp", "hardware.nproc_per_node=2"]
    proc = rlhf_exp(*args, "hardware.dry_run=true", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr
    rank_argv = _launched_rank_argv(proc.stdout)
    launcher = composition.compose(composition.parse(args))
    rank = composition.compose(composition.parse(rank_argv))
    for cfg in (launcher, rank):
        composition.fill_option_names(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # the job config, as the app and the ranks get it
    assert rank.model.name == "mytiny" and rank.data_mix.name == "mysort"
    assert composition.digest(rank) == composition.digest(launcher)


def test_a_rank_that_composed_another_config_stops(monkeypatch):
    from tests.conftest import compose

    cfg = compose("stage=sft")
    monkeypatch.setenv(cli.CONFIG_DIGEST_ENV, composition.digest(cfg))
    cli._same_config_as_launcher(cfg)  # the same config: fine
    other = compose("stage=sft", "model=opt-125m")
    with pytest.raises(RuntimeError, match="composed a different config"):
        cli._same_config_as_launcher(other)


def test_execute_checks_then_launches(monkeypatch, tmp_path):
    """The order the dispatcher promises: check() -> ranks (or the runner); the preflight of a
    single run already ran before Hydra (tests/test_bad_input.py)."""
    from tests.conftest import compose

    cfg = compose("stage=sft", "hardware.nproc_per_node=2")
    calls = []
    monkeypatch.setattr(cli, "check", lambda cfg: calls.append("check"))
    monkeypatch.setattr(cli.preflight, "preflight",
                        lambda cfg, run_dir: calls.append("preflight"))
    monkeypatch.setattr(cli, "_relaunch", lambda cfg, run_dir, extra: calls.append("launch"))
    monkeypatch.setattr(cli.dist, "inside_launch", lambda: False)
    cli._execute(cfg, tmp_path, [])
    assert calls == ["check", "launch"]


# ----------------------------------------------------------------------------- start-up
@pytest.mark.slow  # one quick interpreter start (no torch, by construction)
def test_help_and_cfg_job_import_neither_torch_nor_deepspeed():
    """One interpreter start (no torch: fast by construction) runs both and lists what loaded."""
    code = """
import json, sys
from rlhf_exp import cli
for argv in (["--help"], ["stage=sft", "--cfg", "job"]):
    sys.argv = ["rlhf-exp", *argv]
    try:
        cli.main()
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
heavy = sorted(m for m in ("torch", "deepspeed", "transformers", "wandb") if m in sys.modules)
print(json.dumps(heavy), file=sys.stderr)
"""
    env = {k: v for k, v in os.environ.items() if k not in CHILD_DROP_ENV}  # no launched rank
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []
    assert "config groups" in proc.stdout and "name: sft" in proc.stdout
