"""Unit tests for rlhf_exp.rl.ppo_math against numbers derived by hand in the comments."""

import math

import pytest
import torch

from rlhf_exp.rl.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_token_rewards,
    entropy_from_logits,
    explained_variance,
    gae_advantages_and_returns,
    kl_per_token,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

LN2 = math.log(2.0)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


def close(a, b, atol=1e-5):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# -----------------------------------------------------------------------------
# log-probs / entropy


def test_logprobs_from_logits_hand_values():
    # logits = log([1, 2, 3]) -> probs [1/6, 2/6, 3/6] at every position
    logits = torch.log(t([1.0, 2.0, 3.0])).expand(1, 3, 3)
    labels = torch.tensor([[0, 1, 2]])
    expected = [[math.log(1 / 6), math.log(2 / 6), math.log(3 / 6)]]
    close(logprobs_from_logits(logits, labels), expected)


def test_logprobs_from_logits_matches_log_softmax_and_upcasts_bf16():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, labels), ref)
    out = logprobs_from_logits(logits.bfloat16(), labels)
    assert out.dtype == torch.float32
    close(out, ref, atol=0.05)


def test_logprobs_from_logits_gradient_flows():
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[0]])).sum().backward()
    # d log softmax_0 / d l = onehot(0) - softmax = [1 - 1/2, -1/2]
    close(logits.grad, [[[0.5, -0.5]]])


def test_entropy_from_logits_hand_values():
    # uniform over 4 -> ln 4; probs (1/2, 1/4, 1/4) -> 0.5 ln2 + 2 * 0.25 * ln4 = 1.5 ln2;
    # near one-hot -> ~0
    logits = torch.stack(
        [
            t([0.0, 0.0, 0.0, 0.0]),
            torch.log(t([0.5, 0.25, 0.25, 1e-30])),
            t([100.0, 0.0, 0.0, 0.0]),
        ]
    ).unsqueeze(0)  # [1, 3, 4]
    close(entropy_from_logits(logits), [[2 * LN2, 1.5 * LN2, 0.0]])


# -----------------------------------------------------------------------------
# masked reductions


def test_masked_reductions_hand_values_and_padding_ignored():
    x = t([[1.0, 2.0, 3.0, float("nan")], [4.0, 6.0, float("inf"), -1e9]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    close(masked_sum(x, mask), 16.0)  # 1+2+3+4+6
    close(masked_sum(x, mask, dim=1), [6.0, 10.0])
    close(masked_mean(x, mask), 16.0 / 5)
    close(masked_mean(x, mask, dim=1), [2.0, 5.0])
    # values 1,2,3,4,6: mean 3.2; squared deviations 4.84+1.44+0.04+0.64+7.84 = 14.8
    close(masked_var(x, mask), 14.8 / 4)
    close(masked_var(x, mask, unbiased=False), 14.8 / 5)


def test_masked_reductions_empty_mask_gives_zero_not_nan():
    x = t([[1.0, 2.0], [3.0, 4.0]])
    mask = t([[0, 0], [1, 0]])
    close(masked_mean(x, mask, dim=1), [0.0, 3.0])
    close(masked_mean(x, torch.zeros(2, 2)), 0.0)
    close(masked_var(x, mask), 0.0)  # single token: no spread, not NaN


def test_masked_whiten_mean0_std1_and_padding_zero():
    x = t([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 99.0, -99.0]])
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    w = masked_whiten(x, mask)
    # entries 1..6: mean 3.5, unbiased var = 17.5 / 5 = 3.5
    close(w[0], (t([1.0, 2.0, 3.0, 4.0]) - 3.5) / math.sqrt(3.5))
    close(w[mask].mean(), 0.0)
    close(w[mask].std(), 1.0)
    close(w[1, 2:], [0.0, 0.0])
    w2 = masked_whiten(x, mask, shift_mean=False)
    close(w2[mask].mean(), 3.5)
    close(w2[mask].std(), 1.0)


# -----------------------------------------------------------------------------
# KL


def test_kl_per_token_hand_values():
    logp = torch.log(t([[0.5, 0.25]]))
    ref = torch.log(t([[0.25, 0.5]]))
    # k1 = logp - ref = [ln2, -ln2]
    close(kl_per_token(logp, ref, "k1"), [[LN2, -LN2]])
    # r = p_ref / p = [0.5, 2]; k3 = (r - 1) - ln r = [-0.5 + ln2, 1 - ln2] = [0.1931, 0.3069]
    close(kl_per_token(logp, ref, "k3"), [[-0.5 + LN2, 1.0 - LN2]])
    # k2 = 0.5 * (ln r)^2 = 0.5 ln2^2 for both
    close(kl_per_token(logp, ref, "k2"), [[0.5 * LN2**2, 0.5 * LN2**2]])


def test_kl_k3_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(1)
    logp, ref = torch.randn(4, 50, generator=g) * 3, torch.randn(4, 50, generator=g) * 3
    assert (kl_per_token(logp, ref, "k3") >= 0).all()
    assert (kl_per_token(logp, ref, "k1") < 0).any()  # k1 is not pointwise non-negative
    close(kl_per_token(logp, logp, "k3"), torch.zeros(4, 50))


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k1.*k3"):
        kl_per_token(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# -----------------------------------------------------------------------------
# rewards


def test_last_token_index():
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 0, 3, 0]
    assert last_token_index(mask.bool()).tolist() == [2, 0, 3, 0]


def test_compute_token_rewards_places_clipped_score_at_last_token():
    kl = t([[0.1, 0.2, 0.3, 0.4], [0.5, -0.5, 7.0, 7.0]])
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    scores = t([2.0, -9.0])
    r = compute_token_rewards(kl, scores, mask, kl_coef=0.1, clip_score=5.0)
    # row 0: -0.1 * kl, score 2 (inside clip) added at t=3: -0.04 + 2 = 1.96
    # row 1: -0.1 * kl on t=0,1; score -9 clipped to -5 at t=1: 0.05 - 5 = -4.95; padding 0
    close(r, [[-0.01, -0.02, -0.03, 1.96], [-0.05, -4.95, 0.0, 0.0]])
    r = compute_token_rewards(kl, scores, mask, kl_coef=0.1, clip_score=None)
    close(r[1], [-0.05, 0.05 - 9.0, 0.0, 0.0])


def test_compute_token_rewards_empty_row_gets_nothing():
    r = compute_token_rewards(t([[0.3, 0.3]]), t([4.0]), t([[0, 0]]), kl_coef=0.1, clip_score=5.0)
    close(r, [[0.0, 0.0]])


# -----------------------------------------------------------------------------
# GAE


def test_gae_gamma1_lam095_hand_values():
    values, rewards, mask = t([[0.5, 0.6, 0.7]]), t([[0.0, 0.0, 1.0]]), t([[1, 1, 1]])
    adv, ret = gae_advantages_and_returns(values, rewards, mask, gamma=1.0, lam=0.95)
    # t=2: delta = 1 + 0 - 0.7 = 0.3                 A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1              A1 = 0.1 + 0.95 * 0.3   = 0.385
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1              A0 = 0.1 + 0.95 * 0.385 = 0.46575
    close(adv, [[0.46575, 0.385, 0.3]])
    close(ret, [[0.96575, 0.985, 1.0]])  # A + V


def test_gae_gamma09_lam05_hand_values():
    values, rewards, mask = t([[0.5, 0.6, 0.7]]), t([[0.0, 0.0, 1.0]]), t([[1, 1, 1]])
    adv, _ = gae_advantages_and_returns(values, rewards, mask, gamma=0.9, lam=0.5)
    # t=2: delta = 1 - 0.7 = 0.3                      A2 = 0.3
    # t=1: delta = 0.9 * 0.7 - 0.6 = 0.03            A1 = 0.03 + 0.45 * 0.3   = 0.165
    # t=0: delta = 0.9 * 0.6 - 0.5 = 0.04            A0 = 0.04 + 0.45 * 0.165 = 0.11425
    close(adv, [[0.11425, 0.165, 0.3]])


def test_gae_lam1_returns_are_discounted_reward_to_go():
    values, rewards, mask = t([[0.5, 0.6, 0.7]]), t([[0.2, 0.0, 1.0]]), t([[1, 1, 1]])
    _, ret = gae_advantages_and_returns(values, rewards, mask, gamma=1.0, lam=1.0)
    close(ret, [[1.2, 1.0, 1.0]])  # Monte Carlo returns: values cancel out


def test_gae_stops_bootstrapping_at_masked_end():
    # same first 3 tokens as the gamma=1 example, then a padding token with a huge value and
    # reward that must be ignored: V after EOS counts as 0
    values, rewards = t([[0.5, 0.6, 0.7, 100.0]]), t([[0.0, 0.0, 1.0, 50.0]])
    mask = t([[1, 1, 1, 0]])
    adv, ret = gae_advantages_and_returns(values, rewards, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.46575, 0.385, 0.3, 0.0]])
    close(ret, [[0.96575, 0.985, 1.0, 0.0]])


def test_gae_batch_rows_independent_and_detached():
    values = t([[0.5, 0.6, 0.7, 9.0], [1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    rewards = t([[0.0, 0.0, 1.0, 9.0], [0.0, 0.0, 0.0, 1.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv, ret = gae_advantages_and_returns(values, rewards, mask, gamma=1.0, lam=0.95)
    assert not adv.requires_grad and not ret.requires_grad
    close(adv[0], [0.46575, 0.385, 0.3, 0.0])
    # row 1, gamma 1: deltas = [1, 1, 1, 1 - 4 = -3]
    # A3 = -3; A2 = 1 - 2.85 = -1.85; A1 = 1 - 1.7575 = -0.7575; A0 = 1 - 0.719625 = 0.280375
    close(adv[1], [0.280375, -0.7575, -1.85, -3.0])


# -----------------------------------------------------------------------------
# policy loss


def test_policy_loss_clipping_hand_values():
    ratios = t([[1.1, 1.5, 0.5, 0.9]])
    old = torch.zeros(1, 4)
    logp = torch.log(ratios).requires_grad_()
    adv = t([[1.0, 1.0, -1.0, -1.0]])
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 4), clip_range=0.2)
    # per token max(-A r, -A clip(r)):
    #   r=1.1 A=+1: -1.1 vs -1.1 -> -1.1 (unclipped)
    #   r=1.5 A=+1: -1.5 vs -1.2 -> -1.2 (clipped)
    #   r=0.5 A=-1:  0.5 vs  0.8 ->  0.8 (clipped)
    #   r=0.9 A=-1:  0.9 vs  0.9 ->  0.9 (unclipped)
    close(loss, (-1.1 - 1.2 + 0.8 + 0.9) / 4)
    close(stats["clipfrac"], 0.5)
    # approx_kl = mean of k3 = (r - 1) - ln r
    k3 = [(r - 1) - math.log(r) for r in (1.1, 1.5, 0.5, 0.9)]
    close(stats["approx_kl"], sum(k3) / 4)
    # gradient d/dlogp = -A * r / 4 on unclipped tokens, 0 where the clipped branch is taken
    loss.backward()
    close(logp.grad, [[-1.1 / 4, 0.0, 0.0, 0.9 / 4]])


def test_policy_loss_equals_unclipped_surrogate_within_clip_or_when_pessimistic():
    # r=0.5 with A=+1 is outside the clip range but the unclipped term is the larger (pessimistic)
    # one: -0.5 vs -0.8 -> -0.5, not clipped. r=1.05, A=2: -2.1 both ways.
    logp, old = torch.log(t([[0.5, 1.05]])), torch.zeros(1, 2)
    loss, stats = policy_loss(logp, old, t([[1.0, 2.0]]), torch.ones(1, 2), clip_range=0.2)
    close(loss, (-0.5 - 2.1) / 2)
    close(stats["clipfrac"], 0.0)


def test_policy_loss_ignores_padding_values_and_gradients():
    mask = t([[1, 1, 0]])
    old = torch.zeros(1, 3)
    adv = t([[1.0, -1.0, 5.0]])
    logp_a = t([[0.1, -0.1, 0.0]], requires_grad=True)
    logp_b = t([[0.1, -0.1, 1000.0]], requires_grad=True)  # exp(1000) would overflow
    adv_b = t([[1.0, -1.0, float("nan")]])
    loss_a, stats_a = policy_loss(logp_a, old, adv, mask, clip_range=0.2)
    loss_b, stats_b = policy_loss(logp_b, old, adv_b, mask, clip_range=0.2)
    close(loss_a, loss_b)
    for k in stats_a:
        close(stats_a[k], stats_b[k])
    loss_b.backward()
    assert torch.isfinite(logp_b.grad).all() and logp_b.grad[0, 2] == 0.0


# -----------------------------------------------------------------------------
# value loss


def test_value_loss_clipping_hand_values():
    old = t([[1.0, 1.0, 1.0, 1.0]])
    values = t([[1.5, 1.1, 0.5, 1.5]], requires_grad=True)
    returns = t([[2.0, 0.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 4), clip_range=0.2)
    # v_clip = [1.2, 1.1, 0.8, 1.2]
    #   t0: (1.5-2)^2 = 0.25 vs (1.2-2)^2 = 0.64 -> 0.64 (clipped)
    #   t1: (1.1-0)^2 = 1.21 vs 1.21          -> 1.21
    #   t2: (0.5-1)^2 = 0.25 vs (0.8-1)^2 = 0.04 -> 0.25
    #   t3: (1.5-0)^2 = 2.25 vs (1.2-0)^2 = 1.44 -> 2.25
    close(loss, 0.5 * (0.64 + 1.21 + 0.25 + 2.25) / 4)
    close(stats["vf_clipfrac"], 0.25)
    loss.backward()
    # d/dv 0.5 (v-R)^2 / 4 = (v-R)/4 on unclipped terms, 0 where the clipped term wins
    close(values.grad, [[0.0, 1.1 / 4, -0.5 / 4, 1.5 / 4]])


def test_value_loss_ignores_padding():
    mask = t([[1, 0]])
    a, sa = value_loss(t([[1.5, 0.0]]), t([[1.0, 0.0]]), t([[2.0, 0.0]]), mask, 0.2)
    b, sb = value_loss(t([[1.5, 7.0]]), t([[1.0, -3.0]]), t([[2.0, 1e6]]), mask, 0.2)
    close(a, 0.5 * 0.64)
    close(a, b)
    close(sa["vf_clipfrac"], sb["vf_clipfrac"])


# -----------------------------------------------------------------------------
# explained variance


def test_explained_variance_hand_values():
    returns, mask = t([[1.0, 2.0, 3.0, 50.0]]), t([[1, 1, 1, 0]])
    assert explained_variance(t([[1.0, 2.0, 3.0, -7.0]]), returns, mask) == pytest.approx(1.0)
    assert explained_variance(t([[0.0, 0.0, 0.0, 0.0]]), returns, mask) == pytest.approx(0.0)
    # R - V = [0, 0, -1]: mean -1/3, unbiased var = (1/9 + 1/9 + 4/9) / 2 = 1/3; Var[R] = 1
    ev = explained_variance(t([[1.0, 2.0, 4.0, 0.0]]), returns, mask)
    assert isinstance(ev, float) and ev == pytest.approx(2 / 3)
    # constant returns: 0.0 by convention, not NaN
    assert explained_variance(t([[0.0, 1.0]]), t([[3.0, 3.0]]), t([[1, 1]])) == 0.0


# -----------------------------------------------------------------------------
# KL controllers


def test_fixed_kl_controller():
    c = FixedKLController(0.1)
    c.update(current_kl=100.0, n_steps=256)
    assert c.value == 0.1


def test_adaptive_kl_controller_direction_and_clip():
    # target 6, horizon 10000, 256 steps per update
    up = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    up.update(current_kl=12.0, n_steps=256)  # error 12/6 - 1 = 1 clipped to 0.2
    assert up.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))  # 0.100512
    near = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    near.update(current_kl=6.3, n_steps=256)  # error 0.05, inside the clip
    assert near.value == pytest.approx(0.1 * (1 + 0.05 * 256 / 10000))  # 0.100128
    down = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    down.update(current_kl=0.0, n_steps=256)  # error -1 clipped to -0.2
    assert down.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))  # 0.099488
    assert down.value < 0.1 < near.value < up.value


def test_kl_controller_state_dict_round_trip():
    a = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    for kl in (12.0, 9.0, 1.0):
        a.update(kl, 256)
    b = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    b.load_state_dict(a.state_dict())
    assert b.value == a.value != 0.5
    a.update(8.0, 256)
    b.update(8.0, 256)
    assert b.value == a.value
    f = FixedKLController(0.3)
    f.load_state_dict(FixedKLController(0.05).state_dict())
    assert f.value == 0.05


# -----------------------------------------------------------------------------
# running moments


def test_running_moments_hand_values():
    rm = RunningMoments()
    assert (rm.mean, rm.std) == (0.0, 1.0)  # identity normalisation before any data
    # batch [1, 2, 3]: mean 2, unbiased std 1
    assert rm.update(t([1.0, 2.0, 3.0])) == pytest.approx((2.0, 1.0))
    # batch [4, 5]: mean 4.5, std sqrt(0.5)
    assert rm.update(t([4.0, 5.0])) == pytest.approx((4.5, math.sqrt(0.5)))
    # all of 1..5: mean 3, unbiased var = 10 / 4 = 2.5
    assert rm.mean == pytest.approx(3.0)
    assert rm.std == pytest.approx(math.sqrt(2.5))


def test_running_moments_matches_concatenated_torch_stats():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, generator=g) * 3 + 7 for n in (1, 5, 17, 64)]
    batches.append(torch.randn(4, 8, generator=g))  # any shape: every element counts
    rm = RunningMoments()
    for b in batches:
        rm.update(b)
    all_x = torch.cat([b.flatten() for b in batches]).double()
    assert rm.count == all_x.numel()
    assert rm.mean == pytest.approx(all_x.mean().item(), rel=1e-9)
    assert rm.std == pytest.approx(all_x.std().item(), rel=1e-9)


def test_running_moments_state_dict_round_trip():
    a = RunningMoments()
    a.update(t([1.0, 2.0, 3.0]))
    b = RunningMoments()
    b.load_state_dict(a.state_dict())
    for rm in (a, b):
        rm.update(t([10.0, 20.0]))
    assert (b.mean, b.std, b.count) == (a.mean, a.std, a.count)
    assert b.count == 5 and b.mean == pytest.approx(36.0 / 5)


def test_gae_outputs_zero_at_any_padding_even_leading():
    # a row with leading padding (not the usual layout) must still give exactly 0 there, and the
    # real tokens must match the 3-token gamma=1 example
    values, rewards = t([[9.0, 0.5, 0.6, 0.7]]), t([[9.0, 0.0, 0.0, 1.0]])
    mask = t([[0, 1, 1, 1]])
    adv, ret = gae_advantages_and_returns(values, rewards, mask, gamma=1.0, lam=0.95)
    close(adv, [[0.0, 0.46575, 0.385, 0.3]])
    close(ret, [[0.0, 0.96575, 0.985, 1.0]])
