"""Resume: an SFT run killed with SIGKILL after a checkpoint, restarted with `resume=<run dir>`,
ends exactly like an uninterrupted run with the same seed, and continues the same W&B run, whose
merged history holds every step exactly once (the killed part keeps every row up to its
checkpoint: rlhf_exp/tracking.Tracker.flush)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_exp.wandb_reader import read_merged, read_run, run_files
from tests.conftest import CHILD_DROP_ENV, ROOT, compose

# keep_best_mode=max makes the "best" checkpoint the oldest one (eval loss falls), so the test
# sees it kept although keep_last=1 alone would delete it
ARGS = ["stage=sft", "seed=7", "data_mix.sources.0.synthetic.num_examples=600",
        "sft.micro_batch_size_per_device=8", "sft.max_steps=6", "sft.log_every=1",
        "sft.eval_every=2", "sft.save_every=2", "sft.keep_last=1",
        "sft.keep_best_metric=sft/eval_loss", "sft.keep_best_mode=max",
        "logger.log_checkpoints=false"]
REWARD_ARGS = ["stage=reward", "seed=7", "data_mix.sources.0.synthetic.num_examples=600",
               "reward.micro_batch_size_per_device=8", "reward.max_steps=6",
               "reward.log_every=1", "reward.eval_every=2", "reward.save_every=2",
               "reward.keep_last=1", "logger.log_checkpoints=false"]


def _kill_after_checkpoint(run_dir: Path, step: int, args: list[str] = ARGS) -> None:
    """Start the run as a user would and SIGKILL it once checkpoint `step` is complete."""
    marker = run_dir / "checkpoints" / f"step_{step:06d}" / "trainer_state.json"
    env = {k: v for k, v in os.environ.items() if k not in CHILD_DROP_ENV}  # see conftest.cli
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_exp", *args, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 600
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"run ended before checkpoint {step}: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("no checkpoint within 600 s")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _wandb_ids(run_dir: Path) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*"))


def _steps(run, metric: str, stage: str) -> list[int]:
    """The steps at which `metric` was logged, in history order (a repeat would show twice)."""
    return [int(row[f"{stage}/step"]) for row in run.history if metric in row]


def _check_history(killed: Path, reference: Path, stage: str, checkpoint_step: int,
                   evals: list[int]) -> None:
    """The killed part alone holds every row up to the checkpoint; the merged history of the
    killed and resumed parts holds each step once, with the uninterrupted run's values."""
    first_part, second_part = (read_run(f) for f in sorted(
        run_files(killed / "wandb"), key=lambda f: f.parent.name))
    loss = f"{stage}/loss"
    assert _steps(first_part, loss, stage)[:checkpoint_step] == list(
        range(1, checkpoint_step + 1)), "rows up to the checkpoint lost with the killed process"
    assert min(_steps(second_part, f"{stage}/step", stage)) == checkpoint_step + 1
    (run,) = read_merged(killed / "wandb")
    (ref,) = read_merged(reference / "wandb")
    assert _steps(run, loss, stage) == _steps(ref, loss, stage) == list(range(1, 7))
    assert _steps(run, f"{stage}/eval_loss", stage) == evals
    for metric in (loss, f"{stage}/lr", f"{stage}/eval_loss"):
        got, want = run.metric(metric), ref.metric(metric)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5, metric


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, rlhf_exp):
    from rlhf_exp.stages import sft

    killed = tmp_path / "killed"
    _kill_after_checkpoint(killed, 2)
    assert not (killed / "result.json").exists(), "the run finished before it was killed"
    (ids_before,) = set(_wandb_ids(killed))  # one W&B run so far
    # a kill in the middle of a later save leaves a temp dir: resume must ignore it
    junk = killed / "checkpoints" / ".tmp-step_000004-train"
    junk.mkdir()
    (junk / "config.json").write_text("{")

    # restart with only resume=<run dir>: the run's own overrides come from .hydra/
    proc = rlhf_exp(f"resume={killed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sft: resumed from" in proc.stdout and "at step " in proc.stdout
    resumed = json.loads((killed / "result.json").read_text())

    # the same W&B run continued: a second offline log with the same id
    ids = _wandb_ids(killed)
    assert len(ids) == 2 and set(ids) == {ids_before} == {resumed["wandb_run_id"]}

    # the uninterrupted run with the same seed
    _, _, ref = sft.train(compose(*ARGS), tmp_path / "reference")
    for key in ("sft/loss", "sft/eval_loss", "sft/first_loss"):
        assert abs(resumed["metrics"][key] - ref.metrics[key]) < 1e-5, key
    assert resumed["metrics"]["sft/steps"] == 6

    # step by step: the killed + resumed W&B run holds each step once, as the reference does
    _check_history(killed, tmp_path / "reference", "sft", 2, evals=[2, 4, 6])
    (ref_run,) = read_merged(tmp_path / "reference" / "wandb")

    # retention: keep_last=1 (the final one) + the best by sft/eval_loss
    ckpts = killed / "checkpoints"
    assert not junk.exists()
    assert (ckpts / "final").resolve().name == "step_000006"
    best = (ckpts / "best").resolve()
    assert best.exists() and (best / "trainer_state.json").exists()
    evals = dict(zip(_steps(ref_run, "sft/eval_loss", "sft"), ref_run.metric("sft/eval_loss")))
    assert best.name == f"step_{max((2, 4), key=evals.get):06d}" == "step_000002"
    kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert kept == ["step_000002", "step_000006"]  # the last one (= final) and the best

    # running the finished run dir again trains nothing and returns its result
    t0 = time.time()
    again = sft.run(compose(*ARGS, f"resume={killed}"), killed)
    assert again.metrics == resumed["metrics"] and time.time() - t0 < 5


@pytest.mark.slow
def test_reward_stage_sigkill_then_resume_matches_uninterrupted_run(tmp_path, rlhf_exp):
    from rlhf_exp.stages import reward

    killed = tmp_path / "killed"
    _kill_after_checkpoint(killed, 2, REWARD_ARGS)
    assert not (killed / "result.json").exists(), "the run finished before it was killed"
    (id_before,) = set(_wandb_ids(killed))
    proc = rlhf_exp(f"resume={killed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reward: resumed from" in proc.stdout
    resumed = json.loads((killed / "result.json").read_text())
    assert set(_wandb_ids(killed)) == {id_before} == {resumed["wandb_run_id"]}

    _, _, ref = reward.train(compose(*REWARD_ARGS), tmp_path / "reference")
    for key in ("reward/loss", "reward/first_loss", "reward/eval_loss", "reward/eval_accuracy",
                "reward/eval_margin"):
        assert abs(resumed["metrics"][key] - ref.metrics[key]) < 1e-5, key
    assert resumed["metrics"]["reward/steps"] == 6
    _check_history(killed, tmp_path / "reference", "reward", 2, evals=[2, 4, 6])
    # the step-0 data statistic was logged once, by the killed part (not again on resume)
    (run,) = read_merged(killed / "wandb")
    assert _steps(run, "reward/dropped_overlong", "reward") == [0]
    # the last step's checkpoint is the final one; keep_last=1 pruned the step-2/4 ones
    assert (killed / "checkpoints" / "final").resolve().name == "step_000006"
    assert sorted(p.name for p in (killed / "checkpoints").glob("step_*")) == ["step_000006"]

    # running the finished run dir again trains nothing and returns its result
    again = reward.run(compose(*REWARD_ARGS, f"resume={killed}"), killed)
    assert again.metrics == resumed["metrics"]


def test_resume_needs_a_run_dir(tmp_path):
    from rlhf_exp.errors import UserError
    from rlhf_exp.resume_argv import resume_argv

    with pytest.raises(UserError, match=r"^resume=.*not a run dir"):
        resume_argv([f"resume={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match="hydra.sweep.dir"):
        resume_argv(["-m", f"resume={tmp_path}", "seed=1,2"])


def test_resume_argv_reuses_the_runs_overrides(tmp_path):
    from rlhf_exp.resume_argv import resume_argv as _resume_argv

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(
        "- stage=sft\n- sft.max_steps=10\n- seed=3\n")
    argv = _resume_argv([f"resume={tmp_path}", "sft.max_steps=20"])
    assert argv == ["sft.max_steps=20", "stage=sft", "seed=3", f"resume={tmp_path}",
                    f"hydra.run.dir={tmp_path}"]


def test_keep_best_metric_is_validated():
    from rlhf_exp.config import ConfigError

    with pytest.raises(ConfigError, match="needs sft.save_every > 0"):
        compose("sft.keep_best_metric=sft/eval_loss")
    with pytest.raises(ConfigError, match="must be a metric of this stage"):
        compose("sft.keep_best_metric=eval_loss", "sft.save_every=5")
    with pytest.raises(ConfigError, match="keep_best_mode"):
        compose("sft.keep_best_mode=lowest")


def _finished_sft_run_dir(root: Path, *overrides: str) -> Path:
    """The files a finished `stage=sft` run leaves in its run dir (no training needed)."""
    from omegaconf import OmegaConf

    run_dir = root / "sft_run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in ("stage=sft", *overrides)))
    cfg = compose("stage=sft", *overrides)
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "config_tree.txt").write_text("tree\n")
    (run_dir / "cli.log").write_text("log\n")
    (run_dir / "result.json").write_text('{"stage": "sft", "metrics": {}}')
    (run_dir / "checkpoints" / "step_000010").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_000010" / "config.json").write_text("{}")
    (run_dir / "checkpoints" / "final").symlink_to("step_000010")
    return run_dir


def _snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run_dir)): (p.read_bytes() if p.is_file() else b"",
                                          p.lstat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*"))}


@pytest.mark.parametrize("args, says", [
    (["stage=ppo"], "that run is a stage=sft run, not stage=ppo"),
    (["stage=reward"], "that run is a stage=sft run, not stage=reward"),
    (["sft.lr=0.1"], "sft.lr=0.003 (now 0.1)"),
    (["seed=99"], "seed=1234 (now 99)"),
    (["model.lora.enabled=true"], "model.lora.enabled=False (now True)"),
])
def test_resume_of_another_stage_or_config_stops_before_touching_the_run(tmp_path, rlhf_exp,
                                                                          args, says):
    run_dir = _finished_sft_run_dir(tmp_path)
    before = _snapshot(run_dir)
    proc = rlhf_exp(*args, f"resume={run_dir}")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"rlhf-exp: error: resume={run_dir}: ") and says in line, line
    assert _snapshot(run_dir) == before  # not one byte or timestamp changed
    assert not (run_dir / "wandb").exists()


def test_resume_may_change_length_intervals_logger_and_tags(tmp_path):
    from rlhf_exp import resume

    run_dir = _finished_sft_run_dir(tmp_path, "sft.max_steps=10")
    cfg = compose("stage=sft", "sft.max_steps=20", "sft.save_every=5", "sft.eval_every=3",
                  "sft.keep_last=4", "logger=none", "tags=[more]", f"resume={run_dir}",
                  "ppo.kl.coef=0.5")  # another stage's keys do not matter to an SFT run
    resume.check_compatible(cfg, run_dir)
