"""GRPO: critic-free policy gradient with group baselines (GRPO, RLOO, Dr. GRPO, DAPO, GSPO,
REINFORCE++ options; docs/grpo.md).

Run: rlhf-exp stage=grpo grpo.actor_init=<sft run dir|artifact>            (gold-reward function)
     rlhf-exp stage=grpo grpo.actor_init=<sft> grpo.reward_model=<reward run dir>
     rlhf-exp stage=grpo grpo=rloo grpo.actor_init=<sft>                   (RLOO preset)

Models:
  actor      trainable, from `grpo.actor_init` (the SFT policy; null = the base model), LoRA per
             `model.lora`, ZeRO stage `grpo.actor.zero_stage` (null = `zero_stage.stage`)
  reference  frozen copy of the starting policy, loaded only when `grpo.beta` > 0
  reward     `grpo.reward_model` (frozen, optional) and/or reward functions
  (rlhf_exp/rl/rewards.py);
             `grpo.reward_functions: null` means the task's gold reward when there is no reward
             model, none when there is one
No critic: each completion's advantage is its reward against the other completions of the same
prompt (rlhf_exp/rl/grpo_math.py has the formulas). Dropout is off in every model.

One step (`grpo.steps` of them), each a function below:
  generate_groups   `prompts_per_step` prompts (global; each rank its slice, so a prompt's group
                    stays on one rank), `num_generations` sampled completions of each
                    (rlhf_exp/rl/rollout.py, shared with PPO); with `refill_max_rounds`,
                    refill_groups samples rounds of new prompts until enough groups have a
                    reward spread (DAPO dynamic sampling)
  make_experience   old log-probs (only when the update is not one on-policy pass, or beta > 0),
                    reference log-probs (beta > 0), the scores; the KL folded into the reward
                    (`kl_in_reward`); group baselines and advantages over the global batch
                    (`baseline`, `scale_rewards`) or REINFORCE++'s whitened token returns
                    (`advantage_estimator`), DAPO's overlong shaping (`overlong`), zero-std
                    groups counted and optionally left out
  grpo_step         `num_iterations` passes, `num_minibatches` optimizer steps each, micro-batches
                    of `micro_batch_size_per_device` (`packing`, the default: whole groups on
                    packed rows cut by `micro_batch_tokens`, rl/packed_rows.py; the same loss
                    and gradient): clipped token loss with `epsilon` /
                    `epsilon_high`, + beta * KL (unless in the reward), - entropy_coef * entropy,
                    aggregated by `loss_agg` over the whole minibatch (every rank's tokens)
  finish_step       statistics averaged over ranks
The loop around them is rlhf_exp/rl/rl_loop.py (shared with PPO): the prompt schedule,
timing, the NaN stop (loss and gradient norm), logging, evals, training checkpoints, the final
policy. Held-out eval (`grpo.eval_every`, and before the first / after the last step): the ppo
share's eval slice, sampled with `grpo.generation` and a fixed seed (rl_steps.heldout_eval), the
same numbers `stage=eval` and PPO report for the same policy and settings. Step 0 is the start.

Resume: `grpo.save_every=N` writes a training checkpoint every N steps
(rlhf_exp/training/resume.py): the actor's HF checkpoint and DeepSpeed state, every rank's RNG and
generators. The prompts of step s are a function of s (rollout.PromptSchedule), so `resume=<run
dir>` continues exactly. Outputs: checkpoints/step_N (the policy, HF format, `final`); W&B artifact
<experiment_name>-grpo-model; the config and summary record where the run started from.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_exp import tasks
from rlhf_exp.config import ConfigError
from rlhf_exp.modeling import models
from rlhf_exp.rl import (
    evaluation,
    grpo_math,
    packed_rows,
    ppo_math,
    rewards,
    rl_loop,
    rl_steps,
    rollout,
)
from rlhf_exp.rl.rollout import Trajectory
from rlhf_exp.training import dist, engine, runtime, stage_kit
from rlhf_exp.training.tracking import Tracker, resolve_init

GOLD_FUNCTION = "rlhf_exp.tasks:gold_reward_fn"
FINAL_KEYS = ("grpo/gold_reward", "grpo/reward", "grpo/kl", "grpo/response_length",
              "grpo/frac_zero_std")


# ----------------------------------------------------------------------------- what a run holds
@dataclass
class Inputs:
    """Where the models start from, resolved before anything is written."""

    actor_init: str
    actor_init_artifact: str | None
    reward_model: str | None  # None: no reward model (reward functions only)
    reward_model_artifact: str | None


@dataclass
class Geometry:
    """How one rollout is cut (config.validate checked that it divides evenly)."""

    prompts_local: int  # prompts per rank per step
    n_local: int  # completions per rank per step (prompts_local x num_generations)
    minibatch: int  # completions per rank per optimizer step
    micro: int  # completions per forward/backward
    grad_accum: int  # micro-batches per optimizer step
    optimizer_steps: int  # over the whole run (the LR schedule's length)
    group: int  # num_generations
    shuffle_groups: bool  # minibatches are made of whole groups (minibatch % group == 0)
    prompt_group: int  # rows per prompt in a forward: group (shared_prompt) or 1
    # packed rows (rl/packed_rows.py), micro-batches cut by this many tokens; None = padded rows,
    # `micro` per micro-batch
    token_budget: int | None = None


@dataclass
class Models:
    tokenizer: object
    actor: object  # DeepSpeed engine
    reference: object | None  # frozen; None when grpo.beta == 0
    reward_model: object | None  # frozen; None without grpo.reward_model
    reward_functions: list[rewards.RewardFunction]
    actor_stage: int


class State(rl_loop.State):
    """Everything besides the engine that changes from step to step (rl_loop.State: the step,
    the generators, the evals); saved for resume."""


@dataclass
class Experience(rl_loop.Rollout):
    """One rank's rollout (sequences, attention_mask, position_ids, mask) with what the update
    needs. [n, ...]; R = response columns."""

    old_logprobs: torch.Tensor | None  # [n, R]; None = one on-policy pass (ratio 1)
    ref_logprobs: torch.Tensor | None  # [n, R]; None = no KL term in the loss
    advantages: torch.Tensor  # [n], or [n, R] per token (advantage_estimator=reinforce*)
    keep: torch.Tensor  # [n] float: 0 for a filtered (zero-std) group's completions


# ----------------------------------------------------------------------------- set-up steps
def resolve_inputs(cfg: DictConfig) -> Inputs:
    """Paths of the actor's and reward model's starting points (path, run dir or artifact)."""
    gc = cfg.grpo

    def start(ref: str) -> tuple[str, str | None]:
        path, artifact = resolve_init(ref)
        return str(path), artifact

    if gc.actor_init:
        actor, actor_art = start(gc.actor_init)
    else:
        actor, actor_art = models.resolve_base_path(cfg.model), None
    rm, rm_art = None, None
    if gc.reward_model and gc.reward_model_weight > 0:
        rm, rm_art = start(gc.reward_model)
    return Inputs(actor, actor_art, rm, rm_art)


def reward_function_nodes(cfg: DictConfig) -> list:
    """The reward functions this run uses: `grpo.reward_functions`, or when it is null the
    task's gold reward without a reward model and none with one."""
    gc = cfg.grpo
    if gc.reward_functions is not None:
        return list(gc.reward_functions)
    if gc.reward_model and gc.reward_model_weight > 0:
        return []
    return [OmegaConf.create({"fn": GOLD_FUNCTION, "weight": 1.0})]


def check_default_reward_fits(cfg: DictConfig, rows: list[dict]) -> None:
    """The default reward (the gold function) needs rows with a gold reward: one line if the
    data_mix has none, before its traceback-free but less helpful RewardFunctionError."""
    if cfg.grpo.reward_functions is not None or cfg.grpo.reward_model:
        return
    if any(tasks.gold_reward(r.get("task"), r["prompt"], "") is None for r in rows):
        raise ConfigError("grpo: no reward for this data_mix: the default reward is the task's "
                          "gold reward (rlhf_exp.tasks:gold_reward_fn), and its rows have none "
                          "(their source sets no `task`); set grpo.reward_model=<reward run dir> "
                          "or grpo.reward_functions=[{fn: package.module:function, weight: 1.0}]")


def batch_geometry(cfg: DictConfig, world: int, can_pack: bool = True) -> Geometry:
    """The rollout's cut; packed rows when `grpo.packing` and the models can (`can_pack`)."""
    gc = cfg.grpo
    prompts_local = gc.prompts_per_step // world
    n_local = prompts_local * gc.num_generations
    minibatch = n_local // gc.num_minibatches
    micro = min(gc.micro_batch_size_per_device, minibatch)
    G = gc.num_generations
    shared = gc.shared_prompt and micro % G == 0 and not cfg.model.gradient_checkpointing
    packed = gc.packing and can_pack
    if packed:  # a packed micro-batch holds whole groups whenever minibatches do
        shared = gc.shared_prompt and minibatch % G == 0
    return Geometry(prompts_local, n_local, minibatch, micro, minibatch // micro,
                    gc.steps * gc.num_iterations * gc.num_minibatches, G, minibatch % G == 0,
                    G if shared else 1, gc.micro_batch_tokens if packed else None)


def packing_geometry(cfg: DictConfig, world: int, m: Models) -> Geometry:
    """The geometry once the models are loaded: packed rows (`grpo.packing`) unless a model
    cannot take them (flash-attention, an unchecked family): then padded rows, said once."""
    reason = (packed_rows.why_not(m.actor, m.reference, m.reward_model) if cfg.grpo.packing
              else None)
    if reason:
        runtime.say(f"grpo: padded rows, not packed: {reason}")
    return batch_geometry(cfg, world, can_pack=reason is None)


def load_models(cfg: DictConfig, inputs: Inputs, geo: Geometry,
                reward_functions: list[rewards.RewardFunction]) -> Models:
    """The actor on a training engine; the reference (beta > 0) and reward model frozen."""
    gc = cfg.grpo
    tokenizer, actor, actor_stage = rl_loop.load_actor(cfg, "grpo", inputs.actor_init,
                                                       inputs.reward_model)
    reference = (rl_loop.frozen(cfg, inputs.actor_init, tokenizer, reward=False,
                                zero_stage=actor_stage, offload=gc.offload_reference)
                 if gc.beta > 0 else None)
    reward_model = None
    if inputs.reward_model is not None:
        reward_model = rl_loop.frozen(cfg, inputs.reward_model, tokenizer, reward=True,
                                      zero_stage=actor_stage, offload=gc.offload_reward_model)
    actor_eng = stage_kit.build_engine(actor, cfg, gc.actor, total_steps=geo.optimizer_steps,
                                       micro_batch_size=geo.micro, grad_accum=geo.grad_accum,
                                       zero_stage=actor_stage)
    actor_eng.train()
    return Models(tokenizer, actor_eng, reference, reward_model, reward_functions, actor_stage)


def fresh_state(cfg: DictConfig) -> State:
    return State(**rl_loop.seeded_generators(cfg.seed))


def describe(cfg: DictConfig, m: Models, geo: Geometry, inputs: Inputs, prompts: int,
             held_out: int, tracker: Tracker) -> None:
    """The run's shape: one line on the console, the batch sizes and placements in W&B."""
    gc, world = cfg.grpo, dist.world_size()
    completions = gc.prompts_per_step * gc.num_generations
    runtime.say(f"grpo: {prompts} prompts ({held_out * world} held out), "
                f"{gc.steps} steps x {gc.prompts_per_step} prompts x {gc.num_generations} "
                f"completions = {completions}; update {gc.num_iterations} pass(es) x "
                f"{gc.num_minibatches} minibatch(es) = micro {geo.micro} x accum "
                f"{geo.grad_accum} x {world} ranks; baseline {gc.baseline}, scale_rewards "
                f"{gc.scale_rewards}, loss_agg {gc.loss_agg}, beta {gc.beta}, advantages "
                f"{gc.advantage_estimator}, ratio per {gc.importance_sampling_level}, refill "
                f"{gc.refill_max_rounds} rounds, overlong {gc.overlong}; "
                + (f"packed rows <= {geo.token_budget} tokens" if geo.token_budget else
                   "padded rows") + "; actor zero "
                f"{m.actor_stage}; actor {inputs.actor_init}; reward "
                f"{inputs.reward_model or '-'}"
                + "".join(f" + {f.weight} x {f.spec}" for f in m.reward_functions))
    tracker.summary({"grpo/prompts_per_step": gc.prompts_per_step,
                     "grpo/completions_per_step": completions,
                     "grpo/minibatch_size": geo.minibatch * world,
                     "grpo/train_prompts": prompts,
                     "grpo/reference_placement": engine.placement(gc.offload_reference,
                                                                  m.actor_stage)
                     if m.reference is not None else "none",
                     "grpo/reward_model_placement": engine.placement(gc.offload_reward_model,
                                                                     m.actor_stage)
                     if m.reward_model is not None else "none"})


# ----------------------------------------------------------------------------- one step
def generate_groups(m: Models, cfg: DictConfig, rows: list[dict],
                    prompt_tokens: list[list[int]], state: State) -> Trajectory:
    """`num_generations` sampled completions of each prompt, group by group (rows g*G .. g*G+G-1
    answer prompt g), from the actor in eval mode."""
    G = cfg.grpo.num_generations
    synced = m.actor_stage == 3 and dist.world_size() > 1  # every decode step is a collective
    return rollout.sample(m.actor, m.tokenizer, [r for r in rows for _ in range(G)],
                          [p for p in prompt_tokens for _ in range(G)],
                          evaluation.generation_config(cfg.grpo.generation),
                          generator=state.sample_gen, synced_gpus=synced,
                          device=dist.device_for(cfg.hardware.device),
                          group_size=G if cfg.grpo.shared_prompt else 1)


def kl_estimator(cfg: DictConfig) -> str:
    """`grpo.kl_estimator`, or by default k3 as a loss term and k1 in the reward: as a reward,
    only k1's score-function gradient is the KL's gradient (k3 there pushes the policy away
    from the reference wherever it is below it); as a loss term k1's gradient is zero in
    expectation, k3's is the KL's."""
    gc = cfg.grpo
    return gc.kl_estimator or ("k1" if gc.kl_in_reward else "k3")


def needs_old_logprobs(cfg: DictConfig) -> bool:
    """One pass in one optimizer step is on-policy (the ratio is exactly 1, its gradient that
    of log pi), so the old log-probs are the update's own, detached: one forward saved. More
    passes or minibatches need them; so does any KL (measured at the rollout)."""
    gc = cfg.grpo
    return gc.num_iterations > 1 or gc.num_minibatches > 1 or gc.beta > 0


def shaped_scores(cfg: DictConfig, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The scores the advantages (and the refill's spread) see: with DAPO's soft overlong
    penalty when `overlong: soft` (lengths count the EOS)."""
    gc = cfg.grpo
    if gc.overlong != "soft":
        return scores
    return scores + grpo_math.soft_overlong_penalty(
        mask.sum(-1), gc.generation.max_new_tokens, gc.overlong_buffer, gc.overlong_penalty)


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` summed (the same on every rank)."""
    return dist.all_gather_cat(t.reshape(1, -1)).sum(0).reshape(t.shape)


def advantages_and_keep(cfg: DictConfig, scores: torch.Tensor, mask: torch.Tensor,
                        old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                        seq_kl: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's advantages ([n] per sequence, or [n, R] per token for REINFORCE++) and keep
    weights, the global zero-spread groups and the global rewards they are judged on.
    `advantage_estimator=group`: the group baseline over the global batch (this rank's rows are
    a contiguous slice of it; groups never span ranks), the KL folded into the sequence reward
    with `kl_in_reward`. reinforce(_baseline): token returns with the KL per token in the reward
    (`kl_in_reward`), whitened over every rank's tokens (grpo_math.reinforce_advantages)."""
    gc = cfg.grpo
    G, n, rank = gc.num_generations, len(scores), dist.rank()
    group_kl = gc.kl_in_reward and gc.advantage_estimator == "group" and seq_kl is not None
    rewards_ = scores - gc.beta * seq_kl if group_kl else scores
    all_rewards = dist.all_gather_cat(rewards_)
    if gc.advantage_estimator == "group":
        advantages = grpo_math.group_advantages(all_rewards, G, baseline=gc.baseline,
                                                scale_rewards=gc.scale_rewards
                                                )[rank * n:(rank + 1) * n]
    else:
        token_kl = (ppo_math.kl_per_token(old_logp, ref_logp, kl_estimator(cfg))
                    if gc.kl_in_reward and ref_logp is not None else None)
        advantages = grpo_math.reinforce_advantages(
            rewards_, mask, G, baseline=gc.advantage_estimator == "reinforce_baseline",
            kl=token_kl, beta=gc.beta, all_reduce_sum=_sum_over_ranks)
    zero_std = grpo_math.zero_std_groups(all_rewards, G)  # [global groups]
    local_zero = zero_std[rank * (n // G):(rank + 1) * (n // G)].repeat_interleave(G)
    keep = (~local_zero).float() if gc.filter_zero_std else torch.ones(n, device=scores.device)
    return advantages, keep, zero_std, all_rewards


@torch.no_grad()
def make_experience(m: Models, cfg: DictConfig, traj: Trajectory, geo: Geometry
                    ) -> tuple[Experience, dict[str, float], list[list]]:
    """Log-probs, scores, KL, group advantages of a rollout. Returns (experience, rollout stats,
    samples-table rows). Advantages are computed on every rank's rewards (all-gathered) so that
    `scale_rewards=batch` is over the global batch; groups never span ranks."""
    gc, t0 = cfg.grpo, time.perf_counter()
    traj = rollout.trim_responses(traj)  # every forward below skips all-padding columns
    temp, mask = rl_steps.sampling_temperature(gc.generation), traj.response_mask
    kw = dict(temperature=temp, micro_batch=geo.micro, group_size=geo.prompt_group,
              token_budget=geo.token_budget)
    old_logp = rollout.logprobs(m.actor, traj, **kw) if needs_old_logprobs(cfg) else None
    ref_logp = rollout.logprobs(m.reference, traj, **kw) if m.reference is not None else None
    scores, score_stats = rl_steps.score(traj, m.reward_model, m.reward_functions,
                                         gc.reward_model_weight, micro=geo.micro, stage="grpo",
                                         token_budget=geo.token_budget)
    seq_kl = (evaluation.sequence_kl(old_logp, ref_logp, mask, kl_estimator(cfg))
              if ref_logp is not None else None)  # [n] KL(policy || reference) per response
    eos = (traj.responses == m.tokenizer.eos_token_id).any(-1)
    shaped = shaped_scores(cfg, scores, mask)
    advantages, keep, zero_std, all_rewards = advantages_and_keep(
        cfg, shaped, mask, old_logp, ref_logp, seq_kl)
    if gc.overlong == "mask":  # truncated answers (no EOS within max_new_tokens) out of the loss
        keep = keep * eos.float()
    exp = Experience(traj.sequences, traj.attention_mask, traj.position_ids, mask, old_logp,
                     None if gc.kl_in_reward else ref_logp, advantages, keep)

    G, all_scores = gc.num_generations, dist.all_gather_cat(scores)
    golds, gold_sums = rl_steps.gold_stats(traj.rows, traj.texts)
    stats = {
        "grpo/reward": all_scores.mean().item(),
        "grpo/reward_std": all_scores.std().item() if len(all_scores) > 1 else 0.0,
        "grpo/group_reward_std": grpo_math.group_view(all_rewards, G).std(-1).mean().item(),
        "grpo/frac_zero_std": zero_std.float().mean().item(),
        "grpo/advantage_abs": (advantages.abs().mean() if advantages.ndim == 1 else
                               ppo_math.masked_mean(advantages.abs(), mask)).item(),
        "grpo/response_length": mask.sum(-1).mean().item(),
        "grpo/eos_rate": eos.float().mean().item(),
        "perf/gen_s": traj.gen_s,
        "perf/experience_s": time.perf_counter() - t0,
        **score_stats,
        **gold_sums,
    }
    if gc.overlong == "soft":
        stats["grpo/overlong_penalty"] = (shaped - scores).mean().item()
    if seq_kl is not None:
        stats["grpo/kl"] = seq_kl.mean().item()
        stats["grpo/non_score_reward"] = (-gc.beta * seq_kl).mean().item()
    return exp, stats, rl_steps.samples_table(traj.rows, traj.texts, scores, golds)


@dataclass
class Refill:
    """Where DAPO's dynamic sampling takes the prompts of a step's extra rounds: round k of step
    s samples step s of its own PromptSchedule (seeded apart from the main one), so the prompts
    are a function of (s, k) and a resumed run refills exactly as an uninterrupted one."""

    prompts: list[dict]
    prompt_tokens: list[list[int]]
    schedules: list[rollout.PromptSchedule]  # one per extra round


def refill_schedules(cfg: DictConfig, prompts: list[dict], prompt_tokens: list[list[int]]
                     ) -> Refill:
    gc = cfg.grpo
    return Refill(prompts, prompt_tokens, [
        rollout.PromptSchedule(len(prompts), gc.prompts_per_step,
                               seed=cfg.seed + 1_000_003 * (k + 1), rank=dist.rank(),
                               world=dist.world_size())
        for k in range(gc.refill_max_rounds)])


def _widen(x: torch.Tensor, left: int, right: int, fill: float) -> torch.Tensor:
    """[n, c] -> [n, left + c + right], the new columns `fill`."""
    return torch.cat([x.new_full((len(x), left), fill), x, x.new_full((len(x), right), fill)], 1)


def concat_groups(picks: list[tuple[Trajectory, int]], group: int, pad_id: int) -> Trajectory:
    """One trajectory of the groups `picks` ((trajectory, group index) pairs, from rounds of
    different widths): prompts left-padded and responses right-padded to the widest, padding
    out of the attention, so every real token keeps its position and its logits."""
    P = max(t.sequences.shape[1] - t.response_mask.shape[1] for t, _ in picks)
    R = max(t.response_mask.shape[1] for t, _ in picks)
    seqs, attns, masks, rows, texts = [], [], [], [], []
    for t, g in picks:
        s, r = slice(g * group, (g + 1) * group), t.response_mask.shape[1]
        left, right = P - (t.sequences.shape[1] - r), R - r
        seqs.append(_widen(t.sequences[s], left, right, pad_id))
        attns.append(_widen(t.attention_mask[s], left, right, 0))
        masks.append(_widen(t.response_mask[s], 0, right, 0))
        rows += t.rows[s]
        texts += t.texts[s]
    attn = torch.cat(attns)
    gen_s = sum({id(t): t.gen_s for t, _ in picks}.values())
    return Trajectory(rows=rows, sequences=torch.cat(seqs), attention_mask=attn,
                      position_ids=(attn.cumsum(-1) - 1).clamp_min(0),
                      response_mask=torch.cat(masks), texts=texts, gen_s=gen_s)


def refill_groups(m: Models, cfg: DictConfig, geo: Geometry, refill: Refill, rows: list[dict],
                  prompt_tokens: list[list[int]], state: State
                  ) -> tuple[Trajectory, dict[str, float]]:
    """DAPO dynamic sampling (Yu et al. 2025; verl `filter_groups`, OpenRLHF
    `--dynamic_filtering`): sample the step's groups, then rounds of new prompts
    (`refill`) until this rank holds `prompts_local` groups whose scores differ, at most
    `refill_max_rounds` extra rounds. Every rank runs the same rounds (the stop is decided on
    every rank's count), so generation and the collectives after stay in lockstep. Short after
    the last round: zero-spread groups fill the batch (filter_zero_std leaves them out)."""
    gc, G, step, world = cfg.grpo, cfg.grpo.num_generations, state.step + 1, dist.world_size()
    spread: list[tuple[Trajectory, int]] = []
    tied: list[tuple[Trajectory, int]] = []
    rounds = 0
    for rounds in range(gc.refill_max_rounds + 1):
        if rounds > 0:
            idx = refill.schedules[rounds - 1].indices(step)
            rows = [refill.prompts[i] for i in idx]
            prompt_tokens = [refill.prompt_tokens[i] for i in idx]
        traj = generate_groups(m, cfg, rows, prompt_tokens, state)
        scores, _ = rl_steps.score(traj, m.reward_model, m.reward_functions,
                                   gc.reward_model_weight, micro=geo.micro, stage="grpo")
        shaped = shaped_scores(cfg, scores, traj.response_mask)
        for g, zero in enumerate(grpo_math.zero_std_groups(shaped, G).tolist()):
            (tied if zero else spread).append((traj, g))
        short = torch.tensor([float(max(geo.prompts_local - len(spread), 0))])
        if dist.all_gather_cat(short.to(scores.device)).max().item() == 0:
            break  # every rank is full
    picks = spread[:geo.prompts_local]
    picks += tied[:geo.prompts_local - len(picks)]
    # per-rank counts times the ranks: averaged over ranks (finish_step), the global counts
    stats = {"grpo/refill_rounds": float(rounds),
             "grpo/groups_generated": float(len(spread) + len(tied)) * world,
             "grpo/groups_dropped": float(len(tied) - (len(picks) - min(len(spread),
                                                                         len(picks)))) * world,
             "grpo/groups_short": float(geo.prompts_local - min(len(spread),
                                                                geo.prompts_local)) * world}
    return concat_groups(picks, G, m.tokenizer.pad_token_id), stats


def rollout_step(m: Models, cfg: DictConfig, geo: Geometry, refill: Refill | None,
                 rows: list[dict], prompt_tokens: list[list[int]], state: State
                 ) -> tuple[Experience, dict[str, float], list[list]]:
    """This rank's prompts of the step: their groups of completions (refilled with new prompts'
    groups while too few have a reward spread, `refill_max_rounds`), then the experience."""
    if refill is None:
        return make_experience(m, cfg, generate_groups(m, cfg, rows, prompt_tokens, state), geo)
    traj, refill_stats = refill_groups(m, cfg, geo, refill, rows, prompt_tokens, state)
    exp, stats, table = make_experience(m, cfg, traj, geo)
    return exp, {**stats, **refill_stats}, table


def minibatch_totals(exp: Experience, idx: torch.Tensor, device: torch.device
                     ) -> tuple[float, float]:
    """(real tokens, sequences) of one minibatch over every rank: the loss normalisers of
    `loss_agg` (filtered groups count for nothing)."""
    mask = exp.mask[idx] * exp.keep[idx, None]
    local = [float(mask.sum()), float((mask.sum(-1) > 0).sum())]
    world = dist.world_size()
    return tuple(v * world for v in dist.all_reduce_mean(local, device))


def micro_batches(exp: Experience, rows: torch.Tensor, geo: Geometry) -> list[torch.Tensor]:
    """A minibatch's micro-batches (its row indices, in order): `micro` rows each, or packed:
    whole prompt groups cut by `micro_batch_tokens`, as many on every rank (the most any rank
    needs: ZeRO reduces gradients in every backward, so the ranks' passes must pair up)."""
    if geo.token_budget is None:
        return [rows[k:k + geo.micro] for k in range(0, len(rows), geo.micro)]
    G = geo.prompt_group
    costs = packed_rows.packed_length(exp.attention_mask[rows], exp.mask[rows], G)
    plan = packed_rows.plan_micro_batches(costs, geo.token_budget)
    count = int(dist.all_gather_cat(torch.tensor([len(plan)], device=rows.device)).max())
    return [rows[r.start * G:r.stop * G] for r in packed_rows.split_to(plan, costs, count)]


def update_forward(m: Models, geo: Geometry, b: Experience, temp: float, entropy_grad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, R] log-probs and entropies of a micro-batch's responses under the actor (the
    entropy's gradient only for an entropy bonus): packed, or padded rows."""
    if geo.token_budget is not None:
        packed = packed_rows.pack(b.sequences, b.attention_mask, b.mask,
                                  group_size=geo.prompt_group, row_tokens=geo.token_budget,
                                  dtype=packed_rows.model_dtype(m.actor))
        return packed_rows.logprobs_and_entropy(m.actor, packed, temp,
                                                entropy="grad" if entropy_grad else "detached")
    R = b.mask.shape[1]
    if geo.prompt_group > 1:
        logits = rollout.group_response_logits(m.actor, b.sequences, b.attention_mask,
                                               b.position_ids, R, geo.prompt_group, temp)
    else:
        logits = rollout.response_logits(m.actor, b.sequences, b.attention_mask,
                                         b.position_ids, R, temp)
    logp = ppo_math.logprobs_from_logits(logits, b.responses)
    return logp, ppo_math.entropy_from_logits(logits if entropy_grad else logits.detach())


def grpo_step(m: Models, cfg: DictConfig, exp: Experience, state: State, geo: Geometry
              ) -> dict[str, float]:
    """`num_iterations` passes over one rollout, `num_minibatches` optimizer steps each.
    Returns the means of the update's statistics on this rank.

    DeepSpeed divides each micro-batch's loss by the accumulation steps and averages gradients
    over ranks; the loss handed to it is scaled by both, so the step's gradient is exactly that
    of `loss_agg` over the whole minibatch (grpo_math). Packed, the micro-batches of a minibatch
    vary in number: the accumulation boundary is set by hand (the last one) and the loss is
    scaled by the ranks alone; the gradient is the same sum over the same tokens."""
    gc, device = cfg.grpo, exp.sequences.device
    temp, world = rl_steps.sampling_temperature(gc.generation), dist.world_size()
    max_new = gc.generation.max_new_tokens
    packed = geo.token_budget is not None
    scale = world if packed else world * geo.grad_accum  # undo DeepSpeed's averaging (docstring)
    acc: dict[str, list[float]] = defaultdict(list)
    for _ in range(gc.num_iterations):
        if geo.shuffle_groups:  # whole groups stay together (and may share their prompt)
            groups = torch.randperm(geo.n_local // geo.group, generator=state.shuffle_gen)
            perm = (groups[:, None] * geo.group + torch.arange(geo.group)).flatten().to(device)
        else:
            perm = torch.randperm(geo.n_local, generator=state.shuffle_gen).to(device)
        for mb in range(gc.num_minibatches):
            rows = perm[mb * geo.minibatch:(mb + 1) * geo.minibatch]
            tokens, sequences = minibatch_totals(exp, rows, device)
            if sequences == 0:  # every group filtered, on every rank: no step at all
                acc["grpo/skipped_minibatches"].append(1.0)
                continue
            acc["grpo/skipped_minibatches"].append(0.0)
            micros, mb_loss, mb_pg = micro_batches(exp, rows, geo), 0.0, 0.0
            for j, idx in enumerate(micros):
                b = exp.select(idx)
                if packed:
                    m.actor.set_gradient_accumulation_boundary(j == len(micros) - 1)
                logp, entropy = update_forward(m, geo, b, temp, gc.entropy_coef > 0)
                loss, st = grpo_math.grpo_loss(
                    logp, b.old_logprobs if b.old_logprobs is not None else logp.detach(),
                    b.advantages, b.mask * b.keep[:, None], epsilon=gc.epsilon,
                    epsilon_high=gc.epsilon_high, loss_agg=gc.loss_agg, max_new_tokens=max_new,
                    ref_logprobs=b.ref_logprobs, beta=gc.beta, kl_estimator=kl_estimator(cfg),
                    entropy=entropy, entropy_coef=gc.entropy_coef, total_tokens=tokens,
                    total_sequences=sequences,
                    importance_sampling_level=gc.importance_sampling_level)
                m.actor.backward(loss * scale, scale_wrt_gas=not packed)
                m.actor.step()
                # the minibatch's loss on this rank x ranks (the mean over ranks is the loss)
                mb_loss += loss.item() * world
                mb_pg += st["pg_loss"].item() * world
                for key in ("clipfrac", "clipfrac_low", "clipfrac_high", "approx_kl"):
                    acc[f"grpo/{key}"].append(st[key].item())
                acc["grpo/entropy"].append(
                    ppo_math.masked_mean(entropy.detach(), b.mask).item())
            acc["grpo/loss"].append(mb_loss)
            acc["grpo/pg_loss"].append(mb_pg)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def finish_step(cfg: DictConfig, stats: dict[str, float], state: State
                ) -> dict[str, float]:
    """Average the step's statistics over ranks (the loop's NaN stop checks them next)."""
    return rl_steps.reduce_over_ranks(stats, "grpo", dist.device_for(cfg.hardware.device))


def grpo_steps(m: Models, cfg: DictConfig, geo: Geometry, eval_rows: list[dict],
               run_dir: Path, tracker: Tracker, refill: Refill | None = None) -> rl_loop.Steps:
    """GRPO's steps, for the loop (rlhf_exp/rl/rl_loop.py)."""
    return rl_loop.Steps(
        rollout=partial(rollout_step, m, cfg, geo, refill),
        update=partial(grpo_step, m, cfg, geo=geo),
        finish=partial(finish_step, cfg), evaluate=partial(rl_loop.evaluate, cfg, "grpo", m,
                                                           eval_rows),
        # the checkpoint holds the actor and the loop's state: nothing of GRPO's own
        save=partial(rl_loop.save_checkpoint, cfg, "grpo", run_dir, tracker, m.actor,
                     m.tokenizer),
        load=lambda state, ckpt: rl_loop.load_checkpoint(m.actor, state, ckpt))


# ----------------------------------------------------------------------------- the stage
def train(cfg: DictConfig, run_dir: Path) -> tuple[object, object, runtime.StageResult]:
    """GRPO of `grpo.actor_init` against its reward (module docstring); returns (actor engine,
    tokenizer, result) so callers and tests can inspect."""
    gc = cfg.grpo
    with stage_kit.begin(cfg, run_dir, "grpo") as run:
        # --- inputs first: too few prompts, a start that points nowhere, data without a gold
        # reward or a failing reward function stop the run before anything is written
        prompts = rl_loop.read_prompts(cfg, "grpo", "prompts_per_step")
        inputs = resolve_inputs(cfg)
        check_default_reward_fits(cfg, prompts.train[:4])
        reward_functions = rewards.load(reward_function_nodes(cfg), "grpo.reward_functions",
                                        prompts.train[:4])
        tracker = rl_loop.open_run(run, asdict(inputs))

        # --- models, the step-to-step state
        geo = batch_geometry(cfg, run.world)
        m = load_models(cfg, inputs, geo, reward_functions)
        geo = packing_geometry(cfg, run.world, m)
        state = fresh_state(cfg)
        describe(cfg, m, geo, inputs, len(prompts.train), len(prompts.eval_rows), tracker)

        # --- the loop (rlhf_exp/rl/rl_loop.py) with GRPO's steps
        loop = rl_loop.prompt_loop(
            "grpo", cfg, run_dir, m.tokenizer, prompts, gc.prompts_per_step, engines=[m.actor],
            loss_keys=("grpo/loss",),
            hint="lower grpo.actor.lr or check the reward scale",
            postfix={"gold": "grpo/gold_reward", "reward": "grpo/reward",
                     "zero_std": "grpo/frac_zero_std"})
        refill = (refill_schedules(cfg, loop.prompts, loop.prompt_tokens)
                  if gc.refill_max_rounds > 0 else None)
        state = rl_loop.train(loop, grpo_steps(m, cfg, geo, loop.eval_rows, run_dir, tracker,
                                               refill), state, tracker, run.resume_from)

        # --- checkpoint, result
        result, _ = rl_loop.save_result(loop, state, tracker, actor=m.actor,
                                        tokenizer=m.tokenizer, meta=asdict(inputs),
                                        final_keys=FINAL_KEYS)
        gold = rl_loop.gold_change("grpo", state)
        stage_kit.close(run, result, *([f"grpo: done. {gold}"] if gold else []))
    return m.actor, m.tokenizer, result


run = stage_kit.runner("grpo", train)  # the dispatcher's entry point
