"""The GRPO stage: W&B metrics, table and artifact, the checkpoint, the reward model as the
reward, config checks, the pipeline hand-off and eval/resume knowing `grpo` (kill-then-resume:
tests/test_resume.py, for every stage).

Real parts throughout (DeepSpeed on CPU, W&B offline, the tiny model); budgets are a few steps
on 16 completions, so nothing here says GRPO learns: docs/grpo.md has those figures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_exp.config import ConfigError
from rlhf_exp.errors import UserError
from rlhf_exp.modeling import models
from rlhf_exp.rl import ppo_math, rollout
from rlhf_exp.stages import eval as eval_stage
from rlhf_exp.stages import grpo, pipeline
from rlhf_exp.tasks import sort_digits
from rlhf_exp.training import checkpoint, resume, runtime
from rlhf_exp.training.wandb_reader import read_runs
from tests.conftest import FAST, compose, tiny_groups

# 4 prompts x 4 completions, two passes x two minibatches, the reference loaded (beta > 0),
# clip-higher, zero-std groups filtered: every optional path of the update runs
GRPO_FAST = [*FAST, "stage=grpo", "grpo.steps=3", "grpo.prompts_per_step=4",
             "grpo.num_generations=4", "grpo.micro_batch_size_per_device=4",
             "grpo.num_iterations=2", "grpo.num_minibatches=2", "grpo.beta=0.05",
             "grpo.epsilon_high=0.28", "grpo.filter_zero_std=true", "grpo.eval_every=2",
             "grpo.eval_num_prompts=16", "grpo.eval_batch_size=8", "logger.table_every=2",
             "grpo.save_every=1", "grpo.keep_last=5"]


@pytest.fixture(scope="module")
def grpo_run(sft_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo_run")
    cfg = compose(*GRPO_FAST, f"grpo.actor_init={sft_run['run_dir']}")
    actor, tokenizer, result = grpo.train(cfg, run_dir)
    (run,) = read_runs(run_dir / "wandb")
    return {"cfg": cfg, "run_dir": run_dir, "result": result, "run": run, "actor": actor,
            "tokenizer": tokenizer}


@pytest.mark.slow
def test_wandb_run_holds_metrics_table_and_artifact(grpo_run, sft_run):
    run, cfg = grpo_run["run"], grpo_run["cfg"]
    assert run.job_type == "grpo" and run.group == cfg.experiment_name
    for key in ("grpo/reward", "grpo/gold_reward", "grpo/reward_std", "grpo/frac_zero_std",
                "grpo/kl", "grpo/loss", "grpo/pg_loss", "grpo/clipfrac", "grpo/clipfrac_high",
                "grpo/approx_kl", "grpo/entropy", "grpo/response_length", "grpo/eos_rate",
                "grpo/reward_fn/gold_reward_fn", "perf/gen_s", "perf/train_s",
                "perf/samples_per_s"):
        assert len(run.metric(key)) == 3, key
    # the default reward is the task's gold reward; KL to the reference is k3 (never negative)
    assert run.metric("grpo/reward") == pytest.approx(run.metric("grpo/gold_reward"))
    assert all(k >= 0 for k in run.metric("grpo/kl"))
    assert all(0.0 <= f <= 1.0 for f in run.metric("grpo/frac_zero_std"))
    # two passes x two minibatches: after the first optimizer step the ratio moves off 1
    assert max(run.metric("grpo/approx_kl")) > 0
    # held-out eval before the first step, at step 2 and after the last
    assert [row["grpo/step"] for row in run.history if "grpo/eval_gold_reward" in row] == \
        [0, 2, 3]
    steps = [row["grpo/step"] for row in run.history if row.get("grpo/samples._type")]
    assert steps == [1, 2]
    files = sorted((grpo_run["run_dir"] / "wandb").glob("offline-run-*/files/media/table/grpo/*"))
    table = json.loads(files[0].read_text())
    assert table["columns"] == ["prompt", "response", "reward_score", "gold_reward"]
    assert len(table["data"]) == 16
    prompts = [row[0] for row in table["data"]]
    assert all(prompts[i] == prompts[i - i % 4] for i in range(16)), "groups of 4 completions"
    for prompt, response, score, gold in table["data"]:
        assert gold == pytest.approx(sort_digits.gold_reward(prompt, response)) == score
    final_sft = str(checkpoint.final_checkpoint(sft_run["run_dir"]))
    assert run.config["inputs"]["actor_init"] == final_sft
    assert run.summary["grpo/reference_placement"] == "device"
    assert run.summary["grpo/reward_model_placement"] == "none"
    assert run.summary["grpo/completions_per_step"] == 16
    names = {a["name"] for a in run.artifacts if a["type"] == "model"}
    assert f"{cfg.experiment_name}-grpo-model" in names
    result = json.loads((grpo_run["run_dir"] / "result.json").read_text())
    assert result["stage"] == "grpo"
    for key in ("grpo/gold_reward", "grpo/eval_gold_reward", "grpo/init_eval_gold_reward",
                "grpo/kl", "perf/loop_s"):
        assert key in result["metrics"], key


@pytest.mark.slow
def test_checkpoint_reloads_with_the_trained_weights(grpo_run):
    run_dir = grpo_run["run_dir"]
    final = checkpoint.final_checkpoint(run_dir)
    assert final.name == "step_000003"
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [1, 2, 3]
    reloaded = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = grpo_run["tokenizer"]
    ids = tok(["sort:52813=12358", "sort:321=123"], padding=True, return_tensors="pt")
    actor = grpo_run["actor"].module.eval()
    with torch.no_grad():
        a = reloaded(**ids).logits
        b = actor(**ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    start = AutoModelForCausalLM.from_pretrained(checkpoint.step_dir(run_dir, 1))
    assert not torch.equal(start.lm_head.weight, reloaded.lm_head.weight)  # it trained


@pytest.fixture(scope="module")
def reward_dir(sft_run, tmp_path_factory) -> Path:
    """A reward-model checkpoint: the SFT backbone with a seeded random score head."""
    final = checkpoint.final_checkpoint(sft_run["run_dir"])
    out = tmp_path_factory.mktemp("grpo_rm") / "ckpt"
    tok = models.load_tokenizer(str(final))
    torch.manual_seed(3)
    models.load_reward_model(str(final), tok, sft_run["cfg"].model).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_reward_model_alone_is_the_reward(sft_run, reward_dir, tmp_path):
    """grpo.reward_model set, reward_functions left null: the score is the reward model's alone
    (no gold function), and no reference model is loaded at beta 0."""
    cfg = compose(*GRPO_FAST, f"grpo.actor_init={sft_run['run_dir']}",
                  f"grpo.reward_model={reward_dir}", "grpo.steps=1", "grpo.beta=0",
                  "grpo.save_every=0", "grpo.num_iterations=1", "grpo.num_minibatches=1")
    _, _, result = grpo.train(cfg, tmp_path)
    (run,) = read_runs(tmp_path / "wandb")
    assert run.metric("grpo/reward") == pytest.approx(run.metric("grpo/reward_model_score"))
    assert not run.metric("grpo/reward_fn/gold_reward_fn") and not run.metric("grpo/kl")
    assert run.summary["grpo/reward_model_placement"] == "device"
    assert run.summary["grpo/reference_placement"] == "none"
    assert "grpo/eval_reward_score" in result.metrics


# ----------------------------------------------------------------------------- shared prompts
def _groups():
    """A tiny Llama (seeded random weights) and 3 prompts x 4 sampled completions."""
    model, _, sample = tiny_groups(compose("stage=grpo"))
    return model, sample


def test_shared_prompt_forward_is_exact_with_gradients():
    model, sample = _groups()
    traj = sample(4)
    assert traj.texts == sample(1).texts  # prefilling each prompt once samples the same
    R, mask = traj.response_mask.shape[1], traj.response_mask.bool()
    grads, logits = [], []
    for shared in (False, True):
        model.zero_grad()
        args = (model, traj.sequences, traj.attention_mask, traj.position_ids, R)
        out = (rollout.group_response_logits(*args, 4, temperature=0.7) if shared
               else rollout.response_logits(*args, temperature=0.7))
        ppo_math.masked_sum(ppo_math.logprobs_from_logits(out, traj.responses), mask).backward()
        logits.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.allclose(logits[0][mask], logits[1][mask], atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*grads))


def test_trimming_drops_only_all_padding_columns():
    # two rows, prompt 2 tokens, 6 response columns; the responses end at 3 and 5 tokens
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]).float()
    seq = torch.arange(16).view(2, 8)
    attn = torch.cat([torch.ones(2, 2), mask], 1).long()
    traj = rollout.Trajectory([{}, {}], seq, attn, attn.cumsum(-1) - 1, mask, ["a", "b"], 0.0)
    trimmed = rollout.trim_responses(traj)
    assert trimmed.response_mask.shape[1] == 5
    assert torch.equal(trimmed.sequences, seq[:, :7])
    assert torch.equal(trimmed.responses, traj.responses[:, :5])
    assert torch.equal(trimmed.attention_mask, attn[:, :7])
    full = rollout.Trajectory([{}], seq[:1], attn[:1], attn[:1], torch.ones(1, 6), ["a"], 0.0)
    assert rollout.trim_responses(full) is full  # nothing to trim


# ----------------------------------------------------------------------------- config, no run
@pytest.mark.parametrize("override, key", [
    ("grpo.baseline=median", "grpo.baseline"),
    ("grpo.scale_rewards=std", "grpo.scale_rewards"),
    ("grpo.loss_agg=sum", "grpo.loss_agg"),
    ("grpo.kl_estimator=k9", "grpo.kl_estimator"),
    ("grpo.num_generations=1", "grpo.num_generations"),
    ("grpo.num_minibatches=3", "grpo.num_minibatches"),
    ("grpo.micro_batch_size_per_device=5", "grpo.micro_batch_size_per_device"),
    ("grpo.epsilon_high=0", "grpo.epsilon_high"),
    ("grpo.kl_in_reward=true grpo.beta=0", "grpo.kl_in_reward"),
    ("grpo.generation.do_sample=false", "grpo.generation.do_sample"),
    ("grpo.reward_functions=[]", "grpo.reward_functions"),
    ("grpo.actor.lr_scheduler=cyclic", "grpo.actor.lr_scheduler"),
])
def test_bad_grpo_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose("stage=grpo", "grpo.prompts_per_step=4", "grpo.num_generations=4",
                "grpo.micro_batch_size_per_device=4", *override.split())


def test_bad_grpo_config_exits_2_with_one_line(rlhf_exp):
    proc = rlhf_exp("stage=grpo", "grpo.prompts_per_step=3", "hardware.nproc_per_node=2")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("rlhf-exp: error: grpo.prompts_per_step=3") and "ranks" in line


def test_grpo_keys_are_checked_only_when_grpo_runs():
    compose("stage=sft", "grpo.loss_agg=sum")  # a bad grpo key never stops another stage
    with pytest.raises(ConfigError, match="grpo.loss_agg"):
        compose("stage=pipeline", "stage.stages=[sft,grpo]", "grpo.loss_agg=sum")


def test_presets_rloo_and_dr_grpo():
    rloo = compose("stage=grpo", "grpo=rloo", "grpo.steps=7").grpo
    assert (rloo.baseline, rloo.scale_rewards, rloo.kl_in_reward, rloo.steps) == \
        ("leave_one_out", "none", True, 7)
    assert grpo.kl_estimator(compose("stage=grpo", "grpo=rloo")) == "k1"
    assert grpo.kl_estimator(compose("stage=grpo")) == "k3"
    dr = compose("stage=grpo", "grpo=dr_grpo").grpo
    assert (dr.baseline, dr.scale_rewards, dr.loss_agg) == ("group_mean", "none", "dr_grpo")


def test_data_without_gold_reward_needs_a_reward_one_line_before_anything(tmp_path):
    cfg = compose("stage=grpo", "data_mix=local_example", "data_mix.sources.0.task=null")
    with pytest.raises(ConfigError, match="grpo.reward_model=") as info:
        grpo.train(cfg, tmp_path)
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir()), "nothing written before the inputs are known"


def test_reward_function_defaults():
    cfg = compose("stage=grpo")
    assert [n.fn for n in grpo.reward_function_nodes(cfg)] == [grpo.GOLD_FUNCTION]
    cfg = compose("stage=grpo", "grpo.reward_model=/some/rm")
    assert grpo.reward_function_nodes(cfg) == []
    cfg = compose("stage=grpo", "grpo.reward_model=/some/rm",
                  "grpo.reward_functions=[{fn: 'rlhf_exp.tasks:gold_reward_fn', weight: 0.5}]")
    assert [(n.fn, n.weight) for n in grpo.reward_function_nodes(cfg)] == \
        [(grpo.GOLD_FUNCTION, 0.5)]


def _result(stage: str, run_dir: Path) -> runtime.StageResult:
    return runtime.StageResult(stage, str(run_dir))


def test_pipeline_hands_each_stage_the_latest_policy_and_reward_model(tmp_path):
    cfg = compose("stage=pipeline", "stage.stages=[sft,reward,grpo,ppo]")
    results = {s: _result(s, tmp_path / s) for s in ("sft", "reward", "grpo")}
    sub = pipeline.stage_config(cfg, "grpo", results)
    assert sub.stage.name == "grpo"
    assert sub.grpo.actor_init == str(tmp_path / "sft")
    assert sub.grpo.reward_model == str(tmp_path / "reward")
    assert pipeline.stage_config(cfg, "reward", results).reward.init_from == str(tmp_path / "sft")
    ppo = pipeline.stage_config(cfg, "ppo", results)  # after grpo: from the GRPO policy
    assert ppo.ppo.actor_init == str(tmp_path / "grpo")
    assert ppo.ppo.critic_init == str(tmp_path / "reward")
    # a key the user set is kept; without a reward stage nothing is handed to reward_model
    cfg = compose("stage=pipeline", "stage.stages=[sft,grpo]", "grpo.actor_init=/mine")
    sub = pipeline.stage_config(cfg, "grpo", {"sft": _result("sft", tmp_path / "sft")})
    assert sub.grpo.actor_init == "/mine" and sub.grpo.reward_model is None


def test_pipeline_stages_are_checked():
    with pytest.raises(ConfigError, match="stage.stages has 'rlhf'"):
        compose("stage=pipeline", "stage.stages=[sft,rlhf]")
    for stages in ("[sft,grpo,grpo]", "[grpo,sft]", "[sft,grpo,reward]", "[]"):
        with pytest.raises(ConfigError, match=r"must list stages of .* once each, sft first"):
            compose("stage=pipeline", f"stage.stages={stages}")
    compose("stage=pipeline", "stage.stages=[sft,reward,grpo,ppo]")  # GRPO, then PPO from it
    # [sft, reward, grpo] with reward_functions=[]: the reward stage's model is the reward
    compose("stage=pipeline", "stage.stages=[sft,reward,grpo]", "grpo.reward_functions=[]")


def test_resume_of_a_grpo_run_checks_the_grpo_node(tmp_path):
    saved = compose("stage=grpo", "grpo.beta=0.1", "grpo.steps=5")
    runtime.save_run_config(saved, tmp_path)
    resume.check_compatible(compose("stage=grpo", "grpo.beta=0.1", "grpo.steps=9",
                                    f"resume={tmp_path}"), tmp_path)  # longer: allowed
    with pytest.raises(UserError, match="grpo.beta"):
        resume.check_compatible(compose("stage=grpo", "grpo.beta=0.3", f"resume={tmp_path}"),
                                tmp_path)


def test_eval_from_run_finds_a_grpo_policy_and_follows_its_eval(tmp_path):
    """A lone GRPO run dir (checkpoints stand-ins: discovery reads only result.json, config and
    the `final` link)."""
    sft_final = tmp_path / "sft_ckpt"
    sft_final.mkdir()
    (sft_final / "config.json").write_text("{}")
    run_dir = tmp_path / "grpo"
    shutil.copytree(sft_final, run_dir / "checkpoints" / "step_000004")
    checkpoint.mark_final(run_dir / "checkpoints" / "step_000004")
    (run_dir / "result.json").write_text(json.dumps({"stage": "grpo"}))
    run_cfg = compose("stage=grpo", "seed=7", f"grpo.actor_init={sft_final}",
                      "grpo.generation.max_new_tokens=9", "grpo.eval_num_prompts=40")
    runtime.save_run_config(run_cfg, run_dir)
    found = eval_stage.discover_run(str(run_dir))
    assert found.policies == {"sft": str(sft_final),
                              "grpo": str((run_dir / "checkpoints" / "step_000004").resolve())}
    assert found.reward_model is None and found.rl_stage == "grpo"
    cfg = eval_stage.match_run(compose("stage=eval", "eval.batch_size=5"), found.config,
                               found.rl_stage)
    assert cfg.seed == 7
    assert cfg.eval.generation.max_new_tokens == 9 and cfg.eval.num_prompts == 40
    assert cfg.eval.kl_estimator == "k1" and cfg.eval.batch_size == 5  # set by hand: kept


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_pipeline_sft_then_grpo_compares_the_first_and_last_policy(tmp_path, rlhf_exp):
    run_dir = tmp_path / "pipe"
    proc = rlhf_exp("stage=pipeline", "stage.stages=[sft,grpo]", *FAST, "sft.max_steps=20",
                    "grpo.steps=2", "grpo.prompts_per_step=4", "grpo.num_generations=4",
                    "grpo.eval_every=0", "grpo.eval_num_prompts=8", "grpo.eval_batch_size=8",
                    "logger.table_every=0", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    m = result["metrics"]
    assert m["pipeline/gold_reward_gain"] == pytest.approx(m["pipeline/grpo_gold_reward"]
                                                           - m["pipeline/sft_gold_reward"])
    assert m["pipeline/sft_kl_to_sft"] == 0.0 and "pipeline/grpo_kl_to_sft" in m
    # the pipeline's re-evaluation from the checkpoints agrees with GRPO's own held-out eval
    assert m["grpo/eval_gold_reward"] == pytest.approx(m["pipeline/grpo_gold_reward"], abs=1e-6)
    assert m["grpo/init_eval_gold_reward"] == pytest.approx(m["pipeline/sft_gold_reward"],
                                                            abs=1e-6)
    summary = (run_dir / "summary.md").read_text()
    assert "| sft |" in summary and "| grpo |" in summary
    (run,) = read_runs(run_dir / "grpo" / "wandb")
    assert run.job_type == "grpo" and run.config["grpo"]["actor_init"] == str(run_dir / "sft")
    assert not (run_dir / "reward").exists()
    # stage=chat answers with the GRPO policy (a policy checkpoint like any other); greedy, so
    # the answer does not depend on the RNG state earlier tests left
    chat = rlhf_exp("stage=chat", f"chat.policy={run_dir / 'grpo'}", "chat.prompt='sort:321='",
                    "chat.generation.do_sample=false", f"hydra.run.dir={tmp_path / 'chat'}")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip().isdigit(), (chat.stdout, chat.stderr[-2000:])
