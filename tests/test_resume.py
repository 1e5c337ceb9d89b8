"""Resume: a training run of every stage (sft, reward, ppo, grpo, dpo, kto) killed with SIGKILL
after a checkpoint, restarted with `resume=<run dir>`, ends like an uninterrupted run with the
same seed and continues the same W&B run, whose merged history holds every step exactly once
(the killed part keeps every row up to its checkpoint: rlhf_exp/tracking.Tracker.flush). Then
the checks of `resume=` itself: a bad run dir, another stage or config, what may change."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_exp.training import checkpoint
from rlhf_exp.training.wandb_reader import read_merged, read_run, run_files
from tests.conftest import compose, kill_after_checkpoint, logged_steps, snapshot, wandb_ids

CHECKPOINT = 2  # the killed run dies once this step's checkpoint is complete


@dataclass
class Case:
    """One stage's kill-then-resume run and what must come out as in the uninterrupted run."""

    args: list[str]
    steps: int
    final_metrics: tuple[str, ...]  # result.json: within 1e-5 of the uninterrupted run's
    step_metrics: tuple[str, ...]  # logged every step: once per step, values within 1e-5
    eval_metric: str  # logged at the evals only ...
    eval_steps: list[int]  # ... at these steps, once each
    weights: tuple[str, ...] = ("final",)  # checkpoints whose weights must agree within 1e-5
    extra: Callable[[Path, Path, dict], None] | None = None  # the stage's own checks


def _sft_retention(killed: Path, reference: Path, resumed: dict) -> None:
    """keep_last=1 (the final one) + the best by sft/eval_loss (keep_best_mode=max: the oldest,
    as eval loss falls); the half-written save left before the resume was ignored and removed."""
    ckpts = killed / "checkpoints"
    assert not (ckpts / ".tmp-step_000004-train").exists()
    assert (ckpts / "final").resolve().name == "step_000006"
    best = (ckpts / "best").resolve()
    assert best.exists() and (best / "trainer_state.json").exists()
    (ref_run,) = read_merged(reference / "wandb")
    evals = dict(zip(logged_steps(ref_run, "sft/eval_loss", "sft"),
                     ref_run.metric("sft/eval_loss")))
    assert best.name == f"step_{max((2, 4), key=evals.get):06d}" == "step_000002"
    kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert kept == ["step_000002", "step_000006"]  # the last one (= final) and the best


def _reward_once(killed: Path, reference: Path, resumed: dict) -> None:
    """The step-0 data statistic was logged once, by the killed part (not again on resume);
    keep_last=1 pruned the step-2/4 checkpoints."""
    (run,) = read_merged(killed / "wandb")
    assert logged_steps(run, "reward/dropped_overlong", "reward") == [0]
    assert (killed / "checkpoints" / "final").resolve().name == "step_000006"
    assert sorted(p.name for p in (killed / "checkpoints").glob("step_*")) == ["step_000006"]


def _ppo_controller_moved(killed: Path, reference: Path, resumed: dict) -> None:
    assert resumed["metrics"]["ppo/kl_coef"] != 0.1  # the adaptive KL controller moved, resumed


def _gold_once(stage: str, killed: Path) -> None:
    """The held-out gold reward of the start (step 0, by the killed part) and of the end."""
    (run,) = read_merged(killed / "wandb")
    assert logged_steps(run, f"{stage}/eval_gold_reward", stage) == [0, 6]


def _grpo_refilled(killed: Path, reference: Path, resumed: dict) -> None:
    """The refill ran on both sides of the kill (tied groups dropped, new ones sampled) and
    counted alike."""
    (run,) = read_merged(killed / "wandb")
    (ref,) = read_merged(reference / "wandb")
    dropped = run.metric("grpo/groups_dropped")
    assert len(dropped) == 4 and sum(dropped[:2]) > 0 and sum(dropped[2:]) > 0
    assert dropped == ref.metric("grpo/groups_dropped")


SMALL = ["seed=7", "data_mix.sources.0.synthetic.num_examples=600", "logger.log_checkpoints=false"]
CASES = {
    # keep_best_mode=max makes the "best" checkpoint the oldest one (eval loss falls), so the
    # test sees it kept although keep_last=1 alone would delete it
    "sft": Case(
        ["stage=sft", *SMALL, "sft.micro_batch_size_per_device=8", "sft.max_steps=6",
         "sft.log_every=1", "sft.eval_every=2", "sft.save_every=2", "sft.keep_last=1",
         "sft.keep_best_metric=sft/eval_loss", "sft.keep_best_mode=max",
         "sft.micro_batch_tokens=64"],  # token-budget micro-batches (several per step)
        6, ("sft/loss", "sft/eval_loss", "sft/first_loss"), ("sft/loss", "sft/lr"),
        "sft/eval_loss", [2, 4, 6], extra=_sft_retention),
    "reward": Case(
        ["stage=reward", *SMALL, "reward.micro_batch_size_per_device=8", "reward.max_steps=6",
         "reward.log_every=1", "reward.eval_every=2", "reward.save_every=2",
         "reward.keep_last=1", "reward.micro_batch_tokens=128"],
        6, ("reward/loss", "reward/first_loss", "reward/eval_loss", "reward/eval_accuracy",
            "reward/eval_margin"), ("reward/loss", "reward/lr"), "reward/eval_loss", [2, 4, 6],
        extra=_reward_once),
    # everything stateful switched on: adaptive KL, reward normalisation, EMA, ptx, two epochs x
    # two minibatches (the minibatch shuffle generator), sampling (the sampling generator)
    "ppo": Case(
        ["stage=ppo", *SMALL, "ppo.steps=4", "ppo.rollout_batch_size=8",
         "ppo.micro_batch_size_per_device=2", "ppo.ppo_epochs=2", "ppo.num_minibatches=2",
         "ppo.eval_every=2", "ppo.eval_num_prompts=8", "ppo.eval_batch_size=8",
         "ppo.save_every=2", "ppo.keep_last=1", "ppo.ema.enabled=true", "ppo.ema.decay=0.9",
         "ppo.kl.adaptive=true", "ppo.kl.target=0.2", "ppo.kl.horizon=50",
         "ppo.normalize_reward=true", "ppo.ptx_coef=0.1", "ppo.log_every=1",
         "logger.table_every=0"],
        4, ("ppo/eval_gold_reward", "ppo/eval_reward_score", "ppo/init_eval_gold_reward",
            "ppo/kl", "ppo/kl_coef", "ppo/reward_score", "ppo/gold_reward",
            "ppo/response_length"),
        # alarm/kl_value: a rolling mean over steps on both sides of the kill (the alarm's state
        # travels in the checkpoint)
        ("ppo/kl", "ppo/actor_loss", "ppo/critic_loss", "ppo/kl_coef", "alarm/kl_value"),
        "ppo/eval_gold_reward", [0, 2, 4], weights=("final", "critic", "ema"),
        extra=_ppo_controller_moved),
    "grpo": Case(
        ["stage=grpo", *SMALL, "grpo.steps=4", "grpo.prompts_per_step=2",
         "grpo.num_generations=4", "grpo.micro_batch_size_per_device=2",
         "grpo.num_iterations=2", "grpo.num_minibatches=2", "grpo.beta=0.1",
         "grpo.kl_in_reward=true", "grpo.eval_every=2", "grpo.eval_num_prompts=8",
         # DAPO's refill resumes too: a reward that ties about half the groups, so that steps
         # drop and refill groups (the base model's gold reward alone ties nearly all)
         "grpo.filter_zero_std=true", "grpo.refill_max_rounds=2",
         "grpo.reward_functions=[{fn: 'rlhf_exp.tasks:gold_reward_fn', weight: 1.0}, "
         "{fn: 'tests.test_grpo_arms:half_tied_reward', weight: 0.1}]",
         "grpo.eval_batch_size=8", "grpo.save_every=2", "grpo.keep_last=1", "grpo.log_every=1",
         "logger.table_every=0"],
        4, ("grpo/eval_gold_reward", "grpo/init_eval_gold_reward", "grpo/kl", "grpo/reward",
            "grpo/gold_reward", "grpo/response_length"), ("grpo/loss", "grpo/kl", "grpo/reward"),
        "grpo/eval_gold_reward", [0, 2, 4], extra=_grpo_refilled),
    "dpo": Case(
        ["stage=dpo", *SMALL, "dpo.micro_batch_size_per_device=8", "dpo.max_steps=6",
         "dpo.log_every=1", "dpo.eval_every=2", "dpo.save_every=2", "dpo.keep_last=1",
         "ppo.eval_num_prompts=8", "ppo.eval_batch_size=8", "dpo.micro_batch_tokens=128"],
        6, ("dpo/loss", "dpo/first_loss", "dpo/eval_loss", "dpo/eval_rewards/margins",
            "dpo/eval_gold_reward", "dpo/init_eval_gold_reward"), ("dpo/loss", "dpo/lr"),
        "dpo/eval_loss", [2, 4, 6], extra=lambda k, r, res: _gold_once("dpo", k)),
    "kto": Case(
        ["stage=kto", *SMALL, "kto.micro_batch_size_per_device=8", "kto.max_steps=6",
         "kto.log_every=1", "kto.eval_every=2", "kto.save_every=2", "kto.keep_last=1",
         "ppo.eval_num_prompts=8", "ppo.eval_batch_size=8"],
        6, ("kto/loss", "kto/first_loss", "kto/eval_loss", "kto/eval_kl",
            "kto/eval_gold_reward", "kto/init_eval_gold_reward"), ("kto/loss", "kto/kl", "kto/lr"),
        "kto/eval_loss", [2, 4, 6], extra=lambda k, r, res: _gold_once("kto", k)),
}


def _weights(run_dir: Path, name: str) -> dict:
    path = (checkpoint.final_checkpoint(run_dir) if name == "final"
            else run_dir / "checkpoints" / name)
    return load_file(str(path / "model.safetensors"))


def _close(got: list[float], want: list[float], what: str) -> None:
    """fp32 training replayed from a checkpoint: the same ops on the same data, agreeing to
    well under the 1e-5 a changed batch, RNG or optimizer state would exceed."""
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5, what


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(CASES))
def test_sigkill_then_resume_matches_uninterrupted_run(stage, tmp_path, rlhf_exp):
    case = CASES[stage]
    runner = importlib.import_module(f"rlhf_exp.stages.{stage}")
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    kill_after_checkpoint(killed, CHECKPOINT, case.args)
    assert not (killed / "result.json").exists(), "the run finished before it was killed"
    (id_before,) = set(wandb_ids(killed))  # one W&B run so far
    if stage == "sft":  # a kill in the middle of a later save leaves a temp dir: ignored
        junk = killed / "checkpoints" / ".tmp-step_000004-train"
        junk.mkdir()
        (junk / "config.json").write_text("{")

    # restart with only resume=<run dir>: the run's own overrides come from .hydra/
    proc = rlhf_exp(f"resume={killed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{stage}: resumed from" in proc.stdout and f"at step {CHECKPOINT}" in proc.stdout
    resumed = json.loads((killed / "result.json").read_text())
    # the same W&B run continued: a second offline log with the same id
    ids = wandb_ids(killed)
    assert len(ids) == 2 and set(ids) == {id_before} == {resumed["wandb_run_id"]}

    # the uninterrupted run with the same seed: the same final metrics and weights
    ref = runner.run(compose(*case.args), reference)
    for key in case.final_metrics:
        _close([resumed["metrics"][key]], [ref.metrics[key]], key)
    for name in case.weights:
        a, b = _weights(killed, name), _weights(reference, name)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, name

    # W&B: the killed part holds every row up to the checkpoint (flushed before it was
    # written); the merged history holds each step once, with the uninterrupted run's values
    first_part, second_part = (read_run(f) for f in sorted(
        run_files(killed / "wandb"), key=lambda f: f.parent.name))
    first = case.step_metrics[0]
    assert logged_steps(first_part, first, stage)[:CHECKPOINT] == list(
        range(1, CHECKPOINT + 1)), "rows up to the checkpoint lost with the killed process"
    assert min(logged_steps(second_part, f"{stage}/step", stage)) == CHECKPOINT + 1
    (run,) = read_merged(killed / "wandb")
    (ref_run,) = read_merged(reference / "wandb")
    for key in case.step_metrics:
        assert logged_steps(run, key, stage) == logged_steps(ref_run, key, stage) == list(
            range(1, case.steps + 1)), key
        _close(run.metric(key), ref_run.metric(key), key)
    assert logged_steps(run, case.eval_metric, stage) == case.eval_steps
    _close(run.metric(case.eval_metric), ref_run.metric(case.eval_metric), case.eval_metric)
    assert resumed["metrics"][f"{stage}/steps"] == case.steps
    if case.extra:
        case.extra(killed, reference, resumed)

    # running the finished run dir again trains nothing: the same result, not a file touched,
    # no new W&B run
    before = snapshot(killed)
    again = runner.run(compose(*case.args, f"resume={killed}"), killed)
    assert again.metrics == resumed["metrics"]
    assert snapshot(killed) == before


def test_resume_needs_a_run_dir(tmp_path):
    from rlhf_exp.command.resume_argv import resume_argv
    from rlhf_exp.errors import UserError

    with pytest.raises(UserError, match=r"^resume=.*not a run dir"):
        resume_argv([f"resume={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match="hydra.sweep.dir"):
        resume_argv(["-m", f"resume={tmp_path}", "seed=1,2"])


def test_resume_argv_reuses_the_runs_overrides(tmp_path):
    from rlhf_exp.command.resume_argv import resume_argv as _resume_argv

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
    before = snapshot(run_dir)
    proc = rlhf_exp(*args, f"resume={run_dir}")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"rlhf-exp: error: resume={run_dir}: ") and says in line, line
    assert snapshot(run_dir) == before  # not one byte or timestamp changed
    assert not (run_dir / "wandb").exists()


def test_resume_may_change_length_intervals_logger_and_tags(tmp_path):
    from rlhf_exp.training import resume

    run_dir = _finished_sft_run_dir(tmp_path, "sft.max_steps=10")
    cfg = compose("stage=sft", "sft.max_steps=20", "sft.save_every=5", "sft.eval_every=3",
                  "sft.keep_last=4", "logger=none", "tags=[more]", f"resume={run_dir}",
                  "ppo.kl.coef=0.5")  # another stage's keys do not matter to an SFT run
    resume.check_compatible(cfg, run_dir)
