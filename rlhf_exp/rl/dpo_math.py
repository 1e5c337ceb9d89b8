"""The DPO losses and statistics, as TRL's DPOTrainer (1.16) computes them.

Shapes: a batch of B preference pairs is 2B right-padded rows, the B chosen sequences then the B
rejected ones (data.tokenize.collate_dpo); T tokens per row, V the vocabulary. A sequence's
log-probability is the SUM over its response tokens (EOS included, prompt and padding excluded)
of log p(token | everything before it).

With the policy's and the frozen reference's log-probabilities of each response, the log-ratios
    chosen_logratio   = logp(chosen)   - ref_logp(chosen)
    rejected_logratio = logp(rejected) - ref_logp(rejected)
    d = chosen_logratio - rejected_logratio
give the implicit rewards beta * logratio and, per pair, the loss (`loss_type`):
    sigmoid   -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)        DPO; eps > 0: cDPO
    hinge     max(0, 1 - beta d)                                                SLiC
    ipo       (c / |c| - r / |r| - 1 / (2 beta))^2, c and r the log-ratios,     IPO (TRL: per
              |c| and |r| the response lengths in tokens                        token, as here)
    robust    (-(1 - eps) log sigmoid(beta d) + eps log sigmoid(-beta d)) / (1 - 2 eps)   rDPO
    simpo     -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m),         SimPO (Meng et
              m = c / |c| - r / |r| - gamma / beta, where c and r are the       al. 2024; TRL's
              policy's OWN log-probabilities (no reference: its log-ratios     CPOTrainer,
              are taken against 0), |c|, |r| the response lengths in tokens    loss_type=simpo)
The batch loss is the mean over pairs, plus `rpo_alpha` x the mean negative log-likelihood per
token of the chosen responses (RPO; TRL 1.16 writes it loss_type=[<loss>, "sft"], loss_weights=
[1, rpo_alpha]). TRL 1.16's sigmoid has no label smoothing; cDPO's form is its (1 - eps, eps)
mix of the loss on the pair and on the swapped pair (tests/test_dpo_math.py checks it so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_exp.config import DPO_LOSS_TYPES  # declared once, in the torch-free config
from rlhf_exp.config.choices import REFERENCE_FREE_LOSSES
from rlhf_exp.rl.ppo_math import logprobs_from_logits


@dataclass
class SequenceLogps:
    """The response log-probabilities of 2B rows (chosen then rejected)."""

    logps: torch.Tensor  # [2B] summed over response tokens (fp32; carries the gradient)
    tokens: torch.Tensor  # [2B] response tokens counted
    logits_sum: torch.Tensor  # [2B] sum over response tokens of the mean logit over V (TRL's
    # logits/* metric; no gradient)

    def halves(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) halves of one field."""
        value = getattr(self, name)
        half = value.shape[0] // 2
        return value[:half], value[half:]


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor,
                   completion_mask: torch.Tensor) -> SequenceLogps:
    """Response log-probabilities from a forward's logits [N, T, V]: position t predicts token
    t+1, which counts where completion_mask[t+1] is 1."""
    per_token = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])  # [N, T-1] fp32
    mask = completion_mask[:, 1:].to(per_token.dtype)
    logits_sum = (logits[:, :-1].detach().float().mean(-1) * mask).sum(-1)
    return SequenceLogps((per_token * mask).sum(-1), mask.sum(-1), logits_sum)


def preference_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *,
                    loss_type: str, beta: float, label_smoothing: float = 0.0,
                    chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None,
                    simpo_gamma: float = 0.5) -> torch.Tensor:
    """[B] the loss of each pair (module docstring). ipo and simpo need the response lengths;
    simpo's log-ratios are the policy's own log-probabilities (dpo_loss passes them so)."""
    d = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "ipo":
        per_token = (chosen_logratios / chosen_tokens.clamp(min=1.0)
                     - rejected_logratios / rejected_tokens.clamp(min=1.0))
        return (per_token - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return ((-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d))
                / (1 - 2 * eps))
    if loss_type == "simpo":  # TRL CPOTrainer.cpo_loss: logits - simpo_gamma / beta
        margin = (chosen_logratios / chosen_tokens.clamp(min=1.0)
                  - rejected_logratios / rejected_tokens.clamp(min=1.0)) - simpo_gamma / beta
        return -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; one of {', '.join(DPO_LOSS_TYPES)}")


def chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per token of the chosen responses (RPO's term)."""
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1.0)


def dpo_loss(seq: SequenceLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *,
             loss_type: str, beta: float, label_smoothing: float = 0.0,
             rpo_alpha: float = 0.0, simpo_gamma: float = 0.5,
             pair_weights: torch.Tensor | None = None,
             chosen_token_weights: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch loss (the mean over pairs, + rpo_alpha x chosen NLL), and the per-pair terms
    (detached, [B] each) that pair_metrics turns into TRL's metrics; terms of several batches
    concatenated give the metrics of them all. A reference-free loss (simpo) ignores
    ref_chosen / ref_rejected: its implicit rewards are beta x the policy's log-probabilities
    per response token (TRL's CPOTrainer rewards, with its average_log_prob)."""
    chosen, rejected = seq.halves("logps")
    chosen_tokens, rejected_tokens = seq.halves("tokens")
    if loss_type in REFERENCE_FREE_LOSSES:
        chosen_logratios, rejected_logratios = chosen, rejected
    else:
        chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
    per_pair = preference_loss(chosen_logratios, rejected_logratios, loss_type=loss_type,
                               beta=beta, label_smoothing=label_smoothing,
                               chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
                               simpo_gamma=simpo_gamma)
    if loss_type in REFERENCE_FREE_LOSSES:  # rewards per token, as TRL's CPO logs them
        chosen_logratios = chosen_logratios / chosen_tokens.clamp(min=1.0)
        rejected_logratios = rejected_logratios / rejected_tokens.clamp(min=1.0)
    # weights [B] (a token-budget micro-batch, training/packing.TokenBudget): the weighted sums
    # replace the means, pair_weights for the pairs', chosen_token_weights for the NLL's
    loss = per_pair.mean() if pair_weights is None else (per_pair * pair_weights).sum()
    if rpo_alpha:
        loss = loss + rpo_alpha * (chosen_nll(chosen, chosen_tokens) if chosen_token_weights is None
                                   else -(chosen * chosen_token_weights).sum())
    logits_chosen, logits_rejected = seq.halves("logits_sum")
    terms = {"pair_loss": per_pair, "rewards/chosen": beta * chosen_logratios,
             "rewards/rejected": beta * rejected_logratios, "logps/chosen": chosen,
             "logps/rejected": rejected, "tokens/chosen": chosen_tokens,
             "tokens/rejected": rejected_tokens, "logits_sum/chosen": logits_chosen,
             "logits_sum/rejected": logits_rejected}
    return loss, {k: v.detach().float() for k, v in terms.items()}


def pair_metrics(terms: dict[str, torch.Tensor], rpo_alpha: float = 0.0) -> dict[str, float]:
    """TRL's DPO metrics (names without the stage prefix) from dpo_loss's terms: `loss` as
    dpo_loss computes it, rewards/* means over pairs (accuracies: the share of pairs whose
    chosen reward is higher; margins: the mean reward difference), logps/* means over pairs,
    logits/* the mean logit per response token (token-weighted, as TRL), and nll_loss the mean
    NLL per chosen token (RPO's term, reported whether or not it is in the loss)."""
    chosen, rejected = terms["rewards/chosen"], terms["rewards/rejected"]
    nll = chosen_nll(terms["logps/chosen"], terms["tokens/chosen"])
    return {"loss": float(terms["pair_loss"].mean() + rpo_alpha * nll),
            "rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
            "rewards/accuracies": float((chosen > rejected).float().mean()),
            "rewards/margins": float((chosen - rejected).mean()),
            "logps/chosen": float(terms["logps/chosen"].mean()),
            "logps/rejected": float(terms["logps/rejected"].mean()),
            "logits/chosen": float(terms["logits_sum/chosen"].sum()
                                   / terms["tokens/chosen"].sum().clamp(min=1)),
            "logits/rejected": float(terms["logits_sum/rejected"].sum()
                                     / terms["tokens/rejected"].sum().clamp(min=1)),
            "nll_loss": float(nll)}
