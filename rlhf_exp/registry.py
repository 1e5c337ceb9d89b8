"""The stage registry: every fact about a stage that code outside the stage needs, in one place.

One `StageSpec` per `stage=` name. The dispatcher (runner), validation (config node, key checks,
metric names, objective), preflight (starting points, data shares, input checks, resumable
checkpoints), the pipeline (hand-off), stage=eval (which policies a run holds), resume (keys a
stage also reads), `--help` and the compare tool read it from here. Adding a stage is one entry
in STAGES plus its runner module (and its config node's schema and YAML, when it has one);
`register()` adds one at run time (a plugin; tests/test_registry.py adds a dummy stage so).

Torch-free and free of rlhf_exp imports (`--help` and `--cfg job` stay fast, nothing cycles
back): hooks and schemas are named as "package.module:attribute" strings, imported on use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# the shares of data_mix.split, in its order (DeepSpeed-Chat's three phases); a stage reads one
# or more of them by name (StageSpec.shares)
SHARES = ("sft", "reward", "ppo")


@dataclass(frozen=True)
class StartKey:
    """A config key naming a checkpoint the stage starts from.

    handoff: where `stage=pipeline` fills it from when left unset: the output of the latest
    earlier stage of that name, or "policy" = of the latest earlier stage that trains a policy;
    None = never filled. base: what the stage loads instead when the key is unset and nothing
    is handed over: "policy" (model.path), "reward" (model.reward_path, else model.path), None.
    """

    key: str
    handoff: str | None = None
    base: str | None = None
    # what the checkpoint must hold: "policy" (a causal LM), "reward" (a score head), None =
    # either; preflight refuses the other kind (rlhf_exp/command/preflight_checks.py)
    kind: str | None = None
    # the stage feeds this model its policy's token ids: it must share the policy's tokenizer
    same_tokenizer: bool = False
    # cfg -> whether the stage loads a model from this key when it is set (None: always); e.g.
    # grpo loads no reward model at grpo.reward_model_weight 0, so nothing of it is checked
    loaded_if: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class StageSpec:
    name: str  # the `stage=` name, the metric prefix and the checkpoint's recorded stage
    runner: str  # module with run(cfg, run_dir) -> StageResult
    help: str  # one line in `rlhf-exp --help` for its config group (the node's group)
    node: str | None = None  # its config node (`sft` -> sft.*); None = none of its own
    schema: str | None = None  # "module:Class" of the node's dataclass (None: RootConfig has it)
    # the shares of data_mix.split it reads, by name (sft, reward, ppo); the first is its data
    shares: tuple[str, ...] = ()
    chainable: bool = False  # may be a stage of stage=pipeline (stage.stages)
    trains_policy: bool = False  # its output is a policy (a causal LM) the pipeline compares
    starts: tuple[StartKey, ...] = ()  # the checkpoints it starts from
    resumable: bool = False  # saves training checkpoints that resume= continues (ZeRO shards)
    shared: bool = False  # stage=algorithms trains it once for all arms (sft, reward)
    objective: str | None = None  # the sweep objective by default
    summary_metrics: tuple[str, ...] = ()  # the pipeline summary table's key metrics
    compare_metrics: tuple[str, ...] = ()  # rlhf-exp-compare's default metrics
    final_metrics: tuple[str, ...] = ()  # the logged metrics its result.json repeats
    # the metric names it logs (a trailing "*" is a family: reward_fn/<function>); its node's
    # keep_best_metric and a run's `objective` must be among them (or the result's)
    metrics: tuple[str, ...] = ()
    node_check: str | None = None  # "module:function(cfg)": validation of its node's keys
    input_check: str | None = None  # "module:function(cfg, stage)": preflight, its data
    # keys of other nodes it reads (a prefix ending in "." is the whole sub-node): resume
    # compares them, validation checks them
    also_reads: tuple[str, ...] = ()

    @property
    def handoff(self) -> dict[str, str]:
        return {s.key: s.handoff for s in self.starts if s.handoff is not None}

    @property
    def start_keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.starts)

    def logs(self, metric: str) -> bool:
        """Whether `metric` is one this stage logs or reports."""
        names = (*self.metrics, *self.final_metrics, *self.summary_metrics)
        return any(metric == m or (m.endswith("*") and metric.startswith(m[:-1])) for m in names)


def _train_loop_metrics(stage: str, *names: str) -> tuple[str, ...]:
    """The metrics train_loop.py logs for a stage (loss, lr, epoch, grad_norm, ...) plus the
    stage's own, and the result's."""
    return tuple(f"{stage}/{n}" for n in ("loss", "lr", "epoch", "grad_norm", "first_loss",
                                          "steps", *names))


_REWARD_STATS = ("accuracy", "chosen_score", "rejected_score", "margin")
_DPO_STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss")
_KTO_STATS = ("kl", "desirable_fraction", "rewards/chosen", "rewards/rejected", "rewards/margins",
              "logps/chosen", "logps/rejected")
_PERF = ("perf/*",)
_ALARM = ("alarm/*",)  # the RL stages' reward-hacking alarm (rlhf_exp/rl/alarm.py)

STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec(
        name="sft", runner="rlhf_exp.stages.sft", node="sft",
        help="SFT stage keys (sft.*)",
        shares=("sft",), chainable=True, trains_policy=True, resumable=True, shared=True,
        starts=(StartKey("sft.init_from", None, "policy", kind="policy"),),
        objective="sft/eval_loss",
        summary_metrics=("sft/eval_loss",),
        compare_metrics=("sft/loss", "sft/eval_loss"),
        metrics=(*_train_loop_metrics("sft", "eval_loss", "global_batch_size", "train_examples",
                                      "eval_examples", "dropped_overlong",
                                      "trainable_params"), *_PERF),
        node_check="rlhf_exp.config.stage_checks:check_sft",
        input_check="rlhf_exp.command.preflight:check_loop_data"),
    StageSpec(
        name="reward", runner="rlhf_exp.stages.reward", node="reward",
        help="reward stage keys (reward.*)",
        shares=("reward",), chainable=True, resumable=True, shared=True,
        starts=(StartKey("reward.init_from", "sft", "reward"),),
        objective="reward/eval_accuracy",
        summary_metrics=("reward/eval_accuracy",),
        compare_metrics=("reward/loss", "reward/eval_accuracy"),
        metrics=(*_train_loop_metrics("reward", *_REWARD_STATS, "eval_loss",
                                      *(f"eval_{s}" for s in _REWARD_STATS),
                                      "eval_gold_spearman", "global_batch_size",
                                      "train_examples", "eval_examples", "dropped_overlong",
                                      "trainable_params"), *_PERF),
        node_check="rlhf_exp.config.stage_checks:check_reward",
        input_check="rlhf_exp.command.preflight:check_loop_data"),
    StageSpec(
        name="ppo", runner="rlhf_exp.stages.ppo", node="ppo",
        help="PPO stage keys (ppo.*)",
        shares=("ppo",), chainable=True, trains_policy=True, resumable=True,
        starts=(StartKey("ppo.actor_init", "policy", "policy", kind="policy"),
                StartKey("ppo.critic_init", "reward", "reward", kind="reward",
                         same_tokenizer=True),
                StartKey("ppo.reward_model", kind="reward", same_tokenizer=True)),
        objective="ppo/eval_gold_reward",
        summary_metrics=("ppo/init_eval_gold_reward", "ppo/eval_gold_reward", "ppo/kl"),
        compare_metrics=("ppo/gold_reward", "ppo/reward_score", "ppo/kl"),
        final_metrics=("ppo/gold_reward", "ppo/reward_score", "ppo/kl", "ppo/response_length"),
        metrics=tuple(f"ppo/{n}" for n in (
            "reward_score", "gold_reward", "kl", "kl_coef", "actor_loss", "critic_loss",
            "clipfrac", "vf_clipfrac", "approx_kl", "entropy", "response_length", "eos_rate",
            "value_explained_var", "ptx_loss", "reward_model_score", "reward_fn/*",
            "eval_*", "init_eval_*", "samples", "step", "steps")) + _PERF + _ALARM,
        node_check="rlhf_exp.config.stage_checks:check_ppo",
        input_check="rlhf_exp.command.preflight:check_ppo_data"),
    StageSpec(
        name="grpo", runner="rlhf_exp.stages.grpo", node="grpo",
        help="GRPO, RLOO, Dr. GRPO keys (grpo.*)",
        shares=("ppo",), chainable=True, trains_policy=True, resumable=True,
        starts=(StartKey("grpo.actor_init", "policy", "policy", kind="policy"),
                StartKey("grpo.reward_model", "reward", None, kind="reward",
                         same_tokenizer=True,
                         loaded_if=lambda cfg: cfg.grpo.reward_model_weight > 0)),
        objective="grpo/eval_gold_reward",
        summary_metrics=("grpo/init_eval_gold_reward", "grpo/eval_gold_reward", "grpo/kl"),
        compare_metrics=("grpo/gold_reward", "grpo/eval_gold_reward", "grpo/kl"),
        final_metrics=("grpo/gold_reward", "grpo/reward", "grpo/kl", "grpo/response_length",
                       "grpo/frac_zero_std"),
        metrics=tuple(f"grpo/{n}" for n in (
            "reward", "reward_std", "gold_reward", "group_reward_std", "frac_zero_std",
            "advantage_abs", "kl", "non_score_reward", "loss", "pg_loss", "clipfrac",
            "clipfrac_low", "clipfrac_high", "approx_kl", "entropy", "response_length",
            "eos_rate", "skipped_minibatches", "reward_model_score", "reward_fn/*", "actor_lr",
            "eval_*", "init_eval_*", "samples", "step", "steps")) + _PERF + _ALARM,
        node_check="rlhf_exp.config.stage_checks:check_grpo",
        input_check="rlhf_exp.command.preflight:check_grpo_data"),
    StageSpec(
        name="dpo", runner="rlhf_exp.stages.dpo", node="dpo",
        help="DPO stage keys (dpo.*)",
        shares=("reward",), chainable=True, trains_policy=True, resumable=True,
        starts=(StartKey("dpo.init_from", "policy", "policy", kind="policy"),
                StartKey("dpo.reference", kind="policy", same_tokenizer=True)),
        objective="dpo/eval_gold_reward",
        summary_metrics=("dpo/init_eval_gold_reward", "dpo/eval_gold_reward",
                         "dpo/eval_rewards/accuracies"),
        compare_metrics=("dpo/loss", "dpo/eval_rewards/accuracies", "dpo/eval_gold_reward"),
        metrics=(*_train_loop_metrics("dpo", *_DPO_STATS, "eval_loss",
                                      *(f"eval_{s}" for s in _DPO_STATS), "eval_gold_reward",
                                      "eval_response_length", "init_eval_gold_reward",
                                      "init_eval_response_length", "global_batch_size",
                                      "train_examples", "eval_examples", "dropped_overlong",
                                      "trainable_params"), *_PERF),
        node_check="rlhf_exp.config.stage_checks:check_dpo",
        input_check="rlhf_exp.command.preflight:check_dpo_data",
        # its held-out gold reward samples with PPO's eval settings (numbers comparable)
        also_reads=("ppo.generation.", "ppo.eval_num_prompts", "ppo.eval_batch_size",
                    "ppo.max_prompt_len")),
    StageSpec(
        name="kto", runner="rlhf_exp.stages.kto", node="kto",
        help="KTO stage keys (kto.*)",
        shares=("reward",), chainable=True, trains_policy=True, resumable=True,
        starts=(StartKey("kto.init_from", "policy", "policy", kind="policy"),
                StartKey("kto.reference", kind="policy", same_tokenizer=True)),
        objective="kto/eval_gold_reward",
        summary_metrics=("kto/init_eval_gold_reward", "kto/eval_gold_reward", "kto/eval_kl"),
        compare_metrics=("kto/loss", "kto/eval_kl", "kto/eval_gold_reward"),
        metrics=(*_train_loop_metrics("kto", "kl", "desirable_fraction", "eval_loss",
                                      *(f"eval_{s}" for s in _KTO_STATS), "eval_gold_reward",
                                      "eval_response_length", "init_eval_gold_reward",
                                      "init_eval_response_length", "global_batch_size",
                                      "train_examples", "eval_examples", "desirable_examples",
                                      "dropped_overlong", "trainable_params"), *_PERF),
        node_check="rlhf_exp.config.stage_checks:check_kto",
        input_check="rlhf_exp.command.preflight:check_kto_data",
        # its held-out gold reward samples with PPO's eval settings (numbers comparable)
        also_reads=("ppo.generation.", "ppo.eval_num_prompts", "ppo.eval_batch_size",
                    "ppo.max_prompt_len")),
    StageSpec(
        name="pipeline", runner="rlhf_exp.stages.pipeline",
        help="which runner: pipeline or one stage",
        metrics=("pipeline/*", "perf/*")),
    StageSpec(
        name="algorithms", runner="rlhf_exp.stages.algorithms",
        help="the shoot-out of stage.arms",
        metrics=("algorithms/*",)),
    StageSpec(
        name="eval", runner="rlhf_exp.stages.eval", node="eval",
        help="stage=eval keys (eval.*)",
        shares=("ppo",),
        metrics=("eval/*",),
        node_check="rlhf_exp.config.stage_checks:check_eval",
        input_check="rlhf_exp.command.preflight:check_eval_data"),
    StageSpec(
        name="chat", runner="rlhf_exp.stages.chat", node="chat",
        help="stage=chat keys (chat.*)",
        starts=(StartKey("chat.policy", None, "policy", kind="policy"),),
        node_check="rlhf_exp.config.stage_checks:check_chat"),
)}


# ----------------------------------------------------------------------------- look-ups
def register(spec: StageSpec) -> None:
    """Add a stage at run time (a plugin's entry, or a test's); replacing a built-in stage is
    refused. A stage that brings its node's schema then needs `config.register_configs()`
    again (the app calls it when rlhf_exp.cli is imported)."""
    if spec.name in STAGES and STAGES[spec.name] != spec:
        raise ValueError(f"stage {spec.name!r} is registered already")
    STAGES[spec.name] = spec


def unregister(name: str) -> None:
    STAGES.pop(name, None)


def get(name: str) -> StageSpec:
    return STAGES[name]


def names() -> tuple[str, ...]:
    """Every `stage=` name."""
    return tuple(STAGES)


def chainable() -> tuple[str, ...]:
    """The stages stage=pipeline may chain."""
    return tuple(n for n, s in STAGES.items() if s.chainable)


def policy_stages() -> tuple[str, ...]:
    """The chainable stages whose output is a policy (a causal LM)."""
    return tuple(n for n, s in STAGES.items() if s.chainable and s.trains_policy)


def pipeline_handoff() -> dict[str, dict[str, str]]:
    """stage -> {key: source} for stage=pipeline (StartKey.handoff)."""
    return {n: s.handoff for n, s in STAGES.items() if s.chainable}


def policy_start_key() -> dict[str, str]:
    """stage -> the key naming the policy it starts from (ppo.actor_init, ...)."""
    return {n: k for n, keys in pipeline_handoff().items() for k, src in keys.items()
            if src == "policy"}


def rl_stages() -> tuple[str, ...]:
    """The stages that train a policy against a reward: handed both a policy and a reward model
    (ppo, grpo); their config names the SFT policy and the reward model they used."""
    return tuple(n for n, keys in pipeline_handoff().items()
                 if {"policy", "reward"} <= set(keys.values()))


def reward_model_stages() -> tuple[str, ...]:
    """The stages whose output is a reward model: a hand-off source that trains no policy."""
    sources = {src for keys in pipeline_handoff().values() for src in keys.values()}
    return tuple(n for n in chainable() if n in sources and not STAGES[n].trains_policy)


def shared_stages() -> tuple[str, ...]:
    """The stages an arm of stage=algorithms may share with the others (sft, reward)."""
    return tuple(n for n, s in STAGES.items() if s.shared)


def resumable() -> tuple[str, ...]:
    return tuple(n for n, s in STAGES.items() if s.resumable)


def node_stages() -> dict[str, str]:
    """config node -> stage, for the stages with a node of their own."""
    return {s.node: n for n, s in STAGES.items() if s.node}


def load(path: str) -> Any:
    """The attribute a "package.module:attribute" string names."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def help_lines() -> dict[str, str]:
    """config group -> its `--help` line, for the stages' nodes."""
    return {s.node: s.help for s in STAGES.values() if s.node}


__all__ = ["SHARES", "STAGES", "StageSpec", "StartKey", "chainable", "get", "help_lines", "load",
           "names", "node_stages", "pipeline_handoff", "policy_stages", "policy_start_key",
           "register", "resumable", "reward_model_stages", "rl_stages", "shared_stages",
           "unregister"]
