"""pass@k and mean@N (rlhf_exp/rl/pass_at_k.py, issue 20 point 4): the estimator against a direct
enumeration of every k-subset, the evaluator's means over prompts, the config checks, and
stage=eval end to end with N samples per prompt."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest
import torch

from rlhf_exp.config.validate import check
from rlhf_exp.errors import ConfigError
from rlhf_exp.rl import evaluation
from rlhf_exp.rl.pass_at_k import PassAtK, pass_at_k, prompt_sums
from rlhf_exp.stages import algorithms, pipeline
from rlhf_exp.stages import eval as eval_stage
from rlhf_exp.training.wandb_reader import read_runs
from tests.conftest import FAST, assert_one_line_exit_2, compose


def enumerated_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The share of the k-subsets of n samples (the first c passing) holding a passing one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_the_estimator_is_the_share_of_k_subsets_with_a_pass(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            # float64 products of at most n ratios: a few ulps
            assert pass_at_k(n, c, k) == pytest.approx(float(enumerated_pass_at_k(n, c, k)),
                                                       abs=1e-12), (n, c, k)


def test_the_estimator_stays_exact_where_binomials_overflow_floats():
    """C(2000, 1000) has ~600 digits (no float holds it); the product form needs none."""
    for n, c, k in [(2000, 3, 1000), (2000, 1, 1), (2000, 1990, 5), (500, 0, 250)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-10)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_summarize_gives_pass_at_k_and_mean_at_n_over_the_rows_with_gold():
    """Two prompts with a gold reward (4 samples each: 2 and 0 passing at 1.0) and one without:
    pass@k is the mean of the per-prompt estimates, mean@4 the mean of all 8 golds; every
    other number is the one the usual (first) sample gives, as without extra samples."""
    samples = evaluation.Samples(["1", "2", "x"], [3, 5, 4], [True, True, False], [])
    gold = [1.0, 0.5, None]
    spec = PassAtK(num_samples=4, ks=(1, 2, 4), threshold=1.0)
    golds = [[1.0, 0.0, 1.0, 0.5], [0.5, 0.25, 0.0, 0.75], None]
    m = evaluation.summarize(
        evaluation.PolicyScores(samples, gold, None, None, golds, spec), torch.device("cpu"))
    single = evaluation.summarize(evaluation.PolicyScores(samples, gold, None, None),
                                  torch.device("cpu"))
    assert {k: m[k] for k in single} == single  # the usual numbers untouched
    # prompt 1: n=4, c=2 -> pass@1 1/2, pass@2 1 - C(2,2)/C(4,2) = 5/6, pass@4 1; prompt 2: 0
    assert m["pass@1"] == pytest.approx(0.5 / 2)
    assert m["pass@2"] == pytest.approx((5 / 6) / 2)
    assert m["pass@4"] == pytest.approx(1.0 / 2)
    assert m["mean@4"] == pytest.approx((2.5 + 1.5) / 8)
    # a threshold the 0.75 sample passes: prompt 2 has c=1
    lower = PassAtK(num_samples=4, ks=(1,), threshold=0.75)
    assert prompt_sums(golds[:2], lower) == pytest.approx([2 / 4 + 1 / 4, (2.5 + 1.5) / 4])


def test_the_eval_node_gives_the_settings_and_the_shoot_out_shows_them():
    cfg = compose("stage=eval", "eval.num_samples=8")
    assert evaluation.pass_at_k_settings(cfg.eval) == PassAtK(8, (1, 8), 1.0)
    assert evaluation.pass_at_k_settings(compose("stage=eval").eval) == PassAtK(1, (1,), 1.0)
    shoot_out = compose("experiment=algorithms")
    assert evaluation.pass_at_k_settings(shoot_out.eval) == PassAtK(4, (1, 4), 1.0)
    check(shoot_out)
    heldout = {"sft": {"gold_reward": 0.3, "pass@1": 0.1, "pass@4": 0.2, "mean@4": 0.3},
               "ppo": {"gold_reward": 0.5, "gold_gain": 0.2, "pass@1": 0.3, "pass@4": 0.5,
                       "mean@4": 0.4}}
    columns = algorithms.heldout_columns(heldout)
    assert columns == ["gold_reward", "gold_gain", "pass@1", "pass@4", "mean@4"]
    text = algorithms.summary_text({}, {}, {}, heldout, "")
    assert "| policy | gold_reward | gold_gain | pass@1 | pass@4 | mean@4 |" in text
    assert "| ppo | 0.5 | 0.2 | 0.3 | 0.5 | 0.4 |" in text
    piped = pipeline.summary_text({}, {"sft": {"gold_reward": 0.25, "pass@1": 0.125,
                                               "mean@1": 0.25}})
    assert "| policy | gold_reward | reward_score | response_length | kl_to_sft | pass@1 | " \
           "mean@1 |" in piped and "| sft | 0.2500 | - | - | - | 0.1250 | 0.2500 |" in piped


@pytest.mark.parametrize("args, needle", [
    (["stage=eval", "eval.include_base=true", "eval.num_samples=0"], "eval.num_samples=0"),
    (["stage=eval", "eval.include_base=true", "eval.num_samples=2", "eval.pass_k=[1,4]"],
     "eval.pass_k=[1, 4] has k=4; each k must be in [1, eval.num_samples=2]"),
    (["experiment=algorithms", "eval.num_samples=2", "eval.pass_k=[3]"], "eval.pass_k=[3]"),
    (["stage=pipeline", "eval.pass_threshold=0"], "eval.pass_threshold=0.0 must be in (0, 1]"),
    (["stage=eval", "eval.include_base=true", "eval.pass_threshold=1.5"],
     "eval.pass_threshold=1.5"),
])
def test_bad_pass_at_k_keys_exit_2_before_the_run(args, needle, rlhf_exp, tmp_path):
    run_dir = tmp_path / "run"
    assert_one_line_exit_2(rlhf_exp(*args, f"hydra.run.dir={run_dir}"), needle)
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="eval"):
        check(compose(*args))


@pytest.mark.slow
def test_stage_eval_logs_pass_at_k_and_mean_at_n_keeping_the_usual_numbers(sft_run, tmp_path,
                                                                           capfd):
    """A trained tiny policy, 12 held-out prompts, 4 samples each: eval/sft/pass@{1,2,4} and
    mean@4 in the result, the printed line and the W&B offline log; the usual sample's numbers
    are the ones of the same run with 1 sample (the same computation on the same responses: equal
    exactly); with 1 sample pass@1 and mean@1 are the share of passing and the mean of the
    table's gold column."""
    common = ["stage=eval", *FAST, f"eval.policies.sft={sft_run['run_dir']}",
              "eval.num_prompts=12", "eval.batch_size=6", "eval.pass_threshold=0.5"]
    many = eval_stage.run(compose(*common, "eval.num_samples=4", "eval.pass_k=[1,2,4]"),
                          tmp_path / "many")
    printed = capfd.readouterr().out
    one = eval_stage.run(compose(*common), tmp_path / "one")
    m, m1 = many.metrics, one.metrics
    assert {k: m[k] for k in m1 if "@" not in k} == {k: v for k, v in m1.items() if "@" not in k}
    p = [m[f"eval/sft/pass@{k}"] for k in (1, 2, 4)]
    assert 0.0 <= p[0] <= p[1] <= p[2] <= 1.0 and 0.0 <= m["eval/sft/mean@4"] <= 1.0
    assert p[2] > p[0]  # 4 tries pass more prompts than 1 (gold is partial credit on digits)
    assert "pass@4" in printed and "mean@4" in printed
    (run,) = read_runs(tmp_path / "many" / "wandb")
    for key in ("eval/sft/pass@1", "eval/sft/pass@2", "eval/sft/pass@4", "eval/sft/mean@4"):
        assert float(run.summary[key]) == pytest.approx(m[key]), key
    golds = [json.loads(line)["sft/gold"]
             for line in (tmp_path / "one" / "eval_samples.jsonl").read_text().splitlines()]
    assert m1["eval/sft/pass@1"] == pytest.approx(sum(g >= 0.5 for g in golds) / len(golds))
    assert m1["eval/sft/mean@1"] == pytest.approx(sum(golds) / len(golds))
