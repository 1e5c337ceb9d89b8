"""Model-free PPO math for RLHF: log-probs, KL, token rewards, GAE, losses, KL control.

Everything here is a pure function of tensors (plus two tiny stateful helpers: the KL
controllers and RunningMoments), so it can be unit-tested on CPU with hand-computed numbers.

Conventions
-----------
All tensors are batch-first and cover the RESPONSE tokens only: [B, T] where T is the number of
generated positions. The caller has already sliced logits / log-probs / values to the response
positions. `mask` is a float or bool [B, T] tensor with 1 for real response tokens (the EOS
token included) and 0 for the padding after EOS. Masked-out positions never influence any output
(not even through NaN/inf, which is why masking uses `torch.where` rather than `x * mask`), and
outputs are 0 there.

DeepSpeed-Chat defaults (step 3, `ppo_trainer.py`), which this module reproduces:
    kl coef beta       0.1    per-token reward = -beta * (logp - logp_ref)   ("k1" estimator)
    reward clip        +-5    the sequence score is clipped, then added at the last response token
    gamma              1.0    GAE discount
    lambda (lam)       0.95   GAE lambda
    policy clip        0.2    PPO ratio clip range
    value clip         0.2    value prediction clip range (around the old values)
DeepSpeed-Chat uses a fixed KL coefficient (FixedKLController); AdaptiveKLController is the
Ziegler et al. (2019) variant.
"""

import math

import torch

from rlhf_exp.config import KL_ESTIMATORS  # declared once, in the torch-free config

# -----------------------------------------------------------------------------
# log-probs and entropy from logits


CHUNK_ELEMENTS = 1 << 22  # logits elements per chunk of rows (16 MiB in fp32)


def _row_chunks(logits: torch.Tensor) -> int:
    """Rows per chunk: as many as fit CHUNK_ELEMENTS (at least one)."""
    per_row = logits[0].numel() if len(logits) else 1
    return max(1, CHUNK_ELEMENTS // max(per_row, 1))


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under softmax(logits). logits [B, T, V], labels [B, T] -> [B, T] fp32.

    Memory-sane: computes gather(logits) - logsumexp(logits) a chunk of rows at a time (as many
    rows as fit CHUNK_ELEMENTS; one row of a large vocabulary), so no full [B, T, V] log_softmax
    copy of a large batch is ever materialised (the vocab dim dominates memory), and a small one
    is one vectorised call. Low precision logits (bf16/fp16) are upcast to fp32 per chunk for an
    accurate logsumexp.
    """
    out, step = [], _row_chunks(logits)
    for k in range(0, len(logits), step):
        chunk = logits[k:k + step]  # [c, T, V]
        chunk = chunk.float() if chunk.dtype != torch.float64 else chunk
        picked = chunk.gather(-1, labels[k:k + step].unsqueeze(-1)).squeeze(-1)  # [c, T]
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out)  # [B, T]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position. logits [B, T, V] -> [B, T] fp32.

    H = logsumexp(l) - sum_v softmax(l)_v * l_v, computed a chunk of rows at a time (see above).
    """
    out, step = [], _row_chunks(logits)
    for k in range(0, len(logits), step):
        chunk = logits[k:k + step]
        chunk = chunk.float() if chunk.dtype != torch.float64 else chunk
        probs = torch.softmax(chunk, dim=-1)
        out.append(torch.logsumexp(chunk, dim=-1) - (probs * chunk).sum(-1))
    return torch.cat(out)  # [B, T]


# -----------------------------------------------------------------------------
# masked reductions


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x over positions where mask is 1 (all dims if dim is None)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))  # where, not x*mask: NaN-proof padding
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1. An all-padding row/batch gives 0, not NaN."""
    m = mask.bool()
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over all masked positions (0-dim). Fewer than 2 tokens gives 0, not NaN."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum().to(var.dtype)
        var = var * n / (n - 1).clamp(min=1)  # Bessel's correction; no-op guard when n <= 1
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over masked positions (unbiased std); padding is set to 0.

    shift_mean=False adds the mean back (only rescales), as TRL does when whitening rewards.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# -----------------------------------------------------------------------------
# KL, rewards, advantages


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi. [B, T] -> [B, T].

    With log r = logp_ref - logp (Schulman, "Approximating KL Divergence", 2020):
      k1 = -log r = logp - logp_ref   unbiased, can be negative per token (DeepSpeed-Chat)
      k2 = 0.5 * (log r)^2            biased, >= 0
      k3 = (r - 1) - log r            unbiased, always >= 0, lower variance
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r  # expm1 keeps precision when r is close to 1
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of mask [B, T] -> [B] (int64).

    A row with no tokens at all returns 0: always a valid index for gather/scatter, and since
    position 0 is masked out in that row, anything placed there is dropped by the mask (so
    compute_token_rewards places that row's score nowhere). Use mask.any(-1) to tell them apart.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # [B, T]
    return torch.where(mask.bool(), positions, 0).max(dim=-1).values


@torch.no_grad()
def compute_token_rewards(
    kl: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    clip_score: float | None,
) -> torch.Tensor:
    """DeepSpeed-Chat per-token rewards. kl [B, T], scores [B] -> rewards [B, T] (detached).

    rewards[b, t] = -kl_coef * kl[b, t] on real tokens, and the sequence score (clipped to
    +-clip_score unless clip_score is None) is added at the last real token of each row.
    """
    rewards = -kl_coef * kl.float()
    if clip_score is not None:
        scores = scores.clamp(-clip_score, clip_score)
    last = last_token_index(mask).unsqueeze(-1)  # [B, 1]
    rewards = rewards.scatter_add(-1, last, scores.to(rewards.dtype).unsqueeze(-1))
    return torch.where(mask.bool(), rewards, torch.zeros_like(rewards))


@torch.no_grad()
def gae_advantages_and_returns(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation, backwards over T. All [B, T]; outputs detached, masked.

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}.
    Values and rewards after the last real token count as 0, so bootstrapping stops at EOS
    (the episode ends there; V of padding is garbage). returns = advantages + values.
    """
    m = mask.bool()
    values = torch.where(m, values.float(), 0.0)
    rewards = torch.where(m, rewards.float(), 0.0)
    T = values.shape[-1]
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        # zero at padding so the recursion restarts at each row's last real token
        last_gae = torch.where(m[:, t], delta + gamma * lam * last_gae, 0.0)
        advantages[:, t] = last_gae
    returns = torch.where(m, advantages + values, 0.0)
    return advantages, returns


# -----------------------------------------------------------------------------
# losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate, masked mean over tokens. All inputs [B, T] -> (0-dim loss, stats).

    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))), ratio = exp(logp - old).
    stats (detached 0-dim tensors, no host sync; call .item() when logging):
      clipfrac   fraction of real tokens where the clipped branch was strictly larger (taken)
      approx_kl  masked mean of the k3 estimate of KL(pi_old || pi), i.e. (r - 1) - log r with
                 r = pi / pi_old; >= 0 and unbiased since tokens were sampled from pi_old
    """
    m = mask.bool()
    # zero the log-ratio at padding before exp: garbage there could overflow to inf and turn
    # the (zero) gradient into NaN
    log_ratio = torch.where(m, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), m)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).float(), m),
            "approx_kl": masked_mean(kl_per_token(old_logprobs, logprobs, "k3"), m),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2), masked mean. All [B, T].

    v_clip = old + clip(v - old, -eps, +eps): the critic may not move more than eps per rollout
    where that would help the loss. stats: vf_clipfrac (tokens where the clipped term was larger).
    """
    m = mask.bool()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    vf_unclipped = (values - returns) ** 2
    vf_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf_unclipped, vf_clipped), m)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf_clipped > vf_unclipped).float(), m)}
    return loss, stats


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over real tokens: 1 is a perfect critic, 0 no better than a
    constant, < 0 worse. Returns 0.0 (not NaN) when Var[R] == 0, e.g. a single token, so logged
    curves stay plottable; a critic cannot explain variance that is not there.
    """
    var_returns = masked_var(returns.float(), mask)
    if var_returns.item() == 0.0:
        return 0.0
    return (1.0 - masked_var(returns.float() - values.float(), mask) / var_returns).item()


# -----------------------------------------------------------------------------
# KL coefficient controllers and running moments (the only stateful pieces)


class FixedKLController:
    """Constant KL coefficient (DeepSpeed-Chat: beta = 0.1)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient, Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences").

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
    KL above target raises beta (stronger pull to the reference), below target lowers it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean / std of every element seen so far (Chan et al. parallel Welford update).

    Kept in Python float64. `.std` is the unbiased (n - 1) std of all data seen, i.e. what
    torch.cat(all_batches).std() would give. Before any data mean = 0 and std = 1 (so x / std
    is the identity), and std stays 1 until 2 elements were seen. Each call sees only the
    tensor it is given: under data parallelism pass the all-gathered scores so ranks agree.
    """

    def __init__(self):
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.count = 0

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Fold in every element of x; returns (batch mean, batch unbiased std; 0 if 1 element)."""
        n = x.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        x = x.detach().double()
        batch_var, batch_mean = torch.var_mean(x, correction=0)
        batch_mean, batch_m2 = batch_mean.item(), batch_var.item() * n
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total
        return batch_mean, math.sqrt(batch_m2 / (n - 1)) if n > 1 else 0.0

    def state_dict(self) -> dict:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.m2 = float(state["mean"]), float(state["m2"])
        self.count = int(state["count"])
