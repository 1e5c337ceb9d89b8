"""Rewards from Python functions (rlhf_exp/rl/rewards.py): named `module:function`, called on
batches, checked on real rows before any model loads, weighted and summed."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from rlhf_exp import tasks
from rlhf_exp.errors import RewardFunctionError, UserError
from rlhf_exp.rl import rewards
from rlhf_exp.tasks import sort_digits

ROWS = [{"prompt": "sort:321=", "response": "123", "task": "sort_digits", "id": "a"},
        {"prompt": "sort:9071=", "response": "0179", "task": "sort_digits", "id": "b"}]


def lengths(prompts, responses, **columns):
    return [len(r) for r in responses]


def raises(prompts, responses, **columns):
    raise KeyError("score")


def too_few(prompts, responses, **columns):
    return [1.0]


def not_numbers(prompts, responses, **columns):
    return ["high"] * len(responses)


def infinite(prompts, responses, **columns):
    return [float("inf")] * len(responses)


def _nodes(*items):
    return OmegaConf.create([{"fn": fn, "weight": w} for fn, w in items])


def test_gold_reward_function_scores_a_batch_like_the_task():
    out = tasks.gold_reward_fn(["sort:321=", "sort:55="], ["123", "5"],
                               task=["sort_digits", "sort_digits"])
    assert out == [1.0, sort_digits.gold_reward("sort:55=", "5")] == [1.0, 0.5]
    with pytest.raises(ValueError, match="no gold reward"):
        tasks.gold_reward_fn(["hi"], ["x"], task=[None])


def test_weighted_sum_and_per_function_means():
    import torch

    functions = rewards.load(_nodes(("rlhf_exp.tasks:gold_reward_fn", 2.0),
                                    (f"{__name__}:lengths", -0.5)), "ppo.reward_functions", ROWS)
    assert [f.name for f in functions] == ["gold_reward_fn", "lengths"]
    total, means = rewards.function_scores(functions, ROWS, ["123", "01"],
                                           torch.device("cpu"))
    gold = [1.0, sort_digits.gold_reward("sort:9071=", "01")]
    assert total.tolist() == pytest.approx([2 * gold[0] - 1.5, 2 * gold[1] - 1.0])
    assert means == pytest.approx({"gold_reward_fn": sum(gold) / 2, "lengths": 2.5})


@pytest.mark.parametrize("spec, says", [
    ("rlhf_exp.tasks.gold_reward_fn", "name a function as 'package.module:function'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("rlhf_exp.tasks:no_such_fn", "has no function 'no_such_fn'"),
    (f"{__name__}:raises", "raised KeyError"),
    (f"{__name__}:too_few", "returned 1 values for 2 responses"),
    (f"{__name__}:not_numbers", "must return a list of numbers"),
    (f"{__name__}:infinite", "NaN or infinite"),
])
def test_a_bad_reward_function_is_one_line_naming_the_key(spec, says):
    with pytest.raises(RewardFunctionError) as exc:
        rewards.load(_nodes((spec, 1.0)), "grpo.reward_functions", ROWS)
    message = str(exc.value)
    assert isinstance(exc.value, UserError) and "\n" not in message
    assert message.startswith("grpo.reward_functions[0].fn") and says in message, message


def test_reward_keys_are_validated_at_composition():
    from rlhf_exp.config import ConfigError
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=r"ppo\.reward_functions\[0\]\.fn='gold'"):
        compose("stage=ppo", "ppo.reward_functions=[{fn: gold}]")
    with pytest.raises(ConfigError, match="no reward"):
        compose("stage=ppo", "ppo.reward_model_weight=0")
    with pytest.raises(ConfigError, match="reward_model_weight=-1"):
        compose("stage=ppo", "ppo.reward_model_weight=-1")
    cfg = compose("stage=ppo", "ppo.reward_model_weight=0",
                  "ppo.reward_functions=[{fn: 'rlhf_exp.tasks:gold_reward_fn', weight: 2}]")
    assert cfg.ppo.reward_functions[0].weight == 2.0
