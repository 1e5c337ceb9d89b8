"""Multirun sweeps: what one job knows about its sweep, and the report when the sweep ends.

    rlhf-exp -m stage=sft seed=1,2 sft.lr=1e-3,3e-3

Every job gets its own run dir (`hydra.sweep.dir`/`hydra.sweep.subdir`) and its own W&B run; all
runs of a sweep share one W&B group, `<experiment_name>-<sweep dir name>`, and each run is tagged
with the values that vary (`seed=1`, `sft.lr=0.001`). A job that fails is recorded, not fatal:
the others still run, and at the end `SweepReport` prints a table of every job (overrides,
status, objective) and writes it to `<sweep dir>/sweep_results.csv`.

All hand-over goes through small files in the sweep dir, so it works the same when a launcher
runs the jobs in other processes or on other machines (submitit):
    <sweep dir>/sweep.json          written at the start: group, varying keys, the command line
    <sweep dir>/<job>/job_status.json   written by each job: status, objective, error, W&B id
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

SWEEP_FILE = "sweep.json"
STATUS_FILE = "job_status.json"
RESULTS_FILE = "sweep_results.csv"


def _key(override: str) -> str:
    """`+sft.lr=1` -> `sft.lr` (the key an override sets)."""
    return override.split("=", 1)[0].lstrip("+~")


def lower_is_better(metric: str) -> bool:
    """Direction of a metric judged by its name: losses, KL, perplexity and times go down."""
    name = metric.lower()
    return any(word in name for word in ("loss", "kl", "perplexity", "ppl", "time", "_s/",
                                         "error", "memory"))


def varying_keys(overrides: list[str], params: dict | None = None) -> list[str]:
    """Keys swept by a multirun: those whose override (command line or `hydra.sweeper.params`) is
    a sweep (`a,b`, `range(..)`, `interval(..)`, `choice(..)`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(overrides)
    parsed = OverridesParser.create().parse_overrides(lines)
    keys: list[str] = []
    for ov in parsed:
        key = _key(ov.input_line)
        if ov.is_sweep_override() and key not in keys:
            keys.append(key)
    return keys


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- inside a job
def job_context() -> dict[str, Any] | None:
    """This job's sweep (group, tags for the varying values, job number), or None outside a
    multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(hc.sweep.dir).resolve()
    info_file = sweep_dir / SWEEP_FILE
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    overrides = list(hc.overrides.task)
    params = hc.sweeper.get("params")  # None for the basic sweeper with nothing swept
    varying = info.get("varying") or varying_keys([], OmegaConf.to_container(
        params, resolve=False) if params else {})
    return {"sweep_dir": str(sweep_dir),
            "group": info.get("group") or f"{sweep_dir.parent.name}-{sweep_dir.name}",
            "job": int(hc.job.num),
            "overrides": overrides,
            "tags": [o.lstrip("+~") for o in overrides if _key(o) in varying]}


def apply_to_config(cfg: DictConfig, ctx: dict[str, Any]) -> list[str]:
    """Put the sweep's W&B group and this job's varying values into `cfg` (logger.group, tags);
    returns the same as overrides, for the ranks a multi-process job starts."""
    if not cfg.logger.group:
        cfg.logger.group = ctx["group"]
    tags = [t for t in ctx["tags"] if t not in cfg.tags]
    cfg.tags = list(cfg.tags) + tags
    quoted = ",".join("'" + t.replace("\\", "\\\\").replace("'", "\\'") + "'" for t in cfg.tags)
    return [f"logger.group={cfg.logger.group}", f"tags=[{quoted}]"]


def write_status(run_dir: Path, ctx: dict[str, Any], *, status: str, objective_key: str | None,
                 objective: float | None, error: str | None = None,
                 wandb_run_id: str | None = None) -> None:
    """`job_status.json` in the job's run dir (rank 0 only): what the end-of-sweep table reads."""
    from rlhf_exp.training import dist

    if not dist.is_main():
        return
    _write_json(Path(run_dir) / STATUS_FILE, {
        "job": ctx["job"], "status": status, "overrides": ctx["overrides"], "tags": ctx["tags"],
        "objective_key": objective_key, "objective": objective, "error": error,
        "run_dir": str(run_dir), "wandb_run_id": wandb_run_id})


# ----------------------------------------------------------------------------- the sweep
def _sweep_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir)).resolve()


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job dir of a sweep (a dir with `.hydra/overrides.yaml` or a status file),
    sorted by job number; a job that left no status (killed) shows as `no status`."""
    rows: dict[Path, dict] = {}
    for path in sorted(Path(sweep_dir).rglob(STATUS_FILE)):
        rows[path.parent] = json.loads(path.read_text())
    for path in sorted(Path(sweep_dir).rglob(".hydra/overrides.yaml")):
        job_dir = path.parent.parent
        if job_dir not in rows and job_dir != Path(sweep_dir):
            overrides = [str(o) for o in OmegaConf.load(path)]
            num = int(job_dir.name) if job_dir.name.isdigit() else -1
            rows[job_dir] = {"job": num, "status": "no status", "overrides": overrides,
                             "objective_key": None, "objective": None, "run_dir": str(job_dir),
                             "error": "the job ended without writing job_status.json (killed?)"}
    return sorted(rows.values(), key=lambda r: (r.get("job", -1), r["run_dir"]))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "-" if value is None else str(value)


def format_table(rows: list[dict[str, Any]], varying: list[str]) -> str:
    """Job, status, objective and the varying override values, aligned in columns."""
    objective = next((r["objective_key"] for r in rows if r.get("objective_key")), "objective")
    header = ["job", "status", objective, *varying]
    lines = []
    for r in rows:
        values = {_key(o): o.split("=", 1)[1] if "=" in o else "" for o in r["overrides"]}
        lines.append([_fmt(r.get("job")), r["status"], _fmt(r.get("objective")),
                      *[values.get(k, "-") for k in varying]])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
           for row in [header, *lines]]
    return "\n".join(out)


class SweepReport(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks.sweep_report`): records the sweep at its
    start, prints and saves the table of jobs at its end, and exits 1 if any job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _sweep_dir(config)
        params = config.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=False) if params else {}
        overrides = list(config.hydra.overrides.task)
        _write_json(sweep_dir / SWEEP_FILE, {
            "group": f"{config.experiment_name}-{sweep_dir.name}",
            "varying": varying_keys(overrides, params),
            "overrides": overrides, "sweeper_params": params,
            "command": " ".join(["rlhf-exp", *sys.argv[1:]])})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _sweep_dir(config)
        info_file = sweep_dir / SWEEP_FILE
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        rows = collect(sweep_dir)
        varying = info.get("varying", [])
        fixed = [o for o in info.get("overrides", []) if _key(o) not in varying]
        print(f"\nrlhf-exp sweep {sweep_dir}  (W&B group {info.get('group', '?')})")
        if fixed:
            print(f"fixed: {' '.join(fixed)}")
        print(format_table(rows, varying), flush=True)
        with open(sweep_dir / RESULTS_FILE, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["job", "status", "objective_key", "objective", "overrides",
                             "run_dir", "wandb_run_id", "error"])
            for r in rows:
                writer.writerow([r.get("job"), r["status"], r.get("objective_key"),
                                 r.get("objective"), " ".join(r["overrides"]), r["run_dir"],
                                 r.get("wandb_run_id"), r.get("error")])
        done = [r for r in rows if r["status"] == "completed" and r.get("objective") is not None]
        if done:
            key = done[0]["objective_key"]
            pick = min if lower_is_better(key) else max
            best = pick(done, key=lambda r: r["objective"])
            print(f"best: job {best['job']} {key}={_fmt(best['objective'])}  "
                  f"({' '.join(best['tags'] or best['overrides'])})")
        print(f"table: {sweep_dir / RESULTS_FILE}; compare: rlhf-exp-compare {sweep_dir}",
              flush=True)
        failed = [r for r in rows if r["status"] != "completed"]
        if failed:
            print(f"rlhf-exp: {len(failed)} of {len(rows)} jobs failed: "
                  + "; ".join(f"job {r['job']}: {r.get('error')}" for r in failed),
                  file=sys.stderr, flush=True)
            raise SystemExit(1)
