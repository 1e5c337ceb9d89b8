"""Sweeps: Hydra multirun (own run dirs, one W&B group, varying-value tags, failures reported,
the end-of-sweep table), the Optuna sweeper, the sweep files in sweeps/ and the experiment
presets."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.conftest import ROOT, SWEEP_FAST, compose

SWEEPS = ROOT / "sweeps"


# ----------------------------------------------------------------------------- sweep files
def _shell_commands(path: Path) -> list[list[str]]:
    """The `rlhf-exp ...` command lines of a shell example (continuations joined, "$@" out)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "rlhf-exp":
            out.append([w for w in words[1:] if w != "$@"])
    return out


_COMPOSED: set[tuple[str, ...]] = set()


def _compose_ok(overrides: list[str], where: str) -> None:
    """Compose + validate (each distinct override list once per session: ~0.5 s apiece)."""
    if tuple(overrides) in _COMPOSED:
        return
    _COMPOSED.add(tuple(overrides))
    try:
        compose(*overrides)
    except Exception as exc:  # noqa: BLE001 - the message is the point
        pytest.fail(f"{where}: {' '.join(overrides)} -> {type(exc).__name__}: {exc}")


def _param_values(spec: dict) -> list:
    """Values a W&B sweep parameter can take that are worth composing: listed values, or the
    ends of a range."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    assert "min" in spec and "max" in spec, spec
    return [spec["min"], spec["max"]]


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.sh")), ids=lambda p: p.name)
def test_hydra_multirun_examples_are_valid(path: Path):
    from rlhf_exp.command.settle import sweep_samples as _sweep_samples

    commands = _shell_commands(path)
    assert commands, f"{path.name}: no rlhf-exp command"
    for words in commands:
        assert "-m" in words, f"{path.name}: a multirun example must pass -m"
        overrides = [w for w in words if not w.startswith("-")]
        swept = [ov for ov in OverridesParser.create().parse_overrides(overrides)
                 if ov.is_sweep_override()]
        assert swept or any(o.startswith("hparams_search=") for o in overrides), path.name
        for combo in _sweep_samples(overrides):  # every value of every swept key
            _compose_ok(combo, path.name)


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("wandb_*.yaml")), ids=lambda p: p.name)
def test_wandb_sweep_files_are_valid(path: Path):
    """The overrides a `wandb agent` would build from this file (wandb's own formatting of
    ${args_no_hyphens}) all compose and validate."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = yaml.safe_load(path.read_text())
    assert spec["method"] in ("grid", "random", "bayes")
    assert spec["metric"]["goal"] in ("minimize", "maximize")
    command = spec["command"]
    assert "rlhf-exp" in command and "${args_no_hyphens}" in command, command
    fixed = [c for c in command[command.index("rlhf-exp") + 1:] if not c.startswith("${")]
    stage = next(c.split("=", 1)[1] for c in fixed if c.startswith("stage="))
    assert spec["metric"]["name"].startswith(f"{stage}/"), "metric must be one the stage logs"
    params = spec["parameters"]
    firsts = {k: _param_values(v)[0] for k, v in params.items()}
    for key, p in params.items():
        for value in _param_values(p):
            args = {k: {"value": value if k == key else firsts[k]} for k in params}
            overrides = create_sweep_command_args({"args": args})["args_no_hyphens"]
            _compose_ok([*fixed, *overrides], f"{path.name} {key}={value}")


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "hparams_search").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_optuna_search_spaces_are_valid(path: Path):
    """Every choice and both ends of every interval of an Optuna preset compose and validate,
    and the sweeper turns each into an Optuna distribution."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hydra_plugins.rlhf_exp_optuna_sweeper.optuna_sweeper import to_distribution
    from rlhf_exp.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"hparams_search={path.stem}"],
                            return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction in ("minimize", "maximize")
    assert cfg.objective, "an Optuna preset must say which metric it optimises"
    lines = [f"{k}={v}" for k, v in sweeper.params.items()]
    assert lines, "empty search space"
    for ov in OverridesParser.create().parse_overrides(lines):
        dist = to_distribution(ov)
        key = ov.get_key_element()
        values = getattr(dist, "choices", None) or (dist.low, dist.high)
        for value in values:
            _compose_ok([f"hparams_search={path.stem}", f"{key}={value}"], path.name)


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", ["dschat_opt1.3b", "llama1b_8gpu", "demo"])
def test_experiment_presets_compose(name: str):
    cfg = compose(f"experiment={name}")
    assert cfg.experiment_name == name  # a preset's own keys win over config.yaml's
    if name == "dschat_opt1.3b":
        assert cfg.model.name == "opt-1.3b" and cfg.model.reward_path == "facebook/opt-350m"
        assert (cfg.hardware.device, cfg.hardware.nproc_per_node) == ("cuda", 1)
        assert cfg.ppo.generation.max_new_tokens == 256 and cfg.ppo.max_prompt_len == 256
    if name == "llama1b_8gpu":
        assert cfg.model.name == "llama-3.2-1b"
        assert (cfg.hardware.device, cfg.hardware.nproc_per_node) == ("cuda", 8)


# ----------------------------------------------------------------------------- multirun
@pytest.mark.slow
def test_multirun_2x2(sft_sweep):
    """4 jobs -> 4 run dirs and 4 W&B runs in one group named after the sweep, each tagged with
    its seed and lr; the table at the end lists all four."""
    from rlhf_exp.training.wandb_reader import read_runs

    proc, sweep_dir = sft_sweep["proc"], sft_sweep["sweep_dir"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    group = json.loads((sweep_dir / "sweep.json").read_text())["group"]
    assert group == f"default-{sweep_dir.name}"
    combos = set()
    for job in jobs:
        status = json.loads((job / "job_status.json").read_text())
        result = json.loads((job / "result.json").read_text())
        assert status["status"] == "completed"
        assert status["objective"] == pytest.approx(result["metrics"]["sft/eval_loss"])
        runs = read_runs(job)
        assert len(runs) == 1 and runs[0].run_id == result["wandb_run_id"]
        assert runs[0].group == group and runs[0].job_type == "sft"
        vary = sorted(t for t in runs[0].tags if t.startswith(("seed=", "sft.lr=")))
        assert len(vary) == 2, runs[0].tags
        combos.add(tuple(vary))
    assert combos == {("seed=1", "sft.lr=0.001"), ("seed=1", "sft.lr=0.003"),
                      ("seed=2", "sft.lr=0.001"), ("seed=2", "sft.lr=0.003")}
    # the end-of-sweep table: one row per job with its status, objective and values
    rows = [ln.split() for ln in proc.stdout.splitlines() if re.match(r"^\d+\s+completed", ln)]
    assert len(rows) == 4 and {(r[3], r[4]) for r in rows} == {
        ("1", "0.001"), ("1", "0.003"), ("2", "0.001"), ("2", "0.003")}
    assert "job  status     sft/eval_loss  seed  sft.lr" in proc.stdout
    with open(sweep_dir / "sweep_results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


@pytest.mark.slow
def test_multirun_failing_job_is_reported_and_others_run(tmp_path, rlhf_exp):
    sweep_dir = tmp_path / "sweep"
    proc = rlhf_exp("-m", *SWEEP_FAST, "sft.max_steps=1", "sft.log_every=1",
               "sft.init_from=/nonexistent/checkpoint,null", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rlhf-exp: job 0 failed:" in proc.stderr and "/nonexistent/checkpoint" in proc.stderr
    failed = json.loads((sweep_dir / "0" / "job_status.json").read_text())
    ok = json.loads((sweep_dir / "1" / "job_status.json").read_text())
    assert failed["status"] == "failed" and "/nonexistent/checkpoint" in failed["error"]
    assert ok["status"] == "completed" and ok["objective"] > 0  # ran after the failure
    assert (sweep_dir / "1" / "checkpoints" / "final").exists()
    # the bad starting point stopped job 0 in its preflight, before a W&B run existed; job 1
    # logged into a run of its own
    from rlhf_exp.training.wandb_reader import read_runs

    assert read_runs(sweep_dir / "0") == [] and failed["wandb_run_id"] is None
    (run1,) = read_runs(sweep_dir / "1")
    assert run1.run_id == ok["wandb_run_id"] and run1.metric("sft/loss")
    assert re.search(r"^0\s+failed\s+-\s+/nonexistent/checkpoint", proc.stdout, re.M)
    assert re.search(r"^1\s+completed\s+[\d.]+\s+null", proc.stdout, re.M)
    assert "1 of 2 jobs failed" in proc.stderr


@pytest.mark.slow
def test_optuna_search_three_trials(tmp_path, rlhf_exp):
    sweep_dir = tmp_path / "optuna"
    proc = rlhf_exp("-m", "hparams_search=sft_optuna", *SWEEP_FAST, "sft.max_steps=2",
               "sft.log_every=1", "hydra.sweeper.n_trials=3",
               "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["n_trials"] == 3 and results["n_complete"] == 3
    objectives = [json.loads((sweep_dir / str(i) / "job_status.json").read_text())["objective"]
                  for i in range(3)]
    assert results["best_value"] == pytest.approx(min(objectives))
    best_job = objectives.index(min(objectives))
    assert results["best_job"] == best_job
    best = results["best_params"]
    assert 3e-4 <= best["sft.lr"] <= 1e-2 and best["sft.lr_scheduler"] in (
        "cosine", "linear", "constant")
    # the trial's sampled values were really used by that job
    cfg = yaml.safe_load((sweep_dir / str(best_job) / "config_resolved.yaml").read_text())
    assert cfg["sft"]["lr"] == pytest.approx(best["sft.lr"])
    assert f"optuna: best trial {results['best_trial']} (job {best_job})" in proc.stdout
