"""A recipe of several stages in one run (`stage=pipeline`, the default): SFT -> reward model ->
PPO by default, or any chain of `stage.stages` (e.g. [sft, grpo], [sft, reward, grpo]).

Run: rlhf-exp                     (or `make demo` = rlhf-exp experiment=demo)
     rlhf-exp stage.stages=[sft,grpo]                                  (GRPO on the gold reward)
     rlhf-exp stage.stages=[reward,ppo] ppo.actor_init=<sft run dir>   (skip a stage)
     rlhf-exp 'stage.stages=[sft,dpo]'                                  (SFT, then DPO)

Each stage runs in this process, in order, with its own run dir under this one (<run_dir>/sft,
/reward, /ppo, ...) and its own W&B run (job_type = the stage, all in the group
`experiment_name`), and starts from an earlier stage's final checkpoint unless the config names
one (the hand-off in rlhf_exp/registry.py): `reward.init_from` = the SFT output; `ppo.actor_init`
and `grpo.actor_init` and `dpo.init_from` = the latest policy (SFT's, or an earlier policy stage's);
`ppo.critic_init` and `grpo.reward_model` = the reward model, when a reward stage ran.

At the end the first and the last policy are reloaded from their checkpoints and compared on the
same held-out prompts with the same generation settings as the last stage's held-out eval
(rlhf_exp/rl/evaluation.py): mean gold reward, reward-model score, response length, and the KL of
each policy to the first. The first policy is named `sft` (the policy the first RL stage
started from), the last one by its stage (`ppo`, `grpo`; with `ppo.ema.enabled` also
`ppo_ema`). The comparison and a table of the stages are printed and written to
<run_dir>/summary.md; <run_dir>/result.json holds every stage's metrics plus
`pipeline/<policy>_<metric>` and `pipeline/gold_reward_gain` (last minus first).
With `eval.num_samples` N samples per prompt the comparison also has pass@k and mean@N
(`eval.pass_k`, `eval.pass_threshold`; rlhf_exp/rl/pass_at_k.py).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_exp import registry
from rlhf_exp.modeling import models
from rlhf_exp.rl import evaluation
from rlhf_exp.training import checkpoint, dist, runtime
from rlhf_exp.training.tracking import resolve_init


def stage_config(cfg: DictConfig, name: str, results: dict[str, runtime.StageResult]) -> DictConfig:
    """The config one stage runs with: stage.name set, and its starting points filled in from
    the earlier stages' outputs where the user left them unset (the registry's hand-off)."""
    sub = copy.deepcopy(cfg)
    sub.stage.name = name
    names = list(results)
    results = {k: results[k] for k in names[:names.index(name)]} if name in names else results
    policies = [stage for stage in results if stage in registry.policy_stages()]
    for key, source in registry.get(name).handoff.items():
        source = policies[-1] if source == "policy" and policies else source
        if source in results and not OmegaConf.select(cfg, key):
            OmegaConf.update(sub, key, results[source].run_dir)
    return sub


def eval_node(cfg: DictConfig, stage: str) -> tuple[DictConfig, str]:
    """The config node whose held-out eval settings (generation, eval_num_prompts,
    eval_batch_size, max_prompt_len) the comparison uses (a stage without them: PPO's), and the
    KL estimator (PPO's own, k1 for the others: unbiased on samples)."""
    if stage == "ppo":
        return cfg.ppo, cfg.ppo.kl.estimator
    node = cfg[stage]
    has_eval = all(k in node for k in ("generation", "eval_num_prompts", "eval_batch_size",
                                       "max_prompt_len"))
    return (node if has_eval else cfg.ppo), "k1"


def compare_policies(cfg: DictConfig, policies: dict[str, str], reference: str,
                     reward_model: str | None, stage: str = "ppo"
                     ) -> dict[str, dict[str, float]]:
    """Held-out metrics of each policy checkpoint, with `stage`'s held-out eval settings: the
    same rows (sharded over ranks, seed + rank), generation, batch size and seed
    (evaluation.compare_checkpoints, as stage=eval). Returns
    {policy name: {gold_reward, reward_score, response_length, kl_to_sft}}."""
    _, scores, device = score_policies(cfg, policies, reference, reward_model, stage)
    return summarize_scores(scores, device)


def score_policies(cfg: DictConfig, policies: dict[str, str], reference: str,
                   reward_model: str | None, stage: str = "ppo"
                   ) -> tuple[list[dict], dict[str, evaluation.PolicyScores], torch.device]:
    """compare_policies before the means: this rank's held-out rows, each policy's responses
    and scores on them, and the device to average them on."""
    node, kl_estimator = eval_node(cfg, stage)
    # N samples per prompt for pass@k and mean@N: the eval node's (eval.num_samples, ...)
    settings = dataclasses.replace(evaluation.stage_settings(cfg, node),
                                   pass_k=evaluation.pass_at_k_settings(cfg.eval))
    rows = evaluation.heldout_shard(cfg, node.eval_num_prompts, dist.rank(), dist.world_size())
    scores = evaluation.compare_checkpoints(
        policies, rows, settings, model_cfg=cfg.model, precision=cfg.hardware.precision,
        reward_model=reward_model, reference=reference, kl_estimator=kl_estimator)
    return rows, scores, settings.device


def summarize_scores(scores: dict[str, evaluation.PolicyScores], device: torch.device
                     ) -> dict[str, dict[str, float]]:
    """{policy: {gold_reward, reward_score, response_length, kl_to_sft, pass@<k>..., mean@<N>}},
    averaged over ranks."""
    shown = ("response_length", "kl_to_sft", "reward_score", "gold_reward")
    return {name: {k: v for k, v in evaluation.summarize(s, device).items()
                   if k in shown or pass_metric(k)} for name, s in scores.items()}


def pass_metric(key: str) -> bool:
    """`pass@<k>` or `mean@<N>` (rlhf_exp/rl/pass_at_k.py)."""
    return key.startswith(("pass@", "mean@"))


def reward_model_of(stage_cfg: DictConfig, stage: str) -> str | None:
    """The reward model an RL stage used (None: reward functions only), as a local path."""
    if stage == "ppo":
        ref = stage_cfg.ppo.reward_model or stage_cfg.ppo.critic_init
    else:  # a stage without a reward model (e.g. one trained on preference pairs): none
        node = stage_cfg[stage]
        ref = node.get("reward_model") if node.get("reward_model_weight", 1.0) > 0 else None
    return str(resolve_init(ref)[0]) if ref else None


def summary_text(results: dict[str, runtime.StageResult],
                 comparison: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per stage, then the held-out comparison of the policies."""
    lines = ["| stage | run dir | W&B run | key metrics |", "|---|---|---|---|"]
    for name, res in results.items():
        spec = registry.STAGES.get(name)
        keys = [k for k in (spec.summary_metrics if spec else ()) if k in res.metrics]
        shown = ", ".join(f"{k}={res.metrics[k]:.4g}" for k in keys)
        lines.append(f"| {name} | {res.run_dir} | {res.wandb_run_id or '-'} | {shown} |")
    if comparison:
        cols = ["gold_reward", "reward_score", "response_length", "kl_to_sft"]
        cols += [k for k in dict.fromkeys(k for m in comparison.values() for k in m)
                 if pass_metric(k)]
        lines += ["", "Held-out prompts, same prompts and generation settings (the last "
                  "stage's generation, seed):", "", "| policy | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for name, m in comparison.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{m[c]:.4f}" if c in m else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: DictConfig, run_dir: Path) -> runtime.StageResult:
    run_dir = Path(run_dir)
    runtime.save_run_config(cfg, run_dir)
    results: dict[str, runtime.StageResult] = {}
    for name in cfg.stage.stages:
        runtime.say(f"pipeline: stage {name} -> {run_dir / name}")
        runner = importlib.import_module(registry.get(name).runner)
        # each runner opens and finishes its own W&B run, so the three never mix
        results[name] = runner.run(stage_config(cfg, name, results), run_dir / name)

    comparison: dict[str, dict[str, float]] = {}
    policy_start = registry.policy_start_key()
    rl_stages = [name for name in results if name in policy_start]
    if rl_stages:
        first, last = rl_stages[0], rl_stages[-1]
        first_cfg = stage_config(cfg, first, results)
        start = OmegaConf.select(first_cfg, policy_start[first])
        sft_path = (str(resolve_init(start)[0]) if start
                    else models.resolve_base_path(cfg.model))
        policies = {"sft": sft_path, last: results[last].checkpoint}
        ema = Path(results[last].run_dir) / "checkpoints" / "ema"
        if (ema / "config.json").exists():
            policies[f"{last}_ema"] = str(ema)
        comparison = compare_policies(cfg, policies, sft_path,
                                      reward_model_of(stage_config(cfg, last, results), last),
                                      stage=last)

    metrics: dict[str, float] = {}
    for res in results.values():
        metrics.update(res.metrics)
    for name, m in comparison.items():
        for key, value in m.items():
            metrics[f"pipeline/{name}_{key}"] = value
    last_policy = rl_stages[-1] if rl_stages else None
    if "gold_reward" in comparison.get("sft", {}) and \
            "gold_reward" in comparison.get(last_policy, {}):
        metrics["pipeline/gold_reward_gain"] = (comparison[last_policy]["gold_reward"]
                                                - comparison["sft"]["gold_reward"])
    text = summary_text(results, comparison)
    if dist.is_main():
        (run_dir / "summary.md").write_text(text)
    runtime.say("\npipeline summary\n" + text)
    last = results[list(results)[-1]] if results else None
    final = checkpoint.final_checkpoint(Path(last.run_dir)) if last else None
    result = runtime.StageResult("pipeline", str(run_dir), str(final) if final else None,
                                 None, None, metrics)
    result.write()
    return result
