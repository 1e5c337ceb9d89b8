"""stage=eval end to end: generation, scores, KL, the reward-model eval, the W&B run and files.

The numbers are checked against independent computations with plain HF classes, not against
the code under test. The "ppo" policy here is a byte-identical copy of the SFT checkpoint under
another path, so its responses must equal SFT's and its KL to SFT must be exactly 0, while the
untrained base model must be far from both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_exp.config import ConfigError
from rlhf_exp.data import build_stage_data
from rlhf_exp.data.tokenize import render_prompt
from rlhf_exp.errors import UserError
from rlhf_exp.modeling import models
from rlhf_exp.rl import evaluation
from rlhf_exp.stages import eval as eval_stage
from rlhf_exp.tasks import sort_digits
from rlhf_exp.training import checkpoint, runtime
from rlhf_exp.training.wandb_reader import read_runs
from tests.conftest import FAST, cli, compose

N_PROMPTS = 16


@pytest.fixture(scope="module")
def reward_dir(sft_run, tmp_path_factory) -> Path:
    """A reward-model checkpoint (SFT backbone, seeded random head): enough to check that eval
    scores exactly as HF does; how good the scores are is the reward stage's business."""
    final = checkpoint.final_checkpoint(sft_run["run_dir"])
    out = tmp_path_factory.mktemp("rm") / "ckpt"
    tok = models.load_tokenizer(str(final))
    torch.manual_seed(7)
    model = models.load_reward_model(str(final), tok, sft_run["cfg"].model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eval_run(sft_run, reward_dir, tmp_path_factory):
    final = checkpoint.final_checkpoint(sft_run["run_dir"])
    ppo_copy = tmp_path_factory.mktemp("ppo") / "ckpt"
    shutil.copytree(final, ppo_copy)
    run_dir = tmp_path_factory.mktemp("eval_run")
    cfg = compose("stage=eval", *FAST, "eval.include_base=true",
                  f"eval.policies.sft={sft_run['run_dir']}",  # a run dir resolves to its final
                  f"eval.policies.ppo={ppo_copy}", f"eval.reward_model={reward_dir}",
                  f"eval.num_prompts={N_PROMPTS}", "eval.num_pairs=24", "eval.batch_size=8")
    result = eval_stage.run(cfg, run_dir)
    samples = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text()
               .splitlines()]
    return {"cfg": cfg, "run_dir": run_dir, "result": result, "samples": samples}


def test_metrics_per_policy_and_kl_to_sft(eval_run):
    m = eval_run["result"].metrics
    for name in ("base", "sft", "ppo"):
        for key in ("reward_score", "gold_reward", "response_length", "kl_to_sft"):
            assert f"eval/{name}/{key}" in m, (name, key, sorted(m))
    # identical weights, same prompts, same seed: same responses, KL exactly 0
    rows = eval_run["samples"]
    assert [r["sft/response"] for r in rows] == [r["ppo/response"] for r in rows]
    assert m["eval/sft/kl_to_sft"] == 0.0
    assert m["eval/ppo/kl_to_sft"] == pytest.approx(0.0, abs=1e-6)
    # the untrained base model babbles: far from SFT and worse on the task
    assert m["eval/base/kl_to_sft"] > 5.0
    assert m["eval/sft/gold_reward"] > m["eval/base/gold_reward"] + 0.2
    assert 1 <= m["eval/sft/response_length"] <= eval_run["cfg"].eval.generation.max_new_tokens


def test_table_rows_hold_gold_and_reward_scores_as_hf_computes_them(eval_run, reward_dir):
    rows, m, cfg = eval_run["samples"], eval_run["result"].metrics, eval_run["cfg"]
    held_out = build_stage_data(cfg.data_mix, "ppo", cfg.seed).eval[:N_PROMPTS]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in held_out]
    for name in ("base", "sft", "ppo"):
        gold = [sort_digits.gold_reward(r["prompt"], r[f"{name}/response"]) for r in rows]
        assert [r[f"{name}/gold"] for r in rows] == pytest.approx(gold)
        assert m[f"eval/{name}/gold_reward"] == pytest.approx(sum(gold) / len(gold))
    # reward: prompt + response + EOS through HF's own sequence-classification pooling
    tok = AutoTokenizer.from_pretrained(reward_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    texts = [r["sft/response"] for r in rows]
    finished = [len(t) < cfg.eval.generation.max_new_tokens for t in texts]  # 1 char = 1 token
    expected = []
    with torch.no_grad():
        for r, text, done in zip(rows, texts, finished):
            ids = tok(render_prompt(tok, r["prompt"]) + text, add_special_tokens=False)["input_ids"]
            ids = ids + [tok.eos_token_id] * done
            expected.append(float(rm(input_ids=torch.tensor([ids])).logits[0, 0]))
    assert [r["sft/reward"] for r in rows] == pytest.approx(expected, abs=1e-4)
    assert m["eval/sft/reward_score"] == pytest.approx(sum(expected) / len(expected), abs=1e-4)


def test_reward_model_accuracy_on_held_out_pairs(eval_run, reward_dir):
    cfg, m = eval_run["cfg"], eval_run["result"].metrics
    pairs = build_stage_data(cfg.data_mix, "reward", cfg.seed).eval[:24]
    tok = AutoTokenizer.from_pretrained(reward_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()

    def score(prompt: str, response: str) -> float:
        ids = tok(render_prompt(tok, prompt) + response, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            return float(rm(input_ids=torch.tensor([ids + [tok.eos_token_id]])).logits[0, 0])

    margins = [score(p["prompt"], p["chosen"]) - score(p["prompt"], p["rejected"])
               for p in pairs]
    assert m["eval/rm_pairs"] == len(pairs)
    assert m["eval/rm_accuracy"] == pytest.approx(sum(x > 0 for x in margins) / len(margins))
    assert m["eval/rm_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    png = eval_run["run_dir"] / "rm_margin_hist.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_run_holds_table_image_and_summary(eval_run):
    (run,) = read_runs(eval_run["run_dir"] / "wandb")
    assert run.job_type == "eval"
    history = {k: v for row in run.history for k, v in row.items()}
    assert history["eval/samples._type"] == "table-file"
    assert int(history["eval/samples.nrows"]) == N_PROMPTS
    assert int(history["eval/samples.ncols"]) == 2 + 3 * 3  # prompt, source + 3 per policy
    assert history["eval/rm_margin_hist._type"] == "image-file"
    table = json.loads((run.file.parent / "files" / history["eval/samples.path"]).read_text())
    assert table["columns"][:5] == ["prompt", "source", "base/response", "base/reward",
                                    "base/gold"]
    for key, value in eval_run["result"].metrics.items():
        assert float(run.summary[key]) == pytest.approx(value), key
    assert set(run.summary["eval/policies"]) == {"base", "sft", "ppo"}


def test_sampling_is_seeded(sft_run):
    """Same rows, settings, batch size and seed: the same responses (what makes eval agree with
    PPO's held-out eval); another seed: other responses."""
    cfg = compose("stage=eval", *FAST, "eval.include_base=true")
    final = str(checkpoint.final_checkpoint(sft_run["run_dir"]))
    tok = models.load_tokenizer(final)
    model = models.load_causal_lm(final, tok, cfg.model)
    rows = evaluation.heldout_rows(cfg, 12)
    gen = evaluation.generation_config(cfg.eval.generation)
    kw = {"template": "{prompt}", "max_prompt_len": 32, "batch_size": 6,
          "device": torch.device("cpu")}
    a = evaluation.sample_responses(model, tok, rows, gen, seed=1, **kw)
    b = evaluation.sample_responses(model, tok, rows, gen, seed=1, **kw)
    c = evaluation.sample_responses(model, tok, rows, gen, seed=2, **kw)
    assert a.texts == b.texts and a.lengths == b.lengths
    assert a.texts != c.texts


def test_summarize_averages_each_score_over_its_rows():
    """Gold reward over the rows that have one; everything else over all rows; a score not
    computed (no reward model, no reference, no gold anywhere) is not reported."""
    samples = evaluation.Samples(["12", "3", "456"], [3, 6, 1], [True, False, True], [])
    full = evaluation.PolicyScores(samples, [1.0, None, 0.25], [0.5, -1.0, 2.0], [0.1, 0.2, 0.6])
    m = evaluation.summarize(full, torch.device("cpu"))
    assert m == pytest.approx({"response_length": 10 / 3, "finished": 2 / 3,
                               "reward_score": 1.5 / 3, "gold_reward": 1.25 / 2,
                               "kl_to_sft": 0.9 / 3})
    bare = evaluation.PolicyScores(samples, [None, None, None], None, None)
    assert set(evaluation.summarize(bare, torch.device("cpu"))) == {"response_length",
                                                                   "finished"}


def test_stage_evals_and_checkpoint_comparisons_share_one_evaluator(tmp_path):
    """A stage's own held-out eval of a policy and the pipeline's comparison of its checkpoint
    give the same numbers: the same code on the same weights (both loaded from one file), rows,
    settings and seed. The policy at the reference's path is the reference: KL exactly 0."""
    from rlhf_exp.stages import pipeline

    cfg = compose("stage=eval", "data_mix.sources.0.synthetic.num_examples=600",
                  "ppo.eval_num_prompts=6", "ppo.eval_batch_size=4",
                  "ppo.generation.max_new_tokens=6")
    base = models.resolve_base_path(cfg.model)
    tok = models.load_tokenizer(base, cfg.model)
    policy = models.load_causal_lm(base, tok, cfg.model).eval()
    rows = evaluation.heldout_shard(cfg, 6, 0, 1)
    own = evaluation.heldout_eval(policy, tok, rows, evaluation.stage_settings(cfg, cfg.ppo),
                                  prefix="ppo")
    compared = pipeline.compare_policies(cfg, {"sft": base}, base, None, stage="ppo")["sft"]
    assert compared["kl_to_sft"] == 0.0
    # pass@1 and mean@1 (eval.num_samples=1): the comparison's own columns, from the same sample
    assert compared.pop("mean@1") == pytest.approx(compared["gold_reward"]) and "pass@1" in compared
    assert own == {f"ppo/eval_{k}": v for k, v in compared.items()
                   if k not in ("kl_to_sft", "pass@1")}
    assert set(own) == {"ppo/eval_response_length", "ppo/eval_gold_reward"}


def test_from_run_finds_policies_and_reward_model(sft_run, reward_dir, tmp_path):
    """A pipeline run dir: sft/, reward/, ppo/ (with an EMA checkpoint) found by result.json."""
    sft_final = checkpoint.final_checkpoint(sft_run["run_dir"])
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "sft").symlink_to(sft_run["run_dir"], target_is_directory=True)
    for stage, target in (("reward", reward_dir), ("ppo", sft_final)):
        ckpts = pipe / stage / "checkpoints"
        ckpts.mkdir(parents=True)
        shutil.copytree(target, ckpts / "step_000010")
        checkpoint.mark_final(ckpts / "step_000010")
        (pipe / stage / "result.json").write_text(json.dumps({"stage": stage}))
    shutil.copytree(sft_final, pipe / "ppo" / "checkpoints" / "ema")
    (pipe / "result.json").write_text(json.dumps({"stage": "pipeline"}))
    found = eval_stage.discover_run(str(pipe))
    assert found.policies == {
        "sft": str(sft_final),
        "ppo": str((pipe / "ppo" / "checkpoints" / "step_000010").resolve()),
        "ppo_ema": str((pipe / "ppo" / "checkpoints" / "ema").resolve())}
    assert found.reward_model == str((pipe / "reward" / "checkpoints" / "step_000010").resolve())
    # a lone PPO run dir: its SFT policy and reward model come from its config, and so do the
    # seed and data_mix that decide which prompts were held out
    run_cfg = compose("stage=ppo", "seed=7", "data_mix.eval_fraction=0.1",
                      f"ppo.actor_init={sft_final}", f"ppo.critic_init={reward_dir}",
                      "ppo.generation.max_new_tokens=9")
    runtime.save_run_config(run_cfg, pipe / "ppo")
    found = eval_stage.discover_run(str(pipe / "ppo"))
    assert found.policies["sft"] == str(sft_final) and found.reward_model == str(reward_dir)
    assert set(found.policies) == {"sft", "ppo", "ppo_ema"}
    cfg = eval_stage.match_run(compose("stage=eval", f"eval.from_run={pipe / 'ppo'}"),
                               found.config)
    assert cfg.seed == 7 and cfg.data_mix.eval_fraction == 0.1
    assert cfg.eval.generation.max_new_tokens == 9  # eval's defaults follow the run's PPO eval


def test_nothing_to_evaluate_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="eval.from_run"):
        eval_stage.run(compose("stage=eval"), tmp_path)
    assert not any(tmp_path.iterdir()), "nothing written before the inputs are known"
    with pytest.raises(ConfigError, match="one process"):
        compose("stage=eval", "eval.include_base=true", "hardware.nproc_per_node=2")


def test_bad_reference_exits_2_with_one_line(tmp_path):
    proc = cli("stage=eval", f"eval.policies.sft={tmp_path / 'missing'}", *FAST,
               f"hydra.run.dir={tmp_path / 'b'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("rlhf-exp: error:")]
    assert "eval.policies.sft=" in line and "missing" in line
    assert not (tmp_path / "b" / "wandb").exists(), "a bad reference must not leave a W&B run"
