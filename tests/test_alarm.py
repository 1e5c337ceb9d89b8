"""The reward-hacking alarm (rlhf_exp/rl/alarm.py): each alarm's rule on hand-made series, its
config checks, the shoot-out's alarm column. The alarm in a real PPO run:
tests/test_alarm_ppo.py."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from rlhf_exp.config import AlarmConfig, ConfigError
from rlhf_exp.rl import alarm
from rlhf_exp.stages import algorithms
from rlhf_exp.training import runtime
from tests.conftest import compose


def _watch(**over) -> alarm.Watch:
    return alarm.Watch("ppo", OmegaConf.structured(AlarmConfig(**over)))


def test_repeated_ngram_share_counts_repeats_within_each_response():
    # "1 2 3 1 2 3 1" has five trigrams, of which (1,2,3) and (2,3,1) come back once each: 2/5;
    # the second response is masked to "4 5 6 7" (two distinct trigrams): 0; the third is
    # shorter than n: 0
    responses = torch.tensor([[1, 2, 3, 1, 2, 3, 1], [4, 5, 6, 7, 4, 5, 6], [8, 9, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    assert alarm.repeated_ngram_share(responses, mask, 3) == pytest.approx((2 / 5) / 3)
    assert alarm.repeated_ngram_share(responses[:1], mask[:1], 1) == pytest.approx(4 / 7)


def _evals(watch: alarm.Watch, golds: list[float], proxies: list[float]) -> list[dict]:
    return [watch.on_eval(10 * i, {"ppo/eval_gold_reward": g, "ppo/eval_reward_score": p}, {})
            for i, (g, p) in enumerate(zip(golds, proxies))]


def test_proxy_gold_fires_after_patience_evals_of_gold_down_and_proxy_up(capsys):
    w = _watch(gold_drop=0.05, patience=2)
    out = _evals(w, [0.50, 0.60, 0.52, 0.50, 0.40], [0.0, 1.0, 1.5, 2.0, 3.0])
    # gold's best is step 10 (0.60); step 20: down 0.08 with the proxy up: one eval past the
    # thresholds; step 30: two in a row -> fires there, and stays latched
    assert [o["alarm/proxy_gold"] for o in out] == [0, 0, 0, 1, 1]
    assert out[3]["alarm/gold_drop"] == pytest.approx(0.10)
    assert out[3]["alarm/proxy_rise"] == pytest.approx(1.0)
    assert w.fired == {"proxy_gold": 30} and out[4]["alarm/any"] == 1
    lines = [x for x in capsys.readouterr().out.splitlines() if "ALARM" in x]
    assert len(lines) == 1 and "proxy_gold at step 30" in lines[0]


def test_proxy_gold_quiet_when_the_proxy_falls_with_gold_or_gold_dips_once():
    both_fall = _watch()
    assert not _evals(both_fall, [0.6, 0.5, 0.4, 0.3], [3.0, 2.0, 1.0, 0.0])[-1]["alarm/any"]
    one_dip = _watch(patience=2)  # a single noisy eval past the thresholds, then recovery
    assert not _evals(one_dip, [0.6, 0.5, 0.6, 0.5], [0.0, 1.0, 2.0, 3.0])[-1]["alarm/any"]
    small = _watch(gold_drop=0.05)  # gold down 0.04 only
    assert not _evals(small, [0.6, 0.56, 0.56, 0.56], [0.0, 1.0, 2.0, 3.0])[-1]["alarm/any"]
    off = _watch(gold_drop=None)
    assert not _evals(off, [0.6, 0.1, 0.1, 0.1], [0.0, 1.0, 2.0, 3.0])[-1]["alarm/any"]


def test_proxy_is_the_training_reward_without_a_heldout_reward_model():
    w = _watch()
    assert w.proxy({"ppo/eval_gold_reward": 0.5}, {"ppo/reward_score": 1.5}) == 1.5
    assert w.proxy({"ppo/eval_gold_reward": 0.5, "ppo/eval_reward_score": 2.0},
                   {"ppo/reward_score": 1.5}) == 2.0
    g = alarm.Watch("grpo", w.cfg)
    assert g.proxy({}, {"grpo/reward": 0.7}) == 0.7 and g.proxy({}, {}) is None


def _steps(watch: alarm.Watch, key: str, values: list[float]) -> list[dict]:
    return [watch.on_step(i + 1, {key: v}) for i, v in enumerate(values)]


@pytest.mark.parametrize(("key", "values", "name", "watched", "fires_at"), [
    # rolling mean over 2 steps vs the first 2: 10 -> 12.5 -> 17.5 -> 25 (x2.5) at step 5
    ("ppo/response_length", [10, 10, 15, 20, 30, 30], "length", "alarm/length_ratio", 5),
    ("ppo/response_length", [10, 10, 6, 3, 2, 2], "length", "alarm/length_ratio", 4),
    ("ppo/entropy", [2.0, 2.0, 1.0, 0.5, 0.2, 0.2], "entropy", "alarm/entropy_ratio", 5),
    ("ppo/kl", [1.0, 5.0, 16.0, 16.0], "kl", "alarm/kl_value", 3),  # (5 + 16) / 2 > 10
    ("alarm/repeat_ngram_share", [0.1, 0.2, 0.9, 0.9], "repeat_ngrams",
     "alarm/repeat_ngram_share", 3),
])
def test_step_alarms_fire_when_their_rolling_value_leaves_its_range(key, values, name, watched,
                                                                   fires_at):
    w = _watch(window=2, length_ratio=2.0, entropy_ratio=0.2, kl_budget=10.0, repeat_share=0.5)
    out = _steps(w, key, values)
    assert [o[f"alarm/{name}"] for o in out] == [float(i + 1 >= fires_at)
                                                  for i in range(len(values))]
    assert watched in out[-1] and w.fired == {name: fires_at}


def test_action_stop_stops_and_keeps_the_best_eval_by_gold_or_proxy():
    warn = _watch()
    _evals(warn, [0.6, 0.4, 0.3], [0.0, 1.0, 2.0])
    assert warn.fired and not warn.stop and not warn.keeps_best
    by_gold = _watch(action="stop")
    _evals(by_gold, [0.5, 0.6, 0.4, 0.3], [0.0, 1.0, 2.0, 3.0])
    assert by_gold.stop and by_gold.best == {"step": 10, "value": 0.6}
    assert by_gold.value_at(30) == 0.3 and by_gold.value_at(20) is None
    by_proxy = _watch(action="stop", keep_best="proxy")
    _evals(by_proxy, [0.5, 0.6, 0.4, 0.3], [0.0, 1.0, 2.0, 3.0])
    assert by_proxy.best == {"step": 30, "value": 3.0}


def test_state_survives_a_resume_round_trip():
    w = _watch(window=2)
    _evals(w, [0.6, 0.5], [0.0, 1.0])
    _steps(w, "ppo/kl", [1.0, 2.0])
    again = _watch(window=2)
    again.load_state_dict(w.state_dict())
    # the next eval continues the streak: fires at once (patience 2)
    assert again.on_eval(20, {"ppo/eval_gold_reward": 0.4, "ppo/eval_reward_score": 2.0},
                         {})["alarm/proxy_gold"] == 1
    assert again.history == {"kl": [1.0, 2.0]}


def test_disabled_alarm_reports_nothing():
    w = _watch(enabled=False, action="stop")
    assert _evals(w, [0.6, 0.1, 0.1], [0.0, 1.0, 2.0]) == [{}, {}, {}]
    assert _steps(w, "ppo/kl", [100.0]) == [{}] and not w.stop


@pytest.mark.parametrize(("override", "key"), [
    ("ppo.alarm.action=halt", "ppo.alarm.action"),
    ("grpo.alarm.keep_best=reward", "grpo.alarm.keep_best"),
    ("ppo.alarm.patience=0", "ppo.alarm.patience"),
    ("ppo.alarm.length_ratio=0.5", "ppo.alarm.length_ratio"),
    ("grpo.alarm.entropy_ratio=1.5", "grpo.alarm.entropy_ratio"),
    ("ppo.alarm.kl_budget=0", "ppo.alarm.kl_budget"),
    ("ppo.alarm.repeat_share=1", "ppo.alarm.repeat_share"),
    ("ppo.alarm.gold_drop=-0.1", "ppo.alarm.gold_drop"),
])
def test_bad_alarm_config_names_the_key(override, key):
    stage = key.split(".")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(f"stage={stage}", override)


def test_alarm_defaults_compose_for_both_rl_stages():
    cfg = compose("stage=ppo", "ppo.alarm.kl_budget=null", "ppo.alarm.action=stop")
    assert cfg.ppo.alarm.kl_budget is None and cfg.ppo.alarm.action == "stop"
    assert cfg.grpo.alarm == OmegaConf.structured(AlarmConfig())


def test_shootout_summary_marks_the_arms_that_tripped_it():
    shared = {"sft": runtime.StageResult("sft", "/r/sft")}
    results = {"ppo": runtime.StageResult("ppo", "/r/ppo", alarms={"proxy_gold": 40, "kl": 45}),
               "grpo": runtime.StageResult("grpo", "/r/grpo")}
    text = algorithms.summary_text(shared, results, {}, {"sft": {}}, "")
    runs_table = text.split("\n\n")[0]  # the first table: the runs
    rows = {line.split("|")[1].strip(): line for line in runs_table.splitlines()}
    assert "| alarm |" in rows["run"]
    assert rows["ppo"].rstrip().endswith("| proxy_gold@40, kl@45 |")
    assert rows["grpo"].rstrip().endswith("| - |") and rows["sft"].rstrip().endswith("| - |")
