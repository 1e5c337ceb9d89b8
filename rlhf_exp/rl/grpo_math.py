"""Model-free GRPO math: group baselines, advantages, the clipped token loss and how it is
aggregated. Pure functions of tensors, unit-tested against hand-derived values (and against
TRL 1.16's GRPOTrainer where the options match: tests/test_grpo_math.py).

Conventions
-----------
A rollout holds N = P * G sequences: P prompts, G = `num_generations` completions each, laid
out group by group (rows g*G .. g*G+G-1 answer prompt g). Token tensors are [N, T] over the
RESPONSE tokens only; `mask` is 1 for real response tokens (EOS included), 0 after EOS.
Masked positions never influence an output (torch.where, not x * mask, as in ppo_math).

Advantages (one per sequence, the same at each of its tokens):

    A_i = (r_i - b_i) / s_i
    b_i = mean of the group                        baseline=group_mean (GRPO)
        = mean of the group without i              baseline=leave_one_out (RLOO)
    s_i = std of i's group + eps                   scale_rewards=group (GRPO, TRL's default)
        = std of the whole batch + eps             scale_rewards=batch
        = 1                                        scale_rewards=none (Dr. GRPO; usual for RLOO)

stds are unbiased (n - 1) and eps = 1e-4, as TRL.

REINFORCE++ (advantage_estimator reinforce / reinforce_baseline) has per-token advantages
instead: the returns (gamma 1) of token rewards that put the (group-mean-subtracted, for the
baseline variant) reward on the last token and -beta * KL_t on every token, whitened over the
batch's real tokens (`reinforce_advantages`, OpenRLHF's estimator). GSPO replaces the token ratio
by one ratio per sequence (`importance_sampling_level`); DAPO's soft overlong penalty is
`soft_overlong_penalty`.

Token loss, with ratio rho_t = exp(logp_t - old_logp_t) and clip bounds (1 - eps_lo, 1 + eps_hi):

    l_t = -min(rho_t * A, clip(rho_t, 1 - eps_lo, 1 + eps_hi) * A) + beta * KL_t - c_H * H_t

(KL_t the per-token estimate of KL(pi || pi_ref) from ppo_math.kl_per_token, present only when
the KL is a loss term; H_t the entropy, present only with an entropy coefficient.) One loss for a
batch is sum_t w_t * l_t with the weights of `loss_agg`:

    token_mean      w_t = 1 / (tokens in the batch)               (DAPO; TRL loss_type="dapo")
    sequence_mean   w_t = 1 / (len_i * sequences in the batch)    (GRPO paper; TRL "grpo")
    dr_grpo         w_t = 1 / (max_new_tokens * sequences)        (Dr. GRPO; TRL "dr_grpo")

The counts are those of the whole optimizer batch (every micro-batch on every rank), passed in
by the caller; with none given, the batch at hand is the whole batch.
"""

from __future__ import annotations

import torch

# the allowed values are declared once, in the torch-free config (checked before torch loads)
from rlhf_exp.config import GRPO_BASELINES as BASELINES
from rlhf_exp.config import GRPO_LOSS_AGG as LOSS_AGG
from rlhf_exp.config import GRPO_SCALE_REWARDS as SCALE_REWARDS
from rlhf_exp.config.choices import GRPO_IMPORTANCE_SAMPLING_LEVELS as IMPORTANCE_SAMPLING_LEVELS
from rlhf_exp.rl.ppo_math import kl_per_token, masked_mean

STD_EPS = 1e-4  # added to the std before dividing (TRL's value)


# ----------------------------------------------------------------------------- advantages
def group_view(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] -> [N / G, G]; the N rewards must be whole groups, group by group."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{tuple(rewards.shape)} rewards are not whole groups of {group_size}")
    return rewards.view(-1, group_size)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N / G] bool: groups whose rewards are all equal (no learning signal from the baseline).
    An exact tie: a relative tolerance would call a group near |r| = 100 whose rewards differ by
    5e-4 tied, though its scaled advantages reach ~1.4."""
    grouped = group_view(rewards, group_size)
    return grouped.max(-1).values == grouped.min(-1).values


def group_advantages(rewards: torch.Tensor, group_size: int, *, baseline: str = "group_mean",
                     scale_rewards: str = "group", eps: float = STD_EPS) -> torch.Tensor:
    """[N] sequence rewards -> [N] advantages (module docstring). fp32, no gradient."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected one of "
                         f"{SCALE_REWARDS}")
    if group_size < 2:
        raise ValueError("a group baseline needs at least 2 completions per prompt")
    r = group_view(rewards.detach().float(), group_size)  # [P, G]
    total = r.sum(-1, keepdim=True)
    if baseline == "group_mean":
        base = total / group_size
    else:  # leave one out: the mean of the other G - 1
        base = (total - r) / (group_size - 1)
    adv = r - base
    if scale_rewards == "group":
        adv = adv / (r.std(-1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        std = r.std() if r.numel() > 1 else r.new_zeros(())
        adv = adv / (std + eps)
    return adv.reshape(-1)


# ----------------------------------------------------------------------------- REINFORCE++
def token_returns(rewards: torch.Tensor, mask: torch.Tensor, *,
                  kl: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """[N] sequence rewards -> [N, T] REINFORCE++ returns (gamma 1): the reward sits on each
    sequence's last real token, - beta * KL_t on every token (the KL as a per-token reward), and
    token t's return is the sum of the rewards from t on. 0 at padding. fp32, no gradient."""
    m = mask.float()
    token_r = torch.zeros_like(m)
    last = (m.shape[1] - 1 - m.flip(-1).argmax(-1))[:, None]  # the last real token
    token_r.scatter_(1, last, rewards.detach().float()[:, None])
    if kl is not None and beta > 0:
        token_r = token_r - beta * torch.where(m.bool(), kl.detach().float(), 0.0)
    token_r = token_r * m
    return token_r.flip(-1).cumsum(-1).flip(-1) * m


def whiten_tokens(values: torch.Tensor, mask: torch.Tensor, all_reduce_sum=None
                  ) -> torch.Tensor:
    """[N, T] values whitened over the real tokens of the whole batch: (v - mean) / std with the
    population variance clamped at 1e-8 (OpenRLHF's advantage normalisation). `all_reduce_sum`
    (a tensor -> its sum over ranks): the batch is every rank's, else this one's."""
    m = mask.float()
    v = torch.where(m.bool(), values.float(), 0.0)
    total = torch.stack([v.sum(), m.sum()])
    if all_reduce_sum is not None:
        total = all_reduce_sum(total)
    mean = total[0] / total[1].clamp(min=1.0)
    sq = ((v - mean).pow(2) * m).sum()
    if all_reduce_sum is not None:
        sq = all_reduce_sum(sq)
    var = sq / total[1].clamp(min=1.0)
    return (v - mean) * var.clamp(min=1e-8).rsqrt() * m


def reinforce_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int, *,
                         baseline: bool, kl: torch.Tensor | None = None, beta: float = 0.0,
                         all_reduce_sum=None) -> torch.Tensor:
    """[N] rewards -> [N, T] REINFORCE++ advantages (Hu 2025; OpenRLHF
    `--advantage_estimator reinforce`, with `baseline` `reinforce_baseline`: the group's mean
    reward subtracted first): token returns with the KL as a per-token reward, whitened over
    the batch's tokens. `rewards` must be this rank's whole groups."""
    r = rewards.detach().float()
    if baseline:
        grouped = group_view(r, group_size)
        r = (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)
    returns = token_returns(r, mask, kl=kl, beta=beta)
    return whiten_tokens(returns, mask, all_reduce_sum)


# ----------------------------------------------------------------------------- DAPO overlong
def soft_overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int,
                          penalty: float = 1.0) -> torch.Tensor:
    """[N] DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; TRL
    `get_soft_overlong_punishment`, verl `overlong_buffer`): 0 up to max_new_tokens - buffer
    tokens, then falling linearly to -penalty at max_new_tokens (and -penalty beyond)."""
    L = lengths.float()
    start = max_new_tokens - buffer
    ramp = (start - L) / max(buffer, 1) * penalty
    out = torch.where(L <= start, torch.zeros_like(L), ramp)
    return torch.where(L > max_new_tokens, torch.full_like(L, -penalty), out)


# ----------------------------------------------------------------------------- the token loss
def clipped_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                       advantages: torch.Tensor, mask: torch.Tensor, epsilon: float,
                       epsilon_high: float | None = None, importance_sampling_level: str = "token"
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A), [N, T]
    (0 at padding); advantages [N] (one per sequence) or [N, T]. epsilon_high None = epsilon.
    importance_sampling_level "sequence" (GSPO, Zheng et al. 2025; TRL
    importance_sampling_level="sequence"): every token of a sequence has the one ratio
    exp(mean_t (logp_t - old_logp_t)), clipped as a whole.

    stats (detached [N, T] bool): clipped_low (rho < 1 - eps with A < 0: the clip bound holds
    the loss) and clipped_high (rho > 1 + eps_high with A > 0), as TRL's clip_ratio metrics."""
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    m = mask.bool()
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; "
                         f"expected one of {IMPORTANCE_SAMPLING_LEVELS}")
    # zero the log-ratio at padding before exp (garbage there could overflow; ppo_math does too)
    log_ratio = torch.where(m, logprobs - old_logprobs, 0.0)
    if importance_sampling_level == "sequence":  # the length-normalised sequence ratio
        log_ratio = (log_ratio.sum(-1, keepdim=True)
                     / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_hi)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    loss = torch.where(m, loss, torch.zeros_like(loss))
    with torch.no_grad():
        stats = {"clipped_low": m & (ratio < 1.0 - epsilon) & (adv < 0),
                 "clipped_high": m & (ratio > 1.0 + eps_hi) & (adv > 0)}
    return loss, stats


def aggregation_weights(mask: torch.Tensor, loss_agg: str, *, max_new_tokens: int,
                        total_tokens: float | None = None,
                        total_sequences: float | None = None) -> torch.Tensor:
    """[N, T] weights w_t of `loss_agg` (module docstring); 0 at padding. `total_tokens` /
    `total_sequences`: the whole optimizer batch's real tokens and sequences (None = this
    batch's own). A sequence with no real token (all masked) weighs nothing."""
    if loss_agg not in LOSS_AGG:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGG}")
    m = mask.float()
    lengths = m.sum(-1, keepdim=True)  # [N, 1]
    if total_tokens is None:
        total_tokens = float(m.sum())
    if total_sequences is None:
        total_sequences = float((lengths > 0).sum())
    if loss_agg == "token_mean":
        w = m / max(total_tokens, 1.0)
    elif loss_agg == "sequence_mean":
        w = m / (lengths.clamp(min=1.0) * max(total_sequences, 1.0))
    else:  # dr_grpo: a constant normaliser, no length bias
        w = m / (max_new_tokens * max(total_sequences, 1.0))
    return w


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, epsilon: float, epsilon_high: float | None = None,
              loss_agg: str = "token_mean", max_new_tokens: int | None = None,
              ref_logprobs: torch.Tensor | None = None, beta: float = 0.0,
              kl_estimator: str = "k3", entropy: torch.Tensor | None = None,
              entropy_coef: float = 0.0, total_tokens: float | None = None,
              total_sequences: float | None = None, importance_sampling_level: str = "token"
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a batch (module docstring) -> (0-dim loss, stats).

    ref_logprobs with beta > 0: beta * KL_t(pi || ref) joins every token's loss (the KL as a loss
    term; for the KL in the reward, fold it into the rewards before `group_advantages` and pass
    no ref_logprobs). entropy [N, T] with entropy_coef > 0: - entropy_coef * H_t joins it.
    max_new_tokens: dr_grpo's normaliser (default: T). stats (detached 0-dim, token means over
    the batch): pg_loss (the surrogate alone, aggregated like the loss), kl, clipfrac,
    clipfrac_low, clipfrac_high, approx_kl (k3 of KL(old || new))."""
    m = mask.bool()
    per_token, clip = clipped_token_loss(logprobs, old_logprobs, advantages, m, epsilon,
                                         epsilon_high, importance_sampling_level)
    weights = aggregation_weights(m, loss_agg, max_new_tokens=max_new_tokens or m.shape[-1],
                                  total_tokens=total_tokens, total_sequences=total_sequences)
    pg_loss = (weights * per_token).sum()
    total = per_token
    kl = None
    if ref_logprobs is not None and beta > 0:
        kl = torch.where(m, kl_per_token(logprobs, ref_logprobs, kl_estimator), 0.0)
        total = total + beta * kl
    if entropy is not None and entropy_coef > 0:
        total = total - entropy_coef * torch.where(m, entropy, 0.0)
    loss = (weights * total).sum()
    with torch.no_grad():
        stats = {
            "pg_loss": pg_loss.detach(),
            "clipfrac": masked_mean((clip["clipped_low"] | clip["clipped_high"]).float(), m),
            "clipfrac_low": masked_mean(clip["clipped_low"].float(), m),
            "clipfrac_high": masked_mean(clip["clipped_high"].float(), m),
            "approx_kl": masked_mean(kl_per_token(old_logprobs, logprobs.detach(), "k3"), m),
        }
        if kl is not None:
            stats["kl"] = masked_mean(kl.detach(), m)
    return loss, stats
