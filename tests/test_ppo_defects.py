"""The three PPO defects an independent review found, each shown fixed on the real code path:
the EMA kept in fp32 (a bf16 EMA barely moves), log-probs computed in fp32 before the temperature
division, and the adaptive KL controller fed the global KL (tests/test_ppo_resume.py checks every
rank's coefficient in a 2-rank run)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf_exp.errors import NonFiniteLossError
from rlhf_exp.modeling import models
from rlhf_exp.rl import ppo_math, rollout
from rlhf_exp.stages import ppo
from rlhf_exp.training import engine
from rlhf_exp.training.nan_stop import stop_if_not_finite
from rlhf_exp.training.tracking import Tracker
from tests.conftest import compose

PPO_TINY = ["stage=ppo", "data_mix.sources.0.synthetic.num_examples=600", "ppo.steps=2",
            "ppo.rollout_batch_size=8", "ppo.micro_batch_size_per_device=8",
            "ppo.eval_num_prompts=8", "ppo.eval_batch_size=8", "logger=none"]


@pytest.mark.slow  # builds the actor's training engine (load_models), though it trains nothing
def test_ema_is_fp32_and_moves_with_a_bf16_actor():
    """A bf16 actor whose weights moved a few bf16 ulps: 300 EMA updates at decay 0.992 must
    cover 1 - 0.992^300 (~91%) of that distance on every weight. A bf16 EMA rounds each
    (1 - decay) * ulp step away and hardly moves (the reviewed defect)."""
    cfg = compose(*PPO_TINY, "hardware.precision=bf16", "ppo.ema.enabled=true")
    inputs = ppo.resolve_inputs(cfg)
    m = ppo.load_models(cfg, inputs, ppo.batch_geometry(cfg, 1), [])
    assert all(p.dtype == torch.float32 for p in m.ema.parameters())
    assert all(p.dtype == torch.bfloat16 for p in m.actor.module.parameters())
    start = [e.detach().clone() for e in m.ema.parameters()]
    with torch.no_grad():  # the actor takes a step of 4 ulps on every weight
        for p in m.actor.module.parameters():
            p.add_(4 * torch.finfo(torch.bfloat16).eps * p.abs().clamp_min(1e-2))
    target = [p.detach().float() for p in m.actor.module.parameters()]
    decay, n = cfg.ppo.ema.decay, 300
    for _ in range(n):
        ppo.update_ema(m, decay)
    want = 1 - decay**n
    for e, s, t in zip(m.ema.parameters(), start, target):
        moved, distance = (e - s), (t - s)
        mask = distance.abs() > 0
        covered = moved[mask] / distance[mask]
        assert torch.allclose(covered, torch.full_like(covered, want), atol=1e-3)

    # the defect, for contrast: the same updates on a bf16 EMA leave most weights where they were
    bf16_ema = [s.to(torch.bfloat16) for s in start]
    for _ in range(n):
        for e, t in zip(bf16_ema, target):
            e.lerp_(t.to(torch.bfloat16), 1 - decay)
    moved = sum(int((e.float() != s).sum()) for e, s in zip(bf16_ema, start))
    assert moved < 0.5 * sum(s.numel() for s in start)


def test_logprobs_are_fp32_before_the_temperature():
    """With bf16 weights, the response log-probs equal fp32 log_softmax(logits.float() / T), as
    the sampler draws from; dividing bf16 logits first is off by up to ~0.2 nats at T=0.7."""
    cfg = compose(*PPO_TINY)
    path = models.resolve_base_path(cfg.model)
    tok = models.load_tokenizer(path)
    model = engine.disable_dropout(models.load_causal_lm(path, tok, cfg.model, "bf16")).eval()
    with torch.no_grad():  # spread the random logits out so rounding matters, as a trained LM's
        model.lm_head.weight.mul_(40)
    seq = tok(["sort:52813=12358", "sort:977=779"], padding=True, return_tensors="pt")
    ids, attn = seq["input_ids"], seq["attention_mask"]
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    R, T = 5, 0.7
    with torch.no_grad():
        logits = rollout.response_logits(model, ids, attn, pos, R, temperature=T)
        # the same forward (logits_to_keep picks the LM head's GEMM shape): bit-exact is fair
        full = model(input_ids=ids, attention_mask=attn, position_ids=pos,
                     logits_to_keep=R + 1).logits
    assert logits.dtype == torch.float32
    want = full[:, -(R + 1):-1].float() / T
    assert torch.equal(logits, want)
    labels = ids[:, -R:]
    ours = ppo_math.logprobs_from_logits(logits, labels)
    bf16_first = ppo_math.logprobs_from_logits(full[:, -(R + 1):-1] / T, labels)
    assert torch.allclose(ours, torch.log_softmax(want, -1).gather(-1, labels[..., None])
                          .squeeze(-1), atol=1e-5)
    assert (ours - bf16_first).abs().max() > 1e-3  # the defect would have been visible here


def test_kl_controller_is_updated_with_the_global_kl():
    """finish_step averages the step's statistics over ranks first and feeds that KL to the
    controller, so the coefficient is a function of global values only."""
    cfg = compose(*PPO_TINY, "ppo.kl.adaptive=true", "ppo.kl.target=1.0", "ppo.kl.horizon=100")
    state = ppo.fresh_state(cfg, None)
    m = SimpleNamespace(ema=None)
    stats = {"ppo/kl": 3.0, "ppo/actor_loss": 0.1, "ppo/critic_loss": 0.2, "_gold_sum": 1.5,
             "_gold_n": 2.0}
    out = ppo.finish_step(m, cfg, state, dict(stats))
    expected = ppo_math.AdaptiveKLController(cfg.ppo.kl.coef, 1.0, 100)
    expected.update(3.0, cfg.ppo.rollout_batch_size)
    assert state.kl_ctl.value == expected.value != cfg.ppo.kl.coef
    assert out["ppo/gold_reward"] == 0.75 and "_gold_sum" not in out


def test_a_nan_loss_stops_the_step_with_one_line(tmp_path):
    """The RL loop's NaN stop (nan_stop.py, shared with train_loop) on PPO's averaged losses."""
    cfg = compose(*PPO_TINY)
    stats = {"ppo/actor_loss": float("nan"), "ppo/critic_loss": 0.2}
    try:
        stop_if_not_finite(stats, [], stage="ppo", step=1, run_dir=tmp_path,
                           tracker=Tracker(cfg, tmp_path, "ppo"), hint="lower ppo.actor.lr")
    except NonFiniteLossError as exc:
        assert str(exc) == ("ppo: the ppo/actor_loss is nan at step 1; stopped. No checkpoint "
                            "to resume from (ppo.save_every); lower ppo.actor.lr")
    else:
        raise AssertionError("a NaN loss went through")


def test_prompt_schedule_is_a_function_of_the_step():
    """The prompts of step s do not depend on the steps before it (resume needs no iterator
    state), the ranks' slices partition each global batch, and every epoch covers the prompts."""
    one = rollout.PromptSchedule(20, 8, seed=3, rank=0, world=1)
    ranks = [rollout.PromptSchedule(20, 8, seed=3, rank=r, world=2) for r in range(2)]
    fresh = rollout.PromptSchedule(20, 8, seed=3, rank=0, world=1)
    seen = [one.indices(s) for s in range(1, 6)]
    assert fresh.indices(4) == seen[3]  # asked out of order, the same answer
    for s in range(1, 6):
        assert ranks[0].indices(s) + ranks[1].indices(s) == seen[s - 1]
    assert len(set(seen[0] + seen[1])) == 16  # epoch 0: two disjoint batches of 8
    assert seen[2] != seen[0]  # epoch 1 reshuffles
