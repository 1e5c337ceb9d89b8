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
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_exp.rl import dpo_math, kto_math
from tests.conftest import assert_one_line_exit_2, compose, perturbed_pair_models

BETA, GAMMA, ALPHA = 2.0, 0.7, 0.5  # SimPO-like beta (its paper uses 2-2.5), gamma, cpo_alpha


@pytest.fixture(scope="module")
def tiny():
    """The tiny model (reference), a policy 0.05-perturbed from it, and 4 sort pairs."""
    return perturbed_pair_models()


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
    assert float(loss2.detach()) == pytest.approx(float(t_loss.detach()), abs=1e-5)


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


# ----------------------------------------------------------------------------- KTO
KTO = {"beta": 0.3, "desirable_weight": 1.0, "undesirable_weight": 1.5}


def _kto_batch(tiny, chunk: int, shared: bool = False):
    """Our KTO batch of the 4 pairs (8 unpaired rows, KL partners within chunks of `chunk`),
    with the reference's log-probabilities of the rows and of their KL sequences."""
    from rlhf_exp.data.unpaired import collate_kto, tokenize_unpaired, unpaired_rows
    from rlhf_exp.stages.dpo import pair_logps

    feats, _ = tokenize_unpaired(unpaired_rows(tiny.rows), tiny.tokenizer, "{prompt}", 32, 48,
                                 "truncate", chunk)
    plain = collate_kto(feats, tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        ref, ref_kl = pair_logps(tiny.policy.eval(), plain).halves("logps")
    tiny.policy.train()
    batch = collate_kto(feats, tiny.tokenizer.pad_token_id, shared_prompt=shared)
    return feats, {**batch, "ref_chosen_logps": ref, "ref_rejected_logps": ref_kl}


@pytest.fixture(scope="module", params=[8, 3])
def trl_kto(request, tiny, tmp_path_factory):
    """TRL 1.16's KTOTrainer on the same 4 pairs (it unpairs them itself), its reference model
    scored live (not precomputed); per_device_train_batch_size 8 (one KL chunk) or 3 (chunks
    of 3, 3, 2: the rotation inside each). All 8 rows are then collated as one batch."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    args = trl.KTOConfig(output_dir=str(tmp_path_factory.mktemp("trl_kto")), report_to=[],
                         use_cpu=True, bf16=False, gradient_checkpointing=False,
                         per_device_train_batch_size=request.param, max_length=None,
                         save_strategy="no", logging_strategy="no", **KTO)
    # the roles swapped (the perturbed model is the reference): its KL estimate is > 0 here, so
    # z0 enters the loss instead of being clamped to 0
    return trl.KTOTrainer(model=copy.deepcopy(tiny.reference).train(),
                          ref_model=copy.deepcopy(tiny.policy).eval(), args=args,
                          train_dataset=Dataset.from_list(tiny.rows),
                          processing_class=tiny.tokenizer)


def test_kto_loss_and_gradient_equal_trls_kto_trainer(tiny, trl_kto):
    """TRL's own compute_loss (KTOTrainer._compute_loss: its KL rotation, z0 clamp, weights) on
    its collated batch, against our features, collate and loss: the same tokens, rows, KL
    sequences, loss and gradient (fp32; 1e-5)."""
    from rlhf_exp.stages.kto import batch_loss

    examples = [trl_kto.train_dataset[i] for i in range(len(trl_kto.train_dataset))]
    t_batch = trl_kto.data_collator(examples)
    trl_kto.model.train()
    trl_kto.model.zero_grad()
    t_loss = trl_kto.compute_loss(trl_kto.model, t_batch)
    t_loss.backward()
    t_kl = trl_kto._metrics["train"]["kl"][-1]

    feats, batch = _kto_batch(tiny, chunk=trl_kto.args.per_device_train_batch_size)
    # the same unpaired rows in TRL's order, the same tokens and KL sequences
    assert [f["label"] for f in feats] == [bool(x) for x in t_batch["label"]]
    for ours, theirs in (("input_ids", "input_ids"), ("completion_mask", "completion_mask")):
        half = batch[ours][:8]
        assert torch.equal(half[:, :t_batch[theirs].shape[1]], t_batch[theirs]), ours
    kl_ids = batch["input_ids"][8:]
    assert torch.equal(kl_ids[:, :t_batch["KL_input_ids"].shape[1]], t_batch["KL_input_ids"])

    policy = copy.deepcopy(tiny.reference).train()
    loss, terms = batch_loss(policy, batch, SimpleNamespace(**KTO))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(t_loss.detach()), abs=1e-5)
    assert float(terms["kl"][0]) == pytest.approx(t_kl, abs=1e-5)
    assert t_kl > 0  # the estimate is not clamped away: z0 enters the loss
    # the shared-prompt layout (each prompt once for its row and its KL sequence): same loss
    _, shared = _kto_batch(tiny, chunk=trl_kto.args.per_device_train_batch_size, shared=True)
    loss2, _ = batch_loss(copy.deepcopy(tiny.reference).train(), shared, SimpleNamespace(**KTO))
    assert float(loss2.detach()) == pytest.approx(float(t_loss.detach()), abs=1e-5)
    _assert_grads_close(_grads(policy), _grads(trl_kto.model))


def test_kto_by_hand_z0_clamped_and_weighted():
    """Two rows by hand: log-ratios 0.4 (desirable) and -0.2 (undesirable); a negative KL
    estimate is clamped to 0; the undesirable row's loss carries its weight."""
    beta, uw = 0.5, 2.0
    kl = kto_math.kl_estimate(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]))
    assert float(kl) == 0.0  # mean log-ratio (0.5 - 1.0) / 2 < 0
    kl_pos = kto_math.kl_estimate(torch.tensor([-1.0, -0.5]), torch.tensor([-1.5, -1.0]))
    assert float(kl_pos) == pytest.approx(0.5)
    logps = torch.tensor([-2.0, -3.0], requires_grad=True)
    loss, terms = kto_math.kto_loss(logps, torch.tensor([-2.4, -2.8]),
                                    torch.tensor([True, False]), kl_pos, beta=beta,
                                    undesirable_weight=uw)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [1 - sig(beta * (0.4 - 0.5)), uw * (1 - sig(beta * (0.5 + 0.2)))]
    assert terms["row_loss"].tolist() == pytest.approx(want, abs=1e-6)
    assert float(loss) == pytest.approx(sum(want) / 2, abs=1e-6)
    m = kto_math.kto_metrics(terms)
    assert m["rewards/chosen"] == pytest.approx(0.2)
    assert m["rewards/rejected"] == pytest.approx(-0.1)
    assert m["kl"] == pytest.approx(0.5) and m["desirable_fraction"] == 0.5


def test_unpaired_rows_and_kl_partners_follow_trl():
    """unpair_preference_dataset's layout (chosen block, then rejected block) and the KL
    rotation by one inside each chunk, against TRL's own functions."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    from rlhf_exp.data.unpaired import kl_partners, unpaired_rows

    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)]
    theirs = unpair_preference_dataset(Dataset.from_list(rows)).to_list()
    ours = unpaired_rows(rows)
    assert [(r["prompt"], r["completion"], r["label"]) for r in ours] == \
        [(r["prompt"], r["completion"], r["label"]) for r in theirs]
    # TRL KTOTrainer._prepare_dataset: [last] + completions[:-1] per chunk of the batch size
    completions = [r["completion"] for r in ours]
    want = []
    for lo in range(0, 10, 4):
        chunk = completions[lo:lo + 4]
        want += [chunk[-1]] + chunk[:-1]
    assert [completions[j] for j in kl_partners(10, 4)] == want


def test_an_unpaired_source_gives_kto_rows_and_a_bad_label_is_a_data_error(tmp_path):
    """format unpaired (TRL's prompt/completion/label): read as KTO rows next to a preference
    source's pairs; a label that is not a boolean names the file, line and column."""
    from omegaconf import OmegaConf

    from rlhf_exp.data.sources import DataError, load_source
    from rlhf_exp.data.unpaired import unpaired_rows

    path = tmp_path / "kto.jsonl"
    path.write_text('{"prompt": "sort:31=", "completion": "13", "label": true}\n'
                    '{"prompt": "sort:21=", "completion": "21", "label": false}\n')
    src = OmegaConf.create({"name": "mine", "kind": "local", "path": str(path),
                            "format": "unpaired", "columns": {}, "max_examples": None,
                            "task": None})
    rows = load_source(src, seed=0)
    pairs = [{"prompt": "sort:54=", "chosen": "45", "rejected": "54"}]
    got = unpaired_rows(pairs + rows)
    assert [(r["prompt"], r["completion"], r["label"]) for r in got] == [
        ("sort:54=", "45", True), ("sort:54=", "54", False), ("sort:31=", "13", True),
        ("sort:21=", "21", False)]
    path.write_text('{"prompt": "sort:31=", "completion": "13", "label": "yes"}\n')
    with pytest.raises(DataError, match=r"kto.jsonl:1: column 'label' must be a bool"):
        load_source(src, seed=0)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,needle", [
    (["stage=dpo", "dpo.loss_type=nope"], "dpo.loss_type='nope' is not allowed; choose one of: "
                                          "sigmoid, hinge, ipo, robust, simpo"),
    (["stage=dpo", "dpo.loss_type=simpo", "dpo.reference=some/model"],
     "dpo.reference=some/model is set but dpo.loss_type=simpo uses no reference model"),
    (["stage=dpo", "dpo.simpo_gamma=1.0"], "dpo.simpo_gamma=1.0 only applies to "
                                           "dpo.loss_type=simpo"),
    (["stage=dpo", "dpo.loss_type=simpo", "dpo.simpo_gamma=-0.5"],
     "dpo.simpo_gamma=-0.5 must be a finite number >= 0"),
    (["stage=kto", "kto.desirable_weight=0"], "kto.desirable_weight=0.0 must be > 0"),
    (["stage=kto", "kto.undesirable_weight=-1"], "kto.undesirable_weight=-1.0 must be > 0"),
    (["stage=kto", "kto.beta=0"], "kto.beta=0.0 must be > 0"),
    (["stage=kto", "kto.micro_batch_size_per_device=1"],
     "kto.micro_batch_size_per_device=1 must be >= 2"),
    (["stage=pipeline", "stage.stages=[sft,kto]", "kto.max_steps=0"],
     "kto.max_steps=0 must be >= 1"),
], ids=["unknown_loss_type", "simpo_with_reference", "gamma_without_simpo", "negative_gamma",
        "kto_desirable_weight_0", "kto_undesirable_weight_negative", "kto_beta_0",
        "kto_micro_batch_1", "kto_in_a_pipeline"])
def test_bad_keys_exit_2_before_any_model_loads(args, needle, tmp_path, rlhf_exp, monkeypatch):
    from rlhf_exp.modeling import models

    loads = []
    original = models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loads.append(a) or original(
        *a, **k))
    run_dir = tmp_path / "run"
    proc = rlhf_exp(*args, f"hydra.run.dir={run_dir}")
    assert_one_line_exit_2(proc, needle)
    assert not run_dir.exists() and not loads


def test_simpo_and_kto_defaults_compose():
    cfg = compose("stage=dpo", "dpo.loss_type=simpo", "dpo.simpo_gamma=0.3", "dpo.beta=2.0")
    assert cfg.dpo.simpo_gamma == 0.3 and cfg.dpo.reference is None
    cfg = compose("stage=kto")
    assert (cfg.kto.beta, cfg.kto.desirable_weight, cfg.kto.undesirable_weight) == (0.1, 1.0, 1.0)


# ----------------------------------------------------------------------------- end to end
SMALL = ["data_mix.sources.0.synthetic.num_examples=1000",
         "sft.max_steps=20", "sft.eval_every=0", "sft.log_every=5",
         "ppo.eval_num_prompts=16", "ppo.eval_batch_size=16"]
KTO_SMALL = ["kto.max_steps=16", "kto.micro_batch_size_per_device=8", "kto.log_every=2",
             "kto.eval_every=4", "kto.warmup_steps=2"]
SIMPO_SMALL = ["dpo.loss_type=simpo", "dpo.beta=2.0", "dpo.simpo_gamma=0.5", "dpo.max_steps=8",
               "dpo.micro_batch_size_per_device=8", "dpo.log_every=2", "dpo.eval_every=4",
               "dpo.warmup_steps=2"]


@pytest.fixture(scope="module")
def sft_kto(tmp_path_factory):
    """`stage=pipeline stage.stages=[sft,kto]`: SFT, then KTO from its output."""
    from rlhf_exp.stages import pipeline

    run_dir = tmp_path_factory.mktemp("sft_kto")
    cfg = compose("stage=pipeline", "stage.stages=[sft,kto]", *SMALL, *KTO_SMALL)
    pipeline.run(cfg, run_dir)
    return run_dir


def _reloads(run_dir: Path, stage: str, start: Path) -> None:
    """The final checkpoint loads with the Auto class, moved away from its start, and two loads
    give the same logits."""
    from transformers import AutoModelForCausalLM

    from rlhf_exp.training import checkpoint

    final = checkpoint.final_checkpoint(run_dir)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        begin = AutoModelForCausalLM.from_pretrained(start).eval()(input_ids=ids).logits
        again = AutoModelForCausalLM.from_pretrained(final).eval()(input_ids=ids).logits
    assert not torch.allclose(logits, begin)
    torch.testing.assert_close(logits, again, rtol=1e-5, atol=1e-6)
    assert json.loads((final / "rlhf_exp.json").read_text())["stage"] == stage


@pytest.mark.slow
def test_kto_stage_trains_and_its_checkpoint_reloads(sft_kto):
    from rlhf_exp.training import checkpoint

    m = json.loads((sft_kto / "kto" / "result.json").read_text())["metrics"]
    assert m["kto/loss"] < m["kto/first_loss"]
    assert m["kto/steps"] == 16
    for key in ("kto/init_eval_gold_reward", "kto/eval_gold_reward", "kto/eval_kl",
                "kto/eval_rewards/chosen", "kto/eval_rewards/rejected", "kto/eval_loss"):
        assert math.isfinite(m[key]), key
    # trained toward the labels: desirable rows' implicit reward above the undesirable ones'
    assert m["kto/eval_rewards/margins"] > 0
    _reloads(sft_kto / "kto", "kto", checkpoint.final_checkpoint(sft_kto / "sft"))


@pytest.mark.slow
def test_simpo_trains_without_a_reference_model(sft_kto, tmp_path, monkeypatch):
    """dpo.loss_type=simpo from the same SFT policy: one causal LM loaded (the policy), no
    reference pass; the loss falls and the checkpoint reloads."""
    from rlhf_exp.modeling import models
    from rlhf_exp.stages import dpo
    from rlhf_exp.training import checkpoint

    loads = []
    original = models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loads.append(a[0]) or original(
        *a, **k))
    monkeypatch.setattr(dpo, "score_with_reference", None)  # a call would fail the run
    sft = checkpoint.final_checkpoint(sft_kto / "sft")
    cfg = compose("stage=dpo", f"dpo.init_from={sft}", *SMALL, *SIMPO_SMALL)
    _, _, result = dpo.train(cfg, tmp_path / "simpo")
    assert loads == [str(sft)]
    m = result.metrics
    assert m["dpo/loss"] < m["dpo/first_loss"]
    assert m["perf/reference_s"] < 1.0
    assert math.isfinite(m["dpo/eval_gold_reward"])
    _reloads(tmp_path / "simpo", "dpo", sft)
