"""Read local (offline) W&B runs through wandb's own reader, `wandb leet inspect --json`.

wandb 0.31 writes no config.yaml / wandb-summary.json for offline runs and dropped the Python
datastore reader; the CLI is the supported way to read a `.wandb` transaction log.

A resumed run (docs/resume.md) is one W&B run written as several parts: one
`offline-run-<time>-<id>/run-<id>.wandb` per process, same id. `read_merged` joins them the way
the run happened: parts in start order, and a later part replaces the earlier parts' history
from its first step on (`<job_type>/step`). The killed part may hold rows past the checkpoint
the resumed part restarted from; those steps were computed again, so each step appears once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


def _wandb_cli() -> str:
    local = Path(sys.executable).with_name("wandb")
    return str(local) if local.exists() else (shutil.which("wandb") or "wandb")


def run_files(path: Path) -> list[Path]:
    """Every `.wandb` log under a run dir, a sweep dir, a wandb dir or a single file."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(path.rglob("run-*.wandb"))


@dataclass
class LocalRun:
    file: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)
    exit_code: int | None = None

    def metric(self, key: str) -> list[float]:
        """The logged values of one metric, in order."""
        return [row[key] for row in self.history if key in row]


def read_run(file: Path) -> LocalRun:
    out = subprocess.run([_wandb_cli(), "leet", "inspect", "--json", str(file)],
                         capture_output=True, text=True, check=True)
    run = LocalRun(file=Path(file))
    for line in out.stdout.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        kind = rec.get("type")
        if kind == "run":
            r = rec["run"]
            run.run_id, run.project = r.get("run_id", ""), r.get("project", "")
            run.group, run.job_type = r.get("run_group", ""), r.get("job_type", "")
            run.tags = r.get("tags", [])
            run.config.update(r.get("config", {}).get("update", {}))
        elif kind == "config":
            run.config.update(rec["config"].get("update", {}))
        elif kind == "history":
            run.history.append(rec["history"]["item"])
        elif kind == "summary":
            run.summary.update(rec["summary"].get("update", {}))
        elif kind == "artifact":
            art = rec["artifact"]
            run.artifacts.append({"name": art.get("name"), "type": art.get("type"),
                                  "aliases": art.get("aliases", []),
                                  "metadata": art.get("metadata")})
        elif kind == "exit":
            run.exit_code = rec["exit"].get("exit_code", 0)
    run.config.pop("_wandb", None)
    return run


def read_runs(path: Path) -> list[LocalRun]:
    return [read_run(f) for f in run_files(path)]


def _step_of(row: dict, key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def merge_parts(parts: list[LocalRun]) -> LocalRun:
    """One run from the parts of a resumed run (same id), given in start order: config and
    summary updated part by part, artifacts appended, the exit code of the last part, and the
    history of each part cut where the next part's history begins (its first
    `<job_type>/step`); rows without that step key are kept."""
    merged = LocalRun(file=parts[-1].file)
    for part in parts:
        merged.run_id = part.run_id or merged.run_id
        merged.project = part.project or merged.project
        merged.group = part.group or merged.group
        merged.job_type = part.job_type or merged.job_type
        merged.tags = part.tags or merged.tags
        merged.config.update(part.config)
        merged.summary.update(part.summary)
        merged.artifacts.extend(part.artifacts)
        merged.exit_code = part.exit_code if part.exit_code is not None else merged.exit_code
        key = f"{merged.job_type}/step"
        steps = [s for row in part.history if (s := _step_of(row, key)) is not None]
        if steps:  # this part replaces every earlier row from its first step on
            first = min(steps)
            merged.history = [row for row in merged.history
                              if (s := _step_of(row, key)) is None or s < first]
        merged.history.extend(part.history)
    return merged


def read_merged(path: Path) -> list[LocalRun]:
    """Every run under `path` with its resumed parts merged (merge_parts), in start order."""
    by_id: dict[str, list[LocalRun]] = {}
    # offline-run-<YYYYmmdd_HHMMSS>-<id>: the dir name sorts a run's parts by start time
    for file in sorted(run_files(path), key=lambda f: f.parent.name):
        part = read_run(file)
        # a log cut by SIGKILL may lack even its run record: the id is in the file name too
        part.run_id = part.run_id or file.stem.removeprefix("run-")
        by_id.setdefault(part.run_id, []).append(part)
    return [merge_parts(parts) for parts in by_id.values()]
