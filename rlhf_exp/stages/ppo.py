"""Stage 3: PPO of the SFT policy against the reward model (DeepSpeed-Chat step 3).

Run: rlhf-exp stage=ppo ppo.actor_init=<sft run dir|artifact> ppo.critic_init=<reward run dir>

Four models, each on its own engine:
  actor      trainable, from `ppo.actor_init` (the SFT policy; null = the base model), LoRA per
             `model.lora`, ZeRO stage `ppo.actor.zero_stage` (null = `zero_stage.stage`)
  reference  frozen copy of the starting policy; the KL penalty is measured against it
  critic     trainable, from `ppo.critic_init` (the reward model; its score head applied at every
             position gives per-token values), LoRA per `ppo.critic_lora`
  reward     frozen, `ppo.reward_model` (null = the critic's starting checkpoint); with
             `ppo.reward_functions` the score is a weighted sum (rlhf_exp/rl/rewards.py), and
             `ppo.reward_model_weight=0` loads no reward model at all
Frozen models are inference-only (engine.build_frozen); `ppo.offload_reference` /
`ppo.offload_reward_model` put them on a ZeRO-3 engine with `offload_param: cpu`, as
DeepSpeed-Chat does. Dropout is off in every model: log-probs and values computed during the
rollout and again during the update must come from the same function.

One step (`ppo.steps` of them), each a function below:
  generate_trajectory  sample `rollout_batch_size` prompts (global; each rank its slice) and a
                       response to each with `ppo.generation` (rlhf_exp/rl/rollout.py, shared with
                       GRPO)
  make_experience      old log-probs (actor), reference log-probs, values (critic), the score;
                       per-token reward = -kl_coef * KL_t plus the clipped (optionally
                       normalised) score at the last response token; GAE; whitened advantages
  ppo_step             `ppo_epochs` passes, `num_minibatches` optimizer steps each, micro-batches
                       of `micro_batch_size_per_device`: clipped policy loss (+ `ptx_coef` * SFT
                       loss on the data_mix's sft share), clipped value loss; stop early once
                       approx KL exceeds `target_approx_kl`
  finish_step          metrics averaged over ranks; the KL controller updated with that global
                       KL (the same coefficient on every rank); the fp32 EMA of the actor
The loop around them is rlhf_exp/rl/rl_loop.py (shared with GRPO): the prompt schedule,
timing, the NaN stop (losses and gradient norms), logging, evals, training checkpoints, the final
policy. Held-out eval (`ppo.eval_every`, and before the first / after the last step): the ppo
share's eval slice, SAMPLED with `ppo.generation` and a fixed seed (evaluation.heldout_eval, which
`stage=eval` and the other RL stages share, so the numbers agree). Step 0 is the starting policy.

Resume: `ppo.save_every=N` writes a training checkpoint every N steps
(rlhf_exp/training/resume.py): the actor's HF checkpoint and DeepSpeed state, the critic's
DeepSpeed state, the fp32 EMA, the KL controller, the running reward statistics, every rank's RNG
and generators. The prompts of step s are a function of s (rollout.PromptSchedule), so `resume=<run
dir>` continues exactly where the run stopped, into the same W&B run. Outputs: checkpoints/step_N
(actor, HF format, `final`), checkpoints/critic, checkpoints/ema; W&B artifacts
<experiment_name>-ppo-model and -ppo-ema-model. The W&B config and summary record the checkpoints
and artifacts the run started from (`inputs`, ppo/*_init*).
"""

from __future__ import annotations

import copy
import time
import types
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlhf_exp.config import ConfigError
from rlhf_exp.data import build_stage_data
from rlhf_exp.data.sampler import GlobalBatchSampler
from rlhf_exp.data.tokenize import collate_sft, tokenize_sft
from rlhf_exp.modeling import models
from rlhf_exp.rl import evaluation, packed_rows, ppo_math, rewards, rl_loop, rl_steps, rollout
from rlhf_exp.rl.rollout import Trajectory
from rlhf_exp.training import checkpoint, dist, engine, resume, runtime, stage_kit
from rlhf_exp.training.tracking import Tracker, resolve_init

FINAL_KEYS = ("ppo/gold_reward", "ppo/reward_score", "ppo/kl", "ppo/kl_coef",
              "ppo/response_length")


# ----------------------------------------------------------------------------- what a run holds
@dataclass
class Inputs:
    """Where the models start from, resolved before anything is written (a reference that
    points nowhere stops the run before a W&B run exists)."""

    actor_init: str
    actor_init_artifact: str | None
    critic_init: str
    critic_init_artifact: str | None
    reward_model: str | None  # None: ppo.reward_model_weight=0, no reward model
    reward_model_artifact: str | None


@dataclass
class Geometry:
    """How one rollout is cut for the update (validate() checked that it divides evenly)."""

    n_local: int  # prompts per rank per step
    minibatch: int  # sequences per rank per optimizer step
    micro: int  # sequences per forward/backward
    grad_accum: int  # micro-batches per optimizer step
    optimizer_steps: int  # over the whole run (the LR schedules' length)
    # packed rows (rl/packed_rows.py) in every forward, of at most this many tokens (an update
    # micro-batch keeps its sequences, in as many packed rows as that takes); None = padded rows
    token_budget: int | None = None


@dataclass
class Models:
    tokenizer: object
    actor: object  # DeepSpeed engine
    reference: object  # frozen module (or ZeRO-3 partitioned)
    critic: object  # DeepSpeed engine; forward -> per-token values [B, T]
    reward_model: object | None  # frozen; None when ppo.reward_model_weight=0
    reward_functions: list[rewards.RewardFunction]
    ema: torch.nn.Module | None  # fp32 shadow of the actor (ppo.ema.enabled)
    actor_stage: int
    critic_stage: int


@dataclass(kw_only=True)
class State(rl_loop.State):
    """Everything besides the engines that changes from step to step (rl_loop.State: the step,
    the generators, the evals); saved for resume."""

    kl_ctl: ppo_math.FixedKLController | ppo_math.AdaptiveKLController
    score_moments: ppo_math.RunningMoments
    ptx: PtxBatches | None


@dataclass
class Experience(rl_loop.Rollout):
    """One rank's rollout (sequences, attention_mask, position_ids, mask) with everything the
    update needs. [n, ...]; R = response columns."""

    old_logprobs: torch.Tensor  # [n, R]
    old_values: torch.Tensor  # [n, R]
    advantages: torch.Tensor  # [n, R]
    returns: torch.Tensor  # [n, R]


class PtxBatches:
    """Micro-batches of the data_mix's SFT share mixed into the actor loss (`ppo.ptx_coef`):
    this rank's slices of a seeded order that cycles over epochs (data.sampler). The number of
    batches drawn is all the state a resumed run needs."""

    def __init__(self, features: list[dict], micro: int, seed: int, pad_id: int) -> None:
        self.features, self.pad_id = features, pad_id
        self.sampler = GlobalBatchSampler(len(features), micro_batch_size=micro, grad_accum=1,
                                          world_size=dist.world_size(), rank=dist.rank(),
                                          seed=seed)
        self.drawn = 0
        self._epoch, self._batches = -1, []

    def next(self) -> dict[str, torch.Tensor]:
        epoch, g = divmod(self.drawn, self.sampler.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.sampler.global_batches(epoch)
        (idx,) = self.sampler.rank_slice(self._batches[g])
        self.drawn += 1
        return collate_sft([self.features[i] for i in idx], self.pad_id)


# ----------------------------------------------------------------------------- set-up steps
def resolve_inputs(cfg: DictConfig) -> Inputs:
    """Paths of the actor, critic and reward-model starting points (path, run dir or artifact)."""
    pc = cfg.ppo

    def start(ref: str | None, fallback: str) -> tuple[str, str | None]:
        if not ref:
            return fallback, None
        path, artifact = resolve_init(ref)
        return str(path), artifact

    actor, actor_art = start(pc.actor_init, models.resolve_base_path(cfg.model))
    critic, critic_art = start(pc.critic_init, models.resolve_reward_base_path(cfg.model))
    rm, rm_art = None, None
    if pc.reward_model_weight > 0:
        rm, rm_art = start(pc.reward_model, critic) if pc.reward_model else (critic, critic_art)
    return Inputs(actor, actor_art, critic, critic_art, rm, rm_art)


def batch_geometry(cfg: DictConfig, world: int, can_pack: bool = True) -> Geometry:
    """The rollout's cut; packed rows when `ppo.packing` and the models can (`can_pack`)."""
    pc = cfg.ppo
    n_local = pc.rollout_batch_size // world
    minibatch = n_local // pc.num_minibatches
    micro = min(pc.micro_batch_size_per_device, minibatch)
    return Geometry(n_local, minibatch, micro, minibatch // micro,
                    pc.steps * pc.ppo_epochs * pc.num_minibatches,
                    pc.micro_batch_tokens if pc.packing and can_pack else None)


def packing_geometry(cfg: DictConfig, world: int, m: Models) -> Geometry:
    """The geometry once the models are loaded: packed rows (`ppo.packing`) unless a model
    cannot take them (flash-attention, an unchecked family): then padded rows, said once."""
    reason = (packed_rows.why_not(m.actor, m.reference, m.critic, m.reward_model)
              if cfg.ppo.packing else None)
    if reason:
        runtime.say(f"ppo: padded rows, not packed: {reason}")
    return batch_geometry(cfg, world, can_pack=reason is None)


def as_value_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make a sequence-classification model's forward return per-token values [B, T] (its score
    head at every position) instead of the pooled score. The values must be the engine forward's
    output: DeepSpeed runs its backward prologue from hooks on that output. Saving is unchanged
    (save_pretrained never calls forward)."""
    hf = model.base_model.model if hasattr(model, "peft_config") else model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **_):
        backbone = getattr(self, self.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False).last_hidden_state
        return self.score(hidden).squeeze(-1).float()  # [B, T]

    hf.forward = types.MethodType(forward, hf)  # peft's forward ends up calling this one
    return model


def load_models(cfg: DictConfig, inputs: Inputs, geo: Geometry,
                reward_functions: list[rewards.RewardFunction]) -> Models:
    """Actor and critic on training engines, reference and reward model frozen, the EMA."""
    pc = cfg.ppo
    tokenizer, actor, actor_stage = rl_loop.load_actor(cfg, "ppo", inputs.actor_init,
                                                       inputs.reward_model)
    critic_stage = cfg.zero_stage.stage if pc.critic.zero_stage is None else pc.critic.zero_stage
    # the EMA is kept in fp32: in bf16, (1 - decay) * step-sized moves round away
    ema = (copy.deepcopy(actor).float().eval().requires_grad_(False)
           .to(dist.device_for(cfg.hardware.device)) if pc.ema.enabled else None)
    reference = rl_loop.frozen(cfg, inputs.actor_init, tokenizer, reward=False,
                               zero_stage=actor_stage, offload=pc.offload_reference)
    critic = models.load_reward_model(inputs.critic_init, tokenizer, cfg.model,
                                      cfg.hardware.precision)
    critic = as_value_model(engine.disable_dropout(
        models.apply_lora(critic, pc.critic_lora, "SEQ_CLS")))
    reward_model = None
    if inputs.reward_model is not None:
        reward_model = rl_loop.frozen(cfg, inputs.reward_model, tokenizer, reward=True,
                                      zero_stage=critic_stage, offload=pc.offload_reward_model)

    def trainable(node, model, stage):
        return stage_kit.build_engine(model, cfg, node, total_steps=geo.optimizer_steps,
                                      micro_batch_size=geo.micro, grad_accum=geo.grad_accum,
                                      zero_stage=stage)

    actor_eng = trainable(pc.actor, actor, actor_stage)
    critic_eng = trainable(pc.critic, critic, critic_stage)
    actor_eng.train()
    critic_eng.train()
    return Models(tokenizer, actor_eng, reference, critic_eng, reward_model, reward_functions,
                  ema, actor_stage, critic_stage)


def build_ptx(cfg: DictConfig, tokenizer, geo: Geometry) -> PtxBatches | None:
    """The SFT micro-batches of `ppo.ptx_coef` (None when it is 0)."""
    if cfg.ppo.ptx_coef <= 0:
        return None
    rows = build_stage_data(cfg.data_mix, "sft", cfg.seed).train
    features, _ = tokenize_sft(rows, tokenizer, cfg.model.prompt_template,
                               cfg.sft.max_prompt_len, cfg.sft.max_len, cfg.data_mix.overlong)
    if len(features) < dist.world_size() * geo.micro:
        raise ConfigError("ppo.ptx_coef > 0 needs SFT examples: the data_mix's sft share is "
                          "empty or smaller than one micro-batch per rank (data_mix.split)")
    return PtxBatches(features, geo.micro, cfg.seed, tokenizer.pad_token_id)


def fresh_state(cfg: DictConfig, ptx: PtxBatches | None) -> State:
    pc = cfg.ppo
    kl_ctl = (ppo_math.AdaptiveKLController(pc.kl.coef, pc.kl.target, pc.kl.horizon)
              if pc.kl.adaptive else ppo_math.FixedKLController(pc.kl.coef))
    return State(kl_ctl=kl_ctl, score_moments=ppo_math.RunningMoments(), ptx=ptx,
                 **rl_loop.seeded_generators(cfg.seed))


def describe(cfg: DictConfig, m: Models, geo: Geometry, inputs: Inputs, prompts: int,
             held_out: int, tracker: Tracker) -> None:
    """The run's shape: one line on the console, the batch sizes and placements in W&B."""
    pc, world = cfg.ppo, dist.world_size()
    runtime.say(f"ppo: {prompts} prompts ({held_out * world} held out), "
                f"{pc.steps} steps x {pc.rollout_batch_size} rollouts; update {pc.ppo_epochs} "
                f"epoch(s) x {pc.num_minibatches} minibatch(es) = micro {geo.micro} x accum "
                f"{geo.grad_accum} x {world} ranks; "
                + (f"packed rows (scoring <= {geo.token_budget} tokens)" if geo.token_budget
                   else "padded rows") + f"; actor zero {m.actor_stage}, critic zero "
                f"{m.critic_stage}; actor {inputs.actor_init}; critic {inputs.critic_init}; "
                f"reward {inputs.reward_model or '-'}"
                + "".join(f" + {f.weight} x {f.spec}" for f in m.reward_functions))
    tracker.summary({"ppo/rollout_batch_size": pc.rollout_batch_size,
                     "ppo/minibatch_size": geo.minibatch * world,
                     "ppo/train_prompts": prompts,
                     "ppo/reference_placement": engine.placement(pc.offload_reference,
                                                                 m.actor_stage),
                     "ppo/reward_model_placement": engine.placement(pc.offload_reward_model,
                                                                    m.critic_stage)
                     if m.reward_model is not None else "none"})


# ----------------------------------------------------------------------------- one step
def generate_trajectory(m: Models, cfg: DictConfig, rows: list[dict],
                        prompt_tokens: list[list[int]], state: State) -> Trajectory:
    """Sample a response to each prompt from the actor (eval mode, no dropout)."""
    synced = m.actor_stage == 3 and dist.world_size() > 1  # every decode step is a collective
    return rollout.sample(m.actor, m.tokenizer, rows, prompt_tokens,
                          evaluation.generation_config(cfg.ppo.generation),
                          generator=state.sample_gen, synced_gpus=synced,
                          device=dist.device_for(cfg.hardware.device))


def rollout_step(m: Models, cfg: DictConfig, geo: Geometry, rows: list[dict],
                 prompt_tokens: list[list[int]], state: State
                 ) -> tuple[Experience, dict[str, float], list[list]]:
    """This rank's prompts of the step: a response to each, then the experience."""
    traj = generate_trajectory(m, cfg, rows, prompt_tokens, state)
    return make_experience(m, cfg, traj, state, geo)


@torch.no_grad()
def critic_values(critic, traj: Trajectory, micro: int, token_budget: int | None = None
                  ) -> torch.Tensor:
    """[n, R] the critic's value of each response position's state (token_budget: on packed
    rows of that many tokens, 0 at padding)."""
    if token_budget is not None:
        return packed_rows.rollout_values(critic, traj, budget=token_budget)
    R, out = traj.response_mask.shape[1], []
    for k in range(0, len(traj.rows), micro):
        s = slice(k, k + micro)
        values = critic(input_ids=traj.sequences[s], attention_mask=traj.attention_mask[s],
                        position_ids=traj.position_ids[s])
        out.append(values[:, -(R + 1):-1].float())
    return torch.cat(out)


@torch.no_grad()
def make_experience(m: Models, cfg: DictConfig, traj: Trajectory, state: State, geo: Geometry
                    ) -> tuple[Experience, dict[str, float], list[list]]:
    """Old log-probs, reference log-probs, values and scores of a trajectory; token rewards,
    GAE advantages and returns. Returns (experience, rollout stats, samples-table rows)."""
    pc, t0 = cfg.ppo, time.perf_counter()
    temp, mask = rl_steps.sampling_temperature(pc.generation), traj.response_mask
    kw = dict(temperature=temp, micro_batch=geo.micro, token_budget=geo.token_budget)
    logp = rollout.logprobs(m.actor, traj, **kw)
    ref_logp = rollout.logprobs(m.reference, traj, **kw)
    values = critic_values(m.critic, traj, geo.micro, geo.token_budget)
    raw_scores, score_stats = rl_steps.score(traj, m.reward_model, m.reward_functions,
                                             pc.reward_model_weight, micro=geo.micro,
                                             stage="ppo", token_budget=geo.token_budget)
    scores = raw_scores
    if pc.normalize_reward:  # running mean/std over every rank's scores so far
        state.score_moments.update(dist.all_gather_cat(raw_scores))
        scores = (raw_scores - state.score_moments.mean) / max(state.score_moments.std, 1e-8)
    kl = ppo_math.kl_per_token(logp, ref_logp, pc.kl.estimator)
    token_rewards = ppo_math.compute_token_rewards(kl, scores, mask, state.kl_ctl.value,
                                                   pc.reward_clip)
    advantages, returns = ppo_math.gae_advantages_and_returns(values, token_rewards, mask,
                                                              pc.gamma, pc.lam)
    if pc.whiten_advantages:
        advantages = ppo_math.masked_whiten(advantages, mask)
    exp = Experience(traj.sequences, traj.attention_mask, traj.position_ids, mask, logp, values,
                     advantages, returns)

    golds, gold_sums = rl_steps.gold_stats(traj.rows, traj.texts)
    seq_kl = ppo_math.masked_sum(kl, mask, dim=-1)
    n = len(traj.rows)
    stats = {
        "ppo/reward_score": raw_scores.mean().item(),
        "ppo/reward_score_std": raw_scores.std().item() if n > 1 else 0.0,
        "ppo/kl": seq_kl.mean().item(),
        "ppo/kl_coef": state.kl_ctl.value,
        "ppo/non_score_reward": (-state.kl_ctl.value * seq_kl).mean().item(),
        "ppo/response_length": mask.sum(-1).mean().item(),
        "ppo/eos_rate": (traj.responses == m.tokenizer.eos_token_id).any(-1).float().mean()
        .item(),
        "ppo/value_explained_var": ppo_math.explained_variance(values, returns, mask),
        "ppo/value_mean": ppo_math.masked_mean(values, mask).item(),
        "ppo/return_mean": ppo_math.masked_mean(returns, mask).item(),
        "perf/gen_s": traj.gen_s,
        "perf/experience_s": time.perf_counter() - t0,
        **score_stats,
        **gold_sums,
    }
    return exp, stats, rl_steps.samples_table(traj.rows, traj.texts, raw_scores, golds)


def actor_forward(actor, b: Experience, packed: packed_rows.PackedRows | None, temp: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, R] log-probs of a micro-batch's responses, their mean entropy (detached)): on
    padded rows, or packed ones."""
    if packed is None:
        logits = rollout.response_logits(actor, b.sequences, b.attention_mask, b.position_ids,
                                         b.mask.shape[1], temp)
        logp = ppo_math.logprobs_from_logits(logits, b.responses)
        with torch.no_grad():
            entropy = ppo_math.masked_mean(ppo_math.entropy_from_logits(logits.detach()),
                                           b.mask)
        return logp, entropy
    logits = packed_rows.response_logits(actor, packed, temp)[None]  # [1, K, V]: real tokens
    logp = packed.scatter(ppo_math.logprobs_from_logits(logits, packed.labels[None])[0])
    with torch.no_grad():
        entropy = ppo_math.entropy_from_logits(logits.detach()).mean()
    return logp, entropy


def ppo_step(m: Models, cfg: DictConfig, exp: Experience, state: State, geo: Geometry
             ) -> dict[str, float]:
    """PPO epochs over one rollout: clipped policy loss (+ ptx) on the actor, clipped value loss
    on the critic. Returns the means of the update's statistics on this rank."""
    pc, device = cfg.ppo, exp.sequences.device
    temp, R = rl_steps.sampling_temperature(pc.generation), exp.mask.shape[1]
    acc: dict[str, list[float]] = defaultdict(list)

    def means(early_stopped: bool) -> dict[str, float]:
        acc["ppo/early_stopped"].append(float(early_stopped))
        return {k: sum(v) / len(v) for k, v in acc.items()}

    for _ in range(pc.ppo_epochs):
        perm = torch.randperm(geo.n_local, generator=state.shuffle_gen).to(device)
        for mb in range(pc.num_minibatches):
            mb_kl = []
            for k in range(mb * geo.minibatch, (mb + 1) * geo.minibatch, geo.micro):
                b = exp.select(perm[k:k + geo.micro])
                packed = (packed_rows.pack(b.sequences, b.attention_mask, b.mask,
                                           row_tokens=geo.token_budget,
                                           dtype=packed_rows.model_dtype(m.actor))
                          if geo.token_budget is not None else None)
                logp, entropy = actor_forward(m.actor, b, packed, temp)
                pg_loss, st = ppo_math.policy_loss(logp, b.old_logprobs, b.advantages, b.mask,
                                                   pc.clip_range)
                loss = pg_loss
                if state.ptx is not None:
                    batch = {key: v.to(device) for key, v in state.ptx.next().items()}
                    ptx_loss = m.actor(**batch).loss
                    loss = pg_loss + pc.ptx_coef * ptx_loss
                    acc["ppo/ptx_loss"].append(ptx_loss.item())
                m.actor.backward(loss)
                m.actor.step()
                if packed is not None:  # the critic's dtype may differ from the actor's
                    values = packed_rows.token_values(m.critic, packed.with_dtype(
                        packed_rows.model_dtype(m.critic)))
                else:
                    values = m.critic(input_ids=b.sequences, attention_mask=b.attention_mask,
                                      position_ids=b.position_ids)[:, -(R + 1):-1].float()
                v_loss, vst = ppo_math.value_loss(values, b.old_values, b.returns, b.mask,
                                                  pc.clip_range_value)
                m.critic.backward(pc.vf_coef * v_loss)
                m.critic.step()
                acc["ppo/actor_loss"].append(pg_loss.item())
                acc["ppo/actor_total_loss"].append(loss.item())
                acc["ppo/critic_loss"].append(v_loss.item())
                acc["ppo/clipfrac"].append(st["clipfrac"].item())
                acc["ppo/approx_kl"].append(st["approx_kl"].item())
                acc["ppo/entropy"].append(entropy.item())
                acc["ppo/vf_clipfrac"].append(vst["vf_clipfrac"].item())
                mb_kl.append(st["approx_kl"].item())
            # early stop on the approx KL of this minibatch, agreed by all ranks
            (approx_kl,) = dist.all_reduce_mean([sum(mb_kl) / len(mb_kl)], device)
            if pc.target_approx_kl is not None and approx_kl > pc.target_approx_kl:
                return means(early_stopped=True)
    return means(early_stopped=False)


@torch.no_grad()
def update_ema(m: Models, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * actor, in fp32 (weights gathered under ZeRO-3)."""
    import deepspeed

    params = list(m.actor.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params) if m.actor_stage == 3 else nullcontext()
    with gather:
        for e, p in zip(m.ema.parameters(), params):
            e.lerp_(p.detach().to(e.device, torch.float32), 1.0 - decay)


def finish_step(m: Models, cfg: DictConfig, state: State, stats: dict[str, float]
                ) -> dict[str, float]:
    """Average the step's statistics over ranks, then update the KL controller with the global
    KL (so every rank holds the same coefficient) and the EMA. (The loop's NaN stop checks the
    averaged losses next.)"""
    stats = rl_steps.reduce_over_ranks(stats, "ppo", dist.device_for(cfg.hardware.device))
    state.kl_ctl.update(stats["ppo/kl"], cfg.ppo.rollout_batch_size)
    if m.ema is not None:
        update_ema(m, cfg.ppo.ema.decay)
    return stats


# ----------------------------------------------------------------------------- checkpoints
def save_training_checkpoint(m: Models, cfg: DictConfig, run_dir: Path, tracker: Tracker,
                             state: State) -> None:
    """Everything `resume=` needs to continue at step state.step + 1 (module docstring)."""
    rl_loop.save_checkpoint(
        cfg, "ppo", run_dir, tracker, m.actor, m.tokenizer, state,
        shared={"kl_ctl": state.kl_ctl.state_dict(),
                "score_moments": state.score_moments.state_dict()},
        local={"ptx_drawn": state.ptx.drawn if state.ptx is not None else 0,
               "kl_coef": state.kl_ctl.value},  # this rank's own (equal on every rank: tested)
        engines={"critic": m.critic},
        files={"ema": m.ema.state_dict()} if m.ema is not None else {})


def load_training_checkpoint(m: Models, state: State, ckpt: Path) -> None:
    resume.load(m.critic, ckpt, name="critic")
    if m.ema is not None:
        m.ema.load_state_dict(resume.load_file(ckpt, "ema"))
    saved = rl_loop.load_checkpoint(m.actor, state, ckpt)  # the RNG last
    state.kl_ctl.load_state_dict(saved["kl_ctl"])
    state.score_moments.load_state_dict(saved["score_moments"])
    if state.ptx is not None:
        state.ptx.drawn = saved["ptx_drawn"]


def save_critic_and_ema(m: Models, cfg: DictConfig, inputs: Inputs, run_dir: Path,
                        tracker: Tracker) -> tuple[Path, Path | None]:
    """Besides the actor (rl_loop.save_result, after these: `final` marks a finished run): the
    critic and the EMA (in the actor's dtype, its own `model` artifact). Returns their
    checkpoints."""
    pc = cfg.ppo
    meta = {"stage": "ppo", "step": pc.steps, **asdict(inputs)}
    critic_ckpt = checkpoint.save_hf(m.critic, m.tokenizer, run_dir / "checkpoints" / "critic",
                                     zero_stage=m.critic.zero_optimization_stage(),
                                     lora_save=pc.critic_lora.save,
                                     metadata={**meta, "model": "critic"})
    ema_ckpt = None
    if m.ema is not None:
        ema_artifact = f"{cfg.experiment_name}-ppo-ema-model"
        dtype = models.torch_dtype(cfg.hardware.precision)
        ema_ckpt = checkpoint.save_hf(
            copy.deepcopy(m.ema).to(dtype), m.tokenizer, run_dir / "checkpoints" / "ema",
            lora_save=cfg.model.lora.save,
            metadata={**meta, "model": "ema", "decay": pc.ema.decay,
                      "artifact": f"{cfg.logger.project}/{ema_artifact}:latest"})
    if cfg.logger.log_checkpoints and ema_ckpt is not None:
        tracker.log_model(ema_ckpt, ema_artifact, aliases=["final", f"step-{pc.steps}"],
                          metadata={**meta, "decay": pc.ema.decay})
    return critic_ckpt, ema_ckpt


def ppo_steps(m: Models, cfg: DictConfig, geo: Geometry, eval_rows: list[dict], run_dir: Path,
              tracker: Tracker) -> rl_loop.Steps:
    """PPO's steps, for the loop (rlhf_exp/rl/rl_loop.py)."""
    return rl_loop.Steps(
        rollout=partial(rollout_step, m, cfg, geo), update=partial(ppo_step, m, cfg, geo=geo),
        finish=lambda stats, state: finish_step(m, cfg, state, stats),
        evaluate=partial(rl_loop.evaluate, cfg, "ppo", m, eval_rows),
        save=partial(save_training_checkpoint, m, cfg, run_dir, tracker),
        load=partial(load_training_checkpoint, m))


# ----------------------------------------------------------------------------- the stage
def train(cfg: DictConfig, run_dir: Path) -> tuple[object, object, runtime.StageResult]:
    """PPO of `ppo.actor_init` with a critic from `ppo.critic_init` (module docstring); returns
    (actor engine, tokenizer, result) so callers and tests can inspect."""
    pc = cfg.ppo
    with stage_kit.begin(cfg, run_dir, "ppo") as run:
        # --- inputs first: bad data, a checkpoint pointing nowhere or a failing reward function
        # stop the run here, before anything is written
        prompts = rl_loop.read_prompts(cfg, "ppo", "rollout_batch_size")
        inputs = resolve_inputs(cfg)
        reward_functions = rewards.load(pc.reward_functions, "ppo.reward_functions",
                                        prompts.train[:4])
        tracker = rl_loop.open_run(run, asdict(inputs))

        # --- models, the step-to-step state
        geo = batch_geometry(cfg, run.world)
        m = load_models(cfg, inputs, geo, reward_functions)
        geo = packing_geometry(cfg, run.world, m)
        state = fresh_state(cfg, build_ptx(cfg, m.tokenizer, geo))
        describe(cfg, m, geo, inputs, len(prompts.train), len(prompts.eval_rows), tracker)

        # --- the loop (rlhf_exp/rl/rl_loop.py) with PPO's steps
        loop = rl_loop.prompt_loop(
            "ppo", cfg, run_dir, m.tokenizer, prompts, pc.rollout_batch_size,
            engines=[m.actor, m.critic], loss_keys=("ppo/actor_loss", "ppo/critic_loss"),
            hint="lower ppo.actor.lr / ppo.critic.lr or check the reward scale",
            postfix={"gold": "ppo/gold_reward", "kl": "ppo/kl", "score": "ppo/reward_score"})
        state = rl_loop.train(loop, ppo_steps(m, cfg, geo, loop.eval_rows, run_dir, tracker),
                              state, tracker, run.resume_from)

        # --- checkpoints (critic, EMA, then the actor marked final), result
        critic_ckpt, ema_ckpt = save_critic_and_ema(m, cfg, inputs, run_dir, tracker)
        result, ckpt = rl_loop.save_result(loop, state, tracker, actor=m.actor,
                                           tokenizer=m.tokenizer, meta=asdict(inputs),
                                           final_keys=FINAL_KEYS)
        gold = rl_loop.gold_change("ppo", state)
        stage_kit.close(run, result, *([f"ppo: done. {gold}, KL "
                                        f"{state.last_stats.get('ppo/kl', 0):.3f}"]
                                       if gold else []),
                        checkpoint_line=f"ppo: checkpoint {ckpt}; critic {critic_ckpt}"
                        + (f"; ema {ema_ckpt}" if ema_ckpt else ""))
    return m.actor, m.tokenizer, result


run = stage_kit.runner("ppo", train)  # the dispatcher's entry point
