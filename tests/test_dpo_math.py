"""DPO math: each loss type against values derived by hand, the response log-probabilities, the
metrics, and parity with TRL's DPOTrainer (loss, gradient and metrics on one fixed batch).

Unit tier: one forward/backward of the tiny model, no training engine, no subprocess."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rlhf_exp.config import DPO_LOSS_TYPES
from rlhf_exp.rl import dpo_math
from tests.conftest import perturbed_pair_models


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# two pairs: policy/reference log-probs of chosen and rejected, response lengths
C, R = [-3.0, -5.0], [-4.0, -2.0]  # policy log p(chosen), log p(rejected)
RC, RR = [-3.5, -4.0], [-3.0, -2.5]  # reference
NC, NR = [4.0, 2.0], [5.0, 3.0]  # response tokens
BETA = 0.5


def _seq(c=C, r=R, nc=NC, nr=NR) -> dpo_math.SequenceLogps:
    return dpo_math.SequenceLogps(torch.tensor(c + r), torch.tensor(nc + nr),
                                  torch.tensor([2.0, 1.0, 4.0, -3.0]))


def _by_hand(loss_type: str, eps: float) -> list[float]:
    out = []
    for c, r, rc, rr, nc, nr in zip(C, R, RC, RR, NC, NR):
        cl, rl = c - rc, r - rr  # log-ratios: (0.5, -1.0) and (-1.0, 0.5)
        d = BETA * (cl - rl)
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * _logsig(d) - eps * _logsig(-d))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - d))
        elif loss_type == "ipo":
            out.append((cl / nc - rl / nr - 1 / (2 * BETA)) ** 2)
        elif loss_type == "robust":
            out.append((-(1 - eps) * _logsig(d) + eps * _logsig(-d)) / (1 - 2 * eps))
    return out


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0),
                                           ("ipo", 0.0), ("robust", 0.0), ("robust", 0.2)])
def test_each_loss_type_equals_its_formula(loss_type, eps):
    loss, terms = dpo_math.dpo_loss(_seq(), torch.tensor(RC), torch.tensor(RR),
                                    loss_type=loss_type, beta=BETA, label_smoothing=eps)
    want = _by_hand(loss_type, eps)
    assert terms["pair_loss"].tolist() == pytest.approx(want, abs=1e-6)
    assert float(loss) == pytest.approx(sum(want) / 2, abs=1e-6)


def test_known_values():
    """Spot values: pair 1 has d = 0.5 * (0.5 + 1.0) = 0.75, pair 2 d = -0.75."""
    _, terms = dpo_math.dpo_loss(_seq(), torch.tensor(RC), torch.tensor(RR),
                                 loss_type="sigmoid", beta=BETA)
    assert terms["pair_loss"].tolist() == pytest.approx(
        [math.log1p(math.exp(-0.75)), math.log1p(math.exp(0.75))], abs=1e-6)
    _, terms = dpo_math.dpo_loss(_seq(), torch.tensor(RC), torch.tensor(RR),
                                 loss_type="hinge", beta=BETA)
    assert terms["pair_loss"].tolist() == pytest.approx([0.25, 1.75])
    # ipo pair 1: 0.5/4 - (-1.0)/5 - 1 = -0.675
    _, terms = dpo_math.dpo_loss(_seq(), torch.tensor(RC), torch.tensor(RR),
                                 loss_type="ipo", beta=BETA)
    assert terms["pair_loss"][0].item() == pytest.approx(0.675 ** 2)
    # robust at eps 0 is plain DPO
    _, robust = dpo_math.dpo_loss(_seq(), torch.tensor(RC), torch.tensor(RR),
                                  loss_type="robust", beta=BETA)
    assert robust["pair_loss"].tolist() == pytest.approx([math.log1p(math.exp(-0.75)),
                                                          math.log1p(math.exp(0.75))])


def test_rpo_adds_the_chosen_nll_per_token():
    base, _ = dpo_math.dpo_loss(_seq(), torch.tensor(RC), torch.tensor(RR),
                                loss_type="sigmoid", beta=BETA)
    with_rpo, terms = dpo_math.dpo_loss(_seq(), torch.tensor(RC), torch.tensor(RR),
                                        loss_type="sigmoid", beta=BETA, rpo_alpha=0.5)
    nll = (3.0 + 5.0) / (4.0 + 2.0)  # -(sum of chosen log p) / chosen tokens
    assert float(with_rpo - base) == pytest.approx(0.5 * nll)
    metrics = dpo_math.pair_metrics(terms, rpo_alpha=0.5)
    assert metrics["nll_loss"] == pytest.approx(nll)
    assert metrics["loss"] == pytest.approx(float(with_rpo))


def test_pair_metrics_are_trls_definitions():
    _, terms = dpo_math.dpo_loss(_seq(), torch.tensor(RC), torch.tensor(RR),
                                 loss_type="sigmoid", beta=BETA)
    m = dpo_math.pair_metrics(terms)
    assert m["rewards/chosen"] == pytest.approx(BETA * (0.5 - 1.0) / 2)
    assert m["rewards/rejected"] == pytest.approx(BETA * (-1.0 + 0.5) / 2)
    assert m["rewards/accuracies"] == 0.5  # pair 1 right (0.25 > -0.5), pair 2 wrong
    assert m["rewards/margins"] == pytest.approx(BETA * (1.5 - 1.5) / 2)
    assert m["logps/chosen"] == pytest.approx(-4.0) and m["logps/rejected"] == -3.0
    assert m["logits/chosen"] == pytest.approx(3.0 / 6.0)  # token-weighted over chosen rows
    assert m["logits/rejected"] == pytest.approx(1.0 / 8.0)


def test_an_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, robust"):
        dpo_math.preference_loss(torch.zeros(1), torch.zeros(1), loss_type="kto", beta=0.1)
    assert DPO_LOSS_TYPES == ("sigmoid", "hinge", "ipo", "robust", "simpo")


def test_sequence_logps_count_only_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 0], [4, 3, 2, 1]])
    completion = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])  # row 0: a pad after its response
    seq = dpo_math.sequence_logps(logits, ids, completion)
    logp = torch.log_softmax(logits, -1)
    want = [logp[0, 0, 2] + logp[0, 1, 3], logp[1, 1, 2] + logp[1, 2, 1]]
    torch.testing.assert_close(seq.logps, torch.stack(want))
    assert seq.tokens.tolist() == [2.0, 2.0]
    want_logits = [logits[0, 0].mean() + logits[0, 1].mean(), logits[1, 1].mean()
                   + logits[1, 2].mean()]
    torch.testing.assert_close(seq.logits_sum, torch.stack(want_logits))


# ----------------------------------------------------------------------------- TRL parity
CASES = {  # our dpo.* settings -> TRL 1.16 DPOConfig
    "sigmoid": ({"loss_type": "sigmoid"}, {"loss_type": ["sigmoid"]}),
    "ipo": ({"loss_type": "ipo"}, {"loss_type": ["ipo"]}),
    "hinge": ({"loss_type": "hinge"}, {"loss_type": ["hinge"]}),
    "robust": ({"loss_type": "robust", "label_smoothing": 0.2},
               {"loss_type": ["robust"], "label_smoothing": 0.2}),
    "rpo": ({"loss_type": "sigmoid", "rpo_alpha": 0.7},
            {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]}),
}
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")


@pytest.fixture(scope="module")
def parity_setup():
    """The tiny model (the reference) and a policy 0.05-perturbed from it, 4 sort pairs, and
    our collated batch with the reference's log-probs."""
    pytest.importorskip("trl")
    from rlhf_exp.data.tokenize import collate_dpo, tokenize_pairs
    from rlhf_exp.stages.dpo import pair_logps

    tiny = perturbed_pair_models()
    path, tokenizer, reference, policy, rows = (tiny.path, tiny.tokenizer, tiny.reference,
                                                tiny.policy, tiny.rows)
    feats, _ = tokenize_pairs(rows, tokenizer, "{prompt}", 32, 48)
    batch = collate_dpo(feats, tokenizer.pad_token_id)
    with torch.no_grad():
        ref_c, ref_r = pair_logps(reference, batch).halves("logps")
    return {"path": path, "tokenizer": tokenizer, "reference": reference, "policy": policy,
            "rows": rows, "batch": batch, "ref": (ref_c, ref_r),
            "shared_batch": collate_dpo(feats, tokenizer.pad_token_id, shared_prompt=True)}


@pytest.fixture(scope="module")
def trl_trainer(parity_setup, tmp_path_factory):
    """One TRL DPOTrainer on a copy of the policy (built once: ~5 s); each case sets the loss
    attributes its __init__ copies from DPOConfig (beta, loss_types, loss_weights,
    label_smoothing), which _compute_loss reads."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # fp32 as ours (TRL's configs default to bf16 autocast, which its reference forward gets)
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[],
                     use_cpu=True, bf16=False, gradient_checkpointing=False, beta=BETA,
                     per_device_train_batch_size=4, max_length=None, save_strategy="no",
                     logging_strategy="no")
    return DPOTrainer(model=copy.deepcopy(parity_setup["policy"]),
                      ref_model=copy.deepcopy(parity_setup["reference"]), args=args,
                      train_dataset=Dataset.from_list(parity_setup["rows"]),
                      processing_class=parity_setup["tokenizer"])


def _trl_loss(trainer, trl_args: dict, swapped: bool = False):
    """TRL's loss on the 4 pairs (chosen and rejected swapped when asked): (loss, gradients by
    name, metrics, its batch)."""
    trainer.beta = BETA
    trainer.loss_types = trl_args["loss_type"]
    trainer.loss_weights = trl_args.get("loss_weights", [1.0] * len(trainer.loss_types))
    trainer.label_smoothing = trl_args.get("label_smoothing", 0.0)
    examples = [trainer.train_dataset[i] for i in range(4)]
    if swapped:
        examples = [{**e, "chosen_ids": e["rejected_ids"], "rejected_ids": e["chosen_ids"]}
                    for e in examples]
    batch = trainer.data_collator(examples)
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), grads, metrics, batch


def _our_loss(setup, ours: dict, beta: float, batch: str = "batch"):
    policy = copy.deepcopy(setup["policy"])
    from rlhf_exp.stages.dpo import pair_logps

    kwargs = {"label_smoothing": 0.0, "rpo_alpha": 0.0, **ours}
    loss, terms = dpo_math.dpo_loss(pair_logps(policy, setup[batch]), *setup["ref"],
                                    beta=beta, **kwargs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    return float(loss.detach()), grads, dpo_math.pair_metrics(terms, kwargs["rpo_alpha"])


def _assert_grads_close(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    worst = max(float((ours[n] - theirs[n]).abs().max()) for n in ours)
    assert worst < 1e-5, f"largest gradient difference {worst}"
    assert max(float(g.abs().max()) for g in ours.values()) > 1e-3  # a gradient to compare


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradient_equal_trl(parity_setup, trl_trainer, case):
    ours_args, trl_args = CASES[case]
    t_loss, t_grads, t_metrics, t_batch = _trl_loss(trl_trainer, trl_args)
    # the same tokens: TRL's tokenization (EOS appended) and right-padded layout are ours
    ours_batch = parity_setup["batch"]
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(t_batch[key], ours_batch[key]), key
    o_loss, o_grads, o_metrics = _our_loss(parity_setup, ours_args, BETA)
    assert abs(o_loss - t_loss) < 1e-5, (o_loss, t_loss)
    _assert_grads_close(o_grads, t_grads)
    for name in METRICS:
        assert o_metrics[name] == pytest.approx(t_metrics[name], abs=1e-5), name


@pytest.mark.parametrize("case", ["rpo", "ipo"])
def test_shared_prompt_layout_equals_trl(parity_setup, trl_trainer, case):
    """dpo.shared_prompt (each pair's prompt computed once, its KV cache repeated for both
    responses): the same loss, gradient and metrics as TRL's one forward per sequence (rpo: the
    sigmoid loss + the chosen NLL; ipo: the response lengths)."""
    from rlhf_exp.stages.dpo import pair_logps

    ours_args, trl_args = CASES[case]
    t_loss, t_grads, t_metrics, _ = _trl_loss(trl_trainer, trl_args)
    o_loss, o_grads, o_metrics = _our_loss(parity_setup, ours_args, BETA, batch="shared_batch")
    assert abs(o_loss - t_loss) < 1e-5, (o_loss, t_loss)
    _assert_grads_close(o_grads, t_grads)
    for name in METRICS:
        assert o_metrics[name] == pytest.approx(t_metrics[name], abs=1e-5), name
    with torch.no_grad():  # the reference pass in this layout: the same log-probs
        shared = pair_logps(parity_setup["reference"], parity_setup["shared_batch"])
    torch.testing.assert_close(torch.cat(shared.halves("logps")), torch.cat(parity_setup["ref"]),
                               rtol=0, atol=1e-5)
    # perf/tokens_per_s counts the same tokens in either layout
    assert int(parity_setup["shared_batch"]["num_tokens"]) == \
        int(parity_setup["batch"]["attention_mask"].sum())


def test_cdpo_is_trls_sigmoid_on_the_pair_and_on_the_swapped_pair(parity_setup, trl_trainer):
    """TRL 1.16 dropped label smoothing from its sigmoid loss; cDPO's loss is (1 - eps) x that
    loss on the pairs + eps x the loss with chosen and rejected swapped (gradients alike)."""
    eps = 0.2
    straight = _trl_loss(trl_trainer, {"loss_type": ["sigmoid"]})
    swapped = _trl_loss(trl_trainer, {"loss_type": ["sigmoid"]}, swapped=True)
    o_loss, o_grads, _ = _our_loss(parity_setup, {"loss_type": "sigmoid",
                                                  "label_smoothing": eps}, BETA)
    assert abs(o_loss - ((1 - eps) * straight[0] + eps * swapped[0])) < 1e-5
    _assert_grads_close(o_grads, {n: (1 - eps) * straight[1][n] + eps * swapped[1][n]
                                  for n in straight[1]})
