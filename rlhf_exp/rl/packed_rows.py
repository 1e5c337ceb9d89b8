"""Packed rows for the RL forwards (PPO, GRPO): no compute on padding.

A rollout's rows are [left-padded prompt | response | padding after EOS], all as long as the
longest prompt plus the longest response. Here a micro-batch's sequences are laid end to end in
ONE row with no padding at all, and a custom attention mask keeps them apart:

    [prompt_a  resp_a1  resp_a2 ... | prompt_b  resp_b1 ... | ...]

- a group's responses (GRPO: `group_size` rows with one prompt) follow their one shared prompt;
  each response attends to that prompt and to its own earlier tokens, never to a sibling or to
  another group (a plain sequence is a group of one);
- position ids restart per sequence: prompt 0 .. p-1, each of its responses p, p+1, ... (what
  the padded row numbers its real tokens, rollout.sample);
- only what is read is computed: a response's last token (EOS) is never an input whose output
  is used (log-probs and values are read at the positions *predicting* response tokens), so it
  is left out, and the LM head runs only at those positions (`logits_to_keep` as indices).
  Reward-model scores read the last token itself: `full_responses=True` keeps it.

The mask is a [1, 1, L, L] additive float mask (0 = attend, dtype min = not), which
transformers 5.x passes through unchanged (masking_utils: a 4D mask is a custom mask) to its
SDPA and eager kernels. On CPU that is one dense masked attention over L tokens: its cost grows
as L^2, which the token budget bounds (`micro_batch_tokens`); on GPU a varlen kernel would skip
the masked blocks altogether.

Outputs come back as the padded path's [B, R] tensors (zeros where the response mask is 0),
so the losses in ppo_math / grpo_math are used unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rlhf_exp.rl import ppo_math, scoring
from rlhf_exp.training.packing import plan_microbatches, split_to  # noqa: F401 (split_to: re-export)

# model_type of the families checked to take the custom 4D mask and explicit position ids
# exactly (transformers 5.25; tests/test_rl_packing.py), under the attention implementations
# that apply a 4D mask (flash-attention takes none: those models run on padded rows)
FAMILIES = frozenset({"llama", "qwen2", "gpt2", "opt"})
ATTENTION = frozenset({"sdpa", "eager"})


@dataclass
class PackedRows:
    """B sequences (R response columns each) packed into one row of L tokens; K = the response
    tokens read (sum of the response lengths)."""

    input_ids: torch.Tensor  # [N, L]: N packed rows (one unless pack(row_tokens=...))
    position_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, 1, L, L] additive: 0 attend, dtype min masked
    # [K] position (flat over the N x L tokens) whose output predicts (or values) a response token
    read_at: torch.Tensor
    rows: torch.Tensor  # [K] which sequence that response token belongs to (0 .. B-1)
    cols: torch.Tensor  # [K] its response column (0 .. R-1)
    labels: torch.Tensor  # [K] the response token itself
    last_at: torch.Tensor  # [B] flat position of each sequence's last real token (full_responses)
    shape: tuple[int, int]  # (B, R)

    def with_dtype(self, dtype: torch.dtype) -> PackedRows:
        """The same packing with its attention mask in `dtype` (another model's)."""
        mask = self.attention_mask
        if mask.dtype == dtype:
            return self
        allowed = mask == 0
        new = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return dataclasses.replace(self, attention_mask=new.masked_fill(
            ~allowed, torch.finfo(dtype).min))

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """[K] per response token -> [B, R], zeros at padding (differentiable)."""
        out = values.new_zeros(self.shape)
        return out.index_put((self.rows, self.cols), values)


def packed_length(attention_mask: torch.Tensor, response_mask: torch.Tensor, group_size: int,
                  full_responses: bool = False) -> list[int]:
    """Tokens each unit (a group of `group_size` rows, or one row) takes in a packed row: the
    planner's costs (pack() lays out exactly these)."""
    R = response_mask.shape[1]
    prompts = attention_mask[:, :-R].sum(-1).long() if R else attention_mask.sum(-1).long()
    lengths = response_mask.sum(-1).long()
    kept = lengths if full_responses else (lengths - 1).clamp_min(0)
    B = len(lengths)
    return [int(prompts[g]) + int(kept[g:g + group_size].sum())
            for g in range(0, B, group_size)]


def pack(sequences: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, *,
         group_size: int = 1, full_responses: bool = False, row_tokens: int | None = None,
         dtype: torch.dtype = torch.float32) -> PackedRows:
    """Pack [B, P+R] left-padded rows (response mask [B, R], 1 up to and including EOS) into
    one row, or with `row_tokens` into as many rows as it takes to keep each within that many
    tokens (whole units, in order; the rows padded to the longest, each pad token attending to
    itself alone): the dense mask's cost grows with the square of a row's length.
    group_size = G > 1: rows g*G .. g*G+G-1 have one prompt, packed once."""
    B, R = response_mask.shape
    P, G, device = sequences.shape[1] - R, group_size, sequences.device
    if B % G:
        raise ValueError(f"{B} rows are not whole groups of {G}")
    costs = packed_length(attention_mask, response_mask, G, full_responses)
    row_of = [0] * len(costs)
    if row_tokens is not None:
        for r, units in enumerate(plan_micro_batches(costs, row_tokens)):
            for u in units:
                row_of[u] = r
    n_rows = row_of[-1] + 1
    lengths = response_mask.sum(-1).long().tolist()
    # per packed row: token ids, positions, group of each token, sequence (-1: a prompt token)
    ids, pos, group_of, seq_of = ([[] for _ in range(n_rows)] for _ in range(4))
    offsets = [0] * n_rows
    read_at, rows, cols, last_at = [], [], [], []  # read_at / last_at: (row, offset)
    for g, g0 in enumerate(range(0, B, G)):
        if G > 1 and not torch.equal(sequences[g0:g0 + G, :P],
                                     sequences[g0:g0 + 1, :P].expand(G, -1)):
            raise ValueError(f"rows {g0} .. {g0 + G - 1} do not share their prompt")
        prompt = sequences[g0, :P][attention_mask[g0, :P].bool()]
        p, r = len(prompt), row_of[g]
        if p == 0:
            raise ValueError(f"row {g0} has an empty prompt: nothing predicts its first token")
        ids[r].append(prompt)
        pos[r].append(torch.arange(p, device=device))
        group_of[r].append(torch.full((p,), g, device=device))
        seq_of[r].append(torch.full((p,), -1, device=device))
        prompt_last, offset = offsets[r] + p - 1, offsets[r] + p
        for i in range(g0, g0 + G):
            n = lengths[i]
            keep = n if full_responses else max(n - 1, 0)
            ids[r].append(sequences[i, P:P + keep])
            pos[r].append(p + torch.arange(keep, device=device))
            group_of[r].append(torch.full((keep,), g, device=device))
            seq_of[r].append(torch.full((keep,), i, device=device))
            if n > 0:  # token 0 is predicted at the prompt's end, token j at token j - 1
                read_at += [(r, prompt_last), *((r, o) for o in range(offset, offset + n - 1))]
                rows += [i] * n
                cols += list(range(n))
            last_at.append((r, offset + keep - 1 if keep else prompt_last))
            offset += keep
        offsets[r] = offset
    L = max(offsets)
    for r in range(n_rows):  # pad each row to L; a pad token is its own group
        pad = L - offsets[r]
        ids[r].append(torch.zeros(pad, dtype=sequences.dtype, device=device))
        pos[r].append(torch.zeros(pad, dtype=torch.long, device=device))
        group_of[r].append(-1 - torch.arange(pad, device=device))
        seq_of[r].append(torch.full((pad,), -1, device=device))
    group_t = torch.stack([torch.cat(x) for x in group_of])  # [rows, L]
    seq_t = torch.stack([torch.cat(x) for x in seq_of])
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    allowed = (causal & (group_t[:, :, None] == group_t[:, None, :])
               & ((seq_t[:, None, :] == -1) | (seq_t[:, None, :] == seq_t[:, :, None])))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min)

    def flat(at: list[tuple[int, int]]) -> torch.Tensor:
        return torch.tensor([r * L + o for r, o in at], dtype=torch.long, device=device)

    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)
    return PackedRows(
        input_ids=torch.stack([torch.cat(x) for x in ids]),
        position_ids=torch.stack([torch.cat(x) for x in pos]),
        attention_mask=mask[:, None], read_at=flat(read_at), rows=rows_t, cols=cols_t,
        labels=sequences[rows_t, P + cols_t], last_at=flat(last_at), shape=(B, R))


def why_not(*models) -> str | None:
    """None when every model given (None entries skipped) packs exactly, else one line why
    not (the RL stages then run on padded rows)."""
    for model in models:
        if model is None:
            continue
        hf = scoring._unwrap(model)
        config = getattr(hf, "config", None)
        kind = getattr(config, "model_type", None)
        attn = getattr(config, "_attn_implementation", None) or "eager"
        if kind not in FAMILIES or attn not in ATTENTION:
            return (f"model_type {kind!r} with attention {attn!r} (packed RL rows cover "
                    f"{sorted(FAMILIES)} under {sorted(ATTENTION)})")
    return None


def model_dtype(model) -> torch.dtype:
    """The floating dtype a model computes in (its attention mask must match)."""
    model = getattr(model, "module", model)  # DeepSpeed engine
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


# ----------------------------------------------------------------------------- token budget
def plan_micro_batches(costs: list[int], budget: int) -> list[range]:
    """Consecutive units (in their given order: the data order) cut into micro-batches of at
    most `budget` tokens each (training.packing's planner); a unit over the budget alone makes
    one."""
    return [range(g[0], g[-1] + 1) for g in plan_microbatches(costs, budget)]


# ----------------------------------------------------------------------------- forwards
def response_logits(model, packed: PackedRows, temperature: float = 1.0) -> torch.Tensor:
    """[K, V] fp32 logits predicting each response token, divided by the sampling temperature
    (upcast first: rollout.response_logits says why)."""
    one_row = packed.input_ids.shape[0] == 1  # then the LM head runs at the read positions only
    out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                position_ids=packed.position_ids,
                logits_to_keep=packed.read_at if one_row else 0).logits
    return (out[0] if one_row else out.flatten(0, 1)[packed.read_at]).float() / temperature


def logprobs_and_entropy(model, packed: PackedRows, temperature: float, *,
                         entropy: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
    """([B, R] log-probs of the response tokens, [B, R] entropies or None), zeros at padding.
    entropy: none | detached | grad (whether its gradient is needed: an entropy bonus)."""
    logits = response_logits(model, packed, temperature)[None]  # [1, K, V]
    logp = packed.scatter(ppo_math.logprobs_from_logits(logits, packed.labels[None])[0])
    if entropy == "none":
        return logp, None
    ent = ppo_math.entropy_from_logits(logits if entropy == "grad" else logits.detach())[0]
    return logp, packed.scatter(ent)


def token_values(model, packed: PackedRows) -> torch.Tensor:
    """[B, R] a value model's (stages/ppo.as_value_model) value at each response token's
    state, the padded path's values[:, -(R + 1):-1]."""
    values = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                   position_ids=packed.position_ids)  # [N, L]
    return packed.scatter(values.flatten()[packed.read_at].float())


def sequence_scores(reward_model, packed: PackedRows) -> torch.Tensor:
    """[B] a reward model's score read at each sequence's last real token (pack with
    full_responses=True)."""
    values = scoring.token_values(reward_model, packed.input_ids, packed.attention_mask,
                                  packed.position_ids)  # [N, L]
    return values.flatten()[packed.last_at].float()


# ----------------------------------------------------------------------------- whole rollouts
def budget_batches(attention_mask: torch.Tensor, response_mask: torch.Tensor, *,
                   group_size: int, budget: int, full_responses: bool = False) -> list[slice]:
    """Row slices of a rollout (in order, whole groups) cut by the token budget."""
    costs = packed_length(attention_mask, response_mask, group_size, full_responses)
    return [slice(r.start * group_size, r.stop * group_size)
            for r in plan_micro_batches(costs, budget)]


@torch.no_grad()
def rollout_logprobs(model, traj, *, temperature: float, budget: int,
                     group_size: int = 1) -> torch.Tensor:
    """[n, R] fp32 log-prob of each sampled token (rollout.logprobs, packed; 0 at padding)."""
    dtype, out = model_dtype(model), []
    for s in budget_batches(traj.attention_mask, traj.response_mask, group_size=group_size,
                            budget=budget):
        packed = pack(traj.sequences[s], traj.attention_mask[s], traj.response_mask[s],
                      group_size=group_size, dtype=dtype)
        out.append(logprobs_and_entropy(model, packed, temperature)[0])
    return torch.cat(out)


@torch.no_grad()
def rollout_values(critic, traj, *, budget: int) -> torch.Tensor:
    """[n, R] the critic's values (stages/ppo.critic_values, packed; 0 at padding)."""
    dtype, out = model_dtype(critic), []
    for s in budget_batches(traj.attention_mask, traj.response_mask, group_size=1,
                            budget=budget):
        packed = pack(traj.sequences[s], traj.attention_mask[s], traj.response_mask[s],
                      dtype=dtype)
        out.append(token_values(critic, packed))
    return torch.cat(out)


@torch.no_grad()
def rollout_scores(reward_model, traj, *, budget: int, group_size: int = 1) -> torch.Tensor:
    """[n] the reward model's scores (rollout.reward_model_scores, packed)."""
    dtype, out = model_dtype(reward_model), []
    for s in budget_batches(traj.attention_mask, traj.response_mask, group_size=group_size,
                            budget=budget, full_responses=True):
        packed = pack(traj.sequences[s], traj.attention_mask[s], traj.response_mask[s],
                      group_size=group_size, full_responses=True, dtype=dtype)
        out.append(sequence_scores(reward_model, packed))
    return torch.cat(out).float()
