"""`resume=<run dir>` on the command line: rewritten, before Hydra composes, into the command
line that run was started with (its saved overrides, the new ones winning) and its run dir, so
the stage continues from that dir's newest training checkpoint and its W&B run. Torch-free: the
command line is settled before anything heavy loads (rlhf_exp/training/resume.py does the rest)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_exp.errors import UserError


def quote_path(value: str) -> str:
    """A path as a Hydra override value (quoted when it has characters the grammar splits on)."""
    if all(c.isalnum() or c in "/._-" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_argv(argv: list[str]) -> list[str]:
    """`resume=<run dir>`: run again in that dir (hydra.run.dir) with the overrides it was
    started with; overrides given now win (e.g. a larger sft.max_steps). The stage then loads
    the newest training checkpoint there and continues the same W&B run."""
    given = [a for a in argv if a.startswith("resume=")]
    value = given[-1].split("=", 1)[1].strip("'\"") if given else ""
    if value in ("", "null", "None"):
        return argv
    if "-m" in argv or "--multirun" in argv:
        raise UserError("resume= continues one run; to continue a sweep, run the same sweep "
                        "again with hydra.sweep.dir=<its sweep dir> (each job resumes from its "
                        "own checkpoints)")
    run_dir = Path(value).expanduser().resolve()
    saved_file = run_dir / ".hydra" / "overrides.yaml"
    if not run_dir.is_dir() or not (saved_file.exists() or (run_dir / "checkpoints").is_dir()):
        raise UserError(f"resume={value}: not a run dir (expected "
                        f"{value}/.hydra/overrides.yaml or {value}/checkpoints/)")
    from omegaconf import OmegaConf

    from rlhf_exp.command import sweep

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
    return [*now, *kept, f"resume={quote_path(str(run_dir))}",
            f"hydra.run.dir={quote_path(str(run_dir))}"]
