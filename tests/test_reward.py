"""The reward stage end to end: W&B metrics and artifact, the SFT hand-off by artifact name, an
HF-loadable checkpoint whose scores equal HF's own pooling, ZeRO-3 + LoRA through the CLI.

These run the real parts (DeepSpeed on CPU with gloo, W&B offline, the tiny model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhf_exp.data.tokenize import collate_pairs, tokenize_pairs
from rlhf_exp.rl.scoring import last_index, sequence_scores, token_values
from rlhf_exp.stages.reward import bradley_terry_loss, pair_scores, spearman
from rlhf_exp.training import checkpoint
from rlhf_exp.training.wandb_reader import read_runs
from tests.conftest import FAST, cli

METRICS = ("reward/loss", "reward/accuracy", "reward/chosen_score", "reward/rejected_score",
           "reward/margin", "perf/samples_per_s", "reward/eval_loss", "reward/eval_accuracy",
           "reward/eval_chosen_score", "reward/eval_rejected_score", "reward/eval_margin",
           "reward/eval_gold_spearman", "reward/lr", "reward/dropped_overlong")


def _only_run(run_dir: Path):
    runs = read_runs(run_dir / "wandb")
    assert len(runs) == 1, f"expected exactly one W&B run, found {len(runs)}"
    return runs[0]


def test_bradley_terry_loss_and_spearman():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = -sum(math.log(1 / (1 + math.exp(-d))) for d in (2.0, 0.0, -2.0)) / 3
    assert float(bradley_terry_loss(c, r)) == pytest.approx(expected)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: ranks x = 1,2,3,4 and y = 1.5,1.5,3,4 -> Pearson of the ranks
    assert spearman([1, 2, 3, 4], [0, 0, 5, 9]) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_wandb_run_holds_metrics_artifact_and_hand_off(reward_run, sft_run):
    run = _only_run(reward_run["run_dir"])
    assert run.job_type == "reward" and run.group == reward_run["cfg"].experiment_name
    for key in METRICS:
        assert run.metric(key), f"{key} not logged"
    losses = run.metric("reward/loss")
    assert len(losses) >= 5
    # started from the SFT artifact (offline: resolved to its local path via the index)
    sft_final = checkpoint.final_checkpoint(sft_run["run_dir"]).resolve()
    assert run.summary["reward/init_path"] == str(sft_final)
    assert run.summary["reward/init_artifact"] == "fixture-sft-model"
    assert run.config["reward"]["init_from"] == "fixture-sft-model"
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert models and models[0]["name"].startswith("fixture-reward-model")
    assert "final" in models[0]["aliases"]
    result = json.loads((reward_run["run_dir"] / "result.json").read_text())
    assert result["stage"] == "reward"
    assert result["metrics"]["reward/eval_accuracy"] == pytest.approx(
        run.metric("reward/eval_accuracy")[-1])


def test_reward_model_learns_from_the_sft_backbone(reward_run):
    m = reward_run["result"].metrics
    assert m["reward/loss"] < m["reward/first_loss"] - 0.05, m
    assert m["reward/eval_accuracy"] > 0.6, m
    assert m["reward/eval_margin"] > 0 and -1 <= m["reward/eval_gold_spearman"] <= 1, m


def test_checkpoint_scores_equal_hf_pooling(reward_run):
    final = checkpoint.final_checkpoint(reward_run["run_dir"])
    tok = reward_run["tokenizer"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert reloaded.config.num_labels == 1
    assert reloaded.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    rows = [{"prompt": "sort:52813=", "chosen": "12358", "rejected": "1238"},
            {"prompt": "sort:907=", "chosen": "079", "rejected": "0799999"},
            {"prompt": "sort:4=", "chosen": "4", "rejected": ""}]
    feats, _ = tokenize_pairs(rows, tok, "{prompt}", 16, 32)
    batch = collate_pairs(feats, tok.pad_token_id)  # right-padded, lengths differ
    assert (batch["attention_mask"] == 0).any()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids.gather(1, last_index(mask)[:, None]) == tok.eos_token_id).all()
    with torch.no_grad():
        hf = reloaded(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours = sequence_scores(reloaded, ids, mask)
        per_token = token_values(reloaded, ids, mask)
        trained = torch.cat(pair_scores(reward_run["engine"].module.eval(), batch))
    torch.testing.assert_close(ours, hf)
    torch.testing.assert_close(per_token.gather(1, last_index(mask)[:, None])[:, 0], hf)
    torch.testing.assert_close(trained, hf)  # the saved weights are the trained ones


@pytest.mark.slow
def test_zero3_lora_run_saves_a_merged_hf_reward_model(tmp_path):
    run_dir = tmp_path / "z3_lora"
    proc = cli("stage=reward", "zero_stage=zero3", "model.lora.enabled=true", *FAST,
               "reward.max_steps=4", "reward.log_every=2", "reward.micro_batch_size_per_device=8",
               "data_mix.sources.0.synthetic.num_examples=1000", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = _only_run(run_dir)
    assert run.job_type == "reward" and len(run.metric("reward/loss")) == 2
    assert run.summary["reward/trainable_params"] < 100_000  # only the adapters and the head
    final = checkpoint.final_checkpoint(run_dir)
    model = AutoModelForSequenceClassification.from_pretrained(final)  # plain HF, consolidated
    assert not any("lora" in name for name, _ in model.named_parameters())
    result = json.loads((run_dir / "result.json").read_text())
    assert "reward/eval_accuracy" in result["metrics"]
