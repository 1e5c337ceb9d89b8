"""The KTO loss and statistics, as TRL 1.16's KTOTrainer computes them (trl/trainer/
kto_trainer.py, KTOTrainer._compute_loss, loss_type="kto"; Ethayarajh et al. 2024, eq. 7).

Inputs per row of a batch of B unpaired rows: the policy's and the frozen reference's
log-probability of its completion (summed over the completion tokens, EOS included), and of its
KL sequence (the row's prompt with another row's completion; rlhf_exp/data/unpaired.py), and its
label (True = desirable). With logratio = logp - ref_logp:
    z0 = max(0, mean over the batch of (kl_logp - ref_kl_logp)), detached   (the KL estimate)
    desirable row     1 - sigmoid(beta (logratio - z0)),  weighted by desirable_weight
    undesirable row   1 - sigmoid(beta (z0 - logratio)),  weighted by undesirable_weight
and the batch loss is the mean of the weighted row losses. TRL averages z0 over ranks before
the clamp (gather_for_metrics(kl).mean()); `kl_estimate` takes the mean of the per-rank means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
                rank_mean=None) -> torch.Tensor:
    """z0: the batch mean of the KL sequences' log-ratios, averaged over ranks by `rank_mean`
    (a function of a float, None = one rank), clamped at 0; detached (no gradient flows
    through it, as in TRL)."""
    kl = (kl_logps - ref_kl_logps).mean().detach()
    if rank_mean is not None:
        kl = torch.tensor(rank_mean(float(kl)), dtype=kl.dtype, device=kl.device)
    return kl.clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
             kl: torch.Tensor, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch loss (module docstring) and the per-row terms (detached) that kto_metrics turns
    into TRL's metrics; terms of several batches concatenated give the metrics of them all."""
    labels = labels.bool()
    logratios = logps - ref_logps
    desirable = 1 - F.sigmoid(beta * (logratios - kl))
    undesirable = 1 - F.sigmoid(beta * (kl - logratios))
    row_loss = torch.where(labels, desirable_weight * desirable,
                           undesirable_weight * undesirable)
    loss = row_loss.mean()
    terms = {"row_loss": row_loss, "rewards": beta * logratios, "logps": logps,
             "label": labels, "kl": kl.expand_as(logps)}
    return loss, {k: v.detach() for k, v in terms.items()}


def kto_metrics(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """TRL's KTO metrics (names without the stage prefix): `loss` (the mean weighted row loss),
    `kl` (the mean KL estimate of the batches), rewards/* and logps/* the means over desirable
    (chosen) and undesirable (rejected) rows, rewards/margins their difference (NaN when a side
    has no row), and `desirable_fraction`."""
    label = terms["label"].bool()
    out = {"loss": float(terms["row_loss"].float().mean()),
           "kl": float(terms["kl"].float().mean()),
           "desirable_fraction": float(label.float().mean())}
    for side, mask in (("chosen", label), ("rejected", ~label)):
        for name in ("rewards", "logps"):
            values = terms[name][mask].float()
            out[f"{name}/{side}"] = float(values.mean()) if len(values) else float("nan")
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
