"""Held-out evaluation of policies: the prompts, seeded sampling, and the three scores.

Shared by `stage=eval` and PPO's held-out eval so both report the same numbers for the same
policy: the same rows (the PPO share's held-out slice, in order), the same prompt rendering and
truncation, the same batches and the same seeded generator give the same responses.

Shapes: B prompts per batch, P prompt tokens (left-padded), R = max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_exp import dist, ppo_math, scoring, tasks
from rlhf_exp.data import build_stage_data
from rlhf_exp.data.tokenize import pad_left, pad_right, prompt_ids
from rlhf_exp.generation import GenerationConfig, Rollout, generate


def heldout_rows(cfg: DictConfig, limit: int | None = None) -> list[dict]:
    """The PPO share's held-out rows (never trained on by any stage), first `limit` of them."""
    rows = build_stage_data(cfg.data_mix, "ppo", cfg.seed).eval
    return rows[:limit] if limit else rows


def heldout_shard(cfg: DictConfig, limit: int, rank: int, world: int) -> list[dict]:
    """This rank's share of the first `limit` held-out rows, cut to a multiple of the world size
    so every rank runs the same number of generation batches (collectives under ZeRO-3),
    sharded [rank::world]."""
    rows = heldout_rows(cfg, limit=limit)
    return rows[:len(rows) // world * world][rank::world]


def generation_config(node: DictConfig) -> GenerationConfig:
    """`ppo.generation` / `eval.generation` / `chat.generation` as a GenerationConfig."""
    return GenerationConfig(**OmegaConf.to_container(node, resolve=True))


def encode_prompts(tokenizer, rows: list[dict], template: str,
                   max_prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' prompts (data.tokenize.prompt_ids), left-padded:
    (input_ids [B, P], attention_mask [B, P])."""
    ids = [prompt_ids(tokenizer, row, template, max_prompt_len) for row in rows]
    return pad_left(ids, tokenizer.pad_token_id), pad_left([[1] * len(s) for s in ids], 0)


@dataclass
class Samples:
    """One policy's responses to the held-out prompts, in prompt order."""

    texts: list[str]  # decoded response, without EOS and special tokens
    lengths: list[int]  # generated tokens, the EOS included (as PPO's response_length)
    finished: list[bool]  # the response ended with EOS (not cut at max_new_tokens)
    rollouts: list[Rollout]  # per batch: token ids and masks (for log-probs / KL)


def sample_responses(model, tokenizer, rows: list[dict], gen: GenerationConfig, *,
                     template: str, max_prompt_len: int, batch_size: int, seed: int,
                     device: torch.device, synced_gpus: bool = False) -> Samples:
    """Generate for every row's prompt, `batch_size` prompts at a time, from one generator
    seeded with `seed`: same rows + settings + batch size + seed = same responses.
    `synced_gpus`: ZeRO-3 on several ranks (every rank runs all decode steps)."""
    rng = torch.Generator().manual_seed(seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = Samples([], [], [], [])
    for lo in range(0, len(rows), batch_size):
        ids, mask = encode_prompts(tokenizer, rows[lo:lo + batch_size],
                                   template, max_prompt_len)
        rollout = generate(model, ids.to(device), mask.to(device), gen, eos_token_id=eos,
                           pad_token_id=pad, generator=rng, synced_gpus=synced_gpus)
        responses, rmask = rollout.responses.cpu(), rollout.response_mask.cpu()
        for tokens, m in zip(responses, rmask):
            kept = tokens[m.bool()].tolist()
            done = bool(kept) and kept[-1] == eos
            out.texts.append(tokenizer.decode(kept[:-1] if done else kept,
                                              skip_special_tokens=True))
            out.lengths.append(len(kept))
            out.finished.append(done)
        out.rollouts.append(rollout)
    return out


def gold_scores(rows: list[dict], texts: list[str]) -> list[float | None]:
    """The task's gold reward of each response; None where the row's source has none."""
    return [tasks.gold_reward(r.get("task"), r["prompt"], t) for r, t in zip(rows, texts)]


def reward_scores(reward_model, tokenizer, rows: list[dict], texts: list[str],
                  finished: list[bool], *, template: str, max_prompt_len: int, batch_size: int,
                  device: torch.device) -> list[float]:
    """The reward model's score of each (prompt, response), encoded as the reward stage encodes
    its pairs (rendered prompt + response + EOS) with the reward model's own tokenizer, so a
    policy with a different tokenizer is scored fairly. A response cut off before EOS gets no
    EOS: the score is read at its last token, as PPO reads it."""
    seqs = []
    for row, text, done in zip(rows, texts, finished):
        p = prompt_ids(tokenizer, row, template, max_prompt_len)
        r = tokenizer(text, add_special_tokens=False)["input_ids"]
        seqs.append(p + r + ([tokenizer.eos_token_id] if done else []))
    scores: list[float] = []
    with torch.no_grad():
        for lo in range(0, len(seqs), batch_size):
            chunk = seqs[lo:lo + batch_size]
            ids = pad_right(chunk, tokenizer.pad_token_id).to(device)
            mask = pad_right([[1] * len(s) for s in chunk], 0).to(device)
            scores += scoring.sequence_scores(reward_model, ids, mask).tolist()
    return scores


def response_logprobs(model, rollout: Rollout) -> torch.Tensor:
    """[B, R] log-prob of each generated token under `model` (fp32, on CPU); positions count
    real tokens only, as during generation, so left padding does not shift them."""
    device = next(model.parameters()).device
    seq = rollout.sequences.to(device)
    mask = rollout.attention_mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=mask, position_ids=pos).logits
    model.train(was_training)
    P = rollout.prompt_len
    return ppo_math.logprobs_from_logits(logits[:, P - 1:-1], seq[:, P:]).cpu()


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
                estimator: str = "k1") -> torch.Tensor:
    """[B] KL(policy || reference) of each response: the per-token estimate summed over the
    response tokens (EOS included), as PPO's per-sequence KL."""
    per_token = ppo_math.kl_per_token(logprobs, ref_logprobs, estimator)
    return ppo_math.masked_sum(per_token, response_mask.to(per_token.dtype), dim=-1)


def heldout_eval(policy, tokenizer, rows: list[dict], gen: GenerationConfig, *, prefix: str,
                 template: str, max_prompt_len: int, batch_size: int, seed: int,
                 device: torch.device, synced_gpus: bool = False,
                 reward_model=None) -> dict[str, float]:
    """The RL stages' held-out evaluation of a policy on this rank's rows (`heldout_shard`),
    averaged over ranks: `<prefix>/eval_gold_reward` (where the rows have a gold reward),
    `<prefix>/eval_reward_score` (with a reward model), `<prefix>/eval_response_length`.
    Sampled with `gen` from a generator seeded with `seed`: the same policy gives the same
    numbers in PPO, GRPO, DPO and `stage=eval`."""
    samples = sample_responses(policy, tokenizer, rows, gen, template=template,
                               max_prompt_len=max_prompt_len, batch_size=batch_size, seed=seed,
                               device=device, synced_gpus=synced_gpus)
    golds = [g for g in gold_scores(rows, samples.texts) if g is not None]
    rm = [] if reward_model is None else reward_scores(
        reward_model, tokenizer, rows, samples.texts, samples.finished, template=template,
        max_prompt_len=max_prompt_len, batch_size=batch_size, device=device)
    sums = dist.all_reduce_mean([sum(golds), len(golds), float(sum(rm)), len(rows),
                                 float(sum(samples.lengths))], device)
    n = max(sums[3], 1e-9)
    metrics = {f"{prefix}/eval_response_length": sums[4] / n}
    if reward_model is not None:
        metrics[f"{prefix}/eval_reward_score"] = sums[2] / n
    if sums[1] > 0:
        metrics[f"{prefix}/eval_gold_reward"] = sums[0] / sums[1]
    return metrics
