"""GRPO math against hand-derived values, and against TRL 1.16's GRPOTrainer loss where the
options match (skipped when TRL is not installed: it is the optional `bench` extra)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhf_exp.rl import evaluation, grpo_math

EPS = grpo_math.STD_EPS
# two groups of G = 3: one with spread rewards, one where every completion scored the same
REWARDS = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 3.0])


# ----------------------------------------------------------------------------- advantages
def test_group_mean_baseline_scaled_by_the_group_std():
    # group 1: mean 1, unbiased std 1; group 2: all equal -> 0 (not NaN)
    adv = grpo_math.group_advantages(REWARDS, 3, baseline="group_mean", scale_rewards="group")
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1.0 + EPS)
    assert torch.allclose(adv, expected)


def test_group_mean_baseline_scaled_by_the_batch_std():
    # batch std: values 0 1 2 3 3 3, mean 2, squared deviations 4+1+0+1+1+1 = 8, / 5 -> 1.6
    adv = grpo_math.group_advantages(REWARDS, 3, baseline="group_mean", scale_rewards="batch")
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (math.sqrt(1.6) + EPS)
    assert torch.allclose(adv, expected)


def test_group_mean_baseline_unscaled_is_dr_grpo():
    adv = grpo_math.group_advantages(REWARDS, 3, baseline="group_mean", scale_rewards="none")
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def test_leave_one_out_baseline_is_the_mean_of_the_others():
    # r = 0, 1, 2: baselines (1+2)/2, (0+2)/2, (0+1)/2 = 1.5, 1, 0.5
    adv = grpo_math.group_advantages(REWARDS, 3, baseline="leave_one_out", scale_rewards="none")
    assert torch.allclose(adv, torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    # = G / (G - 1) x the group-mean advantage; the group scaling divides by the same std
    scaled = grpo_math.group_advantages(REWARDS, 3, baseline="leave_one_out",
                                        scale_rewards="group")
    assert torch.allclose(scaled, torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]) / (1.0 + EPS))
    batch = grpo_math.group_advantages(REWARDS, 3, baseline="leave_one_out",
                                       scale_rewards="batch")
    assert torch.allclose(batch, torch.tensor([-1.5, 0.0, 1.5, 0, 0, 0]) / (math.sqrt(1.6) + EPS))


def test_zero_std_groups_are_reported():
    assert grpo_math.zero_std_groups(REWARDS, 3).tolist() == [False, True]
    assert grpo_math.zero_std_groups(torch.tensor([0.5, 0.5, 0.2, 0.5]), 2).tolist() == \
        [True, False]


def test_zero_std_is_an_exact_tie_not_a_relative_closeness():
    """A group near |r| = 100 whose rewards differ by 5e-4 has a learning signal: its scaled
    advantages reach ~1.4, so it is not zero-std (torch.isclose's rtol 1e-5 called it tied)."""
    near = torch.tensor([100.0, 100.0005, -100.0, -100.0005])
    assert grpo_math.zero_std_groups(near, 2).tolist() == [False, False]
    adv = grpo_math.group_advantages(near, 2)
    assert adv.abs().max().item() > 0.5  # the signal filter_zero_std would have dropped
    tied = torch.tensor([100.0, 100.0, -7.25, -7.25, 0.0, 1e-30])
    assert grpo_math.zero_std_groups(tied, 2).tolist() == [True, True, False]


def test_rewards_that_are_not_whole_groups_are_refused():
    with pytest.raises(ValueError, match="whole groups"):
        grpo_math.group_advantages(torch.zeros(5), 2)


# ----------------------------------------------------------------------------- the clip
def _ratio_case(ratio: float, advantage: float, epsilon: float, epsilon_high: float | None):
    logp = torch.tensor([[math.log(ratio)]])
    loss, stats = grpo_math.clipped_token_loss(logp, torch.zeros(1, 1), torch.tensor([advantage]),
                                               torch.ones(1, 1), epsilon, epsilon_high)
    return loss.item(), stats["clipped_low"].item(), stats["clipped_high"].item()


def test_clip_with_epsilon_high():
    # A > 0, ratio 1.5: held at 1 + eps_high (clip-higher) instead of 1 + eps
    loss, low, high = _ratio_case(1.5, 1.0, 0.2, 0.28)
    assert loss == pytest.approx(-1.28) and high and not low
    loss, _, high = _ratio_case(1.5, 1.0, 0.2, None)
    assert loss == pytest.approx(-1.2) and high
    loss, _, high = _ratio_case(1.25, 1.0, 0.2, 0.28)  # inside the higher bound: not clipped
    assert loss == pytest.approx(-1.25) and not high
    # A < 0, ratio 0.5: held at 1 - eps (the lower bound is epsilon whatever epsilon_high)
    loss, low, high = _ratio_case(0.5, -1.0, 0.2, 0.28)
    assert loss == pytest.approx(0.8) and low and not high
    # the pessimistic side is unclipped: A > 0 with a small ratio, A < 0 with a large one
    assert _ratio_case(0.5, 1.0, 0.2, 0.28) == (pytest.approx(-0.5), False, False)
    assert _ratio_case(1.5, -1.0, 0.2, 0.28) == (pytest.approx(1.5), False, False)


# ----------------------------------------------------------------------------- aggregation
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
TOKEN_LOSS = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])


def _aggregate(loss_agg: str, **kw) -> float:
    """grpo_loss with ratio 1, so each token's loss is -A_t = TOKEN_LOSS."""
    logp = torch.zeros(2, 4)
    loss, _ = grpo_math.grpo_loss(logp, logp, -TOKEN_LOSS, MASK, epsilon=0.2,
                                  loss_agg=loss_agg, **kw)
    return loss.item()


def test_each_loss_aggregation():
    assert _aggregate("token_mean") == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert _aggregate("sequence_mean") == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)
    assert _aggregate("dr_grpo", max_new_tokens=4) == pytest.approx(10 / (2 * 4))
    assert _aggregate("dr_grpo", max_new_tokens=8) == pytest.approx(10 / (2 * 8))
    # the whole optimizer batch's counts, when this is one micro-batch of it
    assert _aggregate("token_mean", total_tokens=8) == pytest.approx(10 / 8)
    assert _aggregate("sequence_mean", total_sequences=4) == pytest.approx((2 + 4) / 4)


@pytest.mark.parametrize("loss_agg", grpo_math.LOSS_AGG)
def test_micro_batches_with_the_batch_totals_add_up_to_the_batch_loss(loss_agg):
    torch.manual_seed(0)
    logp, old = torch.randn(6, 5) * 0.1, torch.randn(6, 5) * 0.1
    adv = torch.randn(6)
    mask = (torch.arange(5) < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]).float()
    kw = dict(epsilon=0.2, epsilon_high=0.3, loss_agg=loss_agg, max_new_tokens=5)
    whole, _ = grpo_math.grpo_loss(logp, old, adv, mask, **kw)
    totals = dict(total_tokens=float(mask.sum()), total_sequences=6.0)
    parts = sum(grpo_math.grpo_loss(logp[s], old[s], adv[s], mask[s], **kw, **totals)[0]
                for s in (slice(0, 2), slice(2, 6)))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


@pytest.mark.parametrize("loss_agg", grpo_math.LOSS_AGG)
def test_filtered_sequences_weigh_like_removed_ones(loss_agg):
    """filter_zero_std zeroes a filtered group's mask: the loss and its gradient are those of the
    batch without it."""
    torch.manual_seed(1)
    logp = (torch.randn(4, 3) * 0.1).requires_grad_()
    old, adv = torch.randn(4, 3) * 0.1, torch.randn(4)
    mask = torch.ones(4, 3)
    keep = torch.tensor([1.0, 1.0, 0.0, 0.0])
    kw = dict(epsilon=0.2, loss_agg=loss_agg, max_new_tokens=3)
    filtered, _ = grpo_math.grpo_loss(logp, old, adv, mask * keep[:, None], **kw)
    kept, _ = grpo_math.grpo_loss(logp[:2], old[:2], adv[:2], mask[:2], **kw)
    assert filtered.item() == pytest.approx(kept.item())
    (grad,) = torch.autograd.grad(filtered, logp)
    assert torch.all(grad[2:] == 0)


# ----------------------------------------------------------------------------- KL
def test_kl_in_the_loss_adds_beta_times_k3_per_token():
    # p = 0.5, p_ref = 0.25: log r = log(0.5); k3 = (r - 1) - log r = -0.5 + log 2
    logp = torch.full((1, 2), math.log(0.5))
    ref = torch.full((1, 2), math.log(0.25))
    k3 = -0.5 + math.log(2.0)
    without, _ = grpo_math.grpo_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 2),
                                     epsilon=0.2)
    with_kl, st = grpo_math.grpo_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 2),
                                      epsilon=0.2, ref_logprobs=ref, beta=0.1)
    assert without.item() == pytest.approx(-1.0)
    assert with_kl.item() == pytest.approx(-1.0 + 0.1 * k3)
    assert st["kl"].item() == pytest.approx(k3)
    k1, _ = grpo_math.grpo_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 2), epsilon=0.2,
                                ref_logprobs=ref, beta=0.1, kl_estimator="k1")
    assert k1.item() == pytest.approx(-1.0 + 0.1 * math.log(2.0))


def test_kl_in_the_reward_moves_the_advantages_not_the_loss():
    """kl_in_reward: reward - beta * sum_t KL_t, before the baseline. Two completions of equal
    score, the second 2 nats (k1) from the reference: the closer one is preferred."""
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
    mask = torch.ones(2, 2)
    seq_kl = evaluation.sequence_kl(logp, ref, mask, "k1")
    assert seq_kl.tolist() == [0.0, 2.0]
    rewards = torch.tensor([1.0, 1.0]) - 0.5 * seq_kl
    adv = grpo_math.group_advantages(rewards, 2, scale_rewards="none")
    assert adv.tolist() == [0.5, -0.5]
    # in the loss instead: equal rewards give no advantage, the KL term alone pulls the second
    in_loss, _ = grpo_math.grpo_loss(logp, logp, torch.zeros(2), mask, epsilon=0.2,
                                     ref_logprobs=ref, beta=0.5, kl_estimator="k1")
    assert in_loss.item() == pytest.approx(0.5 * (0 + 0 + 1 + 1) / 4)


def test_entropy_bonus_lowers_the_loss():
    logp = torch.zeros(1, 2)
    entropy = torch.tensor([[1.0, 3.0]])
    loss, _ = grpo_math.grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2),
                                  epsilon=0.2, entropy=entropy, entropy_coef=0.01)
    assert loss.item() == pytest.approx(-0.01 * 2.0)


# ----------------------------------------------------------------------------- TRL parity
TRL_LOSS = {"token_mean": "dapo", "sequence_mean": "grpo", "dr_grpo": "dr_grpo"}


def _trl_loss(loss_type: str, logp, old, ref, adv, mask, *, epsilon, epsilon_high, beta,
              max_len, importance_sampling_level: str = "token"):
    """TRL's own GRPOTrainer._compute_loss on a fixed rollout: its trainer state is replaced by
    the few attributes the loss reads (one process, no accumulation), the model's log-probs by
    ours."""
    trl = pytest.importorskip("trl")
    acc = SimpleNamespace(num_processes=1, reduce=lambda t, reduction="sum": t,
                          gather=lambda t: t, gather_for_metrics=lambda t: t)
    this = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level, beta=beta, loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len,
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)}, accelerator=acc,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    n = logp.shape[0]
    inputs = {"prompt_ids": torch.ones(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2),
              "completion_ids": torch.ones(n, logp.shape[1], dtype=torch.long),
              "completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    return trl.GRPOTrainer._compute_loss(this, None, inputs)


@pytest.mark.parametrize("loss_agg", grpo_math.LOSS_AGG)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_trl(loss_agg, beta):
    torch.manual_seed(2)
    n, T = 6, 5
    old = torch.log_softmax(torch.randn(n, T, 7), -1)[..., 0]
    logp = (old + 0.3 * torch.randn(n, T)).requires_grad_()  # off-policy: some ratios clip
    ref = old + 0.2 * torch.randn(n, T)
    mask = (torch.arange(T) < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]).float()
    adv = grpo_math.group_advantages(torch.rand(n), 3)
    kw = dict(epsilon=0.2, epsilon_high=0.28)
    ours, stats = grpo_math.grpo_loss(logp, old, adv, mask, loss_agg=loss_agg, max_new_tokens=T,
                                      ref_logprobs=ref, beta=beta, kl_estimator="k3", **kw)
    theirs = _trl_loss(TRL_LOSS[loss_agg], logp, old, ref if beta else None, adv, mask,
                       beta=beta, max_len=T, **kw)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    (g_ours,) = torch.autograd.grad(ours, logp)
    (g_theirs,) = torch.autograd.grad(theirs, logp)
    assert torch.allclose(g_ours, g_theirs, atol=1e-6)
    assert 0 < stats["clipfrac"].item() < 1  # the clip is exercised
