"""The algorithm shoot-out (`stage=algorithms`; the preset `rlhf-exp experiment=algorithms`):
one SFT policy (and one reward model), then from them each arm of `stage.arms`, e.g. PPO,
GRPO against the reward model, GRPO on the gold reward, RLOO and DPO, on the same data and
budget, all in one W&B group. docs/algorithms.md has the measured table.

Run: rlhf-exp experiment=algorithms
     rlhf-exp experiment=algorithms '~stage.arms.ppo' grpo.steps=50    (drop an arm, fewer steps)

An arm is a pipeline (conf/stage/algorithms.yaml): its config is what `rlhf-exp stage=pipeline
stage.stages=<its stages> <this run's overrides> <its overrides>` composes
(rlhf_exp/command/arms.py), checked by the dispatcher before anything runs. The steps, in order:

    arm_configs      each arm's config, composed from this run's command line
    train_shared     the stages the arms share (sft, reward), once: <run_dir>/sft, /reward
    train_arm        each arm from the shared outputs (config.PIPELINE_HANDOFF): <run_dir>/<arm>,
                     its own W&B run (job_type = its stage, name <experiment>-<stage>-<arm>)
    compare_heldout  the SFT policy and every arm's policy on the same held-out prompts with the
                     same settings (PPO's held-out eval: ppo.generation, ppo.eval_num_prompts):
                     gold reward, reward-model score, response length, KL to SFT; with
                     stage.compare_base the base model too, KL to it (kl_to_base); and the
                     first held-out prompts' answers side by side (samples_side_by_side)
    compare_runs     the compare tool's table of the arms' own held-out gold reward
                     (`{stage}/eval_gold_reward`, logged every eval_every steps) and a PNG of it
                     against each arm's wall time: <run_dir>/algorithms.png

<run_dir>/summary.md holds the three tables and the answers; result.json the metrics
`algorithms/<arm>_<metric>` (gold_reward, gold_gain over SFT, reward_score, response_length,
kl_to_sft, wall_s; with stage.compare_base: kl_to_base instead, gold_gain_over_base; pass@<k>
and mean@<N> from eval.num_samples samples per prompt, rlhf_exp/rl/pass_at_k.py), and
`algorithms/<arm>_alarm` (1: the arm tripped a reward-hacking alarm, rlhf_exp/rl/alarm.py; the
runs table's `alarm` column names them with their steps).

`rlhf-exp resume=<run_dir>` continues a cut shoot-out as it does a pipeline: every stage runs
again in its own folder, a finished one returns its result without training, the one that was
cut continues from its last training checkpoint (`<stage>.save_every`) or starts over. A
finished stage's wall_s is then only the time to find it finished.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from omegaconf import DictConfig, open_dict

from rlhf_exp.command import arms, composition
from rlhf_exp.errors import ConfigError
from rlhf_exp.modeling import models
from rlhf_exp.rl import evaluation
from rlhf_exp.stages import pipeline
from rlhf_exp.training import checkpoint, dist, runtime
from rlhf_exp.training.tracking import resolve_init

HELDOUT_COLUMNS = ("gold_reward", "gold_gain", "gold_gain_over_base", "reward_score",
                   "response_length", "kl_to_sft", "kl_to_base", "wall_s")
SAMPLES_SHOWN = 5  # held-out prompts whose answers the summary shows side by side


def arm_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """Each arm's config, composed from the running app's command line as the dispatcher
    composed and checked it (every rank composes the same)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError("stage=algorithms composes its arms from the command line: run it "
                          "with rlhf-exp")
    hc = HydraConfig.get()
    task = list(hc.overrides.task)
    inv = composition.parse([*composition.rank_args(hc), *task])
    out = arms.compose_arms(cfg, task, lambda overrides: composition.compose(inv, overrides))
    for arm_cfg in out.values():
        with open_dict(arm_cfg):
            del arm_cfg["hydra"]  # as the app's own config: the hydra node is not the job's
    return out


def shared_stages(arm_cfgs: dict[str, DictConfig]) -> list[str]:
    """The stages before each arm's own, in order, each once."""
    return list(dict.fromkeys(s for c in arm_cfgs.values() for s in c.stage.stages[:-1]))


def train_shared(cfg: DictConfig, stages: list[str], run_dir: Path, wall: dict[str, float]
                 ) -> dict[str, runtime.StageResult]:
    """The shared stages, once, each from the previous one's output as in a pipeline (their
    wall seconds into `wall`)."""
    results: dict[str, runtime.StageResult] = {}
    for name in stages:
        runtime.say(f"algorithms: shared stage {name} -> {run_dir / name}")
        runner = importlib.import_module(f"rlhf_exp.stages.{name}")
        start = time.perf_counter()
        results[name] = runner.run(pipeline.stage_config(cfg, name, results), run_dir / name)
        wall[name] = time.perf_counter() - start
    return results


def train_arm(name: str, arm_cfg: DictConfig, shared: dict[str, runtime.StageResult],
              run_dir: Path) -> tuple[runtime.StageResult, float]:
    """One arm's own stage from the shared outputs it names; returns its result and wall
    seconds."""
    *before, stage = list(arm_cfg.stage.stages)
    runtime.say(f"algorithms: arm {name} ({' -> '.join([*before, stage])}) -> {run_dir / name}")
    runner = importlib.import_module(f"rlhf_exp.stages.{stage}")
    sub = pipeline.stage_config(arm_cfg, stage, {s: shared[s] for s in before})
    start = time.perf_counter()
    result = runner.run(sub, run_dir / name)
    return result, time.perf_counter() - start


def compare_heldout(cfg: DictConfig, shared: dict[str, runtime.StageResult],
                    results: dict[str, runtime.StageResult]
                    ) -> tuple[dict[str, dict[str, float]], str]:
    """The SFT policy and every arm's final policy (and, with stage.compare_base, the base model
    first), with the same held-out prompts, generation settings and seed (PPO's held-out eval
    settings, as pipeline.compare_policies). KL is to the SFT policy, or to the base model with
    stage.compare_base (`kl_to_base`). Returns the metrics and the side-by-side samples."""
    start = (str(resolve_init(shared["sft"].run_dir)[0]) if "sft" in shared
             else models.resolve_base_path(cfg.model))
    policies, reference = {"sft": start}, start
    if cfg.stage.get("compare_base", False):
        reference = models.resolve_base_path(cfg.model)
        policies = {"base": reference, **policies}
    for name, res in results.items():
        policies[name] = res.checkpoint
        ema = Path(res.run_dir) / "checkpoints" / "ema"
        if (ema / "config.json").exists():
            policies[f"{name}_ema"] = str(ema)
    reward_model = (str(resolve_init(shared["reward"].run_dir)[0]) if "reward" in shared
                    else None)
    rows, scores, device = pipeline.score_policies(cfg, policies, reference, reward_model,
                                                   stage="ppo")
    heldout = pipeline.summarize_scores(scores, device)
    if reference != start:  # the KL of each policy is to the base model
        for m in heldout.values():
            if "kl_to_sft" in m:
                m["kl_to_base"] = m.pop("kl_to_sft")
    return heldout, samples_side_by_side(rows, scores)


def samples_side_by_side(rows: list[dict], scores: dict[str, evaluation.PolicyScores],
                         n: int = SAMPLES_SHOWN) -> str:
    """Markdown: the first `n` held-out prompts (this rank's), each policy's answer to it with
    its gold reward, one table per prompt."""
    blocks = []
    for i, row in enumerate(rows[:n]):
        lines = [f"**{i + 1}.** {_cell(row['prompt'])}", "", "| policy | gold | answer |",
                 "|---|---:|---|"]
        for name, s in scores.items():
            gold = s.gold[i]
            lines.append(f"| {name} | {'-' if gold is None else f'{gold:.2f}'} | "
                         f"{_cell(s.samples.texts[i])} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _cell(text: str) -> str:
    """Text inside a markdown table cell: one line, pipes escaped, empty shown as such."""
    return " ".join(text.replace("|", "\\|").split()) or "(empty)"


def compare_runs(run_dir: Path, names: list[str]) -> tuple[str, Path | None]:
    """The compare tool on the arms' W&B runs: a table of each arm's own held-out gold reward
    (final and best) and a PNG of it against wall time (rank 0 only)."""
    from rlhf_exp.command import compare

    if not dist.is_main():
        return "", None
    runs = compare.load_runs([str(run_dir / name) for name in names])
    runs.sort(key=lambda run: names.index(Path(run.label).name)
              if Path(run.label).name in names else len(names))
    metrics = ["{stage}/eval_gold_reward"]
    text = compare.table(runs, ["stage.name"], metrics)
    png = compare.plot(runs, [], metrics, run_dir / "algorithms.png", x="time")
    return text, png


def summary_text(shared: dict[str, runtime.StageResult], results: dict[str, runtime.StageResult],
                 wall: dict[str, float], heldout: dict[str, dict[str, float]],
                 runs_table: str, samples: str = "") -> str:
    """Markdown: the stages and their W&B runs, the held-out comparison (only the columns some
    policy has), the compare table, the side-by-side samples."""
    lines = ["| run | stage | run dir | W&B run | wall s | alarm |", "|---|---|---|---|---:|---|"]
    for name, res in {**shared, **results}.items():
        lines.append(f"| {name} | {res.stage} | {res.run_dir} | {res.wandb_run_id or '-'} | "
                     f"{wall.get(name, float('nan')):.1f} | {alarm_cell(res)} |")
    columns = heldout_columns(heldout)
    lines += ["", "Every policy on the same held-out prompts, generation settings and seed "
              "(PPO's held-out eval); wall_s: the arm's own stage, from the shared SFT policy:",
              "", "| policy | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, m in heldout.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{m[c]:.4g}" if c in m else "-" for c in columns) + " |")
    if runs_table:
        lines += ["", "The arms' own held-out eval over training (rlhf-exp-compare):", "",
                  "```", runs_table, "```"]
    if samples:
        lines += ["", "Answers side by side (the first held-out prompts, gold reward):", "",
                  samples]
    return "\n".join(lines) + "\n"


def alarm_cell(res: runtime.StageResult) -> str:
    """The reward-hacking alarms an arm tripped, each with the step it fired at
    (rlhf_exp/rl/alarm.py); "-" for none (and for stages without the alarm)."""
    return ", ".join(f"{name}@{step}" for name, step in res.alarms.items()) or "-"


def add_base_gain(heldout: dict[str, dict[str, float]]) -> None:
    """With a base-model row: each other policy's `gold_gain_over_base` (its gold reward minus
    the base model's, on the same prompts)."""
    base = heldout.get("base", {}).get("gold_reward")
    if base is None:
        return
    for name, m in heldout.items():
        if name != "base" and "gold_reward" in m:
            m["gold_gain_over_base"] = m["gold_reward"] - base


def heldout_columns(heldout: dict[str, dict[str, float]]) -> list[str]:
    """HELDOUT_COLUMNS that at least one policy has (kl_to_sft or kl_to_base, not both), then
    pass@<k> and mean@<N> (eval.num_samples samples per prompt) where measured."""
    columns = [c for c in HELDOUT_COLUMNS if any(c in m for m in heldout.values())]
    return columns + [k for k in dict.fromkeys(k for m in heldout.values() for k in m)
                      if pipeline.pass_metric(k)]


def run(cfg: DictConfig, run_dir: Path) -> runtime.StageResult:
    run_dir = Path(run_dir)
    runtime.save_run_config(cfg, run_dir)
    arm_cfgs = arm_configs(cfg)
    wall: dict[str, float] = {}
    shared = train_shared(cfg, shared_stages(arm_cfgs), run_dir, wall)

    results: dict[str, runtime.StageResult] = {}
    for name, arm_cfg in arm_cfgs.items():
        results[name], wall[name] = train_arm(name, arm_cfg, shared, run_dir)

    heldout, samples = compare_heldout(cfg, shared, results)
    base = heldout["sft"].get("gold_reward")
    for name, m in heldout.items():
        if name in wall:
            m["wall_s"] = wall[name]
        if base is not None and "gold_reward" in m and name not in ("sft", "base"):
            m["gold_gain"] = m["gold_reward"] - base
    add_base_gain(heldout)
    runs_table, png = compare_runs(run_dir, list(results))

    text = summary_text(shared, results, wall, heldout, runs_table, samples)
    if dist.is_main():
        (run_dir / "summary.md").write_text(text)
    runtime.say("\nalgorithms summary\n" + text + (f"plot: {png}" if png else ""))
    metrics = {f"algorithms/{name}_{key}": value for name, m in heldout.items()
               for key, value in m.items()}
    metrics.update({f"algorithms/{name}_wall_s": wall[name] for name in shared})
    metrics.update({f"algorithms/{name}_alarm": float(bool(res.alarms))
                    for name, res in results.items()})
    final = checkpoint.final_checkpoint(Path(shared["sft"].run_dir)) if "sft" in shared else None
    result = runtime.StageResult("algorithms", str(run_dir), str(final) if final else None,
                                 None, None, metrics)
    result.write()
    return result
