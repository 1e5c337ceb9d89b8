"""stage=dpo end to end, on a tiny budget: the `[sft, dpo]` pipeline (hand-off, W&B runs, metrics,
held-out gold reward before and after, artifact), the checkpoint through the Auto classes,
stage=eval and stage=chat on the DPO run, and bad DPO keys (kill-and-resume: tests/test_resume.py).

These run the real parts (DeepSpeed on CPU, W&B offline, the tiny model).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_exp.config import ConfigError
from rlhf_exp.stages import eval as eval_stage
from rlhf_exp.stages import pipeline
from rlhf_exp.stages.chat import Chat
from rlhf_exp.training import checkpoint
from rlhf_exp.training.wandb_reader import read_runs
from tests.conftest import compose

SMALL = ["data_mix.sources.0.synthetic.num_examples=1000",
         "sft.max_steps=20", "sft.eval_every=0", "sft.log_every=5",
         "dpo.max_steps=8", "dpo.micro_batch_size_per_device=8", "dpo.log_every=2",
         "dpo.eval_every=4", "dpo.warmup_steps=2",
         "dpo.beta=0.1",  # (the default) the first window (steps 1-2) stays within 0.02 of log 2
         "ppo.eval_num_prompts=16", "ppo.eval_batch_size=16"]
TRAIN_METRICS = ("dpo/loss", "dpo/rewards/chosen", "dpo/rewards/rejected",
                 "dpo/rewards/accuracies", "dpo/rewards/margins", "dpo/logps/chosen",
                 "dpo/logps/rejected", "dpo/logits/chosen", "dpo/logits/rejected",
                 "dpo/nll_loss", "dpo/lr", "dpo/grad_norm", "dpo/epoch", "perf/samples_per_s",
                 "perf/tokens_per_s")
EVAL_METRICS = tuple(f"dpo/eval_{m[4:]}" for m in TRAIN_METRICS[:10])


@pytest.fixture(scope="module")
def sft_dpo(tmp_path_factory):
    """`stage=pipeline stage.stages=[sft,dpo]`: SFT, then DPO from its output."""
    run_dir = tmp_path_factory.mktemp("sft_dpo")
    cfg = compose("stage=pipeline", "stage.stages=[sft,dpo]", *SMALL)
    result = pipeline.run(cfg, run_dir)
    return {"cfg": cfg, "run_dir": run_dir, "result": result,
            "dpo": json.loads((run_dir / "dpo" / "result.json").read_text())}


@pytest.mark.slow
def test_pipeline_hands_the_sft_policy_to_dpo_and_logs_both_runs(sft_dpo):
    run_dir = sft_dpo["run_dir"]
    (sft_run,) = read_runs(run_dir / "sft" / "wandb")
    (run,) = read_runs(run_dir / "dpo" / "wandb")
    assert sft_run.job_type == "sft" and run.job_type == "dpo"
    assert run.group == sft_run.group == "default"
    # DPO started from the SFT run's output, and its reference is that policy
    sft_final = checkpoint.final_checkpoint(run_dir / "sft").resolve()
    assert run.config["dpo"]["init_from"] == str(run_dir / "sft")
    assert run.summary["dpo/init_path"] == run.summary["dpo/reference_path"] == str(sft_final)
    m = sft_dpo["result"].metrics
    assert "sft/eval_loss" in m and "dpo/eval_gold_reward" in m


@pytest.mark.slow
def test_wandb_run_holds_the_metrics_gold_before_after_and_artifact(sft_dpo):
    (run,) = read_runs(sft_dpo["run_dir"] / "dpo" / "wandb")
    for key in TRAIN_METRICS + EVAL_METRICS:
        assert run.metric(key), f"{key} not logged"
    assert len(run.metric("dpo/loss")) == 4  # log_every=2 over 8 steps
    assert len(run.metric("dpo/eval_loss")) == 2  # step 4 and after the last
    # the held-out gold reward of the starting policy (step 0) and after the last step (8)
    gold_steps = [int(r["dpo/step"]) for r in run.history if "dpo/eval_gold_reward" in r]
    assert gold_steps == [0, 8]
    init, final = run.metric("dpo/eval_gold_reward")
    m = sft_dpo["dpo"]["metrics"]
    assert m["dpo/init_eval_gold_reward"] == pytest.approx(init)
    assert m["dpo/eval_gold_reward"] == pytest.approx(final)
    assert run.summary["dpo/reference_pairs"] == 64  # 8 steps x 8 pairs, no pair twice
    # the reference's seconds, split: the training pairs, the held-out pairs, its load
    for key in ("perf/reference_s", "perf/reference_eval_s", "perf/reference_load_s"):
        assert run.summary[key] > 0 and m[key] == pytest.approx(run.summary[key]), key
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert models and models[0]["name"].startswith("default-dpo-model")
    assert "final" in models[0]["aliases"]


@pytest.mark.slow
def test_dpo_learns_the_held_out_preferences(sft_dpo):
    """At step 0 the policy is its reference: every log-ratio is 0 and the pair loss log 2 (the
    logged loss adds rpo_alpha x the chosen NLL, logged as dpo/nll_loss). Trained, the held-out
    pairs' implicit rewards rank the chosen response higher."""
    m = sft_dpo["dpo"]["metrics"]
    alpha = sft_dpo["cfg"].dpo.rpo_alpha
    assert alpha == 1.0  # the default: the fixture runs RPO's NLL term
    (run,) = read_runs(sft_dpo["run_dir"] / "dpo" / "wandb")
    first_nll = run.metric("dpo/nll_loss")[0]
    assert m["dpo/first_loss"] - alpha * first_nll == pytest.approx(math.log(2), abs=0.02)
    eval_pair_loss = m["dpo/eval_loss"] - alpha * m["dpo/eval_nll_loss"]
    assert eval_pair_loss < math.log(2) - 0.01, m
    assert m["dpo/eval_rewards/margins"] > 0 and m["dpo/eval_rewards/accuracies"] > 0.5, m


@pytest.mark.slow
def test_checkpoint_reloads_with_auto_classes_and_identical_logits(sft_dpo):
    final = checkpoint.final_checkpoint(sft_dpo["run_dir"] / "dpo")
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    # the trained weights: the policy moved away from the SFT checkpoint it started from
    start = AutoModelForCausalLM.from_pretrained(
        checkpoint.final_checkpoint(sft_dpo["run_dir"] / "sft")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert not torch.allclose(logits, start(input_ids=ids).logits)
        again = AutoModelForCausalLM.from_pretrained(final).eval()(input_ids=ids).logits
    # two loads of one file: the same weights; fp32 tolerance for the kernels' summation order
    torch.testing.assert_close(logits, again, rtol=1e-5, atol=1e-6)
    assert json.loads((final / "rlhf_exp.json").read_text())["stage"] == "dpo"


@pytest.mark.slow
def test_eval_and_chat_accept_the_dpo_run(sft_dpo, tmp_path):
    """stage=eval on the DPO run finds its policy and the SFT policy it started from, and
    reproduces the DPO stage's own held-out gold rewards (the same evaluation code)."""
    dpo_dir = sft_dpo["run_dir"] / "dpo"
    found = eval_stage.discover_run(str(dpo_dir))
    assert set(found.policies) == {"sft", "dpo"}
    cfg = compose("stage=eval", f"eval.from_run={dpo_dir}", "logger=none")
    result = eval_stage.run(cfg, tmp_path / "eval")
    m, own = result.metrics, sft_dpo["dpo"]["metrics"]
    assert m["eval/dpo/gold_reward"] == pytest.approx(own["dpo/eval_gold_reward"], abs=1e-6)
    assert m["eval/sft/gold_reward"] == pytest.approx(own["dpo/init_eval_gold_reward"],
                                                      abs=1e-6)
    chat = Chat(compose("stage=chat", f"chat.policy={dpo_dir}",
                        "chat.generation.do_sample=false", "chat.generation.max_new_tokens=8"))
    final = checkpoint.final_checkpoint(dpo_dir)
    assert Path(chat.path).resolve() == final.resolve()
    # the chat holds the DPO weights (loaded, not computed: exactly the file's), not the SFT's
    policy = AutoModelForCausalLM.from_pretrained(final).eval()
    want = policy.state_dict()
    for key, value in chat.model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0)
    # ... and answers as greedy decoding of that checkpoint does (the same HF generate on the
    # same weights and kernels), streaming the answer it returns
    ids = torch.tensor([chat.prompt_ids("sort:321=")])
    with torch.no_grad():
        out_ids = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=8, do_sample=False,
                                  eos_token_id=chat.tokenizer.eos_token_id,
                                  pad_token_id=chat.tokenizer.pad_token_id)
    expected = chat.tokenizer.decode(out_ids[0, ids.shape[1]:], skip_special_tokens=True)
    streamed = io.StringIO()
    answer = chat.reply("sort:321=", out=streamed)
    assert answer == expected and answer.strip()
    assert streamed.getvalue() == answer + "\n"
    assert chat.history == [("sort:321=", answer)]


# ----------------------------------------------------------------------------- bad keys
@pytest.mark.parametrize("override,message", [
    ("dpo.loss_type=kto", "dpo.loss_type='kto' is not allowed; choose one of: sigmoid, hinge, "
                          "ipo, robust"),
    ("dpo.beta=0", "dpo.beta=0.0 must be > 0"),
    ("dpo.label_smoothing=0.5", "dpo.label_smoothing=0.5 must be in [0, 0.5)"),
    ("dpo.rpo_alpha=-1", "dpo.rpo_alpha=-1.0 must be >= 0"),
    ("dpo.max_steps=0", "dpo.max_steps=0 must be >= 1, or -1"),
    ("dpo.reference=' '", "dpo.reference is empty"),
    ("data_mix.split=[2,0,4]", "gives the reward share 0, but stage dpo reads it"),
])
def test_bad_dpo_keys_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        compose("stage=dpo", override)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_label_smoothing_only_with_the_losses_that_use_it():
    compose("stage=dpo", "dpo.loss_type=robust", "dpo.label_smoothing=0.1")
    with pytest.raises(ConfigError, match="only applies to dpo.loss_type=sigmoid"):
        compose("stage=dpo", "dpo.loss_type=ipo", "dpo.label_smoothing=0.1")


def test_resume_check_knows_dpo_and_the_ppo_eval_settings_it_reads(tmp_path):
    """A DPO run resumes with another length or interval; not with another dpo key, nor with
    other PPO eval settings (its held-out gold reward samples with them); PPO's training keys
    do not matter to it."""
    from omegaconf import OmegaConf

    from rlhf_exp.errors import UserError
    from rlhf_exp.training import resume

    run_dir = tmp_path / "dpo_run"
    run_dir.mkdir()
    saved = compose("stage=dpo", "dpo.max_steps=6")
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(saved, resolve=True))
    resume.check_compatible(compose("stage=dpo", "dpo.max_steps=12", "dpo.save_every=3",
                                    "ppo.kl.coef=0.5", f"resume={run_dir}"), run_dir)
    for override, says in (("dpo.beta=0.5", "dpo.beta=0.1 (now 0.5)"),
                           ("ppo.generation.temperature=0.5", "ppo.generation.temperature="),
                           ("ppo.eval_num_prompts=8", "ppo.eval_num_prompts=")):
        with pytest.raises(UserError, match=r"the run was made with another config") as err:
            resume.check_compatible(compose("stage=dpo", "dpo.max_steps=6", override,
                                            f"resume={run_dir}"), run_dir)
        assert says in str(err.value), err.value
    with pytest.raises(UserError, match="that run is a stage=dpo run, not stage=sft"):
        resume.check_compatible(compose("stage=sft", f"resume={run_dir}"), run_dir)
