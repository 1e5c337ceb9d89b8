"""On-policy rollouts, shared by the RL stages (PPO, GRPO): which prompts a step samples, the
sampled responses, and the log-probs and reward-model scores of those responses.

Shapes: n rows on this rank, P prompt tokens (left-padded), R = generation.max_new_tokens
response columns, V vocabulary.

Every function here takes its inputs explicitly; a stage decides what to do with the results
(PPO: token rewards, GAE and a critic; GRPO: group baselines).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlhf_exp.data.tokenize import pad_left
from rlhf_exp.rl import packed_rows, ppo_math, scoring
from rlhf_exp.rl.generation import GenerationConfig, generate


@dataclass
class Trajectory:
    """One rank's sampled responses to its prompts, with everything needed to score them."""

    rows: list[dict]  # the data row of each sequence (its prompt, task, ...), n
    sequences: torch.Tensor  # [n, P+R] left-padded prompt, then the response (pad after EOS)
    attention_mask: torch.Tensor  # [n, P+R] 1 for real prompt and response tokens
    position_ids: torch.Tensor  # [n, P+R] positions of real tokens (left padding not counted)
    response_mask: torch.Tensor  # [n, R] float, 1 up to and including the first EOS
    texts: list[str]  # decoded responses, without EOS and special tokens
    gen_s: float  # seconds spent generating

    @property
    def responses(self) -> torch.Tensor:
        """[n, R] the generated tokens."""
        return self.sequences[:, -self.response_mask.shape[1]:]


class PromptSchedule:
    """Which prompts step s samples: a pure function of s, so a resumed run samples exactly the
    prompts an uninterrupted one would, with no iterator state to save.

    Epoch e is a permutation of all prompts seeded by seed + e, cut into global batches of
    `global_batch` prompts (a tail that fills no batch is skipped); step s (1-based) takes global
    batch (s - 1) % batches_per_epoch of epoch (s - 1) // batches_per_epoch, and rank r its r-th
    contiguous slice. Every rank computes the same permutation.
    """

    def __init__(self, num_prompts: int, global_batch: int, *, seed: int, rank: int,
                 world: int) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not split over {world} ranks")
        self.batches_per_epoch = num_prompts // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_prompts} prompts make no global batch of {global_batch}")
        self.num_prompts, self.global_batch = num_prompts, global_batch
        self.seed, self.rank, self.per_rank = seed, rank, global_batch // world
        self._epoch, self._order = -1, []

    def indices(self, step: int) -> list[int]:
        """This rank's prompt indices for step `step` (1-based)."""
        epoch, batch = divmod(step - 1, self.batches_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch = epoch
            self._order = torch.randperm(self.num_prompts, generator=gen).tolist()
        lo = batch * self.global_batch + self.rank * self.per_rank
        return self._order[lo:lo + self.per_rank]


@torch.no_grad()
def sample(policy, tokenizer, rows: list[dict], prompt_tokens: list[list[int]],
           gen: GenerationConfig, *, generator: torch.Generator, synced_gpus: bool,
           device: torch.device, group_size: int = 1) -> Trajectory:
    """Sample one response per prompt (rows[i] is prompted with prompt_tokens[i]).
    `synced_gpus`: ZeRO-3 over several ranks, where every decode step is a collective.
    `group_size` = G > 1: rows come in runs of G with the same prompt (generation.generate's
    prompt_repeats)."""
    t0 = time.perf_counter()
    input_ids = pad_left(prompt_tokens, tokenizer.pad_token_id)
    prompt_mask = pad_left([[1] * len(x) for x in prompt_tokens], 0)
    out = generate(policy, input_ids, prompt_mask, gen, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, generator=generator,
                   synced_gpus=synced_gpus, prompt_repeats=group_size)
    gen_s = time.perf_counter() - t0
    attn = out.attention_mask.to(device)
    mask = out.response_mask.to(device).float()
    responses = out.responses.to(device)
    texts = [tokenizer.decode(responses[i][mask[i].bool()].tolist(), skip_special_tokens=True)
             for i in range(len(rows))]
    return Trajectory(rows=list(rows), sequences=out.sequences.to(device), attention_mask=attn,
                      position_ids=(attn.cumsum(-1) - 1).clamp_min(0), response_mask=mask,
                      texts=texts, gen_s=gen_s)


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor, response_len: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """[B, R, V] fp32 logits predicting each response token (those at positions P-1 .. P+R-2),
    divided by the sampling temperature: the log-probs are then those of the policy that sampled
    the rollout, so ratios and KL are on-policy at any temperature. Upcast BEFORE dividing: in
    bf16 the division alone moves log-probs by up to ~0.2 nats at T=0.7."""
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=response_len + 1).logits
    return out[:, -(response_len + 1):-1].float() / temperature


def group_response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor,
                          position_ids: torch.Tensor, response_len: int, group_size: int,
                          temperature: float = 1.0) -> torch.Tensor:
    """`response_logits` of rows that come in groups of `group_size` with one prompt (GRPO:
    rows g*G .. g*G+G-1 share their left-padded prompt), computing each prompt once: a forward
    over the B/G distinct prompts keeps its KV cache, the cache is repeated G times, and a second
    forward runs the B responses on it. Exact, gradients included: every completion's gradient
    flows back into its group's one prompt pass, as it would into G copies. Needs the model's
    KV cache in training (not with gradient checkpointing)."""
    P, G, R = sequences.shape[1] - response_len, group_size, response_len
    first = slice(None, None, G)
    out = model(input_ids=sequences[first, :P], attention_mask=attention_mask[first, :P],
                position_ids=position_ids[first, :P], use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1:].repeat_interleave(G, dim=0)  # predicts response token 0
    if R > 1:
        cache = out.cache
        cache.batch_repeat_interleave(G)
        rest = model(input_ids=sequences[:, P:P + R - 1],
                     attention_mask=attention_mask[:, :P + R - 1],
                     position_ids=position_ids[:, P:P + R - 1], cache=cache,
                     use_cache=True).logits  # predicts response tokens 1 .. R-1
        logits = torch.cat([logits, rest], dim=1)
    return logits.float() / temperature  # upcast first (response_logits says why)


@torch.no_grad()
def logprobs(model, traj: Trajectory, *, temperature: float, micro_batch: int,
             group_size: int = 1, token_budget: int | None = None) -> torch.Tensor:
    """[n, R] fp32 log-prob of each sampled token under `model`, micro-batch by micro-batch.
    group_size > 1 (dividing micro_batch): rows come in groups sharing a prompt, each prompt
    is computed once (group_response_logits). token_budget: packed rows instead, cut by that
    many tokens (packed_rows; 0 at padding)."""
    if token_budget is not None:
        return packed_rows.rollout_logprobs(model, traj, temperature=temperature,
                                            budget=token_budget, group_size=group_size)
    R, out = traj.response_mask.shape[1], []
    for k in range(0, len(traj.rows), micro_batch):
        s = slice(k, k + micro_batch)
        if group_size > 1:
            logits = group_response_logits(model, traj.sequences[s], traj.attention_mask[s],
                                           traj.position_ids[s], R, group_size, temperature)
        else:
            logits = response_logits(model, traj.sequences[s], traj.attention_mask[s],
                                     traj.position_ids[s], R, temperature)
        out.append(ppo_math.logprobs_from_logits(logits, traj.responses[s]))
    return torch.cat(out)


def trim_responses(traj: Trajectory) -> Trajectory:
    """The trajectory without its trailing response columns that are padding in every row (all
    responses ended before max_new_tokens): later forwards skip them. Masks, log-probs and
    losses are unchanged."""
    used = int(traj.response_mask.sum(0).nonzero().max()) + 1 if traj.response_mask.any() else 1
    cut = traj.response_mask.shape[1] - used
    if cut == 0:
        return traj
    return Trajectory(rows=traj.rows, sequences=traj.sequences[:, :-cut],
                      attention_mask=traj.attention_mask[:, :-cut],
                      position_ids=traj.position_ids[:, :-cut],
                      response_mask=traj.response_mask[:, :-cut], texts=traj.texts,
                      gen_s=traj.gen_s)


@torch.no_grad()
def reward_model_scores(reward_model, traj: Trajectory, *, micro_batch: int,
                        token_budget: int | None = None) -> torch.Tensor:
    """[n] the reward model's score of each (prompt, response), read at the row's last real
    token (its EOS, or the R-th token of a response cut at max_new_tokens). token_budget:
    packed rows instead, cut by that many tokens (packed_rows)."""
    if token_budget is not None:
        return packed_rows.rollout_scores(reward_model, traj, budget=token_budget)
    scores = []
    for k in range(0, len(traj.rows), micro_batch):
        s = slice(k, k + micro_batch)
        values = scoring.token_values(reward_model, traj.sequences[s], traj.attention_mask[s])
        last = ppo_math.last_token_index(traj.attention_mask[s])
        scores.append(values.gather(1, last[:, None]).squeeze(1))
    return torch.cat(scores).float()
