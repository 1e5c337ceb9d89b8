"""stage=algorithms (the shoot-out preset experiment=algorithms): arms composed and checked as
the pipelines they are, the shared stages trained once, every arm in the experiment's W&B group,
one held-out comparison that agrees with each arm's own eval, the compare table and PNG."""

from __future__ import annotations

import json

import pytest

from rlhf_exp import config
from rlhf_exp.command import composition
from rlhf_exp.command.arms import compose_arms
from rlhf_exp.errors import ConfigError
from rlhf_exp.stages.eval import discover_run
from rlhf_exp.training.wandb_reader import read_runs

# the preset on a tiny budget: each arm a step or two, 16 held-out prompts for every eval
TINY = ["experiment=algorithms", "data_mix.sources.0.synthetic.num_examples=3000",
        "sft.max_steps=20", "sft.eval_every=0", "reward.max_steps=20", "reward.eval_every=0",
        "ppo.steps=2", "ppo.rollout_batch_size=16", "ppo.micro_batch_size_per_device=8",
        "ppo.eval_every=1", "ppo.eval_num_prompts=16", "ppo.eval_batch_size=16",
        "grpo.steps=2", "grpo.prompts_per_step=4", "grpo.num_generations=4",
        "grpo.eval_every=1", "grpo.eval_num_prompts=16", "grpo.eval_batch_size=16",
        "dpo.max_steps=4", "dpo.micro_batch_size_per_device=8", "dpo.eval_every=2",
        "dpo.warmup_steps=1", "kto.max_steps=4", "kto.micro_batch_size_per_device=8",
        "kto.eval_every=2", "kto.warmup_steps=1", "logger.table_every=0"]


KTO_ON = "stage.arms.kto={stages:[sft,kto]}"  # the kto arm is off by default (docs/algorithms.md)


def _arms(*overrides: str):
    inv = composition.parse(["experiment=algorithms", *overrides])
    cfg = composition.compose(inv)
    config.validate(cfg)
    return compose_arms(cfg, inv.overrides, lambda o: composition.compose(inv, o))


def test_each_arm_composes_as_its_pipeline_with_the_run_overrides():
    arms = _arms("grpo.steps=7", "+stage.arms.clip_hi={stages:[sft,grpo],"
                 "overrides:['grpo.epsilon_high=0.28']}", KTO_ON)
    assert {n: list(a.stage.stages) for n, a in arms.items()} == {
        "ppo": ["sft", "reward", "ppo"], "grpo_rm": ["sft", "reward", "grpo"],
        "grpo_gold": ["sft", "grpo"], "rloo": ["sft", "grpo"], "dpo": ["sft", "dpo"],
        "reinforce_pp": ["sft", "grpo"], "reinforce_pp_baseline": ["sft", "grpo"],
        "gspo": ["sft", "grpo"], "dapo": ["sft", "grpo"],
        "simpo": ["sft", "dpo"], "kto": ["sft", "kto"], "clip_hi": ["sft", "grpo"]}
    assert all(a.stage.name == "pipeline" and a.grpo.steps == 7 for a in arms.values())
    assert arms["rloo"].grpo.baseline == "leave_one_out"  # the grpo=rloo option, composed
    assert arms["grpo_gold"].grpo.baseline == "group_mean"
    assert arms["clip_hi"].grpo.epsilon_high == 0.28 and arms["rloo"].grpo.epsilon_high is None
    assert arms["ppo"].experiment_name == "algorithms"
    assert (arms["simpo"].dpo.loss_type, arms["simpo"].dpo.beta) == ("simpo", 2.0)
    assert arms["dpo"].dpo.loss_type == "sigmoid" and arms["simpo"].dpo.reference is None
    # the new policy-gradient arms: each its grpo preset, composed
    assert arms["reinforce_pp"].grpo.advantage_estimator == "reinforce"
    assert arms["reinforce_pp_baseline"].grpo.advantage_estimator == "reinforce_baseline"
    assert arms["gspo"].grpo.importance_sampling_level == "sequence"
    assert arms["dapo"].grpo.refill_max_rounds > 0 and arms["dapo"].grpo.overlong == "soft"


@pytest.mark.parametrize("override, message", [
    ("+stage.arms.x={stages:[sft,grpo],overrides:['sft.lr=1']}", "change sft.lr"),
    ("+stage.arms.x={stages:[sft,ppo,grpo]}", "an arm is shared stages"),
    ("+stage.arms.x={stages:[grpo,sft]}", "sft first"),
    ("+stage.arms.x={stage:[sft,grpo]}", "an arm is {stages:"),
    ("+stage.arms.x={stages:[sft,grpo],overrides:['stage=ppo']}", "its overrides set"),
    ("+stage.arms.sft={stages:[sft,grpo]}", "not sft or reward"),
])
def test_a_bad_arm_is_one_config_error(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("{", r"\{")):
        _arms(override)


def test_a_bad_arm_stops_the_cli_before_anything_is_written(rlhf_exp, tmp_path):
    run_dir = tmp_path / "run"
    proc = rlhf_exp("experiment=algorithms", "+stage.arms.x={stages:[sft,grpo],"
                    "overrides:['grpo.prompts_per_step=0']}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    assert "stage.arms.x: grpo.prompts_per_step" in proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()
    proc = rlhf_exp("experiment=algorithms", "stage.arms.rloo.overrides=['grpo=rlooo']",
                    f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and not run_dir.exists()
    assert "stage.arms.rloo: grpo=rlooo is not an option of group 'grpo'" in proc.stderr


@pytest.mark.slow
def test_the_shoot_out_trains_shared_stages_once_and_compares_every_arm(rlhf_exp, tmp_path):
    run_dir = tmp_path / "alg"
    proc = rlhf_exp(*TINY, KTO_ON, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = ["ppo", "grpo_rm", "grpo_gold", "rloo", "reinforce_pp", "reinforce_pp_baseline",
            "gspo", "dapo", "dpo", "simpo", "kto"]
    # shared stages once: one SFT and one reward W&B run; every run in the group `algorithms`
    runs = {}
    for name in ["sft", "reward", *arms]:
        (run,) = read_runs(run_dir / name / "wandb")
        assert run.group == "algorithms"
        runs[name] = run
    assert {n: r.job_type for n, r in runs.items()} == {
        "sft": "sft", "reward": "reward", "ppo": "ppo", "grpo_rm": "grpo", "grpo_gold": "grpo",
        "rloo": "grpo", "reinforce_pp": "grpo", "reinforce_pp_baseline": "grpo",
        "gspo": "grpo", "dapo": "grpo", "dpo": "dpo", "simpo": "dpo", "kto": "kto"}
    assert not any((run_dir / arm / "sft").exists() for arm in arms)
    # each arm started from the shared outputs its chain names
    sft, reward = str(run_dir / "sft"), str(run_dir / "reward")
    assert runs["ppo"].config["ppo"]["actor_init"] == sft
    assert runs["ppo"].config["ppo"]["critic_init"] == reward
    assert runs["grpo_rm"].config["grpo"]["reward_model"] == reward
    assert runs["grpo_gold"].config["grpo"]["reward_model"] is None
    assert runs["rloo"].config["grpo"]["baseline"] == "leave_one_out"
    assert runs["grpo_gold"].config["grpo"]["actor_init"] == sft
    assert runs["dpo"].config["dpo"]["init_from"] == sft
    assert runs["kto"].config["kto"]["init_from"] == sft
    assert runs["simpo"].config["dpo"]["loss_type"] == "simpo"
    # one held-out comparison with the same prompts and settings: it reproduces each arm's own
    # final held-out eval and the SFT policy's (every arm's step-0 eval)
    m = json.loads((run_dir / "result.json").read_text())["metrics"]
    for arm in arms:
        own = runs[arm].metric(f"{runs[arm].job_type}/eval_gold_reward")
        assert m[f"algorithms/{arm}_gold_reward"] == pytest.approx(own[-1], abs=1e-6)
        assert m["algorithms/sft_gold_reward"] == pytest.approx(own[0], abs=1e-6)
        assert m[f"algorithms/{arm}_gold_gain"] == pytest.approx(
            m[f"algorithms/{arm}_gold_reward"] - m["algorithms/sft_gold_reward"])
        assert m[f"algorithms/{arm}_wall_s"] > 0
    # pass@k and mean@N from the preset's 4 samples per prompt (the first the usual one: the
    # gold reward above still equals each arm's own 1-sample eval)
    for name in ["sft", *arms]:
        p1, p4 = m[f"algorithms/{name}_pass@1"], m[f"algorithms/{name}_pass@4"]
        assert 0.0 <= p1 <= p4 <= 1.0 and 0.0 <= m[f"algorithms/{name}_mean@4"] <= 1.0
    summary = (run_dir / "summary.md").read_text()
    assert all(f"| {arm} |" in summary for arm in arms) and "eval_gold_reward" in summary
    assert "| pass@1 | pass@4 | mean@4 |" in summary
    assert (run_dir / "algorithms.png").stat().st_size > 0
    # stage=eval finds every arm's policy by its folder
    found = discover_run(str(run_dir))
    assert set(found.policies) == {"sft", *arms}
    assert found.reward_model and found.reward_model.startswith(reward)


@pytest.mark.slow
def test_a_killed_shoot_out_resumes_without_training_a_finished_stage_again(tmp_path, rlhf_exp):
    """kill -9 during an arm, then `resume=<run dir>`: the shared SFT is not trained again, the
    cut arm continues its W&B run from its checkpoint, the rest runs, the comparison is made."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import CHILD_DROP_ENV, ROOT

    run_dir = tmp_path / "alg"
    args = [*TINY, "~stage.arms.ppo", "~stage.arms.grpo_rm", "~stage.arms.rloo",
            "~stage.arms.simpo",
            "grpo.steps=3", "grpo.save_every=1", f"hydra.run.dir={run_dir}"]
    marker = run_dir / "grpo_gold" / "checkpoints" / "step_000001" / "trainer_state.json"
    env = {k: v for k, v in os.environ.items() if k not in CHILD_DROP_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_exp", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no GRPO checkpoint within 600 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "dpo").exists() and not (run_dir / "result.json").exists()
    (grpo_id,) = [p.name for p in (run_dir / "grpo_gold" / "wandb").glob("offline-run-*")]

    resumed = rlhf_exp(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "sft: " in resumed.stdout and "has already finished" in resumed.stdout
    assert "grpo: resumed from" in resumed.stdout
    assert len(list((run_dir / "sft" / "wandb").glob("offline-run-*"))) == 1  # not retrained
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "grpo_gold" / "wandb").glob("offline-*")}
    assert ids == {grpo_id.rsplit("-", 1)[-1]}  # the same W&B run, continued
    m = json.loads((run_dir / "result.json").read_text())["metrics"]
    assert {"algorithms/grpo_gold_gold_reward", "algorithms/dpo_gold_reward"} <= set(m)
    (run,) = read_runs(run_dir / "dpo" / "wandb")
    assert run.group == "algorithms"


def test_the_smollm2_instructions_preset_composes_and_every_arm_is_valid():
    """experiment=smollm2_instructions: the shoot-out on SmolLM2 and the instructions task with
    the base model compared, the reward-model arms dropped (set to null), and each remaining arm
    a valid pipeline (every arm's config passes config.validate, as the dispatcher checks)."""
    inv = composition.parse(["experiment=smollm2_instructions"])
    cfg = composition.compose(inv)
    config.validate(cfg)
    assert cfg.stage.name == "algorithms" and cfg.stage.compare_base
    assert (cfg.model.name, cfg.data_mix.name) == ("smollm2-135m", "instructions")
    heldout = [s for s in cfg.data_mix.sources if s.eval_only]
    assert [s.path for s in heldout] == ["pkg://rlhf_exp/data/examples/instructions/heldout.jsonl"]
    assert cfg.data_mix.eval_fraction == 0
    arms = compose_arms(cfg, inv.overrides, lambda o: composition.compose(inv, o))
    assert {n: list(a.stage.stages) for n, a in arms.items()} == {
        "grpo_gold": ["sft", "grpo"], "rloo": ["sft", "grpo"], "dpo": ["sft", "dpo"]}
    for name, arm in arms.items():
        config.validate(arm)
        assert arm.model.lora.enabled and arm.experiment_name == "smollm2_instructions", name
    for name in ("grpo_gold", "rloo"):  # the checker as the reward, no reward model
        assert arms[name].grpo.reward_model is None
        assert [f.fn for f in arms[name].grpo.reward_functions] == ["rlhf_exp.tasks:gold_reward_fn"]
    assert (arms["rloo"].grpo.baseline, arms["rloo"].grpo.kl_in_reward) == ("leave_one_out", True)
    assert (arms["grpo_gold"].grpo.baseline, arms["grpo_gold"].grpo.kl_in_reward) == (
        "group_mean", False)
    # the held-out comparison: 64 prompts, all of them held-out topics
    assert cfg.ppo.eval_num_prompts == 64


def test_an_arm_set_to_null_is_dropped():
    arms = _arms("stage.arms.ppo=null", "stage.arms.grpo_rm=null")
    assert set(arms) == {"grpo_gold", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo",
                         "dapo", "dpo", "simpo"}
    with pytest.raises(ConfigError, match="no arms"):
        _arms(*[f"stage.arms.{a}=null" for a in ("ppo", "grpo_rm", "grpo_gold", "rloo", "dpo",
                                                 "simpo", "kto", "reinforce_pp",
                                                 "reinforce_pp_baseline", "gspo", "dapo")])


def test_the_summary_shows_the_base_row_and_answers_side_by_side():
    from rlhf_exp.rl.evaluation import PolicyScores, Samples
    from rlhf_exp.stages import algorithms

    rows = [{"prompt": f"Tell me about owls. Use at most {n} words."} for n in (12, 15)]

    def scores(texts: list[str], gold: list[float]) -> PolicyScores:
        return PolicyScores(Samples(texts, [5] * len(texts), [True] * len(texts), []), gold,
                            None, [0.0] * len(texts))

    table = algorithms.samples_side_by_side(rows, {
        "base": scores(["Owls | hunt at night.", ""], [1.0, 0.0]),
        "sft": scores(["Owls\nare birds.", "Owls fly."], [1.0, 0.5])}, n=1)
    assert table.splitlines() == [
        "**1.** Tell me about owls. Use at most 12 words.", "", "| policy | gold | answer |",
        "|---|---:|---|", r"| base | 1.00 | Owls \| hunt at night. |",
        "| sft | 1.00 | Owls are birds. |"]
    heldout = {"base": {"gold_reward": 0.25, "kl_to_base": 0.0},
               "sft": {"gold_reward": 0.3, "kl_to_base": 1.5},
               "grpo_gold": {"gold_reward": 0.5, "gold_gain": 0.2, "kl_to_base": 3.0}}
    algorithms.add_base_gain(heldout)
    assert heldout["grpo_gold"]["gold_gain_over_base"] == pytest.approx(0.25)
    assert "gold_gain_over_base" not in heldout["base"]
    assert algorithms.heldout_columns(heldout) == [
        "gold_reward", "gold_gain", "gold_gain_over_base", "kl_to_base"]
