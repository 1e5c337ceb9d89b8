"""Ctrl-C: a run interrupted after a checkpoint prints one line (where it stopped, the last
checkpoint, the resume= command), no traceback, exits 130; the printed command continues it.
The signal goes to the run's whole process group, as a terminal sends it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CHILD_DROP_ENV, ROOT, SFT_CHECKPOINTING, cli


def _sigint_default() -> None:
    """A terminal's foreground job takes Ctrl-C; a job started in the background by a
    non-interactive shell (a CI script's `cmd &`) inherits SIGINT ignored, and Python keeps it
    ignored. The run under test is a foreground job."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_after_checkpoint(run_dir: Path, step: int, args: list[str]
                                ) -> subprocess.CompletedProcess:
    marker = run_dir / "checkpoints" / f"step_{step:06d}" / "trainer_state.json"
    env = {k: v for k, v in os.environ.items() if k not in CHILD_DROP_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_exp", *args, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, preexec_fn=_sigint_default)
    deadline = time.time() + 600
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"run ended before checkpoint {step}: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("no checkpoint within 600 s")
        time.sleep(0.05)
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: every process of the group
    out, err = proc.communicate(timeout=300)
    # generous: a loaded 2-core machine; a run that ignored the signal would train on
    assert time.monotonic() - started < 240, "Ctrl-C did not stop the run promptly"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _check_one_line(proc: subprocess.CompletedProcess, run_dir: Path, stage: str) -> str:
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert "KeyboardInterrupt" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("rlhf-exp: interrupted")]
    assert len(said) == 1 and lines[-1] == said[0], lines[-5:]
    line = said[0]
    assert f"rlhf-exp: interrupted: {stage}" in line, line
    assert f"last checkpoint {run_dir}/checkpoints/step_" in line, line
    assert line.endswith(f"continue with: rlhf-exp resume={run_dir}"), line
    return line


@pytest.mark.slow
def test_ctrl_c_says_one_line_and_its_resume_command_continues(tmp_path):
    run_dir = tmp_path / "run"
    proc = _interrupt_after_checkpoint(run_dir, 2, SFT_CHECKPOINTING)
    line = _check_one_line(proc, run_dir, "sft")
    state = json.loads(next(run_dir.glob("checkpoints/step_*/trainer_state.json")).read_text())
    assert f"(sft step {state['step']})" in line
    # the printed command, as typed, continues the run to its end
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[0] == "rlhf-exp"
    done = cli(*command[1:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir / "result.json").read_text())["metrics"]["sft/steps"] == 6


@pytest.mark.slow
def test_ctrl_c_of_a_two_rank_run_says_one_line(tmp_path):
    """torchrun and both ranks get the signal; only the launching process speaks."""
    run_dir = tmp_path / "run"
    proc = _interrupt_after_checkpoint(run_dir, 2, [*SFT_CHECKPOINTING, "hardware.nproc_per_node=2",
                                                    "sft.micro_batch_size_per_device=4"])
    _check_one_line(proc, run_dir, "sft")


def test_the_line_names_the_newest_checkpoint_of_a_pipeline_stage(tmp_path):
    """A pipeline's checkpoints sit in its stages' sub-dirs: the newest one is named; with none
    the line says so (and how often they are written)."""
    from rlhf_exp.training import interrupt

    assert "no training checkpoint yet (written every sft.save_every steps" in \
        interrupt.message("sft", tmp_path)
    for stage, step, age in (("sft", 40, 100), ("reward", 20, 10)):
        ckpt = tmp_path / stage / "checkpoints" / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"stage": stage, "step": step}))
        os.utime(ckpt / "trainer_state.json", (time.time() - age, time.time() - age))
    line = interrupt.message("pipeline", tmp_path)
    assert f"last checkpoint {tmp_path}/reward/checkpoints/step_000020 (reward step 20)" in line
    assert line.endswith(f"continue with: rlhf-exp resume={tmp_path}")
