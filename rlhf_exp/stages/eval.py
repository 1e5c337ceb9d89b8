"""Evaluation: compare policies on held-out prompts, and the reward model on held-out pairs.

Run: rlhf-exp stage=eval eval.from_run=<pipeline run dir>
     rlhf-exp stage=eval eval.policies.sft=<dir> eval.policies.ppo=<dir> eval.reward_model=<dir>

Reads `cfg.eval` (conf/eval/default.yaml). Every policy (base, SFT, PPO, PPO-EMA, or any named
path/artifact) answers the PPO share's held-out prompts with the settings PPO's held-out eval
uses (so the PPO policy's gold reward here reproduces ppo/eval_gold_reward). Each response is
scored by the reward model and, where the task has one, by the gold reward (and, with
`eval.num_samples` N > 1, pass@k and mean@N over N samples per prompt); each policy's KL to
the reference (the SFT policy) is measured on its own responses. The reward model is also
scored on the reward share's held-out preference pairs (accuracy, margin, margin histogram).
Output: a W&B Table (one row per prompt, columns per policy), eval/* metrics, and in the run dir
eval_samples.jsonl, rm_margin_hist.png and result.json. Runs in one process, no DeepSpeed:
inference needs no optimizer state or partitioning at the sizes this project evaluates.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_exp import registry
from rlhf_exp.data import build_stage_data
from rlhf_exp.data.tokenize import collate_pairs, tokenize_pairs
from rlhf_exp.errors import UserError
from rlhf_exp.modeling import models
from rlhf_exp.rl import evaluation
from rlhf_exp.rl.scoring import sequence_scores
from rlhf_exp.training import checkpoint, dist, runtime
from rlhf_exp.training.tracking import Tracker, resolve_init

# table columns first, others after: the base model, then each policy stage (and its EMA)
POLICY_ORDER = ("base", *(n for s in registry.policy_stages() for n in (s, f"{s}_ema")))
# taken from the run (eval.match_run)
MATCHED = ("seed", "model", "data_mix", "reward", "ppo", "grpo")
RL_STAGES = registry.rl_stages()  # stages whose config names the SFT policy and reward model


@dataclass
class FoundRun:
    """What `eval.from_run` points at."""

    policies: dict[str, str] = field(default_factory=dict)  # name -> checkpoint dir
    reward_model: str | None = None
    config: DictConfig | None = None  # the run's config_resolved.yaml
    # the RL stage whose held-out eval settings eval's defaults follow (ppo when there is one)
    rl_stage: str | None = None


def discover_run(run_dir: str) -> FoundRun:
    """The policies and reward model of a finished run: the stage runs in `run_dir` itself and in
    its direct subdirectories (a pipeline's sft/, reward/, ppo/, grpo/, dpo/; the arms of
    stage=algorithms), found by their result.json. A policy-training stage's final checkpoint is
    a policy named after the stage (any stage but reward and pipeline: sft, ppo, grpo, dpo, ...),
    or after its folder when that is not the stage's name (an arm: grpo_rm, rloo). A PPO run
    also yields `<name>_ema` (checkpoints/ema); an RL run whose SFT and reward runs are
    elsewhere yields the actor_init / reward model its config names, a DPO run the
    dpo.init_from it started from (as `sft`)."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"eval.from_run={run_dir}: no such directory")
    found = FoundRun()
    rl_cfg = None
    dpo_start = None  # what a DPO run (a policy stage without a reward) started from: its SFT
    for result in [root / "result.json", *sorted(root.glob("*/result.json"))]:
        if not result.exists():
            continue
        stage = json.loads(result.read_text()).get("stage")
        stage_dir = result.parent
        final = checkpoint.final_checkpoint(stage_dir)  # resolved here: the dir may have moved
        # a stage run in a folder of another name (an arm of stage=algorithms: grpo_rm/, rloo/)
        # is named after its folder: two GRPO arms are two policies
        name = stage if stage_dir == root or stage_dir.name == stage else stage_dir.name
        spec = registry.STAGES.get(stage)
        if stage in registry.reward_model_stages() and final:
            found.reward_model = str(final)
        elif spec is not None and spec.trains_policy and final:
            found.policies[name] = str(final)
        start_key = registry.policy_start_key().get(stage)
        if start_key and stage not in RL_STAGES:  # e.g. dpo: its dpo.init_from
            start_cfg = _stage_config(stage_dir, spec.node)
            start = start_cfg.get(start_key.split(".", 1)[1]) if start_cfg is not None else None
            dpo_start = str(start) if start else dpo_start
        ema = stage_dir / "checkpoints" / "ema"  # PPO's EMA policy (ppo.ema.enabled)
        if spec is not None and spec.trains_policy and (ema / "config.json").exists():
            found.policies[f"{name}_ema"] = str(ema.resolve())
        if stage in RL_STAGES and (found.rl_stage != "ppo"):
            found.rl_stage = stage
            if (stage_dir / "config_resolved.yaml").exists():
                rl_cfg = OmegaConf.load(stage_dir / "config_resolved.yaml").get(stage)
        if found.config is None and (stage_dir / "config_resolved.yaml").exists():
            found.config = OmegaConf.load(stage_dir / "config_resolved.yaml")
    if rl_cfg is not None:  # a lone RL run: its inputs are the SFT policy and reward model
        spec = registry.get(found.rl_stage)
        actor = rl_cfg.get(registry.policy_start_key()[found.rl_stage].split(".", 1)[1])
        if "sft" not in found.policies and actor:
            found.policies["sft"] = str(actor)
        # its frozen reward model, else the checkpoint handed over as one (ppo.critic_init)
        rm_keys = ["reward_model", *(k.split(".", 1)[1] for k, src in spec.handoff.items()
                                     if src == "reward")]
        found.reward_model = found.reward_model or next(
            (rl_cfg.get(k) for k in dict.fromkeys(rm_keys) if rl_cfg.get(k)), None)
    if dpo_start and "sft" not in found.policies:  # a lone DPO run: it started from the SFT
        found.policies["sft"] = dpo_start
    if not found.policies and found.reward_model is None:
        raise UserError(f"eval.from_run={run_dir}: no result.json of an sft, reward, ppo, grpo "
                        "or dpo run in it or its subdirectories (give a pipeline or stage run "
                        "dir)")
    return found


def _stage_config(stage_dir: Path, node: str) -> DictConfig | None:
    """A finished stage run's `node` of its config_resolved.yaml, or None."""
    saved = stage_dir / "config_resolved.yaml"
    return OmegaConf.load(saved).get(node) if saved.exists() else None


def match_run(cfg: DictConfig, run_cfg: DictConfig, rl_stage: str | None = None) -> DictConfig:
    """This config with the run's seed, model, data_mix, reward, ppo and grpo nodes: the
    held-out prompts and pairs are then the ones the run never trained on (the split depends on
    seed and data_mix), and eval's ${ppo.*} defaults follow the run's PPO eval settings, or its
    GRPO eval settings when `rl_stage` is grpo (eval keys set explicitly stay as they are)."""
    cfg = copy.deepcopy(cfg)
    changed = [k for k in MATCHED if k in run_cfg and run_cfg[k] != cfg[k]]
    try:
        for key in changed:
            node = run_cfg[key]
            if isinstance(node, DictConfig):  # a fresh node of the schema's type, then the run's
                node = OmegaConf.merge(OmegaConf.structured(OmegaConf.get_type(cfg[key])), node)
            cfg[key] = node
    except Exception as exc:  # a run dir from another version of the schema
        raise UserError(f"eval.from_run: the run's config_resolved.yaml does not fit this "
                        f"version ({str(exc).splitlines()[0]}); set eval.match_run=false") from None
    if changed:
        runtime.say(f"eval: using the run's {', '.join(changed)} (eval.match_run=true)")
    if rl_stage == "grpo":
        follow_grpo(cfg.eval)
    return cfg


def follow_grpo(node: DictConfig) -> None:
    """Point eval's defaults that still read ${ppo.<key>} at the GRPO node's equivalents
    (generation, prompts, batch size), but for the KL estimator: eval measures KL to SFT on
    samples, where k1 is unbiased, as PPO and the pipeline summary do."""
    for key in list(node.keys()):
        if isinstance(node[key], DictConfig):
            follow_grpo(node[key])
        elif OmegaConf.is_interpolation(node, key):
            text = node._get_node(key)._value()
            if isinstance(text, str) and text.startswith("${ppo."):
                if not text.startswith("${ppo.kl."):  # KL as measured: ppo's (k1)
                    node[key] = text.replace("${ppo.", "${grpo.")


def _resolve(ref: str, key: str, tracker: Tracker | None) -> tuple[str, str | None]:
    """A path / run dir / artifact as a local checkpoint; a bad one is the user's error."""
    try:
        path, artifact = resolve_init(ref, tracker)
    except FileNotFoundError as exc:
        raise UserError(f"{key}: {exc}") from None
    return str(path), artifact


def _mean(values: list) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else float("nan")


def margin_histogram(margins: list[float], path: Path, accuracy: float) -> Path:
    """PNG histogram of chosen - rejected reward margins (the object API needs no display)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.hist(margins, bins=min(40, max(5, len(margins) // 5)), color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel("reward margin: score(chosen) - score(rejected)")
    ax.set_ylabel("held-out pairs")
    ax.set_title(f"reward model on {len(margins)} held-out pairs: accuracy {accuracy:.3f}")
    fig.tight_layout()
    fig.savefig(path)
    return path


@dataclass
class Inputs:
    """What stage=eval compares: the policies (name -> checkpoint dir, in table order), their
    W&B artifacts, the reward model and the KL reference."""

    policies: dict[str, str]
    artifacts: dict[str, str | None]
    reward_path: str | None
    ref_name: str | None
    ref_path: str | None


def resolve_inputs(cfg: DictConfig, found: FoundRun, tracker: Tracker | None) -> Inputs:
    """The policies from a finished run, then explicit entries (which win); the reward model
    and the KL reference (eval.reference, else the SFT policy)."""
    ev = cfg.eval
    refs = {**found.policies, **{str(k): str(v) for k, v in ev.policies.items() if v}}
    policies: dict[str, str] = {}
    artifacts: dict[str, str | None] = {}
    if ev.include_base:
        policies["base"] = models.resolve_base_path(cfg.model)
    for name, ref in refs.items():
        policies[name], artifacts[name] = _resolve(ref, f"eval.policies.{name}={ref}", tracker)
    order = [n for n in POLICY_ORDER if n in policies] + \
            [n for n in policies if n not in POLICY_ORDER]
    reward_ref = ev.reward_model or found.reward_model
    reward_path = _resolve(reward_ref, f"eval.reward_model={reward_ref}", tracker)[0] \
        if reward_ref else None
    ref_name = ev.reference or ("sft" if "sft" in policies else None)
    if ref_name is None:
        ref_path = None
    elif ref_name in policies:
        ref_path = policies[ref_name]
    else:
        ref_path = _resolve(ref_name, f"eval.reference={ref_name}", tracker)[0]
    return Inputs({n: policies[n] for n in order}, artifacts, reward_path, ref_name, ref_path)


def score_policies(cfg: DictConfig, inputs: Inputs, rows: list[dict],
                   device: torch.device) -> tuple[dict[str, float], dict[str, dict[str, list]]]:
    """Each policy in turn: generate, score, KL to the reference (rlhf_exp/rl/evaluation.py, the
    evaluator of the stages' own held-out evals and of the pipeline summary). Returns the
    eval/<policy>/* metrics and each policy's responses, rewards and gold rewards."""
    ev = cfg.eval
    settings = evaluation.EvalSettings(
        gen=evaluation.generation_config(ev.generation), template=cfg.model.prompt_template,
        max_prompt_len=ev.max_prompt_len, batch_size=ev.batch_size, seed=cfg.seed,
        device=device, pass_k=evaluation.pass_at_k_settings(ev))
    evaluated = evaluation.compare_checkpoints(
        inputs.policies, rows, settings, model_cfg=cfg.model, precision=cfg.hardware.precision,
        reward_model=inputs.reward_path, reference=inputs.ref_path,
        kl_estimator=ev.kl_estimator)
    metrics: dict[str, float] = {}
    per_policy: dict[str, dict[str, list]] = {}
    for name in inputs.policies:
        s = evaluated[name]
        per_policy[name] = {"response": s.samples.texts, "gold": s.gold,
                            "reward": s.reward or [None] * len(rows)}
        m = {f"eval/{name}/{key}": value
             for key, value in evaluation.summarize(s, device).items()}
        metrics.update(m)
        runtime.say(f"eval: {name:<8} " + "  ".join(
            f"{k.rsplit('/', 1)[1]} {v:.4f}" for k, v in m.items()))
    return metrics, per_policy


def write_samples(rows: list[dict], per_policy: dict[str, dict[str, list]], run_dir: Path,
                  tracker: Tracker) -> Path:
    """One table row per prompt, one column group per policy: eval_samples.jsonl and the
    eval/samples W&B Table."""
    columns = ["prompt", "source"]
    for name in per_policy:
        columns += [f"{name}/response", f"{name}/reward", f"{name}/gold"]
    table = []
    for i, row in enumerate(rows):
        line = [row["prompt"], row.get("source")]
        for p in per_policy.values():
            line += [p["response"][i], p["reward"][i], p["gold"][i]]
        table.append(line)
    samples_file = run_dir / "eval_samples.jsonl"
    samples_file.write_text("".join(json.dumps(dict(zip(columns, line))) + "\n"
                                    for line in table))
    tracker.log_table("eval/samples", columns, table, 0)
    return samples_file


def reward_model_margins(cfg: DictConfig, reward_path: str, device: torch.device) -> list[float]:
    """score(chosen) - score(rejected) of the reward model on up to eval.num_pairs of the reward
    share's held-out preference pairs."""
    ev = cfg.eval
    reward_tok = models.load_tokenizer(reward_path, cfg.model)
    reward_model = models.load_reward_model(reward_path, reward_tok, cfg.model,
                                            cfg.hardware.precision).to(device).eval()
    pair_rows = [r for r in build_stage_data(cfg.data_mix, "reward", cfg.seed).eval
                 if r.get("chosen") and r.get("rejected")][:ev.num_pairs]
    feats, _ = tokenize_pairs(pair_rows, reward_tok, cfg.model.prompt_template,
                              cfg.reward.max_prompt_len, cfg.reward.max_len,
                              cfg.data_mix.overlong)
    margins: list[float] = []
    with torch.no_grad():
        for lo in range(0, len(feats), ev.batch_size):
            batch = collate_pairs(feats[lo:lo + ev.batch_size], reward_tok.pad_token_id)
            scores = sequence_scores(reward_model, batch["input_ids"].to(device),
                                     batch["attention_mask"].to(device)).float().cpu()
            half = scores.shape[0] // 2
            margins += (scores[:half] - scores[half:]).tolist()
    del reward_model
    gc.collect()
    return margins


def evaluate_reward_model(cfg: DictConfig, reward_path: str, device: torch.device,
                          run_dir: Path, tracker: Tracker) -> dict[str, float]:
    """eval/rm_accuracy, eval/rm_margin, eval/rm_pairs and the margin histogram."""
    margins = reward_model_margins(cfg, reward_path, device)
    if not margins:
        runtime.say("eval: the reward share has no held-out preference pairs; no RM eval")
        return {}
    acc = sum(m > 0 for m in margins) / len(margins)
    metrics = {"eval/rm_accuracy": acc, "eval/rm_margin": _mean(margins),
               "eval/rm_pairs": len(margins)}
    png = margin_histogram(margins, run_dir / "rm_margin_hist.png", acc)
    if tracker.enabled:
        import wandb

        tracker.log({"eval/rm_margin_hist": wandb.Image(str(png))}, 0)
    runtime.say(f"eval: reward model on {len(margins)} held-out pairs: accuracy "
                f"{acc:.4f}, margin {metrics['eval/rm_margin']:.4f}  ({png})")
    return metrics


def evaluate(cfg: DictConfig, run_dir: Path) -> runtime.StageResult:
    if not any(cfg.eval.policies.values()) and not cfg.eval.from_run \
            and not cfg.eval.include_base:
        raise UserError("stage=eval has no policy to evaluate: set eval.from_run=<pipeline run "
                        "dir>, eval.policies.<name>=<path or artifact>, or eval.include_base=true")
    found = discover_run(cfg.eval.from_run) if cfg.eval.from_run else FoundRun()
    if found.config is not None and cfg.eval.match_run:
        cfg = match_run(cfg, found.config, found.rl_stage)
    runtime.set_seed(cfg.seed)
    device = dist.device_for(cfg.hardware.device)
    # Online, artifact names are fetched through the W&B run (which records the lineage), so it
    # starts first; offline, inputs are resolved before it starts, so a bad reference leaves no
    # run behind.
    online = cfg.logger.name == "wandb" and \
        os.environ.get("WANDB_MODE", cfg.logger.mode) == "online"
    tracker = Tracker(cfg, run_dir, "eval") if online else None
    inputs = resolve_inputs(cfg, found, tracker)
    rows = evaluation.heldout_rows(cfg, cfg.eval.num_prompts)
    if not rows:
        raise UserError("eval: the PPO share's held-out slice is empty; raise "
                        "data_mix.eval_fraction or the ppo share in data_mix.split")

    runtime.save_run_config(cfg, run_dir)
    tracker = tracker or Tracker(cfg, run_dir, "eval")
    tracker.summary({"eval/policies": inputs.policies,
                     "eval/policy_artifacts": {n: a for n, a in inputs.artifacts.items() if a},
                     "eval/reward_model": inputs.reward_path or "",
                     "eval/reference": inputs.ref_path or ""})
    runtime.say(f"eval: {len(inputs.policies)} policies ({', '.join(inputs.policies)}) on "
                f"{len(rows)} held-out prompts, reward model {inputs.reward_path or '(none)'}, "
                f"KL reference {inputs.ref_name or '(none)'}; generation "
                f"{OmegaConf.to_container(cfg.eval.generation, resolve=True)}")

    metrics, per_policy = score_policies(cfg, inputs, rows, device)
    samples_file = write_samples(rows, per_policy, run_dir, tracker)
    if inputs.reward_path:
        metrics.update(evaluate_reward_model(cfg, inputs.reward_path, device, run_dir, tracker))

    tracker.log({k: v for k, v in metrics.items() if not math.isnan(v)}, 0)
    tracker.summary(metrics)
    result = runtime.StageResult("eval", str(run_dir), None, tracker.run_id,
                                 str(run_dir / "wandb") if tracker.enabled else None, metrics)
    result.write()
    runtime.say(f"eval: samples {samples_file}")
    if tracker.enabled:
        runtime.say(tracker.where())
    tracker.finish()
    return result


def run(cfg: DictConfig, run_dir: Path) -> runtime.StageResult:
    return evaluate(cfg, run_dir)
