"""Stage 3: PPO of the SFT policy against the reward model (DeepSpeed-Chat step 3).

Run: rlhf-exp stage=ppo ppo.actor_init=<sft run dir|artifact> ppo.critic_init=<reward run dir>

Four models, each on its own engine:
  actor      trainable, from `ppo.actor_init` (the SFT policy; null = the base model), LoRA per
             `model.lora`, ZeRO stage `ppo.actor.zero_stage` (null = `zero_stage.stage`)
  reference  frozen copy of the starting policy; the KL penalty is measured against it
  critic     trainable, from `ppo.critic_init` (the reward model; its score head applied at every
             position gives per-token values), LoRA per `ppo.critic_lora`
  reward     frozen, `ppo.reward_model` (null = the critic's starting checkpoint)
Frozen models are inference-only (engine.build_eval_engine); `ppo.offload_reference` /
`ppo.offload_reward_model` put them on a ZeRO-3 engine with `offload_param: cpu`, as
DeepSpeed-Chat does. Dropout is switched off in every model: log-probs and values computed during
the rollout and again during the update must come from the same function.

One step (`ppo.steps` of them):
  1. rollout     sample `rollout_batch_size` prompts (global; each rank its slice), generate
                 with `ppo.generation` (left-padded prompts, stop at EOS, EOS != pad)
  2. experience  old log-probs (actor), reference log-probs, values (critic), score (reward model
                 at the last real token); per-token reward = -kl_coef * KL_t, plus the clipped
                 (optionally normalised) score at the last response token; GAE; whitened advantages
  3. update      `ppo_epochs` passes, `num_minibatches` optimizer steps each, micro-batches of
                 `micro_batch_size_per_device`: clipped policy loss (+ `ptx_coef` * SFT loss on the
                 data_mix's sft share), clipped value loss; stop early once approx KL exceeds
                 `target_approx_kl`
  4. KL controller update (fixed or adaptive), EMA of the actor (`ppo.ema`)
Held-out eval (`ppo.eval_every`, and before the first / after the last step): the ppo share's
eval slice, SAMPLED with `ppo.generation` and a fixed seed (rlhf_exp/evaluation.py, which
`stage=eval` shares, so the numbers agree). Step 0 is the starting (SFT) policy.

Outputs: checkpoints/step_N (actor, HF format, `final`), checkpoints/critic, checkpoints/ema;
W&B artifacts <experiment_name>-ppo-model and -ppo-ema-model. The W&B config and summary record
the checkpoints and artifacts the run started from (`inputs`, ppo/*_init*).
"""

from __future__ import annotations

import copy
import time
import types
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from omegaconf import DictConfig

from rlhf_exp import checkpoint, dist, engine, evaluation, models, ppo_math, runtime, tasks
from rlhf_exp.config import ConfigError
from rlhf_exp.data import build_stage_data
from rlhf_exp.data.tokenize import collate_sft, pad_left, prompt_ids, tokenize_sft
from rlhf_exp.generation import generate
from rlhf_exp.scoring import token_values
from rlhf_exp.tracking import Tracker, resolve_init

TABLE_ROWS = 16  # rows of the periodic W&B samples table


# ----------------------------------------------------------------------------- model helpers
def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off for good, also in train mode: nn.Dropout modules (LoRA's included) get p=0,
    and float `*dropout*` attributes (attention dropout read at forward time, e.g. Llama's
    `attention_dropout`, OPT's `dropout`) are set to 0. Gradient checkpointing needs train mode,
    so eval() alone would not do."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


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


def frozen(model: torch.nn.Module, cfg: DictConfig, zero_stage: int, offload: bool):
    """An inference-only model; offload = ZeRO-3 with parameters offloaded to CPU."""
    disable_dropout(model)
    if not offload:
        return engine.build_eval_engine(model, cfg, zero_stage=zero_stage)
    off = copy.deepcopy(cfg)
    off.zero_stage.offload_param = "cpu"
    off.zero_stage.stage3_param_persistence_threshold = 0  # keep no weight resident
    return engine.build_eval_engine(model, off, zero_stage=3)


def response_logits(model, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor,
                    response_len: int, temperature: float = 1.0) -> torch.Tensor:
    """[B, R, V] logits predicting each response token (those at positions P-1 .. P+R-2),
    divided by the sampling temperature: the log-probs are then those of the policy that
    sampled the rollout, so the PPO ratio and the KL are on-policy for any temperature."""
    out = model(input_ids=seq, attention_mask=attn, position_ids=pos,
                logits_to_keep=response_len + 1).logits
    return out[:, -(response_len + 1):-1] / temperature


def gather_all(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's (equal-shaped) tensor."""
    if dist.world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.world_size())]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def heldout_shard(cfg: DictConfig, rank: int, world: int) -> list[dict]:
    """This rank's held-out eval prompts: the first `ppo.eval_num_prompts` of the ppo share's
    eval slice, cut to a multiple of the world size (every rank then runs the same number of
    generation batches: collectives under ZeRO-3), sharded [rank::world]."""
    rows = evaluation.heldout_rows(cfg, limit=cfg.ppo.eval_num_prompts)
    return rows[:len(rows) // world * world][rank::world]


def cycle(loader):
    while True:
        yield from loader


@dataclass
class Experience:
    """One rank's rollout with everything the update needs. [n, ...]; R = response columns."""

    sequences: torch.Tensor  # [n, P+R]
    attention_mask: torch.Tensor  # [n, P+R]
    position_ids: torch.Tensor  # [n, P+R]
    mask: torch.Tensor  # [n, R] float, 1 up to and including EOS
    old_logprobs: torch.Tensor  # [n, R]
    old_values: torch.Tensor  # [n, R]
    advantages: torch.Tensor  # [n, R]
    returns: torch.Tensor  # [n, R]

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, -self.mask.shape[1]:]

    def select(self, idx: torch.Tensor) -> Experience:
        return Experience(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


# ----------------------------------------------------------------------------- the stage
def train(cfg: DictConfig, run_dir: Path) -> tuple[object, object, runtime.StageResult]:
    """Train and save; returns (actor engine, tokenizer, result) so callers and tests can
    inspect."""
    pc = cfg.ppo
    runtime.set_seed(cfg.seed)
    dist.init(cfg.hardware.device)
    device = dist.device_for(cfg.hardware.device)
    world, rank = dist.world_size(), dist.rank()

    # --- data first (a bad data_mix fails before anything is written): prompts of the ppo share
    data = build_stage_data(cfg.data_mix, "ppo", cfg.seed)
    if len(data.train) < pc.rollout_batch_size:
        raise ConfigError(f"ppo: the data_mix's ppo share has {len(data.train)} prompts, fewer "
                          f"than ppo.rollout_batch_size={pc.rollout_batch_size}")
    eval_rows = heldout_shard(cfg, rank, world)
    runtime.save_run_config(cfg, run_dir)
    tracker = Tracker(cfg, run_dir, "ppo")

    # --- starting points: path, run dir or artifact (online: use_artifact records lineage)
    def start(ref: str | None, fallback: str) -> tuple[str, str | None]:
        if not ref:
            return fallback, None
        path, artifact = resolve_init(ref, tracker)
        return str(path), artifact

    actor_path, actor_artifact = start(pc.actor_init, models.resolve_base_path(cfg.model))
    critic_path, critic_artifact = start(pc.critic_init,
                                         models.resolve_reward_base_path(cfg.model))
    rm_path, rm_artifact = (start(pc.reward_model, critic_path) if pc.reward_model
                            else (critic_path, critic_artifact))
    inputs = {"actor_init": actor_path, "actor_init_artifact": actor_artifact,
              "critic_init": critic_path, "critic_init_artifact": critic_artifact,
              "reward_model": rm_path, "reward_model_artifact": rm_artifact}
    if tracker.enabled:
        tracker.run.config.update({"inputs": inputs}, allow_val_change=True)
    tracker.summary({f"ppo/{k}": v or "" for k, v in inputs.items()})

    # --- batch geometry (validate() checked that it divides evenly)
    n_local = pc.rollout_batch_size // world  # prompts per rank per step
    minibatch = n_local // pc.num_minibatches
    micro = min(pc.micro_batch_size_per_device, minibatch)
    grad_accum = minibatch // micro
    optimizer_steps = pc.steps * pc.ppo_epochs * pc.num_minibatches
    R = pc.generation.max_new_tokens
    temp = pc.generation.temperature if pc.generation.do_sample else 1.0

    # --- models
    tokenizer = models.load_tokenizer(actor_path, cfg.model)
    rm_tokenizer = models.load_tokenizer(rm_path, cfg.model)
    if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"ppo: the reward model at {rm_path} uses a different tokenizer than "
                          f"the actor at {actor_path}; PPO scores the actor's tokens directly")
    precision = cfg.hardware.precision
    actor = models.load_causal_lm(actor_path, tokenizer, cfg.model, precision)
    actor = disable_dropout(models.apply_lora(actor, cfg.model.lora))
    ema = copy.deepcopy(actor).eval().requires_grad_(False) if pc.ema.enabled else None
    actor_stage = cfg.zero_stage.stage if pc.actor.zero_stage is None else pc.actor.zero_stage
    critic_stage = cfg.zero_stage.stage if pc.critic.zero_stage is None else pc.critic.zero_stage
    reference = frozen(models.load_causal_lm(actor_path, tokenizer, cfg.model, precision), cfg,
                       actor_stage, pc.offload_reference)
    critic = models.load_reward_model(critic_path, tokenizer, cfg.model, precision)
    critic = as_value_model(disable_dropout(models.apply_lora(critic, pc.critic_lora, "SEQ_CLS")))
    reward_model = frozen(models.load_reward_model(rm_path, tokenizer, cfg.model, precision), cfg,
                          critic_stage, pc.offload_reward_model)

    def optim(node, model, stage):
        return engine.build_train_engine(
            model, cfg, lr=node.lr, weight_decay=node.weight_decay, micro_batch_size=micro,
            grad_accum=grad_accum, max_grad_norm=node.max_grad_norm, scheduler=node.lr_scheduler,
            warmup_steps=node.warmup_steps, total_steps=optimizer_steps,
            min_lr_ratio=node.min_lr_ratio, zero_stage=stage)

    actor_eng = optim(pc.actor, actor, actor_stage)
    critic_eng = optim(pc.critic, critic, critic_stage)
    actor_eng.train()
    critic_eng.train()
    if ema is not None:
        ema.to(device)
    # ZeRO-3 over several ranks: every forward is a collective, so generation runs all R steps
    synced = actor_stage == 3 and world > 1
    gen_cfg = evaluation.generation_config(pc.generation)
    kl_ctl = (ppo_math.AdaptiveKLController(pc.kl.coef, pc.kl.target, pc.kl.horizon)
              if pc.kl.adaptive else ppo_math.FixedKLController(pc.kl.coef))
    score_moments = ppo_math.RunningMoments()

    # --- tokens: the prompts (cut to their last max_prompt_len tokens); the sft share for ptx
    template = cfg.model.prompt_template
    prompt_tokens = [prompt_ids(tokenizer, row, template, pc.max_prompt_len)
                     for row in data.train]
    ptx_batches = None
    if pc.ptx_coef > 0:
        sft_rows = build_stage_data(cfg.data_mix, "sft", cfg.seed).train
        ptx_set, _ = tokenize_sft(sft_rows, tokenizer, template, cfg.sft.max_prompt_len,
                                  cfg.sft.max_len, cfg.data_mix.overlong)
        if len(ptx_set) < world * micro:
            raise ConfigError("ppo.ptx_coef > 0 needs SFT examples: the data_mix's sft share is "
                              "empty (data_mix.split)")
        ptx_loader = torch.utils.data.DataLoader(
            ptx_set[rank::world], batch_size=micro, shuffle=True, drop_last=True,
            generator=torch.Generator().manual_seed(cfg.seed),
            collate_fn=lambda b: collate_sft(b, tokenizer.pad_token_id))
        ptx_batches = cycle(ptx_loader)
    order_gen = torch.Generator().manual_seed(cfg.seed)  # same prompt order on every rank
    sample_gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1 + rank)

    def prompt_batches():
        """Each step's global batch from a reshuffled pass over the prompts; this rank's slice."""
        while True:
            perm = torch.randperm(len(prompt_tokens), generator=order_gen).tolist()
            for i in range(0, len(perm) - pc.rollout_batch_size + 1, pc.rollout_batch_size):
                yield perm[i + rank * n_local: i + (rank + 1) * n_local]

    runtime.say(f"ppo: {len(data.train)} prompts ({len(eval_rows) * world} held out), "
                f"{pc.steps} steps x {pc.rollout_batch_size} rollouts; update {pc.ppo_epochs} "
                f"epoch(s) x {pc.num_minibatches} minibatch(es) = micro {micro} x accum "
                f"{grad_accum} x {world} ranks; actor zero {actor_stage}, critic zero "
                f"{critic_stage}; actor {actor_path}; critic {critic_path}; reward {rm_path}")
    def placement(offload: bool, stage: int) -> str:  # as engine.build_eval_engine places it
        return "zero3-offload-cpu" if offload else ("zero3" if stage == 3 else "device")

    tracker.summary({"ppo/rollout_batch_size": pc.rollout_batch_size,
                     "ppo/minibatch_size": minibatch * world, "ppo/train_prompts": len(data.train),
                     "ppo/reference_placement": placement(pc.offload_reference, actor_stage),
                     "ppo/reward_model_placement": placement(pc.offload_reward_model,
                                                             critic_stage)})

    # --- the pieces of one step
    @torch.no_grad()
    def make_experience(rows_idx: list[int]) -> tuple[Experience, dict, list]:
        t0 = time.perf_counter()
        ids = [prompt_tokens[i] for i in rows_idx]
        input_ids = pad_left(ids, tokenizer.pad_token_id)
        prompt_mask = pad_left([[1] * len(x) for x in ids], 0)
        rollout = generate(actor_eng.module, input_ids, prompt_mask, gen_cfg,
                           eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, generator=sample_gen,
                           synced_gpus=synced)
        t_gen = time.perf_counter() - t0
        seq = rollout.sequences.to(device)
        attn = rollout.attention_mask.to(device)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)  # real-token positions, as during generation
        mask = rollout.response_mask.to(device).float()
        responses = seq[:, -R:]
        logp, ref_logp, values, scores = [], [], [], []
        for k in range(0, len(ids), micro):  # forwards in micro-batches bound the memory
            s, a, p = seq[k:k + micro], attn[k:k + micro], pos[k:k + micro]
            logp.append(ppo_math.logprobs_from_logits(
                response_logits(actor_eng, s, a, p, R, temp), responses[k:k + micro]))
            ref_logp.append(ppo_math.logprobs_from_logits(
                response_logits(reference, s, a, p, R, temp), responses[k:k + micro]))
            values.append(critic_eng(input_ids=s, attention_mask=a, position_ids=p)
                          [:, -(R + 1):-1].float())
            # the reward model's score at each row's last real token (EOS, or the R-th token)
            rm = token_values(reward_model, s, a)
            scores.append(rm.gather(1, ppo_math.last_token_index(a)[:, None]).squeeze(1))
        logp, ref_logp = torch.cat(logp), torch.cat(ref_logp)
        values, raw_scores = torch.cat(values), torch.cat(scores).float()
        scores = raw_scores
        if pc.normalize_reward:  # running mean/std over every rank's scores so far
            score_moments.update(gather_all(raw_scores))
            scores = (raw_scores - score_moments.mean) / max(score_moments.std, 1e-8)
        kl = ppo_math.kl_per_token(logp, ref_logp, pc.kl.estimator)
        rewards = ppo_math.compute_token_rewards(kl, scores, mask, kl_ctl.value, pc.reward_clip)
        advantages, returns = ppo_math.gae_advantages_and_returns(values, rewards, mask,
                                                                  pc.gamma, pc.lam)
        if pc.whiten_advantages:
            advantages = ppo_math.masked_whiten(advantages, mask)
        exp = Experience(seq, attn, pos, mask, logp, values, advantages, returns)

        texts = [tokenizer.decode(responses[i][mask[i].bool()].tolist(), skip_special_tokens=True)
                 for i in range(len(ids))]
        golds = [tasks.gold_reward(data.train[i].get("task"), data.train[i]["prompt"], t)
                 for i, t in zip(rows_idx, texts)]
        seq_kl = ppo_math.masked_sum(kl, mask, dim=-1)
        stats = {
            "ppo/reward_score": raw_scores.mean().item(),
            "ppo/reward_score_std": raw_scores.std().item() if len(ids) > 1 else 0.0,
            "ppo/kl": seq_kl.mean().item(),
            "ppo/kl_coef": kl_ctl.value,
            "ppo/non_score_reward": (-kl_ctl.value * seq_kl).mean().item(),
            "ppo/response_length": mask.sum(-1).mean().item(),
            "ppo/eos_rate": (responses == tokenizer.eos_token_id).any(-1).float().mean().item(),
            "ppo/value_explained_var": ppo_math.explained_variance(values, returns, mask),
            "ppo/value_mean": ppo_math.masked_mean(values, mask).item(),
            "ppo/return_mean": ppo_math.masked_mean(returns, mask).item(),
            "perf/gen_s": t_gen,
            "perf/experience_s": time.perf_counter() - t0 - t_gen,
        }
        known = [g for g in golds if g is not None]
        if known:  # only sources with a gold reward (the synthetic task) have one
            stats["ppo/gold_reward"] = sum(known) / len(known)
        table = [[data.train[i]["prompt"], t, float(raw_scores[j]), g]
                 for j, (i, t, g) in enumerate(zip(rows_idx, texts, golds))][:TABLE_ROWS]
        return exp, stats, table

    def update(exp: Experience) -> dict:
        """PPO epochs over one rollout; returns the means of the update's statistics."""
        acc: dict[str, list[float]] = defaultdict(list)
        for _ in range(pc.ppo_epochs):
            perm = torch.randperm(n_local, generator=shuffle_gen).to(device)
            for m in range(pc.num_minibatches):
                mb_kl = []
                for k in range(m * minibatch, (m + 1) * minibatch, micro):
                    b = exp.select(perm[k:k + micro])
                    logits = response_logits(actor_eng, b.sequences, b.attention_mask,
                                             b.position_ids, R, temp)
                    logp = ppo_math.logprobs_from_logits(logits, b.responses)
                    pg_loss, st = ppo_math.policy_loss(logp, b.old_logprobs, b.advantages, b.mask,
                                                       pc.clip_range)
                    loss = pg_loss
                    if ptx_batches is not None:
                        batch = {k2: v.to(device) for k2, v in next(ptx_batches).items()}
                        ptx_loss = actor_eng(**batch).loss
                        loss = pg_loss + pc.ptx_coef * ptx_loss
                        acc["ppo/ptx_loss"].append(ptx_loss.item())
                    actor_eng.backward(loss)
                    actor_eng.step()
                    with torch.no_grad():
                        entropy = ppo_math.masked_mean(
                            ppo_math.entropy_from_logits(logits.detach()), b.mask)
                    values = critic_eng(input_ids=b.sequences, attention_mask=b.attention_mask,
                                        position_ids=b.position_ids)[:, -(R + 1):-1].float()
                    v_loss, vst = ppo_math.value_loss(values, b.old_values, b.returns, b.mask,
                                                      pc.clip_range_value)
                    critic_eng.backward(pc.vf_coef * v_loss)
                    critic_eng.step()
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
                    acc["ppo/early_stopped"].append(1.0)
                    return {k: sum(v) / len(v) for k, v in acc.items()}
        acc["ppo/early_stopped"].append(0.0)
        return {k: sum(v) / len(v) for k, v in acc.items()}

    @torch.no_grad()
    def update_ema() -> None:
        """ema <- decay * ema + (1 - decay) * actor (weights gathered under ZeRO-3)."""
        import deepspeed

        params = list(actor_eng.module.parameters())
        gather = deepspeed.zero.GatheredParameters(params) if actor_stage == 3 else nullcontext()
        with gather:
            for e, p in zip(ema.parameters(), params):
                e.lerp_(p.detach().to(e.device, e.dtype), 1.0 - pc.ema.decay)

    def evaluate(step: int) -> dict:
        """Held-out prompts, sampled with ppo.generation and a fixed seed (see the docstring)."""
        samples = evaluation.sample_responses(
            actor_eng.module, tokenizer, eval_rows, gen_cfg, template=template,
            max_prompt_len=pc.max_prompt_len, batch_size=pc.eval_batch_size,
            seed=cfg.seed + rank, device=device, synced_gpus=synced)
        golds = [g for g in evaluation.gold_scores(eval_rows, samples.texts) if g is not None]
        rm_scores = evaluation.reward_scores(
            reward_model, tokenizer, eval_rows, samples.texts,
            samples.finished, template=template, max_prompt_len=pc.max_prompt_len,
            batch_size=pc.eval_batch_size, device=device)
        n = len(eval_rows)
        sums = dist.all_reduce_mean([sum(golds), len(golds), float(sum(rm_scores)), n,
                                     float(sum(samples.lengths))], device)
        metrics = {"ppo/eval_reward_score": sums[2] / max(sums[3], 1e-9),
                   "ppo/eval_response_length": sums[4] / max(sums[3], 1e-9)}
        if sums[1] > 0:
            metrics["ppo/eval_gold_reward"] = sums[0] / sums[1]
        tracker.log(metrics, step)
        return metrics

    # --- the loop
    init_eval = evaluate(0) if eval_rows else {}
    last_eval = init_eval
    batches = prompt_batches()
    bar = runtime.progress(pc.steps, "ppo")
    last: dict = {}
    for step in range(1, pc.steps + 1):
        t0 = time.perf_counter()
        exp, stats, table = make_experience(next(batches))
        t1 = time.perf_counter()
        stats.update(update(exp))
        t_train = time.perf_counter() - t1
        kl_ctl.update(stats["ppo/kl"], pc.rollout_batch_size)
        if ema is not None:
            update_ema()
        stats.update({"perf/train_s": t_train, "ppo/actor_lr": actor_eng.get_lr()[0],
                      "perf/samples_per_s": pc.rollout_batch_size / (time.perf_counter() - t0)})
        keys = sorted(stats)  # the same order on every rank
        values = dist.all_reduce_mean([stats[k] for k in keys], device)
        stats = dict(zip(keys, values))
        last = stats
        bar.update(1)
        bar.set_postfix(gold=f"{stats.get('ppo/gold_reward', float('nan')):.3f}",
                        kl=f"{stats['ppo/kl']:.2f}", score=f"{stats['ppo/reward_score']:.2f}")
        if step % pc.log_every == 0 or step == pc.steps:
            tracker.log(stats, step)
        if cfg.logger.table_every > 0 and (step % cfg.logger.table_every == 0 or step == 1):
            tracker.log_table("ppo/samples", ["prompt", "response", "reward_score",
                                              "gold_reward"], table, step)
        if pc.eval_every > 0 and step % pc.eval_every == 0 and step < pc.steps:
            last_eval = evaluate(step)
        if pc.save_every > 0 and step % pc.save_every == 0 and step < pc.steps:
            checkpoint.save_hf(actor_eng, tokenizer, checkpoint.step_dir(run_dir, step),
                               zero_stage=actor_eng.zero_optimization_stage(),
                               lora_save=cfg.model.lora.save, metadata={"step": step})
            checkpoint.prune(run_dir, pc.keep_last)
    bar.close()
    last_eval = evaluate(pc.steps) if eval_rows else last_eval

    # --- checkpoints: actor (final), critic, EMA; artifacts
    meta = {"stage": "ppo", "step": pc.steps, **inputs}
    artifact = f"{cfg.experiment_name}-ppo-model"
    ckpt = checkpoint.save_hf(
        actor_eng, tokenizer, checkpoint.step_dir(run_dir, pc.steps),
        zero_stage=actor_eng.zero_optimization_stage(), lora_save=cfg.model.lora.save,
        metadata={**meta, "artifact": f"{cfg.logger.project}/{artifact}:latest"})
    checkpoint.mark_final(ckpt)
    checkpoint.prune(run_dir, pc.keep_last)
    critic_ckpt = checkpoint.save_hf(critic_eng, tokenizer, run_dir / "checkpoints" / "critic",
                                     zero_stage=critic_eng.zero_optimization_stage(),
                                     lora_save=pc.critic_lora.save,
                                     metadata={**meta, "model": "critic"})
    ema_ckpt = None
    if ema is not None:
        ema_artifact = f"{cfg.experiment_name}-ppo-ema-model"
        ema_ckpt = checkpoint.save_hf(
            ema, tokenizer, run_dir / "checkpoints" / "ema", lora_save=cfg.model.lora.save,
            metadata={**meta, "model": "ema", "decay": pc.ema.decay,
                      "artifact": f"{cfg.logger.project}/{ema_artifact}:latest"})
    if cfg.logger.log_checkpoints:
        tracker.log_model(ckpt, artifact, aliases=["final", f"step-{pc.steps}"],
                          metadata={**meta, **last_eval})
        if ema_ckpt is not None:
            tracker.log_model(ema_ckpt, ema_artifact, aliases=["final", f"step-{pc.steps}"],
                              metadata={**meta, "decay": pc.ema.decay})

    metrics = {k: last[k] for k in ("ppo/gold_reward", "ppo/reward_score", "ppo/kl",
                                    "ppo/kl_coef", "ppo/response_length") if k in last}
    metrics.update(last_eval)
    for k, v in init_eval.items():
        metrics[k.replace("ppo/eval_", "ppo/init_eval_")] = v
    metrics["ppo/steps"] = pc.steps
    tracker.summary(metrics)
    result = runtime.StageResult("ppo", str(run_dir), str(ckpt), tracker.run_id,
                                 str(run_dir / "wandb") if tracker.enabled else None, metrics)
    result.write()
    if "ppo/eval_gold_reward" in last_eval and "ppo/eval_gold_reward" in init_eval:
        runtime.say(f"ppo: done. held-out gold reward {init_eval['ppo/eval_gold_reward']:.3f} "
                    f"-> {last_eval['ppo/eval_gold_reward']:.3f}, KL {last.get('ppo/kl', 0):.3f}")
    runtime.say(f"ppo: checkpoint {ckpt}; critic {critic_ckpt}"
                + (f"; ema {ema_ckpt}" if ema_ckpt else ""))
    if tracker.enabled:
        runtime.say(tracker.where())
    tracker.finish()
    return actor_eng, tokenizer, result


def run(cfg: DictConfig, run_dir: Path) -> runtime.StageResult:
    return train(cfg, run_dir)[2]
