"""The training stages' shared kit: one prologue/epilogue (rlhf_exp/training/stage_kit.py), one RL
loop (rlhf_exp/rl/rl_loop.py), one NaN stop (rlhf_exp/training/nan_stop.py). Stage runners
stay short reads; a run that fails is recorded as failed with its error line last; the RL NaN stop
also watches the gradient norm; the closing line says honestly what was measured.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from rlhf_exp.training import train_loop
from rlhf_exp.training.wandb_reader import read_runs
from tests.conftest import ROOT, cli, compose

STAGES = ROOT / "rlhf_exp" / "stages"
MAX_LINES = 80

# the smallest GRPO run: two steps of 4 prompts x 4 completions from the tiny base model
GRPO_ONE_STEP = ["stage=grpo", "data_mix.sources.0.synthetic.num_examples=600", "grpo.steps=2",
                 "grpo.prompts_per_step=4", "grpo.num_generations=4",
                 "grpo.micro_batch_size_per_device=16", "grpo.eval_num_prompts=1",
                 "grpo.eval_batch_size=1", "grpo.eval_every=0", "logger.log_checkpoints=false",
                 "logger.table_every=0"]


# ----------------------------------------------------------------------------- short runners
def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_stage_function_is_longer_than_80_lines():
    """A stage runner reads as named steps: every function in rlhf_exp/stages/ (decorators not
    counted, docstring included) fits on a screen."""
    long = {f"{path.name}:{name}": n for path in sorted(STAGES.glob("*.py"))
            for name, n in _functions(path) if n > MAX_LINES}
    assert not long, f"longer than {MAX_LINES} lines: {long}"
    assert sum(1 for path in STAGES.glob("*.py") for _ in _functions(path)) > 50  # it looked


# ----------------------------------------------------------------------------- closing line
def _loop(log_every: int) -> train_loop.Loop:
    cfg = compose("stage=sft", f"sft.log_every={log_every}")
    return train_loop.Loop(stage="sft", node=cfg.sft, total_steps=3, steps_per_epoch=10,
                           run_dir=Path("."), tokenizer=None, device=None)


def test_closing_loss_names_one_window_when_the_run_is_shorter_than_log_every():
    """A run of 3 steps with log_every=5 logs once (at its last step): first and last loss are
    the same window, so the closing line gives that one number, and says why."""
    state = train_loop.LoopState(step=3, first_loss=1.25, last_loss=1.25)
    line = train_loop.loss_change(_loop(5), state)
    assert line == "loss 1.2500 (one log window: 3 step(s), sft.log_every=5)"
    assert "->" not in line
    longer = train_loop.LoopState(step=3, first_loss=2.0, last_loss=1.25)
    assert train_loop.loss_change(_loop(1), longer) == "loss 2.0000 -> 1.2500"


# ----------------------------------------------------------------------------- failing runs
def _reward_module(tmp_path: Path, body: str) -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "my_rewards.py").write_text(textwrap.dedent(body))
    return pkg


def _wandb_exit(run_dir: Path) -> int | None:
    (run,) = read_runs(run_dir / "wandb")
    return run.exit_code


@pytest.mark.slow  # a CLI run that loads the tiny model and samples one step
def test_reward_function_raising_at_step_1_is_recorded_as_failed(tmp_path):
    """The reward function passes the load-time check (4 sample rows) and raises on the first
    step's 16 completions: exit 2, the error line last and on its own line (the progress bar
    closed and the W&B footer printed before it), and the W&B run's exit record says failed."""
    pkg = _reward_module(tmp_path, """
        def fussy(prompts, completions, **_):
            if len(completions) > 4:
                raise RuntimeError("cannot score a whole step")
            return [0.0] * len(completions)
        """)
    run_dir = tmp_path / "run"
    proc = cli(*GRPO_ONE_STEP, "grpo.reward_functions=[{fn: my_rewards:fussy, weight: 1.0}]",
               f"hydra.run.dir={run_dir}", env={"PYTHONPATH": str(pkg)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("rlhf-exp: error: ") and \
        "my_rewards:fussy raised RuntimeError: cannot score a whole step" in last, last
    assert "Traceback" not in proc.stderr
    assert _wandb_exit(run_dir) == 1
    assert not (run_dir / "result.json").exists()


@pytest.mark.slow  # a CLI run that trains one step
def test_rl_nan_stop_checks_the_gradient_norm_and_ends_the_wandb_run(tmp_path):
    """Rewards of order 1e30 without reward scaling: every loss GRPO logs stays finite (the
    advantages, ~1e30, are finite), but the gradient norm (a sum of squares) overflows. The run
    must stop at step 1 with one line, as the supervised loop does, with its W&B run failed."""
    pkg = _reward_module(tmp_path, """
        def huge(prompts, completions, **_):  # -1e30, 0, 1e30, ...: no group has zero std
            return [1e30 * (i % 3 - 1) for i in range(len(completions))]
        """)
    run_dir = tmp_path / "run"
    proc = cli(*GRPO_ONE_STEP, "grpo.reward_functions=[{fn: my_rewards:huge, weight: 1.0}]",
               "grpo.scale_rewards=none", "grpo.beta=0", "grpo.actor.zero_stage=2",
               f"hydra.run.dir={run_dir}", env={"PYTHONPATH": str(pkg)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("rlhf-exp: error: grpo: the gradient norm is inf at step 1; "
                           "stopped. No checkpoint to resume from (grpo.save_every); lower "
                           "grpo.actor.lr or check the reward scale"), last
    assert _wandb_exit(run_dir) == 1  # (the losses are checked first: they were finite)


# ----------------------------------------------------------------------------- throughput
@pytest.mark.slow  # trains two GRPO steps
def test_rl_throughput_and_loop_time_mean_what_the_supervised_loop_means(tmp_path):
    """One definition for every stage (README's metrics table): `perf/tokens_per_s` counts the
    real tokens of the trained sequences (prompt + response, as train_loop counts the
    attention mask), not only the response; `perf/loop_s` is the time of the steps, without
    held-out evals and checkpoint writes. Here an eval of 32 prompts and a checkpoint follow
    step 1; the loop time must stay the steps' own (their rollout, experience and update
    phases plus a little bookkeeping), not grow by the eval and the save."""
    from rlhf_exp.stages import grpo

    cfg = compose(*GRPO_ONE_STEP, "grpo.eval_every=1", "grpo.eval_num_prompts=32",
                  "grpo.eval_batch_size=32", "grpo.save_every=1", "grpo.log_every=1")
    _, _, result = grpo.train(cfg, tmp_path / "run")
    (run,) = read_runs(tmp_path / "run" / "wandb")
    rows = [r for r in run.history if "perf/tokens_per_s" in r]
    assert len(rows) == 2
    for r in rows:  # tokens per sequence = prompt + response tokens
        per_sequence = r["perf/tokens_per_s"] / r["perf/samples_per_s"]
        assert per_sequence >= r["grpo/response_length"] + 1, r
    phases = sum(r["perf/gen_s"] + r["perf/experience_s"] + r["perf/train_s"] for r in rows)
    loop_s = result.metrics["perf/loop_s"]
    assert phases <= loop_s <= 1.15 * phases + 0.5, (loop_s, phases)


# ----------------------------------------------------------------------------- engine memory
def _live_engines() -> int:
    import gc

    gc.collect()
    return sum(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects())


@pytest.mark.slow  # trains two SFT steps, twice
def test_a_finished_stage_leaves_no_engine_alive_for_the_next_stage(tmp_path):
    """A ZeRO engine's gradient hooks keep it (weights, gradients, Adam states) alive after its
    last reference goes; a stage run in a pipeline's process releases its engines, so the next
    stage gets the memory back. Without the release, the engine outlives its references."""
    from rlhf_exp.stages import sft
    from rlhf_exp.training import engine

    cfg = compose("stage=sft", "model=tiny-llama", "logger=none", "sft.max_steps=2",
                  "sft.eval_every=0", "data_mix.sources.0.synthetic.num_examples=200")
    engine.release_engines()  # earlier tests' engines, if any
    before = _live_engines()
    eng, _, _ = sft.train(cfg, tmp_path / "train")  # the stage's steps alone: no release
    del eng
    assert _live_engines() == before + 1  # unreachable, yet alive
    assert engine.release_engines() == 1
    assert _live_engines() == before

    result = sft.run(cfg, tmp_path / "run")  # the dispatcher's entry point releases
    assert result.checkpoint is not None
    assert _live_engines() == before
