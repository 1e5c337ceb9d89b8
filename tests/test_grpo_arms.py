"""The policy-gradient arms of stage=grpo against their reference implementations, on fixed
batches: REINFORCE++ and REINFORCE++-baseline against a transcription of OpenRLHF's
experience maker (compute_reward, get_cumulative_returns, the advantage whitening), GSPO
against TRL 1.16's own GRPOTrainer._compute_loss (importance_sampling_level="sequence"), DAPO's
soft overlong punishment against TRL's get_soft_overlong_punishment. Loss, advantages and
gradient within 1e-5 (fp32 sums over a few dozen terms: rounding is ~1e-7). Then the refill of
DAPO's dynamic sampling on a real tiny model (slow)."""

from __future__ import annotations

import zlib

import pytest
import torch

from rlhf_exp.config import ConfigError
from rlhf_exp.rl import grpo_math, ppo_math
from tests.test_grpo_math import _trl_loss

G = 3


def _batch(seed: int = 3, n: int = 6, T: int = 5):
    torch.manual_seed(seed)
    old = torch.log_softmax(torch.randn(n, T, 7), -1)[..., 0]
    logp = (old + 0.3 * torch.randn(n, T)).requires_grad_()  # off-policy: some ratios clip
    ref = old + 0.2 * torch.randn(n, T)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])[:n]
    mask = (torch.arange(T) < lengths[:, None]).float()
    return logp, old, ref, mask, torch.rand(n)


# ----------------------------------------------------------------------------- REINFORCE++
def _openrlhf_advantages(reward, old, ref, mask, *, kl_coef, baseline, group):
    """OpenRLHF's experience maker (openrlhf/trainer/ppo_utils/experience_maker.py and
    openrlhf/models/utils.py), transcribed: the group mean subtracted (reinforce_baseline),
    compute_reward (the reward at the last action token, - kl_coef * KL per token, KL k1 =
    log_probs - log_probs_base masked), get_cumulative_returns (gamma 1), then the whitening
    over every action token of the batch (var clamped at 1e-8, rsqrt)."""
    if baseline:
        r = reward.reshape(-1, group)
        reward = (r - r.mean(-1, keepdim=True)).reshape(-1)
    kl = (old - ref) * mask
    kl_reward = -kl_coef * kl
    eos_indices = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices,
                                                src=reward.unsqueeze(1).to(kl.dtype))
    rewards = (last_reward + kl_reward) * mask
    returns = torch.zeros_like(rewards)
    cumulative = torch.zeros(rewards.size(0))
    for t in reversed(range(rewards.size(1))):
        cumulative = rewards[:, t] + 1.0 * cumulative
        returns[:, t] = cumulative
    adv, m = returns.flatten().float(), mask.flatten()
    num_actions = m.sum()
    mean = (adv * m).sum() / num_actions
    var = ((adv - mean).pow(2) * m).sum() / num_actions
    rstd = var.clamp(min=1e-8).rsqrt()
    return (returns - mean) * rstd


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_reinforce_pp_advantages_equal_openrlhf(baseline, beta):
    logp, old, ref, mask, reward = _batch()
    kl = ppo_math.kl_per_token(old, ref, "k1")
    ours = grpo_math.reinforce_advantages(reward, mask, G, baseline=baseline, kl=kl, beta=beta)
    theirs = _openrlhf_advantages(reward, old, ref, mask, kl_coef=beta, baseline=baseline,
                                  group=G)
    assert torch.allclose(ours * mask, theirs * mask, atol=1e-5)
    assert (ours[mask == 0] == 0).all()
    # whitened over the real tokens: mean 0, population std 1
    real = ours[mask.bool()]
    assert real.mean().abs() < 1e-5 and (real.var(unbiased=False) - 1).abs() < 1e-4


def test_reinforce_pp_baseline_ignores_a_shift_of_a_group():
    """The baseline variant subtracts each group's mean: adding a constant to one group's
    rewards changes nothing (without the baseline it does)."""
    _, old, ref, mask, reward = _batch()
    shifted = reward + torch.tensor([5.0] * G + [0.0] * G)
    a = grpo_math.reinforce_advantages(reward, mask, G, baseline=True)
    b = grpo_math.reinforce_advantages(shifted, mask, G, baseline=True)
    assert torch.allclose(a, b, atol=1e-5)
    c = grpo_math.reinforce_advantages(shifted, mask, G, baseline=False)
    assert not torch.allclose(grpo_math.reinforce_advantages(reward, mask, G, baseline=False), c,
                              atol=1e-2)


def test_whitening_over_ranks_equals_whitening_of_the_whole_batch():
    """Two ranks' halves with their sums all-reduced whiten like the whole batch at once."""
    torch.manual_seed(0)
    v, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    whole = grpo_math.whiten_tokens(v, mask)
    halves = [(v[:3], mask[:3]), (v[3:], mask[3:])]
    # a two-rank all-reduce, each "rank" adding the other half's sums
    first = torch.stack([torch.where(m.bool(), x, 0.0).sum() for x, m in halves]), \
        torch.stack([m.sum() for _, m in halves])
    total = torch.stack([first[0].sum(), first[1].sum()])
    mean = total[0] / total[1]
    sq = sum(((torch.where(m.bool(), x, 0.0) - mean).pow(2) * m).sum() for x, m in halves)
    calls = iter([total, sq, total, sq])
    parts = [grpo_math.whiten_tokens(x, m, all_reduce_sum=lambda t: next(calls))
             for x, m in halves]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_loss_and_gradient_equal_openrlhf(baseline):
    """The policy loss of REINFORCE++ is the clipped surrogate with token advantages: ours
    (grpo_loss, token_mean) against OpenRLHF's PolicyLoss transcribed (masked_mean over the
    batch's tokens of -min(ratio * A, clip(ratio) * A))."""
    logp, old, ref, mask, reward = _batch()
    adv = grpo_math.reinforce_advantages(reward, mask, G, baseline=baseline,
                                         kl=ppo_math.kl_per_token(old, ref, "k1"), beta=0.05)
    ours, _ = grpo_math.grpo_loss(logp, old, adv, mask, epsilon=0.2, loss_agg="token_mean")
    ratio = (logp - old).exp()
    surr = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    theirs = (surr * mask).sum() / mask.sum()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    (g_ours,) = torch.autograd.grad(ours, logp)
    (g_theirs,) = torch.autograd.grad(theirs, logp)
    assert torch.allclose(g_ours, g_theirs, atol=1e-6)


# ----------------------------------------------------------------------------- GSPO
@pytest.mark.parametrize("loss_agg,trl_type", [("sequence_mean", "grpo"),
                                               ("token_mean", "dapo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_loss_and_gradient_equal_trl(loss_agg, trl_type, beta):
    logp, old, ref, mask, reward = _batch(seed=3)
    adv = grpo_math.group_advantages(reward, G)
    kw = dict(epsilon=3e-4, epsilon_high=4e-4)  # GSPO's clip range: some sequences clip
    ours, stats = grpo_math.grpo_loss(logp, old, adv, mask, loss_agg=loss_agg,
                                      ref_logprobs=ref, beta=beta, kl_estimator="k3",
                                      importance_sampling_level="sequence", **kw)
    trl = pytest.importorskip("trl")
    theirs = _trl_loss(trl_type, logp, old, ref if beta else None, adv, mask, beta=beta,
                       max_len=mask.shape[1], importance_sampling_level="sequence", **kw)
    assert trl.__version__.startswith("1.16")
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    (g_ours,) = torch.autograd.grad(ours, logp)
    (g_theirs,) = torch.autograd.grad(theirs, logp)
    assert torch.allclose(g_ours, g_theirs, atol=1e-6)
    assert 0 < stats["clipfrac"].item() < 1  # the clip is exercised


def test_gspo_ratio_is_one_per_sequence():
    """Every token of a sequence has the same ratio: a sequence whose mean log-ratio is past the
    clip is clipped at all its tokens, another inside it at none."""
    mask = torch.ones(2, 3)
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.3, 0.3, 0.3], [0.5, -0.5, 0.0]])  # means 0.3 and 0
    loss, clip = grpo_math.clipped_token_loss(logp, old, torch.ones(2), mask, 0.2,
                                              importance_sampling_level="sequence")
    assert clip["clipped_high"][0].all() and not clip["clipped_high"][1].any()
    assert torch.allclose(loss[1], -torch.ones(3))  # ratio exp(0) = 1 at every token
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_math.clipped_token_loss(logp, old, torch.ones(2), mask, 0.2,
                                     importance_sampling_level="seq")


# ----------------------------------------------------------------------------- overlong
def test_soft_overlong_penalty_equals_trl():
    trl_rewards = pytest.importorskip("trl.rewards")
    L_max, cache = 12, 4
    lengths = torch.arange(0, 15)
    theirs = trl_rewards.get_soft_overlong_punishment(L_max, cache)([[1] * n for n in lengths])
    ours = grpo_math.soft_overlong_penalty(lengths, L_max, cache)
    assert torch.allclose(ours, torch.tensor(theirs, dtype=torch.float32), atol=1e-6)
    # verl's overlong_penalty_factor scales it
    assert torch.allclose(grpo_math.soft_overlong_penalty(lengths, L_max, cache, 0.5), 0.5 * ours)
    assert ours[8].item() == 0.0 and ours[10].item() == pytest.approx(-0.5)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("override,needle", [
    ("grpo.advantage_estimator=ppo", "grpo.advantage_estimator"),
    ("grpo.importance_sampling_level=seq", "grpo.importance_sampling_level"),
    ("grpo.overlong=cut", "grpo.overlong"),
    ("grpo.refill_max_rounds=2", "grpo.filter_zero_std=true"),
    ("grpo.refill_max_rounds=-1", "grpo.refill_max_rounds"),
])
def test_bad_arm_keys_are_refused(override, needle):
    from rlhf_exp.config import validate
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(compose("stage=grpo", override))


def test_reinforce_refuses_group_keys_and_soft_needs_a_buffer():
    from rlhf_exp.config import validate
    from tests.conftest import compose

    with pytest.raises(ConfigError, match="grpo.baseline"):
        validate(compose("stage=grpo", "grpo=reinforce_pp", "grpo.baseline=leave_one_out"))
    with pytest.raises(ConfigError, match="grpo.overlong_buffer"):
        validate(compose("stage=grpo", "grpo.overlong=soft", "grpo.overlong_buffer=99"))
    for preset in ("reinforce_pp", "reinforce_pp_baseline", "gspo", "dapo"):
        validate(compose("stage=grpo", f"grpo={preset}"))  # every preset is valid


# ----------------------------------------------------------------------------- DAPO refill
def _tied(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % 2 == 0


def half_tied_reward(prompts: list[str], responses: list[str], **_) -> list[float]:
    """A reward that ties every group of about half the prompts (0 for all their answers) and
    spreads the others' (the answer's length): a refill test's reward function."""
    return [0.0 if _tied(p) else float(len(r)) for p, r in zip(prompts, responses)]


@pytest.mark.slow
def test_refill_fills_the_step_with_groups_that_have_a_spread(tmp_path):
    """Each step ends with prompts_per_step groups, every one with a reward spread, though about
    half the prompts sampled have none: the refill rounds replaced them (and say so)."""
    from rlhf_exp.stages import grpo
    from rlhf_exp.training.wandb_reader import read_runs
    from tests.conftest import FAST, compose

    cfg = compose(*FAST, "stage=grpo", "grpo.steps=2", "grpo.prompts_per_step=4",
                  "grpo.num_generations=4", "grpo.micro_batch_size_per_device=16",
                  "grpo.beta=0", "grpo.filter_zero_std=true", "grpo.refill_max_rounds=4",
                  "grpo.eval_num_prompts=8", "grpo.eval_batch_size=8", "logger.table_every=1",
                  "grpo.reward_functions=[{fn: 'tests.test_grpo_arms:half_tied_reward', "
                  "weight: 1.0}]")
    grpo.train(cfg, tmp_path)
    (run,) = read_runs(tmp_path / "wandb")
    assert run.metric("grpo/frac_zero_std") == [0.0, 0.0]  # the batch: no tied group left
    assert run.metric("grpo/groups_short") == [0.0, 0.0]
    generated, dropped = run.metric("grpo/groups_generated"), run.metric("grpo/groups_dropped")
    rounds = run.metric("grpo/refill_rounds")
    assert all(g == 4 * (r + 1) for g, r in zip(generated, rounds))
    assert sum(dropped) > 0 and max(rounds) >= 1  # tied groups were sampled and replaced
    import json
    for table in sorted((tmp_path / "wandb").glob("offline-run-*/files/media/table/grpo/*")):
        data = json.loads(table.read_text())["data"]
        assert len(data) == 16  # 4 groups of 4
        for g in range(4):
            group = data[4 * g:4 * g + 4]
            assert len({row[0] for row in group}) == 1 and not _tied(group[0][0])
            assert len({row[2] for row in group}) > 1  # the rewards differ


def test_concat_groups_pads_without_moving_real_tokens():
    """Groups from rounds of different widths: each row keeps its real tokens, in order, at
    the same positions (position_ids), with padding out of the attention."""
    from rlhf_exp.rl.rollout import Trajectory
    from rlhf_exp.stages.grpo import concat_groups

    def traj(P, R, seed):
        g = torch.Generator().manual_seed(seed)
        seqs = torch.randint(3, 50, (2, P + R), generator=g)
        attn = torch.ones(2, P + R, dtype=torch.long)
        attn[1, :1] = 0  # row 1: one left-pad token
        seqs[1, 0] = 0
        rmask = torch.ones(2, R)
        rmask[0, R - 1:] = 0  # row 0 ended early (pad after EOS)
        attn[0, -1] = 0
        seqs[0, -1] = 0
        return Trajectory(rows=[{"prompt": f"p{seed}"}] * 2, sequences=seqs, attention_mask=attn,
                          position_ids=(attn.cumsum(-1) - 1).clamp_min(0), response_mask=rmask,
                          texts=["a", "b"], gen_s=1.0)

    a, b = traj(3, 4, 0), traj(5, 2, 1)
    out = concat_groups([(a, 0), (b, 0)], 2, pad_id=0)
    assert out.sequences.shape == (4, 5 + 4) and out.response_mask.shape == (4, 4)
    assert out.gen_s == 2.0 and [r["prompt"] for r in out.rows] == ["p0"] * 2 + ["p1"] * 2
    for src, rows in ((a, slice(0, 2)), (b, slice(2, 4))):
        for i, j in zip(range(2), range(rows.start, rows.stop)):
            real_src = src.sequences[i][src.attention_mask[i].bool()]
            real_out = out.sequences[j][out.attention_mask[j].bool()]
            assert torch.equal(real_src, real_out)
            assert torch.equal(src.position_ids[i][src.attention_mask[i].bool()],
                               out.position_ids[j][out.attention_mask[j].bool()])
            r = src.response_mask.shape[1]
            assert torch.equal(out.response_mask[j, :r], src.response_mask[i])
            assert not out.response_mask[j, r:].any()
            # the response columns line up: response token t of the source at column P' + t
            assert torch.equal(out.responses[j, :r][src.response_mask[i].bool()],
                               src.responses[i][src.response_mask[i].bool()])


@pytest.mark.slow
@pytest.mark.parametrize("preset,extra", [
    ("reinforce_pp", ["grpo.overlong=mask"]), ("reinforce_pp_baseline", []), ("gspo", []),
    ("dapo", [])])
def test_each_preset_trains(preset, extra, tmp_path):
    """Each new preset runs a real (tiny) GRPO stage end to end, its own metrics logged."""
    import math

    from rlhf_exp.stages import grpo
    from rlhf_exp.training.wandb_reader import read_runs
    from tests.conftest import FAST, compose

    cfg = compose(*FAST, "stage=grpo", f"grpo={preset}", "grpo.steps=2",
                  "grpo.prompts_per_step=4", "grpo.num_generations=4",
                  "grpo.micro_batch_size_per_device=8", "grpo.eval_num_prompts=8",
                  "grpo.eval_batch_size=8", "grpo.generation.max_new_tokens=8",
                  "grpo.reward_functions=[{fn: 'tests.test_grpo_arms:half_tied_reward', "
                  "weight: 1.0}]", *extra)
    grpo.train(cfg, tmp_path)
    (run,) = read_runs(tmp_path / "wandb")
    assert all(math.isfinite(v) for v in run.metric("grpo/pg_loss"))
    if preset.startswith("reinforce"):
        assert len(run.metric("grpo/kl")) == 2  # beta 0.01: the reference is loaded
    if preset == "dapo":
        assert all(p <= 0 for p in run.metric("grpo/overlong_penalty"))
        assert len(run.metric("grpo/groups_generated")) == 2


@pytest.mark.slow
def test_refill_on_two_ranks_with_zero3_stays_in_lockstep(tmp_path):
    """2 ranks under ZeRO-3 (every decode step a collective): each rank refills its own groups,
    the ranks run the same rounds (a rank that stopped early would hang the other), with
    REINFORCE++-baseline's whitening and GSPO's ratio on top; every step logs its counts."""
    from rlhf_exp.training.wandb_reader import read_runs
    from tests.conftest import ROOT, cli

    run_dir = tmp_path / "run"
    proc = cli("stage=grpo", "grpo=dapo", "hardware.nproc_per_node=2", "zero_stage=zero3",
               "seed=7", "data_mix.sources.0.synthetic.num_examples=600",
               "logger.log_checkpoints=false", "grpo.steps=3", "grpo.prompts_per_step=4",
               "grpo.num_generations=4", "grpo.micro_batch_size_per_device=8",
               "grpo.eval_num_prompts=8", "grpo.eval_batch_size=8", "grpo.refill_max_rounds=3",
               "grpo.advantage_estimator=reinforce_baseline",
               "grpo.importance_sampling_level=sequence",
               "grpo.reward_functions=[{fn: 'tests.test_grpo_arms:half_tied_reward', "
               "weight: 1.0}]", f"hydra.run.dir={run_dir}", timeout=900,
               env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching 2 ranks" in proc.stdout
    (run,) = read_runs(run_dir / "wandb")
    rounds, generated = run.metric("grpo/refill_rounds"), run.metric("grpo/groups_generated")
    assert len(rounds) == 3 and all(g == 4 * (r + 1) for g, r in zip(generated, rounds))
    assert sum(run.metric("grpo/groups_dropped")) > 0
    short = run.metric("grpo/groups_short")
    assert all(f == 0 for f, s in zip(run.metric("grpo/frac_zero_std"), short) if s == 0)
