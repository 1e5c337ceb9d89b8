"""Ctrl-C: one line that says where the run stopped and how to continue it, exit code 130.

Python answers Ctrl-C with a KeyboardInterrupt traceback in every process the terminal signals:
a multi-rank run showed two (the launcher's parent and each rank, ~110 lines) and hid what the
user needs. The checkpoints are kept either way (each is written atomically); this module only
replaces the noise with:

    rlhf-exp: interrupted: sft at step 13; last checkpoint <run dir>/checkpoints/step_000010;
    continue with: rlhf-exp resume=<run dir>

`stop()` is called where the app catches exceptions (cli.app, cli._sweep_job); a launched rank
exits 130 quietly, its launcher's parent (`run_launcher`) mutes what the launcher prints once
interrupted, and says the line itself.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import NoReturn

EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a job stopped by Ctrl-C
STATE_FILE = "trainer_state.json"  # (resume.STATE_FILE; resume imports torch)
LAUNCHER_GRACE_S = 120  # how long the launcher's parent waits for the ranks to stop


def last_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest complete training checkpoint in a run dir or in its stages' sub-dirs (a
    pipeline's sft/, reward/, ...), with its trainer state."""
    run_dir = Path(run_dir)
    found = []
    for pattern in ("checkpoints/step_*/" + STATE_FILE, "*/checkpoints/step_*/" + STATE_FILE):
        for state in run_dir.glob(pattern):
            try:
                found.append((state.stat().st_mtime, state.parent, json.loads(state.read_text())))
            except (OSError, ValueError):
                continue
    if not found:
        return None
    _, ckpt, state = max(found, key=lambda f: f[0])
    return ckpt, state


_BAR: list = []  # the last progress bar the run opened (runtime.progress), closed or not


def track(bar):
    """Remember `bar` (a training loop's tqdm bar): its count is the step a Ctrl-C stops at."""
    _BAR[:] = [] if bar.disable else [bar]  # (close() disables a bar: checked here, open)
    return bar


def _live_step() -> tuple[str, int] | None:
    """(stage, step) of the last progress bar on this process, if any."""
    return (str(_BAR[0].desc).strip(": "), int(_BAR[0].n)) if _BAR else None


def message(stage: str, run_dir: Path, sweep_dir: Path | None = None) -> str:
    """The one line: where the run stopped, its last checkpoint, the command to continue."""
    live = _live_step()
    where = f"{live[0] or stage} at step {live[1]}" if live else stage
    ckpt = last_checkpoint(run_dir)
    if ckpt is None:
        saved = (f"no training checkpoint yet (written every {stage}.save_every steps; "
                 "0 = never)")
    else:
        saved = (f"last checkpoint {ckpt[0]} ({ckpt[1].get('stage')} step "
                 f"{ckpt[1].get('step')})")
    if sweep_dir is not None:
        again = (f"run the same sweep again with hydra.sweep.dir={shlex.quote(str(sweep_dir))} "
                 "(each job resumes from its own checkpoints)")
    else:
        again = f"rlhf-exp resume={shlex.quote(str(run_dir))}"
    return f"rlhf-exp: interrupted: {where}; {saved}; continue with: {again}"


def _close_tracker() -> None:
    """The W&B run, closed as interrupted (exit code 130, not a success)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        try:
            wandb.finish(exit_code=EXIT_CODE, quiet=True)
        except Exception:  # a second Ctrl-C, or the service gone: the files are on disk
            pass


def stop(stage: str, run_dir: Path, sweep_dir: Path | None = None) -> NoReturn:
    """After a KeyboardInterrupt in the app: close the W&B run, say the line (the process
    that owns the terminal only), exit 130."""
    from rlhf_exp.training import dist

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the line short
    _close_tracker()
    # a rank our launcher started (cli._relaunch sets RLHF_EXP_RUN_DIR): its parent says it
    if "RLHF_EXP_RUN_DIR" not in os.environ and dist.is_main():
        print(message(stage, run_dir, sweep_dir), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CODE)


# ----------------------------------------------------------------------------- launcher
def _forward(source, target, muted: threading.Event) -> None:
    """Copy the launcher's output as it comes (progress bars included: raw bytes, no line
    buffering) until the run is interrupted; after that, drop it (tracebacks of the launcher
    and the ranks)."""
    while True:
        chunk = source.read1(65536)
        if not chunk:
            return
        if not muted.is_set():
            target.write(chunk)
            target.flush()


def run_launcher(cmd: list[str], env: dict, preexec_fn=None) -> int:
    """Run the launcher (torchrun / deepspeed) and wait for it; returns its exit code. On
    Ctrl-C (which the terminal sends to the launcher and the ranks too): mute their output,
    wait for them to stop (a second Ctrl-C kills them), then raise KeyboardInterrupt here."""
    proc = subprocess.Popen(cmd, env=env, preexec_fn=preexec_fn, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    muted = threading.Event()
    threads = [threading.Thread(target=_forward, args=(pipe, out.buffer, muted), daemon=True)
               for pipe, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    for t in threads:
        t.start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        muted.set()
        try:
            proc.wait(timeout=LAUNCHER_GRACE_S)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        raise KeyboardInterrupt from None
    for t in threads:
        t.join(timeout=5)
    return rc
