"""The reward-hacking alarm in a real PPO run (docs/alarm.md): against a weak reward model (10
steps of reward training) with the KL term off, the proxy climbs while held-out gold falls and
the proxy_gold alarm stops the run, keeping the best held-out eval's checkpoint; the same
settings with the default KL coefficient train to the end without a word from it.

Real parts throughout: the SFT fixture, a reward stage run, the PPO stage (DeepSpeed on CPU,
W&B offline), the alarm at its default thresholds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_exp.stages import ppo, reward
from rlhf_exp.training import checkpoint
from rlhf_exp.training.wandb_reader import read_runs
from tests.conftest import FAST, compose

pytestmark = pytest.mark.slow

# long enough for the KL-free run to part (docs/alarm.md: gold falls from about step 15),
# held-out eval every 5 steps on 64 prompts, the alarm stopping the run
SETTINGS = [*FAST, "stage=ppo", "ppo.steps=40", "ppo.rollout_batch_size=16",
            "ppo.micro_batch_size_per_device=16", "ppo.eval_every=5", "ppo.eval_num_prompts=64",
            "ppo.eval_batch_size=64", "logger.table_every=0", "logger.log_checkpoints=false",
            "ppo.alarm.action=stop", "ppo.keep_last=1"]


@pytest.fixture(scope="module")
def weak_reward_model(sft_run, tmp_path_factory) -> Path:
    """A reward model trained 10 steps from the SFT policy: it has picked up a little of the
    preference signal, not enough to rank the answers PPO finds."""
    run_dir = tmp_path_factory.mktemp("weak_rm")
    cfg = compose("stage=reward", *FAST, "reward.max_steps=10",
                  f"reward.init_from={sft_run['run_dir']}", "experiment_name=weak_rm")
    reward.train(cfg, run_dir)
    return run_dir


def _ppo(sft_run, rm: Path, run_dir: Path, *overrides: str):
    cfg = compose(*SETTINGS, f"ppo.actor_init={sft_run['run_dir']}", f"ppo.critic_init={rm}",
                  "experiment_name=alarm", *overrides)
    _, _, result = ppo.train(cfg, run_dir)
    (run,) = read_runs(run_dir / "wandb")
    evals = [r for r in run.history if "ppo/eval_gold_reward" in r]
    return result, run, evals


def test_kl_off_trips_the_proxy_gold_alarm_where_the_curves_part(sft_run, weak_reward_model,
                                                                 tmp_path, capsys):
    result, run, evals = _ppo(sft_run, weak_reward_model, tmp_path, "ppo.kl.coef=0")
    fired = result.alarms.get("proxy_gold")
    assert fired is not None, [(r.get("ppo/step", 0), r["ppo/eval_gold_reward"],
                                r["ppo/eval_reward_score"]) for r in evals]
    # the curves parted: at the firing eval gold is more than gold_drop below its best eval
    # while the proxy is above its value there, and it was so at the eval before too (patience)
    step = {r.get("ppo/step", 0): r for r in evals}
    best = max(evals, key=lambda r: r["ppo/eval_gold_reward"])
    for s in (fired - 5, fired):
        assert step[s]["ppo/eval_gold_reward"] < best["ppo/eval_gold_reward"] - 0.05
        assert step[s]["ppo/eval_reward_score"] > best["ppo/eval_reward_score"]
    # and not earlier: no eval before those two had parted
    assert all(r["alarm/proxy_gold"] == 0 for r in evals if r.get("ppo/step", 0) < fired)
    assert step[fired]["alarm/proxy_gold"] == 1
    # stop: the run ended at the firing step; the kept policy is the best eval's checkpoint
    assert fired < 40 and result.metrics["ppo/steps"] == fired
    assert result.metrics["alarm/stopped_step"] == fired and result.metrics["alarm/any"] == 1
    kept = Path(result.checkpoint)
    assert kept == (tmp_path / "checkpoints" / "best").resolve()
    assert kept.name == f"step_{best.get('ppo/step', 0):06d}" and checkpoint.is_checkpoint(kept)
    assert checkpoint.final_checkpoint(tmp_path).name == f"step_{fired:06d}"
    assert json.loads((tmp_path / "result.json").read_text())["alarms"] == {"proxy_gold": fired}
    lines = [x for x in capsys.readouterr().out.splitlines() if "ALARM" in x]
    assert len(lines) == 1 and f"proxy_gold at step {fired}" in lines[0]


def test_the_default_kl_keeps_the_alarm_quiet(sft_run, weak_reward_model, tmp_path):
    result, run, evals = _ppo(sft_run, weak_reward_model, tmp_path)
    assert result.alarms == {}, [(r.get("ppo/step", 0), r["ppo/eval_gold_reward"],
                                  r["ppo/eval_reward_score"]) for r in evals]
    assert result.metrics["ppo/steps"] == 40 and result.metrics["alarm/any"] == 0
    assert Path(result.checkpoint) == checkpoint.final_checkpoint(tmp_path)
    # every step logged the watched values of the step alarms, all quiet
    assert len(run.metric("alarm/kl_value")) == 40
    assert max(run.metric("alarm/repeat_ngram_share")) < 0.5
