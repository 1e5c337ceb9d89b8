"""Bad input on the newer stages (issue 23), each through the whole CLI path (cli.main() in
this process) like tests/test_bad_input.py: exit 2, one stderr line naming the key, before any
model loads and before Hydra writes the run dir or a W&B run exists. The checkpoints are the
tiny model's files with the rlhf_exp.json each stage's save writes (checkpoint.save_hf), so no
training is needed (unit tier); tests/test_kinds_e2e.py does the same with trained runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_exit_2, compose


def _checkpoint(root: Path, name: str, spec: dict, meta: dict | None,
                architecture: str | None = None) -> Path:
    """A copy of the tiny model `spec` as a checkpoint dir, with the stage metadata `meta`
    (None: a plain HF dir, as from the hub) and optionally another architecture."""
    from rlhf_exp.modeling.models import tiny_model_dir

    out = root / name
    shutil.copytree(tiny_model_dir(spec), out)
    if meta is not None:
        (out / "rlhf_exp.json").write_text(json.dumps(meta))
    if architecture:
        config = json.loads((out / "config.json").read_text())
        config["architectures"] = [architecture]
        (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    llama, gpt2 = compose("stage=sft").model.tiny, compose("model=tiny-gpt2").model.tiny
    out = {
        "sft": _checkpoint(root, "sft", llama, {"stage": "sft", "step": 40}),
        "reward": _checkpoint(root, "reward", llama, {"stage": "reward", "step": 150},
                              "LlamaForSequenceClassification"),
        "critic": _checkpoint(root, "critic", llama, {"stage": "ppo", "model": "critic"},
                              "LlamaForSequenceClassification"),
        "hub_lm": _checkpoint(root, "hub_lm", llama, None, "LlamaForCausalLM"),
        "hub_rm": _checkpoint(root, "hub_rm", llama, None, "LlamaForSequenceClassification"),
        "gpt2_sft": _checkpoint(root, "gpt2_sft", gpt2, {"stage": "sft"}),
        "gpt2_rm": _checkpoint(root, "gpt2_rm", gpt2, {"stage": "reward"},
                               "GPT2ForSequenceClassification"),
    }
    # a run dir whose checkpoints/final is the reward model (what users pass most)
    run = root / "reward_run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(out["reward"], run / "checkpoints" / "step_000150")
    (run / "checkpoints" / "final").symlink_to("step_000150")
    out["reward_run"] = run
    return out


KIND_CASES = [
    ("sft_as_grpo_reward_model", ["stage=grpo", "grpo.reward_model=@sft@"],
     "grpo.reward_model=@sft@ holds a sft policy checkpoint, but grpo.reward_model needs a "
     "reward model"),
    ("hub_lm_as_ppo_reward_model", ["stage=ppo", "ppo.reward_model=@hub_lm@",
                                    "ppo.critic_init=@reward@"], "ppo.reward_model=@hub_lm@"),
    ("sft_as_ppo_critic", ["stage=ppo", "ppo.critic_init=@sft@"], "ppo.critic_init=@sft@"),
    ("reward_as_grpo_actor", ["stage=grpo", "grpo.actor_init=@reward_run@"],
     "grpo.actor_init=@reward_run@ (@reward_run@/checkpoints/step_000150) holds a reward model "
     "checkpoint, but grpo.actor_init needs a policy"),
    ("reward_as_dpo_init", ["stage=dpo", "dpo.init_from=@reward@"], "dpo.init_from=@reward@"),
    ("critic_as_dpo_reference", ["stage=dpo", "dpo.reference=@critic@"],
     "holds a ppo critic checkpoint"),
    ("reward_as_ppo_actor", ["stage=ppo", "ppo.actor_init=@reward@"], "ppo.actor_init=@reward@"),
    ("hub_rm_as_chat_policy", ["stage=chat", "chat.policy=@hub_rm@", "chat.prompt=hi"],
     "chat.policy=@hub_rm@ holds a sequence-classification model"),
    ("reward_as_eval_policy", ["stage=eval", "eval.policies.sft=@reward@"],
     "eval.policies.sft=@reward@"),
    # another tokenizer than the policy's
    ("gpt2_dpo_reference", ["stage=dpo", "dpo.reference=@gpt2_sft@"],
     "dpo.reference=@gpt2_sft@ has another tokenizer than the dpo policy"),
    ("gpt2_grpo_reward_model", ["stage=grpo", "grpo.actor_init=@sft@",
                                "grpo.reward_model=@gpt2_rm@"],
     "grpo.reward_model=@gpt2_rm@ has another tokenizer"),
    ("gpt2_ppo_critic", ["stage=ppo", "ppo.actor_init=@sft@", "ppo.critic_init=@gpt2_rm@"],
     "ppo.critic_init=@gpt2_rm@ has another tokenizer"),
    # every DPO pair longer than dpo.max_len under overlong=drop
    ("dpo_all_pairs_too_long", ["stage=dpo", "data_mix.overlong=drop", "dpo.max_len=6",
                                "dpo.max_prompt_len=4"], "dpo: all "),
    ("kto_all_rows_too_long", ["stage=kto", "data_mix.overlong=drop", "kto.max_len=6",
                               "kto.max_prompt_len=4"], "kto: all "),
]


@pytest.mark.parametrize("args, needle", [c[1:] for c in KIND_CASES],
                         ids=[c[0] for c in KIND_CASES])
def test_wrong_checkpoint_or_tokenizer_exits_2_before_the_run(args, needle, ckpts, tmp_path,
                                                              rlhf_exp):
    for name, path in ckpts.items():
        args = [a.replace(f"@{name}@", str(path)) for a in args]
        needle = needle.replace(f"@{name}@", str(path))
    run_dir = tmp_path / "run"
    proc = rlhf_exp(*args, "data_mix.sources.0.synthetic.num_examples=400",
                    f"hydra.run.dir={run_dir}")
    assert_one_line_exit_2(proc, needle)
    assert not run_dir.exists()


@pytest.mark.parametrize("args", [
    ["stage=grpo", "grpo.actor_init=@sft@", "grpo.reward_model=@reward_run@"],
    ["stage=grpo", "grpo.actor_init=@hub_lm@", "grpo.reward_model=@hub_rm@"],
    ["stage=ppo", "ppo.actor_init=@sft@", "ppo.critic_init=@critic@"],
    ["stage=dpo", "dpo.init_from=@sft@", "dpo.reference=@hub_lm@"],
    ["stage=chat", "chat.policy=@sft@", "chat.prompt=hi"],
    ["stage=reward", "reward.init_from=@sft@"],  # a reward model starts from a policy
    # grpo.reward_model_weight=0 loads no reward model (the registry's StartKey.loaded_if):
    # its tokenizer is not the policy's business
    ["stage=grpo", "grpo.actor_init=@sft@", "grpo.reward_model=@gpt2_rm@",
     "grpo.reward_model_weight=0", "grpo.reward_functions=[{fn: 'rlhf_exp.tasks:gold_reward_fn'}]"],
], ids=["grpo", "grpo_hub", "ppo_critic", "dpo", "chat", "reward_from_sft", "grpo_rm_unused"])
def test_right_kinds_pass_the_checks(args, ckpts):
    """The same checks on the right kinds (and on plain hub dirs) raise nothing."""
    from rlhf_exp.command import preflight, preflight_checks

    for name, path in ckpts.items():
        args = [a.replace(f"@{name}@", str(path)) for a in args]
    cfg = compose(*args, "data_mix.sources.0.synthetic.num_examples=400")
    stages = preflight._stages(cfg)
    preflight_checks.check_inputs(cfg, preflight.starting_points(cfg), stages)


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_pair_lengths_counted_as_the_stage_counts(stage, ckpts):
    """Limits that keep some rows pass; the count is that of the stage's tokenization (its
    registry input check)."""
    from rlhf_exp import registry

    cfg = compose(f"stage={stage}", "data_mix.overlong=drop", f"{stage}.max_len=64",
                  f"{stage}.max_prompt_len=32", "data_mix.sources.0.synthetic.num_examples=400")
    registry.load(registry.get(stage).input_check)(cfg, stage)


CONFIG_CASES = [
    ("reward_function_without_fn", ["stage=grpo", "grpo.reward_functions=[{weight: 2.0}]"],
     "grpo.reward_functions[0] has no fn"),
    ("ppo_reward_function_without_fn", ["stage=ppo", "ppo.reward_functions=[{weight: 2.0}]"],
     "ppo.reward_functions[0] has no fn"),
    ("plus_on_a_built_in_arm", ["experiment=algorithms", "+stage.arms.ppo={stages:[sft,grpo]}"],
     "stage.arms.ppo is the built-in arm 'ppo'"),
    ("plus_on_an_existing_list", ["stage=sft", "+tags=[a]"], "tags exists already"),
    ("arm_override_unquoted", ["experiment=algorithms", "+stage.arms.hi.stages=[sft,grpo]",
                               "+stage.arms.hi.overrides=[grpo.epsilon_high=0.28]"],
     "must be quoted inside the argument"),
    ("keep_best_metric_typo", ["stage=dpo", "dpo.keep_best_metric=dpo/eval_los",
                               "dpo.save_every=5"], "did you mean dpo/eval_loss"),
    ("keep_best_metric_unknown", ["stage=sft", "sft.keep_best_metric=sft/accuracy",
                                  "sft.save_every=5"], "sft.keep_best_metric='sft/accuracy'"),
]


@pytest.mark.parametrize("args, needle", [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_exits_2_with_one_line(args, needle, tmp_path, rlhf_exp):
    run_dir = tmp_path / "run"
    proc = rlhf_exp(*args, f"hydra.run.dir={run_dir}")
    assert_one_line_exit_2(proc, needle)
    assert not run_dir.exists()


def test_reward_module_that_exits_at_import_is_named(tmp_path, rlhf_exp, monkeypatch):
    """A reward module that parses the command line with argparse at import: argparse exits
    (SystemExit 2) blaming rlhf-exp's arguments; the error names the function instead."""
    (tmp_path / "argparse_reward.py").write_text(
        "import argparse\n"
        "parser = argparse.ArgumentParser()\n"
        "parser.add_argument('--scale', type=float, default=1.0)\n"
        "ARGS = parser.parse_args()\n"
        "def score(prompts, responses, **kw):\n"
        "    return [ARGS.scale] * len(prompts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "run"
    proc = rlhf_exp("stage=grpo", "grpo.reward_functions=[{fn: 'argparse_reward:score'}]",
                    f"hydra.run.dir={run_dir}")
    assert_one_line_exit_2(proc, "grpo.reward_functions[0].fn='argparse_reward:score': "
                                 "importing module 'argparse_reward' exited (SystemExit 2")
    assert "usage:" not in proc.stdout
    assert not run_dir.exists()


def test_the_algorithms_example_parses_as_typed(rlhf_exp):
    """The command in the header of conf/stage/algorithms.yaml, split as a shell splits it,
    composes the arm it describes."""
    import shlex

    from omegaconf import OmegaConf

    from rlhf_exp.command.composition import CONF_DIR

    header = (Path(CONF_DIR) / "stage" / "algorithms.yaml").read_text().split("\nname:")[0]
    lines = [ln.lstrip("#").strip() for ln in header.splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("rlhf-exp "))
    command = lines[start]
    while command.endswith("\\"):
        start += 1
        command = command[:-1] + " " + lines[start]
    args = shlex.split(command)[1:]
    proc = rlhf_exp(*args, "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    arm = OmegaConf.create(proc.stdout).stage.arms.grpo_hi
    assert list(arm.stages) == ["sft", "grpo"]
    assert list(arm.overrides) == ["grpo.epsilon_high=0.28"]


# ----------------------------------------------------------------------------- run dirs
def test_a_run_dir_holding_another_run_of_the_stage_is_refused(tmp_path, rlhf_exp):
    """A run dir whose saved config is another sft run's (another lr): refused before Hydra
    writes into it; the same run again (longer: resume's rule) passes."""
    from omegaconf import OmegaConf

    from rlhf_exp.command import preflight_checks
    from tests.conftest import snapshot

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = compose("stage=sft", "sft.lr=1e-3")
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(saved, resolve=True))
    before = snapshot(run_dir)
    proc = rlhf_exp("stage=sft", "sft.lr=5e-3", f"hydra.run.dir={run_dir}")
    assert_one_line_exit_2(proc, f"hydra.run.dir={run_dir} holds another sft run (made with "
                                 "another config: sft.lr=0.001 (now 0.005))")
    assert snapshot(run_dir) == before
    preflight_checks.check_run_dir_owner(compose("stage=sft", "sft.lr=1e-3",
                                                 "sft.max_steps=500"), run_dir)


def test_the_default_run_dir_is_unique_per_launch():
    """Two launches in the same second get two dirs: the time plus this process's token;
    the dispatcher and the app (one process) resolve the same dir."""
    import re

    from rlhf_exp.command import composition, run_token

    first = composition.compose(composition.parse(["stage=sft"]))
    again = composition.compose(composition.parse(["stage=sft"]))
    name = Path(str(first.hydra.run.dir)).name
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_{run_token.TOKEN}_sft", name), name
    assert Path(str(again.hydra.run.dir)).name.split("_", 2)[2] == f"{run_token.TOKEN}_sft"
    sweep = composition.compose(composition.parse(["-m", "stage=sft", "seed=1,2"]),
                                ["stage=sft"], multirun=True)
    assert str(sweep.hydra.sweep.dir).endswith(f"_{run_token.TOKEN}")


@pytest.mark.slow
def test_two_launches_at_once_write_two_run_dirs(tmp_path):
    """`rlhf-exp stage=sft ... &` twice (a shell loop, a job array): two run dirs, each holding
    its own run (hardware.dry_run: Hydra makes the run dir, the stage does not train)."""
    import os
    import subprocess
    import sys

    from tests.conftest import CHILD_DROP_ENV, ROOT

    env = {k: v for k, v in os.environ.items() if k not in CHILD_DROP_ENV}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, "-m", "rlhf_exp", "stage=sft",
                               "hardware.dry_run=true", f"seed={seed}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    dirs = sorted((tmp_path / "outputs" / "default").iterdir())
    assert len(dirs) == 2, dirs
    seeds = sorted(_saved_seed(d) for d in dirs)
    assert seeds == [1, 2]


def _saved_seed(run_dir: Path) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(run_dir / ".hydra" / "config.yaml").seed)


def test_trained_checkpoints_record_their_kind(sft_run, reward_run, rlhf_exp, tmp_path):
    """With the checkpoints real runs write (final and training ones): an SFT run as a reward
    model and a reward run as a policy are refused in one line; each the right way round
    passes the kind check."""
    from rlhf_exp.command import preflight_checks
    from rlhf_exp.training import checkpoint

    sft_dir, rm_dir = sft_run["run_dir"], reward_run["run_dir"]
    for final, kind in ((checkpoint.final_checkpoint(sft_dir), preflight_checks.POLICY),
                        (checkpoint.final_checkpoint(rm_dir), preflight_checks.REWARD)):
        assert preflight_checks.checkpoint_kind(final)[0] == kind
    run_dir = tmp_path / "run"
    proc = rlhf_exp("stage=grpo", f"grpo.reward_model={sft_dir}", f"hydra.run.dir={run_dir}")
    assert_one_line_exit_2(proc, f"grpo.reward_model={sft_dir} (")
    assert "holds a sft policy checkpoint" in proc.stderr
    proc = rlhf_exp("stage=dpo", f"dpo.init_from={rm_dir}", f"hydra.run.dir={run_dir}")
    assert_one_line_exit_2(proc, "holds a reward model checkpoint, but dpo.init_from needs a "
                                 "policy")
    assert not run_dir.exists()
    preflight_checks.check_checkpoint_kinds([("grpo.actor_init", str(sft_dir)),
                                             ("grpo.reward_model", str(rm_dir))])
