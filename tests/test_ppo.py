"""The PPO stage: W&B metrics and tables, checkpoints (actor, critic, EMA), offloaded frozen
models, LoRA, dropout off, the value model behind the engine, ptx, and config checks.

Real parts throughout (DeepSpeed on CPU, W&B offline, the tiny model); budgets are a few PPO
steps on 16 rollouts, so nothing here says PPO learns: tests/test_pipeline.py does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf_exp.config import ConfigError
from rlhf_exp.modeling import models
from rlhf_exp.rl import rollout, scoring
from rlhf_exp.stages import ppo
from rlhf_exp.tasks import sort_digits
from rlhf_exp.training import checkpoint, engine
from rlhf_exp.training.wandb_reader import read_runs
from tests.conftest import FAST, cli, compose

# a few steps on 16 rollouts, two epochs x two minibatches, everything optional switched on
PPO_FAST = [*FAST, "stage=ppo", "ppo.steps=3", "ppo.rollout_batch_size=16",
            "ppo.micro_batch_size_per_device=4", "ppo.ppo_epochs=2", "ppo.num_minibatches=2",
            "ppo.eval_every=2", "ppo.eval_num_prompts=16", "ppo.eval_batch_size=8",
            "logger.table_every=2", "ppo.save_every=1", "ppo.keep_last=5"]
PPO_ALL_ON = ["ppo.ema.enabled=true", "ppo.ema.decay=0.5", "ppo.ptx_coef=0.5",
              "ppo.offload_reference=true", "ppo.offload_reward_model=true",
              "ppo.critic_lora.enabled=true", "ppo.critic_lora.save=adapter",
              "ppo.kl.estimator=k3", "ppo.kl.adaptive=true", "ppo.normalize_reward=true"]


@pytest.fixture(scope="module")
def reward_dir(sft_run, tmp_path_factory) -> Path:
    """A reward-model checkpoint: the SFT backbone with a seeded random score head (what the
    scores are worth is not the point here)."""
    final = checkpoint.final_checkpoint(sft_run["run_dir"])
    out = tmp_path_factory.mktemp("ppo_rm") / "ckpt"
    tok = models.load_tokenizer(str(final))
    torch.manual_seed(3)
    model = models.load_reward_model(str(final), tok, sft_run["cfg"].model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _ppo(sft_run, reward_dir, run_dir: Path, *overrides: str):
    cfg = compose(*PPO_FAST, f"ppo.actor_init={sft_run['run_dir']}",
                  f"ppo.critic_init={reward_dir}", *overrides)
    _, _, result = ppo.train(cfg, run_dir)
    (run,) = read_runs(run_dir / "wandb")
    return {"cfg": cfg, "run_dir": run_dir, "result": result, "run": run}


@pytest.fixture(scope="module")
def ppo_run(sft_run, reward_dir, tmp_path_factory):
    return _ppo(sft_run, reward_dir, tmp_path_factory.mktemp("ppo_run"), *PPO_ALL_ON)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def test_wandb_run_holds_metrics_table_and_inputs(ppo_run, sft_run, reward_dir):
    run, cfg = ppo_run["run"], ppo_run["cfg"]
    assert run.job_type == "ppo" and run.group == cfg.experiment_name
    per_step = ["ppo/reward_score", "ppo/gold_reward", "ppo/kl", "ppo/kl_coef", "ppo/actor_loss",
                "ppo/critic_loss", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy",
                "ppo/response_length", "ppo/value_explained_var", "ppo/ptx_loss", "perf/gen_s",
                "perf/train_s", "perf/samples_per_s"]
    for key in per_step:
        assert len(run.metric(key)) == 3, key
    # gold rewards are shares of right digits; the adaptive controller moves the coefficient
    assert all(0.0 <= g <= 1.0 for g in run.metric("ppo/gold_reward"))
    assert run.metric("ppo/kl_coef")[-1] != run.metric("ppo/kl_coef")[0]
    assert all(k >= 0 for k in run.metric("ppo/kl")), "k3 KL is never negative"
    # held-out eval before the first step, at step 2 and after the last
    assert len(run.metric("ppo/eval_gold_reward")) == 3
    assert len(run.metric("ppo/eval_reward_score")) == 3
    # the samples table at steps 1 and 2 (table_every=2, and always at step 1)
    steps = [row["ppo/step"] for row in run.history if row.get("ppo/samples._type")]
    assert steps == [1, 2]
    files = sorted((ppo_run["run_dir"] / "wandb").glob("offline-run-*/files/media/table/ppo/*"))
    table = json.loads(files[0].read_text())
    assert table["columns"] == ["prompt", "response", "reward_score", "gold_reward"]
    assert len(table["data"]) == 16
    for prompt, response, _, gold in table["data"]:
        assert gold == pytest.approx(sort_digits.gold_reward(prompt, response))
    # where the run started from: config and summary
    final_sft = str(checkpoint.final_checkpoint(sft_run["run_dir"]))
    assert run.config["inputs"]["actor_init"] == final_sft
    assert run.config["inputs"]["critic_init"] == str(reward_dir)
    assert run.config["inputs"]["reward_model"] == str(reward_dir)
    assert run.summary["ppo/actor_init"] == final_sft
    sft_artifact = f"{cfg.logger.project}/{sft_run['cfg'].experiment_name}-sft-model:latest"
    assert run.summary["ppo/actor_init_artifact"] == sft_artifact
    assert run.summary["ppo/reference_placement"] == "zero3-offload-cpu"
    assert run.summary["ppo/reward_model_placement"] == "zero3-offload-cpu"
    names = {a["name"] for a in run.artifacts if a["type"] == "model"}
    assert {f"{cfg.experiment_name}-ppo-model", f"{cfg.experiment_name}-ppo-ema-model"} <= names
    result = json.loads((ppo_run["run_dir"] / "result.json").read_text())
    for key in ("ppo/gold_reward", "ppo/eval_gold_reward", "ppo/init_eval_gold_reward",
                "ppo/kl"):
        assert key in result["metrics"], key


def test_checkpoints_actor_critic_adapter_and_ema(ppo_run, sft_run):
    run_dir = ppo_run["run_dir"]
    final = checkpoint.final_checkpoint(run_dir)
    assert final.name == "step_000003"
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [1, 2, 3]
    actor = AutoModelForCausalLM.from_pretrained(final)  # a plain HF checkpoint
    assert actor.config.eos_token_id != actor.config.pad_token_id
    # the critic was trained with LoRA and saved as an adapter (ppo.critic_lora.save=adapter)
    critic = run_dir / "checkpoints" / "critic"
    assert (critic / "adapter_config.json").exists()
    # EMA: its own checkpoint, between the start and the final policy (decay 0.5, 3 updates)
    start = _weights(checkpoint.final_checkpoint(sft_run["run_dir"]))
    ema, last = _weights(run_dir / "checkpoints" / "ema"), _weights(final)
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(ema[key], last[key]) and not torch.equal(ema[key], start[key])
    # decay 0.5 over 3 steps: ema = w3/2 + w2/4 + w1/8 + w0/8
    w1, w2 = (_weights(checkpoint.step_dir(run_dir, s)) for s in (1, 2))
    expected = last[key] / 2 + w2[key] / 4 + w1[key] / 8 + start[key] / 8
    assert torch.allclose(ema[key], expected, atol=1e-6)


def test_ptx_coefficient_changes_the_update(ppo_run, sft_run, reward_dir, tmp_path):
    """Same seed, same first rollout; only ptx differs, and so do the weights after one step."""
    no_ptx = _ppo(sft_run, reward_dir, tmp_path, *PPO_ALL_ON, "ppo.ptx_coef=0", "ppo.steps=1")
    run, base = ppo_run["run"], no_ptx["run"]
    assert run.metric("ppo/gold_reward")[0] == base.metric("ppo/gold_reward")[0]
    assert run.metric("ppo/reward_score")[0] == base.metric("ppo/reward_score")[0]
    # with ptx the actor's loss is the policy loss plus coef * the SFT loss
    total, pg, ptx = (run.metric(k)[0] for k in ("ppo/actor_total_loss", "ppo/actor_loss",
                                                 "ppo/ptx_loss"))
    assert ptx > 0.1 and total == pytest.approx(pg + 0.5 * ptx, rel=1e-5)
    assert not base.metric("ppo/ptx_loss")
    assert base.metric("ppo/actor_total_loss") == base.metric("ppo/actor_loss")
    a = _weights(checkpoint.step_dir(ppo_run["run_dir"], 1))
    b = _weights(checkpoint.final_checkpoint(tmp_path))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_offloaded_frozen_model_is_zero3_partitioned_and_scores_the_same(sft_run, reward_dir):
    cfg = compose(*PPO_FAST)
    tok = models.load_tokenizer(str(reward_dir))
    plain = models.load_reward_model(str(reward_dir), tok, cfg.model).eval()
    offloaded = engine.build_frozen(models.load_reward_model(str(reward_dir), tok, cfg.model),
                                    cfg, zero_stage=2, offload=True)
    params = list(offloaded.parameters())
    # ZeRO-3 with nothing kept resident: every weight lives only as its partition (ds_tensor)
    # on the CPU, and is gathered for a forward and released after it
    assert all(hasattr(p, "ds_tensor") and p.ds_tensor.device.type == "cpu" for p in params)
    assert all(not p.ds_persist and p.data.numel() == 0 for p in params)
    ids = tok(["sort:321=123", "sort:55=55"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = scoring.sequence_scores(plain, ids["input_ids"], ids["attention_mask"])
        b = scoring.sequence_scores(offloaded, ids["input_ids"], ids["attention_mask"])
    assert torch.allclose(a, b, atol=1e-5)


def test_dropout_is_off_even_in_train_mode(sft_run):
    final = str(checkpoint.final_checkpoint(sft_run["run_dir"]))
    cfg = compose("model.lora.enabled=true", "model.lora.dropout=0.3")
    tok = models.load_tokenizer(final)
    model = models.load_causal_lm(final, tok, cfg.model)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model = models.apply_lora(model, cfg.model.lora).train()
    ids = tok(["sort:52813=12358"], return_tensors="pt")
    assert not torch.equal(model(**ids).logits, model(**ids).logits)  # dropout is on
    engine.disable_dropout(model).train()
    assert torch.equal(model(**ids).logits, model(**ids).logits)


def test_response_logits_are_the_sampling_distributions_at_the_response_positions(sft_run):
    """Row i of the response logits predicts response token i (read at position P-1+i) and is
    divided by the sampling temperature, so old/new log-probs are those of the sampler."""
    final = str(checkpoint.final_checkpoint(sft_run["run_dir"]))
    tok = models.load_tokenizer(final)
    model = engine.disable_dropout(models.load_causal_lm(final, tok, sft_run["cfg"].model))
    seq = tok(["sort:52813=12358"], return_tensors="pt")["input_ids"]
    attn = torch.ones_like(seq)
    pos = torch.arange(seq.shape[1])[None]
    R = 5  # the last 5 tokens are the response
    with torch.no_grad():
        full = model(input_ids=seq, attention_mask=attn, position_ids=pos).logits
        plain = rollout.response_logits(model, seq, attn, pos, R)
        tempered = rollout.response_logits(model, seq, attn, pos, R, temperature=0.7)
    P = seq.shape[1] - R
    assert torch.allclose(plain, full[:, P - 1:P + R - 1], atol=1e-5)
    assert torch.allclose(tempered, full[:, P - 1:P + R - 1] / 0.7, atol=1e-5)


def test_value_model_returns_token_values_through_the_engine(sft_run, reward_dir):
    """The critic's engine forward returns per-token values (the score head at every position)
    and trains through engine.backward."""
    cfg = compose(*PPO_FAST)
    tok = models.load_tokenizer(str(reward_dir))
    reference = models.load_reward_model(str(reward_dir), tok, cfg.model).eval()
    critic = ppo.as_value_model(models.load_reward_model(str(reward_dir), tok, cfg.model))
    eng = engine.build_train_engine(critic, cfg, lr=1e-4, weight_decay=0.0, micro_batch_size=2,
                                    grad_accum=1, max_grad_norm=1.0, scheduler="constant",
                                    warmup_steps=0, total_steps=1)
    ids = tok(["sort:321=123", "sort:55=55"], padding=True, return_tensors="pt")
    values = eng(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    with torch.no_grad():
        expected = scoring.token_values(reference, ids["input_ids"], ids["attention_mask"])
    assert values.shape == ids["input_ids"].shape
    assert torch.allclose(values, expected, atol=1e-5)
    eng.backward(values.pow(2).mean())
    eng.step()
    with torch.no_grad():
        after = eng(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    assert after.pow(2).mean() < values.pow(2).mean()


@pytest.mark.parametrize("override, key", [
    ("ppo.rollout_batch_size=10", "ppo.rollout_batch_size"),  # not divisible by 4 minibatches
    ("ppo.micro_batch_size_per_device=3", "ppo.micro_batch_size_per_device"),
    ("ppo.kl.estimator=k9", "ppo.kl.estimator"),
    ("ppo.ema.decay=1.5", "ppo.ema.decay"),
    ("ppo.actor.zero_stage=4", "ppo.actor.zero_stage"),
    ("ppo.critic_lora.save=both", "ppo.critic_lora.save"),
    ("ppo.lam=1.5", "ppo.lam"),
    ("ppo.ptx_coef=-1", "ppo.ptx_coef"),
    ("ppo.generation.temperature=0", "ppo.generation.temperature"),
    ("ppo.generation.top_p=0", "ppo.generation.top_p"),
    ("ppo.generation.compile=fast", "ppo.generation.compile"),
])
def test_bad_ppo_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose("stage=ppo", "ppo.rollout_batch_size=16", "ppo.num_minibatches=4",
                "ppo.micro_batch_size_per_device=4", override)


def test_bad_ppo_config_exits_2_with_one_line():
    proc = cli("stage=ppo", "ppo.rollout_batch_size=48", "ppo.num_minibatches=5")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("rlhf-exp: error: ppo.rollout_batch_size=48")
    assert "num_minibatches" in line


def test_reward_from_a_function_alone_loads_no_reward_model(sft_run, reward_dir, tmp_path):
    """ppo.reward_model_weight=0 with the gold-reward function: the score of every rollout is the
    function's value (here the gold reward itself), and no reward model is loaded."""
    out = _ppo(sft_run, reward_dir, tmp_path, "ppo.reward_model_weight=0", "ppo.steps=2",
               "ppo.reward_functions=[{fn: 'rlhf_exp.tasks:gold_reward_fn', weight: 1.0}]")
    run = out["run"]
    assert run.summary["ppo/reward_model_placement"] == "none"
    assert run.summary["ppo/reward_model"] == ""
    fn = run.metric("ppo/reward_fn/gold_reward_fn")
    assert len(fn) == 2
    assert fn == pytest.approx(run.metric("ppo/gold_reward"))
    assert fn == pytest.approx(run.metric("ppo/reward_score"))
    assert not run.metric("ppo/eval_reward_score") and run.metric("ppo/eval_gold_reward")
