"""Weights & Biases tracking: one W&B run per stage run, created on rank 0 only.

group = logger.group or experiment_name (the runs of one experiment sit together; a multirun
sets one group per sweep and tags each run with its varying values), job_type = the stage,
tags = the group choices plus the user's tags, config = the fully resolved config. Metrics are
namespaced by stage (`sft/loss`) and by kind (`perf/tokens_per_s`), all stepped on
`<stage>/step`. Offline by default; `logger.mode=online` or WANDB_MODE for real use.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.errors import InitError
from rlhf_exp.modeling.models import cache_root
from rlhf_exp.training import dist

GROUPS = ("model", "stage", "zero_stage", "hardware", "data_mix", "logger")
# wandb 0.31 buffers its run file (.wandb, a log of 32 KiB blocks) in the W&B service process and
# writes a partial block every `x_transaction_log_flush_interval` seconds (default 15): a run
# SIGKILLed sooner loses those rows. It has no flush call, so Tracker.flush() waits for one of
# these periodic writes, made frequent here (appending a few KiB; it never fsyncs).
FLUSH_INTERVAL_S = 0.25


def group_choices(cfg: DictConfig) -> dict[str, str]:
    """Which option of each config group this run uses (each option's `name`)."""
    return {g: str(cfg[g].name) for g in GROUPS}


def run_tags(cfg: DictConfig) -> list[str]:
    return [f"{g}:{v}" for g, v in group_choices(cfg).items()] + list(cfg.tags)


class Tracker:
    """Logs metrics, tables and artifacts of one stage run; a no-op off rank 0 or with
    `logger=none`."""

    def __init__(self, cfg: DictConfig, run_dir: Path, job_type: str, *,
                 run_id: str | None = None, extra_config: dict | None = None):
        self.job_type = job_type
        self.run = None
        self.latest: dict[str, Any] = {}  # last logged value of each metric (on every rank)
        self.run_dir = Path(run_dir)
        if not dist.is_main() or cfg.logger.name != "wandb":
            return
        import wandb

        mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
        config = OmegaConf.to_container(cfg, resolve=True)
        config["group_choices"] = group_choices(cfg)
        config["run_dir"] = str(self.run_dir)
        config.update(extra_config or {})
        self.run = wandb.init(
            project=cfg.logger.project, entity=cfg.logger.entity,
            group=cfg.logger.get("group") or cfg.experiment_name,
            job_type=job_type, tags=run_tags(cfg), config=config, dir=str(self.run_dir),
            name=f"{cfg.experiment_name}-{job_type}-{self.run_dir.name}", mode=mode,
            id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", quiet=True,
                                    x_transaction_log_flush_interval=FLUSH_INTERVAL_S),
        )
        step = f"{job_type}/step"
        self.run.define_metric(step)
        for prefix in (job_type, "perf", "eval"):
            self.run.define_metric(f"{prefix}/*", step_metric=step)

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.latest.update(metrics)
        if self.run:
            self.run.log({f"{self.job_type}/step": step, **metrics})

    def flush(self, timeout: float = 30.0) -> None:
        """Make every row logged so far durable in the run's .wandb file, so that it survives a
        kill of this process (SIGKILL, preemption). Call it before writing a resumable
        checkpoint: once the checkpoint exists, the W&B history up to its step is on disk.

        Reading the summary is a round trip through the W&B service: when it returns, the
        service has taken every earlier row; the next periodic write (FLUSH_INTERVAL_S) puts them
        in the file. We wait until the file has not grown for two intervals (at least two after
        the round trip)."""
        if not self.run or self.run.settings.mode == "disabled":
            return
        self.run.summary.keys()  # returns after the service has handled every earlier call
        path = Path(self.run.settings.sync_file)
        start = last_change = time.monotonic()
        size = path.stat().st_size if path.exists() else -1
        while time.monotonic() - start < timeout:
            time.sleep(FLUSH_INTERVAL_S / 2)
            now_size = path.stat().st_size if path.exists() else -1
            now = time.monotonic()
            if now_size != size:
                size, last_change = now_size, now
            elif now - last_change >= 2 * FLUSH_INTERVAL_S and now - start >= 2 * FLUSH_INTERVAL_S:
                return

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        if self.run:
            import wandb

            self.log({key: wandb.Table(columns=columns, data=rows)}, step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run:
            self.run.summary.update(values)

    def log_model(self, path: Path, name: str, aliases: list[str], metadata: dict) -> str | None:
        """Log a checkpoint dir as a `model` artifact; returns its qualified name."""
        if not self.run:
            return None
        import wandb

        art = wandb.Artifact(name, type="model", metadata=metadata)
        art.add_dir(str(path))
        self.run.log_artifact(art, aliases=aliases)
        full = f"{self.run.project}/{name}:latest"
        _remember_artifact(full, Path(path))
        _remember_artifact(f"{name}:latest", Path(path))
        return full

    def use_artifact(self, name: str) -> Path | None:
        """Online: declare the input (W&B lineage) and download it. Offline: None."""
        if not self.run or self.run.settings.mode == "offline" or self.run.offline:
            return None
        art = self.run.use_artifact(name, type="model")
        return Path(art.download())

    def record_inputs(self, inputs: dict[str, str | None], prefix: str) -> None:
        """The checkpoints and artifacts a run started from: in the config (`inputs`), in the
        summary (`<prefix>/<key>`), and online as W&B lineage (use_artifact) where they came
        from an artifact."""
        self.summary({f"{prefix}/{k}": v or "" for k, v in inputs.items()})
        if not self.run:
            return
        self.run.config.update({"inputs": inputs}, allow_val_change=True)
        for key, value in inputs.items():
            if key.endswith("_artifact") and value:
                try:
                    self.use_artifact(value)
                except Exception:  # lineage is best effort: the local weights are what we load
                    pass

    def finish(self, exit_code: int = 0) -> None:
        if self.run:
            self.run.finish(exit_code=exit_code)
            self.run = None

    def where(self) -> str:
        """How to look at this run afterwards (printed at the end of a stage)."""
        wandb_dir = self.run_dir / "wandb"
        return (f"W&B run: {wandb_dir}  (view: wandb leet {wandb_dir}; "
                f"upload: wandb sync {wandb_dir}/offline-run-*)")


# ----------------------------------------------------------------------------- hand-off
def _index_path() -> Path:
    return cache_root() / "artifacts.json"


def _remember_artifact(name: str, path: Path) -> None:
    """Offline, `use_artifact` raises: keep name -> local path so a later stage can still start
    from an artifact name on this machine."""
    index = _index_path()
    index.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(index.read_text()) if index.exists() else {}
    table[name] = str(Path(path).resolve())
    tmp = index.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, index)


def resolve_init(ref: str, tracker: Tracker | None = None) -> tuple[Path, str | None]:
    """A stage's starting point from a local path (a checkpoint or a run dir) or a W&B artifact
    name. Returns (local path, artifact name or None). Online, an artifact name is declared with
    `use_artifact` (so W&B shows lineage); offline it falls back to the local path recorded when
    the artifact was logged."""
    from rlhf_exp.training.checkpoint import final_checkpoint, is_checkpoint

    path = Path(ref).expanduser()
    if path.exists():
        if not is_checkpoint(path):  # a run dir: its final checkpoint
            ckpt = final_checkpoint(path)
            if ckpt is None:
                raise InitError(f"{ref}: neither a checkpoint (no config.json) nor a run "
                                        "dir with checkpoints/final")
            path = ckpt
        meta = path / "rlhf_exp.json"
        artifact = json.loads(meta.read_text()).get("artifact") if meta.exists() else None
        if artifact and tracker is not None and tracker.enabled:
            try:
                tracker.use_artifact(artifact)
            except Exception:  # lineage is best effort: the local weights are what we load
                pass
        return path, artifact
    if tracker is not None:
        downloaded = tracker.use_artifact(ref)
        if downloaded is not None:
            return downloaded, ref
    table = json.loads(_index_path().read_text()) if _index_path().exists() else {}
    key = ref if ":" in ref.rsplit("/", 1)[-1] else f"{ref}:latest"
    if key in table and Path(table[key]).exists():
        return Path(table[key]), ref
    raise InitError(f"{ref}: not a local path, and no artifact of that name is known "
                            "offline (log it on this machine first, or go online)")
