"""`rlhf-exp-compare`: put runs side by side: the config keys that differ, the final and best value
of chosen metrics, and a PNG of their curves.

    rlhf-exp-compare outputs/default/multirun_2026-11-23_10-45-00          # every job of a sweep
    rlhf-exp-compare outputs/a/2026-..._sft outputs/b/2026-..._sft --metrics sft/loss,sft/lr
    rlhf-exp-compare my-entity/rlhf_exp/abc123 my-entity/rlhf_exp/def456    # online W&B runs
    rlhf-exp-compare outputs/algorithms/<run>/{ppo,grpo_gold,dpo} \
        --metrics '{stage}/eval_gold_reward' --x time    # runs of different stages, wall time

`{stage}` in a metric name stands for each run's stage (its W&B job_type), so runs of different
stages compare on their own metric of one kind. `--x time` plots against the seconds since each
run started (W&B's `_runtime`) instead of the stage's step.

A PATH is a run dir, a sweep dir, a `wandb` dir or a `.wandb` file (read offline through
`wandb leet inspect`, rlhf_exp/training/wandb_reader.py), or a W&B run path `entity/project/run_id`
(read with `wandb.Api()`, needs network). A run resumed after an interruption wrote several
offline logs with one run id: they are merged into one run.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_exp import registry
from rlhf_exp.command.sweep import lower_is_better
from rlhf_exp.errors import CompareError

# metrics shown when --metrics is not given, by the runs' job type (= stage)
DEFAULT_METRICS = {name: list(spec.compare_metrics) for name, spec in registry.STAGES.items()
                   if spec.compare_metrics or name == "eval"}
X_AXES = ("step", "time")
# config keys that always differ between runs and say nothing about the experiment
IGNORED_KEYS = ("run_dir", "tags", "logger.group", "resume", "group_choices.")
RUN_PATH = re.compile(r"^(?:https?://[^/]+/)?([^/\s]+)/([^/\s]+)/(?:runs/)?([^/\s]+)$")


@dataclass
class Run:
    """One W&B run as compare needs it, from an offline log or the W&B API."""

    run_id: str
    label: str = ""
    job_type: str = ""
    group: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def metric(self, name: str) -> str:
        """A metric name with `{stage}` standing for this run's stage."""
        return name.replace("{stage}", self.job_type)

    def series(self, metric: str, x: str = "step") -> list[tuple[float, float]]:
        """(x, value) of one metric, x the stage's step or (x="time") the seconds since the run
        started; a step logged twice (a run resumed from an earlier checkpoint) keeps its last
        value."""
        metric = self.metric(metric)
        xkey = "_runtime" if x == "time" else f"{self.job_type}/step"
        points: dict[float, float] = {}
        for i, row in enumerate(self.history):
            value = row.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                where = row.get(xkey, row.get("_step", i))
                points[float(where)] = float(value)
        return sorted(points.items())


# ----------------------------------------------------------------------------- reading
def _local_runs(path: Path) -> list[Run]:
    """The runs logged under a local path; a resumed run's parts (several offline logs with one
    id) are merged into one run (wandb_reader.merge_parts: a later part wins from its first
    step on)."""
    from rlhf_exp.training.wandb_reader import read_merged, run_files

    if not run_files(path):
        raise CompareError(f"{path}: no W&B run logs (run-*.wandb) under it")
    return [Run(run_id=local.run_id, job_type=local.job_type, group=local.group,
                config=local.config, history=local.history, summary=local.summary,
                label=str(local.config.get("run_dir") or local.file.parent.parent.parent))
            for local in read_merged(path)]


def _api_run(path: str) -> Run:
    """An online run (`entity/project/run_id`) through the public API."""
    import wandb

    entity, project, run_id = RUN_PATH.match(path).groups()
    try:
        remote = wandb.Api().run(f"{entity}/{project}/{run_id}")
        history = list(remote.scan_history())
    except Exception as exc:  # network, auth, unknown run: one line, not a traceback
        raise CompareError(f"{path}: cannot read this W&B run ({type(exc).__name__}: {exc})") \
            from exc
    config = {k: v for k, v in dict(remote.config).items() if not k.startswith("_")}
    return Run(run_id=remote.id, label=str(config.get("run_dir") or path),
               job_type=remote.job_type or "", group=remote.group or "", config=config,
               history=history, summary=dict(remote.summary))


def load_runs(paths: list[str]) -> list[Run]:
    runs: list[Run] = []
    for text in paths:
        path = Path(text).expanduser()
        if path.exists():
            runs.extend(_local_runs(path))
        elif RUN_PATH.match(text):
            runs.append(_api_run(text))
        else:
            raise CompareError(f"{text}: no such file or directory, and not a W&B run path "
                               "(entity/project/run_id)")
    seen: dict[str, Run] = {}
    for run in runs:  # the same run given twice (a dir and its sweep) counts once
        seen.setdefault(run.run_id, run)
    runs = list(seen.values())
    _short_labels(runs)
    return runs


def _short_labels(runs: list[Run]) -> None:
    """Labels relative to the runs' common parent dir (a sweep's jobs become 0, 1, 2, ...)."""
    parts = [Path(r.label).parts for r in runs]
    common = 0
    if len(runs) > 1:
        while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
            common += 1
    for run, p in zip(runs, parts):
        run.label = str(Path(*p[common:])) if p[common:] else run.run_id


def _sort_key(run: Run):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", run.label)]


# ----------------------------------------------------------------------------- comparing
def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            # lists of nodes (data_mix.sources) by index, as Hydra overrides address them
            out.update(flatten(dict(enumerate(value)), f"{name}."))
        else:
            out[name] = value
    return out


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (missing counts as a value)."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    out = []
    for key in keys:
        if key in IGNORED_KEYS or key.startswith(tuple(k for k in IGNORED_KEYS
                                                       if k.endswith("."))):
            continue
        if len({repr(f.get(key)) for f in flat}) > 1:
            out.append(key)
    return out


def default_metrics(runs: list[Run]) -> list[str]:
    metrics: list[str] = []
    for run in runs:
        for m in DEFAULT_METRICS.get(run.job_type, []):
            if m not in metrics:
                metrics.append(m)
    return metrics


def final_and_best(run: Run, metric: str) -> tuple[float | None, float | None]:
    points = run.series(metric)
    if not points:
        value = run.summary.get(run.metric(metric))
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return (float(value), float(value)) if ok else (None, None)
    values = [v for _, v in points if not math.isnan(v)] or [math.nan]
    best = min(values) if lower_is_better(metric) else max(values)
    return points[-1][1], best


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def table(runs: list[Run], keys: list[str], metrics: list[str]) -> str:
    header = ["run", "id", *keys]
    for m in metrics:
        header += [f"{m} final", f"{m} best{'(min)' if lower_is_better(m) else '(max)'}"]
    rows = []
    for run in runs:
        flat = flatten(run.config)
        row = [run.label, run.run_id, *[_fmt(flat.get(k)) for k in keys]]
        for m in metrics:
            row += [_fmt(v) for v in final_and_best(run, m)]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def plot(runs: list[Run], keys: list[str], metrics: list[str], out: Path,
         x: str = "step") -> Path:
    """One panel per metric, one line per run, labelled with the run and its differing keys;
    x is the stage's step or (x="time") the seconds since each run started."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(metrics))
    fig, axes = plt.subplots(n, 1, figsize=(8, 3.2 * n), squeeze=False)
    # the default cycle has 10 colours: past 10 runs, the line style tells repeats apart
    styles = ["-", "--", ":", "-."]
    for ax, metric in zip(axes[:, 0], metrics):
        for i, run in enumerate(runs):
            points = run.series(metric, x)
            if not points:
                continue
            flat = flatten(run.config)
            extra = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(flat.get(k))}" for k in keys[:3])
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, color=f"C{i % 10}",
                    linestyle=styles[i // 10 % len(styles)], label=f"{run.label} {extra}".strip())
        ax.set_title(metric.replace("{stage}", "<stage>") + (
            " (each run's own stage)" if "{stage}" in metric else ""))
        if x == "time":
            ax.set_xlabel("wall time since the run started (s)")
        else:
            ax.set_xlabel(f"{runs[0].job_type or 'step'}/step" if runs else "step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf-exp-compare", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="run dir, sweep dir, wandb dir, .wandb file or entity/project/run_id")
    parser.add_argument("--metrics", help="comma-separated metric names (default: by stage, "
                        + "; ".join(f"{k}: {','.join(v)}" for k, v in DEFAULT_METRICS.items()
                                    if v) + ")")
    parser.add_argument("--plot", default="compare.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--keys", help="comma-separated config keys to show (default: the "
                        "keys that differ)")
    parser.add_argument("--x", choices=X_AXES, default="step", help="the plot's x axis: the "
                        "stage's step or the wall time since each run started (default: step)")
    args = parser.parse_args(argv)
    try:
        runs = sorted(load_runs(args.paths), key=_sort_key)
    except CompareError as exc:
        print(f"rlhf-exp-compare: error: {exc}", file=sys.stderr)
        return 2
    metrics = ([m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics
               else default_metrics(runs))
    keys = ([k.strip() for k in args.keys.split(",")] if args.keys else differing_keys(runs))
    missing = [m for m in metrics if not any(final_and_best(r, m)[0] is not None for r in runs)]
    if missing:
        print(f"rlhf-exp-compare: warning: no run logged {', '.join(missing)}", file=sys.stderr)
    print(f"{len(runs)} runs; differing config keys: {', '.join(keys) or '(none)'}")
    print(table(runs, keys, metrics))
    out = plot(runs, keys, metrics, Path(args.plot), x=args.x)
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
