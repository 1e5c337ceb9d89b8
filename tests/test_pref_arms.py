"""SimPO (dpo.loss_type=simpo) and KTO (stage=kto): parity with TRL 1.16 on a fixed batch (loss
and gradient within 1e-5), the config checks, and (slow) a few training steps of each on the
tiny model.

SimPO's reference is TRL's CPOTrainer (trl/experimental/cpo/cpo_trainer.py): its `cpo_loss` and
`get_batch_logps` are called as they are (cpo_loss unbound, on an object holding the attributes
it reads); its NLL term is a closure inside `concatenated_forward`, transcribed below. KTO's
loss lives inside TRL's KTOTrainer._compute_loss (trl/trainer/kto_trainer.py, lines ~1445-1500
of 1.16), not a callable of its own: `_trl_kto_loss` below is a line-by-line transcription."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from rlhf_exp.rl import dpo_math

BETA, GAMMA, ALPHA = 2.0, 0.7, 0.5  # SimPO-like beta (its paper uses 2-2.5), gamma, cpo_alpha


@pytest.fixture(scope="module")
def tiny():
    """The tiny model (reference), a policy 0.05-perturbed from it, and 4 sort pairs."""
    from omegaconf import OmegaConf

    from rlhf_exp.config import ModelConfig, TinyModelConfig
    from rlhf_exp.modeling import models
    from rlhf_exp.tasks import sort_digits

    model_cfg = OmegaConf.structured(ModelConfig(name="tiny", tiny=TinyModelConfig()))
    path = str(models.tiny_model_dir(model_cfg.tiny))
    tokenizer = models.load_tokenizer(path, model_cfg)
    reference = models.load_causal_lm(path, tokenizer, model_cfg).eval()
    policy = copy.deepcopy(reference).train()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
            for r in sort_digits.generate(4, seed=3)]
    return SimpleNamespace(tokenizer=tokenizer, reference=reference, policy=policy, rows=rows)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads_close(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    worst = max(float((ours[n] - theirs[n]).abs().max()) for n in ours)
    # fp32 sums over a few hundred tokens: differences of order 1e-7; 1e-5 is the bound
    assert worst < 1e-5, f"largest gradient difference {worst}"
    assert max(float(g.abs().max()) for g in ours.values()) > 1e-3  # a gradient to compare


# ----------------------------------------------------------------------------- SimPO
def _trl_simpo(policy, batch: dict, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16 CPOTrainer, loss_type="simpo": its get_batch_logps (average_log_prob=True for
    simpo) and cpo_loss, called as they are; the NLL is concatenated_forward's
    `cross_entropy_loss` closure (cpo_trainer.py ~line 826), transcribed. Returns (loss,
    per-pair losses)."""
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    trainer = cpo.CPOTrainer
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    use_cache=False).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    half = labels.shape[0] // 2
    logps = trainer.get_batch_logps(logits, labels, average_log_prob=True)
    fake_self = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=GAMMA, beta=BETA,
                                label_smoothing=eps,
                                accelerator=SimpleNamespace(device=logits.device))
    losses, _, _ = trainer.cpo_loss(fake_self, logps[:half], logps[half:])
    nll = torch.nn.CrossEntropyLoss()(logits[:half, :-1].reshape(-1, logits.shape[-1]),
                                      labels[:half, 1:].reshape(-1))
    return losses.mean() + ALPHA * nll, losses


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_simpo_loss_and_gradient_equal_trls_cpo_simpo(tiny, eps):
    from rlhf_exp.data.tokenize import collate_dpo, tokenize_pairs
    from rlhf_exp.stages.dpo import pair_logps

    feats, _ = tokenize_pairs(tiny.rows, tiny.tokenizer, "{prompt}", 32, 48)
    batch = collate_dpo(feats, tiny.tokenizer.pad_token_id)
    theirs = copy.deepcopy(tiny.policy)
    t_loss, t_pairs = _trl_simpo(theirs, batch, eps)
    t_loss.backward()

    ours = copy.deepcopy(tiny.policy)
    nan = torch.full((4,), math.nan)  # a reference-free loss must not read the reference
    loss, terms = dpo_math.dpo_loss(pair_logps(ours, batch), nan, nan, loss_type="simpo",
                                    beta=BETA, label_smoothing=eps, rpo_alpha=ALPHA,
                                    simpo_gamma=GAMMA)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(t_loss.detach()), abs=1e-5)
    assert terms["pair_loss"].tolist() == pytest.approx(t_pairs.tolist(), abs=1e-5)
    _assert_grads_close(_grads(ours), _grads(theirs))
    # the shared-prompt layout gives the same loss
    shared = collate_dpo(feats, tiny.tokenizer.pad_token_id, shared_prompt=True)
    loss2, _ = dpo_math.dpo_loss(pair_logps(copy.deepcopy(tiny.policy), shared), nan, nan,
                                 loss_type="simpo", beta=BETA, label_smoothing=eps,
                                 rpo_alpha=ALPHA, simpo_gamma=GAMMA)
    assert float(loss2) == pytest.approx(float(t_loss), abs=1e-5)


def test_simpo_by_hand():
    """One pair by hand: average log-probs -3/4 and -4/5, m = -0.75 + 0.8 - 0.7 / 2."""
    seq = dpo_math.SequenceLogps(torch.tensor([-3.0, -4.0]), torch.tensor([4.0, 5.0]),
                                 torch.zeros(2))
    _, terms = dpo_math.dpo_loss(seq, torch.zeros(1), torch.zeros(1), loss_type="simpo",
                                 beta=BETA, simpo_gamma=GAMMA)
    m = -0.75 + 0.8 - GAMMA / BETA
    assert terms["pair_loss"].item() == pytest.approx(math.log1p(math.exp(-BETA * m)), abs=1e-6)
    # implicit rewards: beta x the average log-prob (TRL CPO's chosen_rewards)
    assert terms["rewards/chosen"].item() == pytest.approx(BETA * -0.75)
    assert terms["rewards/rejected"].item() == pytest.approx(BETA * -0.8)
