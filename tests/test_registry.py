"""The stage registry (rlhf_exp/registry.py) is the one place that lists stages: a stage added
there (plus its runner) runs through the dispatcher, validation, preflight and the pipeline; and
the defects the hand-written copies caused stay fixed: every group of `--help` described, GRPO's
optimizer keys checked as PPO's are, one rule for which nodes are validated, metric names
checked, PPO/GRPO checkpoints counted as resumable by preflight, the hostfile checked once."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_exp import config, registry
from rlhf_exp.command import composition, preflight, usage
from rlhf_exp.errors import ConfigError, UserError
from tests.conftest import compose


# ----------------------------------------------------------------------------- one list
def test_the_old_stage_lists_are_the_registrys():
    assert config.STAGES == registry.names()
    assert config.PIPELINE_HANDOFF == {
        "sft": {}, "reward": {"reward.init_from": "sft"},
        "ppo": {"ppo.actor_init": "policy", "ppo.critic_init": "reward"},
        "grpo": {"grpo.actor_init": "policy", "grpo.reward_model": "reward"},
        "dpo": {"dpo.init_from": "policy"}, "kto": {"kto.init_from": "policy"}}
    assert config.POLICY_STAGES == ("sft", "ppo", "grpo", "dpo", "kto")
    assert config.SHARED_STAGES == ("sft", "reward")
    assert registry.rl_stages() == ("ppo", "grpo")
    assert registry.reward_model_stages() == ("reward",)
    assert set(registry.resumable()) == {"sft", "reward", "ppo", "grpo", "dpo", "kto"}
    # every hook and schema a stage names can be loaded
    for spec in registry.STAGES.values():
        for hook in (spec.node_check, spec.input_check, spec.schema):
            if hook:
                assert callable(registry.load(hook)), hook
        assert spec.objective is None or spec.logs(spec.objective), spec.name


def test_help_describes_every_group_and_names_every_training_stage():
    """It called the grpo group "your own group" and named only SFT -> reward -> PPO."""
    text = usage.text(composition.parse(["--help"]))
    assert "your own group" not in text
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ")}
    assert "grpo.*" in lines["grpo"] and "rloo" in lines["grpo"]
    assert "dpo.*" in lines["dpo"]
    header = text.split("usage:")[0]
    for name in ("SFT", "reward", "PPO", "GRPO", "DPO"):
        assert name in header


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("key, value", [("weight_decay", -1), ("warmup_steps", -1),
                                        ("min_lr_ratio", 2), ("max_grad_norm", -1),
                                        ("lr", 0), ("zero_stage", 5)])
@pytest.mark.parametrize("node", ["grpo.actor", "ppo.actor", "ppo.critic"])
def test_every_rl_optimizer_node_is_checked_alike(node, key, value):
    """grpo.actor.weight_decay=-1 (and the others) passed while PPO's were refused."""
    stage = node.split(".")[0]
    with pytest.raises(ConfigError, match=rf"^{node}\.{key}="):
        compose(f"stage={stage}", f"{node}.{key}={value}")


@pytest.mark.parametrize("bad", ["ppo.clip_range=-1", "grpo.epsilon=-1", "dpo.beta=-1",
                                 "sft.lr=-1", "reward.lr=-1"])
def test_a_node_is_checked_when_its_stage_runs_and_only_then(bad):
    """One rule (rlhf_exp/config/validate.py): a stage's node is validated when the run goes
    through that stage. A bad grpo.* key did not stop stage=sft, a bad ppo.* key did."""
    node = bad.split(".")[0]
    other = "sft" if node != "sft" else "reward"
    compose(f"stage={other}", bad)  # not this run's stage: not judged
    with pytest.raises(ConfigError, match=rf"^{node}\."):
        compose(f"stage={node}", bad)
    chain = {"sft": "[sft]", "reward": "[sft,reward]", "ppo": "[sft,reward,ppo]",
             "grpo": "[sft,grpo]", "dpo": "[sft,dpo]"}[node]
    with pytest.raises(ConfigError, match=rf"^{node}\."):
        compose("stage=pipeline", f"stage.stages={chain}", bad)


def test_a_training_stage_on_three_ranks_is_not_stopped_by_ppos_geometry():
    """ppo.rollout_batch_size=64 does not split over 3 ranks: that is PPO's concern only."""
    compose("stage=sft", "hardware.nproc_per_node=3")
    with pytest.raises(ConfigError, match="ppo.rollout_batch_size"):
        compose("stage=ppo", "hardware.nproc_per_node=3")


def test_keys_a_stage_reads_from_another_node_are_checked_with_it():
    """DPO's held-out gold reward samples with ppo.generation (StageSpec.also_reads)."""
    compose("stage=dpo", "ppo.clip_range=-1")  # PPO's own keys: not DPO's business
    with pytest.raises(ConfigError, match=r"^ppo\.generation\.top_p="):
        compose("stage=dpo", "ppo.generation.top_p=2")


@pytest.mark.parametrize("stage, metric, ok", [
    ("dpo", "dpo/eval_los", False), ("dpo", "dpo/eval_loss", True),
    ("dpo", "dpo/eval_rewards/accuracies", True), ("sft", "sft/eval_loss", True),
    ("sft", "sft/eval_accuracy", False), ("reward", "reward/eval_accuracy", True),
    ("reward", "sft/eval_loss", False)])
def test_keep_best_metric_must_be_one_the_stage_logs(stage, metric, ok):
    """dpo.keep_best_metric=dpo/eval_los (a typo) was accepted: no best link, no word."""
    args = (f"stage={stage}", f"{stage}.keep_best_metric={metric}", f"{stage}.save_every=5")
    if ok:
        compose(*args)
    else:
        with pytest.raises(ConfigError, match=rf"^{stage}\.keep_best_metric=.*must be a metric"):
            compose(*args)


# ----------------------------------------------------------------------------- preflight
def _fake_checkpoint(run_dir: Path, stage: str, world_size: int) -> None:
    ckpt = run_dir / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")  # what makes it a checkpoint (checkpoint.py)
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"stage": stage, "step": 2, "world_size": world_size}))


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "grpo", "dpo"])
def test_preflight_refuses_a_checkpoint_of_another_rank_count(stage, tmp_path):
    """PPO and GRPO were missing from preflight's list of stages with resumable checkpoints:
    their run resumed with another rank count was stopped only after the run config had been
    written into the run dir."""
    _fake_checkpoint(tmp_path, stage, world_size=2)
    cfg = compose(f"stage={stage}")
    with pytest.raises(UserError, match="saved by 2 ranks, this run has 1"):
        preflight.check_run_dir(cfg, tmp_path)
    pipeline = compose("stage=pipeline", "stage.stages=[sft,reward,ppo]")
    _fake_checkpoint(tmp_path / "pipe" / "ppo", "ppo", world_size=2)
    with pytest.raises(UserError, match="saved by 2 ranks"):
        preflight.check_run_dir(pipeline, tmp_path / "pipe")


def test_the_hostfile_is_checked_once_in_preflight_with_one_path_rule(tmp_path, monkeypatch):
    """Three checks with two path rules: `~/hostfile` passed preflight (expanded) but not
    check_rendezvous (not expanded). Now validation and the launch command leave the file to
    preflight, which expands `~`, and the launch command passes the expanded path."""
    from rlhf_exp.command.launch import launch_command

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "hostfile").write_text("node-0 slots=8\nnode-1 slots=8\n")
    args = ("stage=sft", "hardware=multinode_deepspeed", "hardware.master_addr=10.0.0.1")
    cfg = compose(*args, "hardware.hostfile='~/hostfile'")
    config.check_rendezvous(cfg)
    preflight.check_hostfile(cfg)
    cmd = launch_command(cfg, list(args), str(tmp_path / "run"))
    assert f"--hostfile={tmp_path / 'hostfile'}" in cmd
    missing = compose(*args, "hardware.hostfile='~/nope'")
    config.check_rendezvous(missing)  # configuration only: no filesystem
    with pytest.raises(UserError, match=r"^hardware\.hostfile=~/nope: no such file$"):
        preflight.check_hostfile(missing)


# ----------------------------------------------------------------------------- a new stage
DUMMY = '''
"""A stage that lives outside rlhf_exp: its registry entry, runner, config node and checks."""
from dataclasses import dataclass
from pathlib import Path

from rlhf_exp import registry
from rlhf_exp.training import runtime
from rlhf_exp.errors import ConfigError, UserError


@dataclass
class DummyConfig:
    steps: int = 2
    greeting: str = "hello"


def check_node(cfg):
    if cfg.dummy.steps < 1:
        raise ConfigError(f"dummy.steps={cfg.dummy.steps} must be >= 1")


def check_inputs(cfg, stage):
    if cfg.dummy.greeting == "refuse":
        raise UserError("dummy: its input check refused dummy.greeting")


def run(cfg, run_dir):
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "greeting.txt").write_text(cfg.dummy.greeting)
    result = runtime.StageResult("dummy", str(run_dir), None, None, None,
                                 {"dummy/score": float(cfg.dummy.steps)})
    result.write()
    return result


SPEC = registry.StageSpec(
    name="dummy", runner=__name__, node="dummy", schema=__name__ + ":DummyConfig",
    help="the dummy stage (dummy.*)", chainable=True, objective="dummy/score",
    metrics=("dummy/score",), summary_metrics=("dummy/score",),
    node_check=__name__ + ":check_node",
    input_check=__name__ + ":check_inputs")
'''


@pytest.fixture
def dummy_stage(tmp_path, monkeypatch):
    """A temporary package `dummy_stage_pkg` registering the stage `dummy`, and a config folder
    with its `stage=dummy` option; nothing in rlhf_exp/ is touched."""
    pkg = tmp_path / "pkgs" / "dummy_stage_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(DUMMY))
    conf = tmp_path / "conf"
    (conf / "stage").mkdir(parents=True)
    (conf / "stage" / "dummy.yaml").write_text("name: dummy\n")
    (conf / "dummy").mkdir()  # its own group (unselected): `--help` describes it
    (conf / "dummy" / "default.yaml").write_text("steps: 2\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    import dummy_stage_pkg

    registry.register(dummy_stage_pkg.SPEC)
    config.register_configs()  # the node's schema joins base_config
    try:
        yield conf
    finally:
        registry.unregister("dummy")
        config.register_configs()
        sys.modules.pop("dummy_stage_pkg", None)


def _main(*argv: str) -> None:
    from rlhf_exp import cli

    old = sys.argv
    sys.argv = ["rlhf-exp", *argv]
    try:
        cli.main()
    finally:
        sys.argv = old


def test_a_stage_added_in_one_place_runs_through_dispatcher_preflight_and_pipeline(
        dummy_stage, tmp_path, capsys, monkeypatch):
    from tests.conftest import RANK_ENV

    for key in RANK_ENV:  # an earlier in-process stage run leaves them: not a launched rank
        monkeypatch.delenv(key, raising=False)
    common = ("--config-dir", str(dummy_stage), "logger=none")
    # the dispatcher: validated (its node's schema and check), preflighted, run
    _main(*common, "stage=dummy", "dummy.steps=3", f"hydra.run.dir={tmp_path / 'one'}")
    result = json.loads((tmp_path / "one" / "result.json").read_text())
    assert result["stage"] == "dummy" and result["metrics"] == {"dummy/score": 3.0}
    # the pipeline: a chain of it, in its own sub-run dir
    _main(*common, "stage=pipeline", "stage.stages=[dummy]", "dummy.greeting=bonjour",
          f"hydra.run.dir={tmp_path / 'pipe'}")
    assert (tmp_path / "pipe" / "dummy" / "greeting.txt").read_text() == "bonjour"
    assert "dummy/score" in (tmp_path / "pipe" / "summary.md").read_text()
    capsys.readouterr()
    # its node check (validation) and its input check (preflight): one line, exit 2, no run dir
    for bad, says in (("dummy.steps=0", "dummy.steps=0 must be >= 1"),
                      ("dummy.greeting=refuse", "its input check refused")):
        with pytest.raises(SystemExit) as exc:
            _main(*common, "stage=dummy", bad, f"hydra.run.dir={tmp_path / 'bad'}")
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not (tmp_path / "bad").exists()
    # an unknown key of its node is a composition error, as for a built-in node
    with pytest.raises(SystemExit):
        _main(*common, "stage=dummy", "dummy.stepz=1", f"hydra.run.dir={tmp_path / 'bad'}")
    assert "dummy.stepz" in capsys.readouterr().err
    assert "the dummy stage" in usage.text(composition.parse(["--config-dir", str(dummy_stage),
                                                              "--help"]))
