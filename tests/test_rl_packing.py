"""Packed rows in the RL update and scoring forwards (rlhf_exp/rl/packed_rows.py): the layout,
the token-budget planner, and exactness: on a fixed rollout of the tiny model, a packed
update's loss and gradients equal the padded one's (GRPO with its token-budget micro-batches,
PPO with its row micro-batches), and so do the rollout's log-probs, values and reward scores.

Tolerance: fp32 throughout; the two paths add the same terms in a different order and through
differently shaped kernels (one row of L tokens vs B padded rows), which moves fp32 results by
~1e-7 relative; 1e-5 (the issue's bound) leaves two orders of margin and still catches any
token attending across sequences, a wrong position or a missed token (those move log-probs by
1e-2 and more).
"""

from __future__ import annotations

import pytest
import torch

from rlhf_exp.config import ConfigError
from rlhf_exp.modeling import models
from rlhf_exp.rl import grpo_math, packed_rows, ppo_math, rollout
from rlhf_exp.stages import grpo, ppo
from rlhf_exp.training import engine
from rlhf_exp.training.wandb_reader import read_runs
from tests.conftest import FAST, compose, tiny_groups

TOL = dict(atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the layout
def _two_rows():
    """One prompt (2 real tokens after one pad), two responses of 3 and 2 tokens (EOS = 2)."""
    seq = torch.tensor([[0, 11, 12, 21, 22, 2], [0, 11, 12, 31, 2, 0]])
    resp = torch.tensor([[1, 1, 1], [1, 1, 0]]).float()
    attn = torch.cat([torch.tensor([[0, 1, 1], [0, 1, 1]]), resp.long()], 1)
    return seq, attn, resp


def test_a_group_packs_behind_its_one_prompt():
    seq, attn, resp = _two_rows()
    p = packed_rows.pack(seq, attn, resp, group_size=2)
    # the responses' last tokens (EOS) are never read as inputs: left out
    assert p.input_ids.tolist() == [[11, 12, 21, 22, 31]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # each response continues its prompt
    assert p.read_at.tolist() == [1, 2, 3, 1, 4]  # prompt end predicts token 0 of both
    assert p.labels.tolist() == [21, 22, 2, 31, 2]
    allowed = (p.attention_mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 0],
                       [1, 1, 0, 0, 1]]  # the second response never sees the first
    out = p.scatter(torch.arange(1.0, 6.0))
    assert out.tolist() == [[1, 2, 3], [4, 5, 0]]  # zeros where the response mask is 0


def test_rows_pack_alone_and_reward_reads_the_last_token():
    seq, attn, resp = _two_rows()
    p = packed_rows.pack(seq, attn, resp)  # group_size 1: each row its own prompt
    assert p.input_ids.tolist() == [[11, 12, 21, 22, 11, 12, 31]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]  # restarting per sequence
    allowed = p.attention_mask[0, 0] == 0
    assert not allowed[4:, :4].any()  # nothing crosses sequences
    full = packed_rows.pack(seq, attn, resp, group_size=2, full_responses=True)
    assert full.input_ids.tolist() == [[11, 12, 21, 22, 2, 31, 2]]
    assert full.last_at.tolist() == [4, 6]  # each response's EOS
    two = packed_rows.pack(seq, attn, resp, row_tokens=4)  # a row per sequence, padded to 4
    assert two.input_ids.tolist() == [[11, 12, 21, 22], [11, 12, 31, 0]]
    assert two.read_at.tolist() == [1, 2, 3, 5, 6]  # flat over the 2 x 4 tokens
    assert (two.attention_mask[1, 0, 3] == 0).tolist() == [False, False, False, True]
    assert packed_rows.packed_length(attn, resp, 2) == [5]
    assert packed_rows.packed_length(attn, resp, 1) == [4, 3]
    with pytest.raises(ValueError, match="share their prompt"):
        packed_rows.pack(torch.cat([seq[:1], seq[:1] + 1]), attn, resp, group_size=2)


def test_token_budget_planner_keeps_order_and_splits_to_a_count():
    plan = packed_rows.plan_micro_batches([3, 3, 5, 1, 1], budget=6)
    assert plan == [range(0, 2), range(2, 4), range(4, 5)]  # 3+3, 5+1, 1
    assert packed_rows.plan_micro_batches([10, 2], budget=4) == [range(0, 1), range(1, 2)]
    costs = [1, 1, 1, 1]
    split = packed_rows.split_to([range(0, 4)], costs, 3)
    assert len(split) == 3 and [u for r in split for u in r] == [0, 1, 2, 3]
    assert packed_rows.split_to(plan, [3, 3, 5, 1, 1], 3) == plan


def test_models_that_cannot_take_the_mask_fall_back_to_padded_rows(fixed):
    cfg, model, tok, traj = fixed
    assert packed_rows.why_not(model, None) is None
    model.config._attn_implementation = "flash_attention_2"
    try:
        assert "flash_attention_2" in packed_rows.why_not(model)
        geo = grpo.packing_geometry(cfg, 1, grpo.Models(tok, model, None, None, [], 0))
        assert geo.token_budget is None  # padded rows, the KV-cache shared prompt as before
    finally:
        model.config._attn_implementation = "sdpa"
    geo = grpo.packing_geometry(cfg, 1, grpo.Models(tok, model, None, None, [], 0))
    assert geo.token_budget == cfg.grpo.micro_batch_tokens and geo.prompt_group == 4


# ----------------------------------------------------------------------------- a fixed rollout
def _rollout(cfg):
    """The tiny Llama (seeded random weights, fp32) and a fixed rollout of 3 prompts x 4 sampled
    completions whose responses are cut at EOS at lengths 1 .. 8 (the random model rarely
    stops by itself): left-padded prompts of 3 lengths, ragged responses."""
    model, tok, sample = tiny_groups(cfg)
    traj = sample(4)
    R = traj.response_mask.shape[1]
    P = traj.sequences.shape[1] - R
    lengths = [8, 3, 1, 6, 2, 8, 5, 4, 7, 1, 3, 8]
    seq, attn = traj.sequences.clone(), traj.attention_mask.clone()
    mask = torch.zeros(len(lengths), R)
    for i, n in enumerate(lengths):
        seq[i, P + n - 1] = tok.eos_token_id
        seq[i, P + n:] = tok.pad_token_id
        attn[i, P + n:] = 0
        mask[i, :n] = 1
    traj = rollout.Trajectory(traj.rows, seq, attn, traj.position_ids, mask, traj.texts, 0.0)
    return model, tok, traj


@pytest.fixture(scope="module")
def fixed():
    cfg = compose(*FAST, "stage=grpo", "grpo.prompts_per_step=3", "grpo.num_generations=4",
                  "grpo.micro_batch_size_per_device=4")
    return cfg, *_rollout(cfg)


def test_rollout_logprobs_values_and_scores_match_padded(fixed):
    cfg, model, tok, traj = fixed
    mask = traj.response_mask.bool()
    padded = rollout.logprobs(model, traj, temperature=0.7, micro_batch=4)
    for group, budget in ((4, 4096), (4, 30), (1, 16)):  # one forward, or several
        packed = rollout.logprobs(model, traj, temperature=0.7, micro_batch=4,
                                  group_size=group, token_budget=budget)
        torch.testing.assert_close(packed[mask], padded[mask], **TOL)
        assert (packed[~mask] == 0).all()
    rm = models.load_reward_model(models.resolve_base_path(cfg.model), tok, cfg.model)
    rm = engine.disable_dropout(rm).eval()
    torch.testing.assert_close(
        rollout.reward_model_scores(rm, traj, micro_batch=4, token_budget=40),
        rollout.reward_model_scores(rm, traj, micro_batch=4), **TOL)
    critic = ppo.as_value_model(rm)
    torch.testing.assert_close(ppo.critic_values(critic, traj, 4, token_budget=40)[mask],
                               ppo.critic_values(critic, traj, 4)[mask], **TOL)


def _grpo_experience(model, traj, temp: float) -> grpo.Experience:
    """Old and reference log-probs a little off the policy (ratios away from 1, some clipped),
    advantages of both signs, the last group filtered."""
    g = torch.Generator().manual_seed(1)
    n, R = traj.response_mask.shape
    with torch.no_grad():
        logp = rollout.logprobs(model, traj, temperature=temp, micro_batch=4)
    old = logp + 0.3 * torch.randn(n, R, generator=g)
    ref = logp + 0.3 * torch.randn(n, R, generator=g)
    keep = torch.tensor([1.0] * 8 + [0.0] * 4)
    return grpo.Experience(traj.sequences, traj.attention_mask, traj.position_ids,
                           traj.response_mask, old, ref, torch.randn(n, generator=g), keep)


def _grpo_update(model, exp, geo, cfg, temp, entropy_coef):
    """The loss and gradients of one GRPO minibatch (the rows in a shuffled group order), with
    grpo_step's own micro-batching, forward, loss and normalisers (the engine's scaling aside:
    one rank, its accumulation undone as grpo_step does)."""
    model.zero_grad()
    rows = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7])  # whole groups, reordered
    tokens, sequences = grpo.minibatch_totals(exp, rows, torch.device("cpu"))
    m = grpo.Models(None, model, None, None, [], 0)
    total, micros = 0.0, grpo.micro_batches(exp, rows, geo)
    for idx in micros:
        b = exp.select(idx)
        logp, ent = grpo.update_forward(m, geo, b, temp, entropy_coef > 0)
        loss, _ = grpo_math.grpo_loss(
            logp, b.old_logprobs, b.advantages, b.mask * b.keep[:, None], epsilon=0.2,
            epsilon_high=0.28, loss_agg=cfg.grpo.loss_agg, max_new_tokens=8,
            ref_logprobs=b.ref_logprobs, beta=0.1, entropy=ent, entropy_coef=entropy_coef,
            total_tokens=tokens, total_sequences=sequences)
        loss.backward()
        total += loss.item()
    return total, len(micros), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("loss_agg, entropy_coef", [("token_mean", 0.0),
                                                    ("sequence_mean", 0.01)])
def test_grpo_packed_update_equals_padded(fixed, loss_agg, entropy_coef):
    cfg, model, tok, traj = fixed
    cfg.grpo.loss_agg = loss_agg
    temp = 0.7
    exp = _grpo_experience(model, traj, temp)
    base = dict(prompts_local=3, n_local=12, minibatch=12, micro=4, grad_accum=3,
                optimizer_steps=1, group=4, shuffle_groups=True)
    padded = grpo.Geometry(**base, prompt_group=1)
    shared = grpo.Geometry(**base, prompt_group=4)
    loss0, n0, grads0 = _grpo_update(model, exp, padded, cfg, temp, entropy_coef)
    assert n0 == 3
    for budget, micros in ((4096, 1), (40, 3)):  # one packed row, or a row per group
        packed = grpo.Geometry(**base, prompt_group=4, token_budget=budget)
        loss, n, grads = _grpo_update(model, exp, packed, cfg, temp, entropy_coef)
        assert n == micros
        assert loss == pytest.approx(loss0, abs=1e-6, rel=1e-5)
        for a, b in zip(grads, grads0):
            torch.testing.assert_close(a, b, **TOL)
    loss_s, _, grads_s = _grpo_update(model, exp, shared, cfg, temp, entropy_coef)
    assert loss_s == pytest.approx(loss0, abs=1e-6, rel=1e-5)  # the KV-cache path agrees too
    assert any(g.abs().max() > 1e-3 for g in grads0)  # a gradient worth comparing


def test_ppo_packed_micro_batch_equals_padded(fixed):
    """ppo_step's actor and critic forwards on one micro-batch: policy and value losses and
    both models' gradients, packed vs padded rows."""
    cfg, model, tok, traj = fixed
    critic = ppo.as_value_model(engine.disable_dropout(models.load_reward_model(
        models.resolve_base_path(cfg.model), tok, cfg.model)))
    g = torch.Generator().manual_seed(2)
    n, R = traj.response_mask.shape
    with torch.no_grad():
        logp = rollout.logprobs(model, traj, temperature=1.0, micro_batch=4)
        values = ppo.critic_values(critic, traj, 4)
    exp = ppo.Experience(traj.sequences, traj.attention_mask, traj.position_ids,
                         traj.response_mask, logp + 0.3 * torch.randn(n, R, generator=g),
                         values + 0.1 * torch.randn(n, R, generator=g),
                         torch.randn(n, R, generator=g), torch.randn(n, R, generator=g))
    b = exp.select(torch.tensor([5, 0, 11, 2, 7, 9]))
    out = []
    for packing in (False, True):
        model.zero_grad()
        critic.zero_grad()
        # rows of at most 24 tokens: the 6 sequences (7-15 tokens each) in several packed rows
        packed = (packed_rows.pack(b.sequences, b.attention_mask, b.mask, row_tokens=24)
                  if packing else None)
        assert packed is None or packed.input_ids.shape[0] > 1
        logp_b, entropy = ppo.actor_forward(model, b, packed, 1.0)
        pg, _ = ppo_math.policy_loss(logp_b, b.old_logprobs, b.advantages, b.mask, 0.2)
        pg.backward()
        v = (packed_rows.token_values(critic, packed) if packing else
             critic(input_ids=b.sequences, attention_mask=b.attention_mask,
                    position_ids=b.position_ids)[:, -(R + 1):-1].float())
        vl, _ = ppo_math.value_loss(v, b.old_values, b.returns, b.mask, 0.2)
        vl.backward()
        out.append((pg.item(), vl.item(), entropy.item(),
                    [p.grad.clone() for p in [*model.parameters(), *critic.parameters()]
                     if p.grad is not None]))
    (pg0, vl0, e0, g0), (pg1, vl1, e1, g1) = out
    assert pg1 == pytest.approx(pg0, abs=1e-6, rel=1e-5)
    assert vl1 == pytest.approx(vl0, abs=1e-6, rel=1e-5)
    assert e1 == pytest.approx(e0, rel=1e-5)
    assert len(g0) == len(g1) > 0
    for a, c in zip(g0, g1):
        torch.testing.assert_close(c, a, **TOL)


# ----------------------------------------------------------------------------- on the engine
@pytest.mark.slow
def test_grpo_run_packed_equals_padded(tmp_path):
    """One GRPO step on DeepSpeed, packed vs padded rows, from the same weights and rollout:
    two minibatches (the second one's loss is taken after the first optimizer step, so a
    token-budget minibatch that did not step, or stepped twice, shows), the update cut into
    several packed micro-batches by a small budget. The logged losses agree within 1e-5. The
    random base model earns no reward on this task (zero advantages), so an entropy bonus
    gives the update a gradient from the first minibatch on."""
    args = [*FAST, "stage=grpo", "seed=3", "grpo.steps=1", "grpo.prompts_per_step=4",
            "grpo.num_generations=4", "grpo.micro_batch_size_per_device=4",
            "grpo.num_minibatches=2", "grpo.beta=0.1", "grpo.eval_every=0",
            "grpo.eval_num_prompts=4", "grpo.eval_batch_size=4", "logger.table_every=0",
            "logger.log_checkpoints=false", "grpo.micro_batch_tokens=48",
            "grpo.entropy_coef=0.01"]
    losses = []
    for packing in ("false", "true"):
        cfg = compose(*args, f"grpo.packing={packing}")
        actor, _, result = grpo.train(cfg, tmp_path / packing)
        (run,) = read_runs(tmp_path / packing / "wandb")
        losses.append({k: run.metric(k)[0] for k in ("grpo/loss", "grpo/pg_loss",
                                                      "grpo/reward")})
        losses[-1]["weights"] = [p.detach().clone() for p in actor.module.parameters()]
    padded, packed = losses
    assert packed["grpo/reward"] == padded["grpo/reward"]  # the same rollout
    for key in ("grpo/loss", "grpo/pg_loss"):
        assert packed[key] == pytest.approx(padded[key], abs=1e-5, rel=1e-5)
    # after two Adam steps (lr 3e-4 each) the weights agree to well under one step
    cfg = compose(*args)
    path = models.resolve_base_path(cfg.model)
    start = models.load_causal_lm(path, models.load_tokenizer(path, cfg.model), cfg.model)
    moved = max((a - b).abs().max().item()
                for a, b in zip(padded["weights"], start.parameters()))
    worst = max((a - b).abs().max().item()
                for a, b in zip(packed["weights"], padded["weights"]))
    assert moved > 4e-4 and worst < 3e-5


@pytest.mark.slow
def test_ppo_run_packed_equals_padded(tmp_path):
    """One PPO step on DeepSpeed, packed (every forward; rows of at most 24 tokens, so a
    micro-batch spans several) vs padded rows, from the same weights and rollout: the
    experience (reward, KL, values) and the update's losses agree within 1e-5, two minibatches
    (the second after the first optimizer step), actor and critic."""
    args = [*FAST, "stage=ppo", "seed=3", "ppo.steps=1", "ppo.rollout_batch_size=8",
            "ppo.micro_batch_size_per_device=2", "ppo.num_minibatches=2", "ppo.eval_every=0",
            "ppo.eval_num_prompts=4", "ppo.eval_batch_size=4", "logger.table_every=0",
            "logger.log_checkpoints=false", "ppo.micro_batch_tokens=24"]
    keys = ("ppo/actor_loss", "ppo/critic_loss", "ppo/reward_score", "ppo/kl",
            "ppo/value_mean", "ppo/entropy")
    out = []
    for packing in ("false", "true"):
        cfg = compose(*args, f"ppo.packing={packing}")
        actor, _, _ = ppo.train(cfg, tmp_path / packing)
        (run,) = read_runs(tmp_path / packing / "wandb")
        out.append({k: run.metric(k)[0] for k in keys})
        out[-1]["weights"] = [p.detach().clone() for p in actor.module.parameters()]
    padded, packed = out
    for key in keys:
        assert packed[key] == pytest.approx(padded[key], abs=1e-5, rel=1e-5), key
    path = models.resolve_base_path(cfg.model)
    start = models.load_causal_lm(path, models.load_tokenizer(path, cfg.model), cfg.model)
    moved = max((a - b).abs().max().item()
                for a, b in zip(padded["weights"], start.parameters()))
    worst = max((a - b).abs().max().item()
                for a, b in zip(packed["weights"], padded["weights"]))
    assert moved > 5e-5 and worst < 2e-5


@pytest.mark.parametrize("override, key", [("grpo.micro_batch_tokens=0", "grpo.micro_batch_tokens"),
                                           ("ppo.micro_batch_tokens=-5", "ppo.micro_batch_tokens")])
def test_bad_packing_keys_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(f"stage={override.split('.')[0]}", override)
