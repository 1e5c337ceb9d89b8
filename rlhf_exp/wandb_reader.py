"""Read local (offline) W&B runs through wandb's own reader, `wandb leet inspect --json`.

wandb 0.31 writes no config.yaml / wandb-summary.json for offline runs and dropped the Python
datastore reader; the CLI is the supported way to read a `.wandb` transaction log.
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
