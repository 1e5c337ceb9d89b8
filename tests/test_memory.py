"""Memory options, each checked where it takes effect (not just that the config key parses):
ZeRO-3 CPU offload (the engine's optimizer and parameter partitions), gradient checkpointing
(activations recomputed in backward), LoRA (what trains, and what a checkpoint holds, merged or
as an adapter). The runs are short in-process SFT runs of the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, compose

SHORT = ["stage=sft", *FAST, "sft.max_steps=3", "sft.micro_batch_size_per_device=8",
         "sft.warmup_steps=0", "logger=none", "data_mix.eval_fraction=0"]


def _train(tmp_path_factory, name: str, *overrides: str):
    from rlhf_exp.stages import sft

    cfg = compose(*SHORT, *overrides)
    engine, tokenizer, result = sft.train(cfg, tmp_path_factory.mktemp(name))
    return {"cfg": cfg, "engine": engine, "tokenizer": tokenizer, "result": result}


@pytest.fixture(scope="module")
def offload_gc(tmp_path_factory):
    return _train(tmp_path_factory, "offload_gc", "zero_stage=zero3_offload",
                  "model.gradient_checkpointing=true")


@pytest.fixture(scope="module")
def lora_merged(tmp_path_factory):
    # ZeRO-3: the LoRA merge must work from the gathered (not the live, partitioned) weights
    return _train(tmp_path_factory, "lora_merged", "zero_stage=zero3", "model.lora.enabled=true",
                  "model.lora.save=merged")


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory):
    return _train(tmp_path_factory, "lora_adapter", "zero_stage=zero2", "model.lora.enabled=true",
                  "model.lora.save=adapter")


def _decoder_layer(module: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in module.modules() if type(m).__name__.endswith("DecoderLayer"))


def _layer_calls_per_step(engine) -> int:
    """How often the first decoder layer's attention runs in one forward + backward of a
    training step. (transformers checkpoints the layer's `forward`, so hooks on the layer itself
    stay outside the recompute; its submodules are called again inside it.)"""
    calls = []
    attention = next(_decoder_layer(engine.module).children())
    handle = attention.register_forward_hook(lambda *_: calls.append(1))
    try:
        engine.module.train()
        ids = torch.randint(10, 30, (2, 12), generator=torch.Generator().manual_seed(0))
        loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        engine.backward(loss)
    finally:
        handle.remove()
        engine.optimizer.zero_grad()
    return len(calls)


# ----------------------------------------------------------------------------- ZeRO-3 offload
def test_zero3_offload_config_block():
    from rlhf_exp.training import engine

    cfg = compose("stage=sft", "zero_stage=zero3_offload")
    ds = engine.deepspeed_config(cfg, micro_batch_size=2, grad_accum=1, max_grad_norm=1.0,
                                 world_size=1)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    plain = engine.deepspeed_config(compose("stage=sft", "zero_stage=zero3"), micro_batch_size=2,
                                    grad_accum=1, max_grad_norm=1.0, world_size=1)
    assert "offload_optimizer" not in plain["zero_optimization"]
    assert "offload_param" not in plain["zero_optimization"]


def test_zero3_offload_engine_offloads(offload_gc):
    eng = offload_gc["engine"]
    assert eng.zero_optimization_stage() == 3
    assert eng.zero_offload_optimizer().device == "cpu"
    assert eng.zero_offload_param().device == "cpu"
    # the ZeRO-3 optimizer itself runs in offload mode: fp32 partitions and Adam state live on
    # the CPU, parameter partitions are kept on the CPU between uses
    opt = eng.optimizer
    assert type(opt).__name__ == "DeepSpeedZeroOptimizer_Stage3"
    assert opt.offload_optimizer and opt.offload_param
    assert getattr(opt.device, "value", opt.device) == "cpu"  # an OffloadDeviceEnum
    states = [s for s in opt.optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].device.type == "cpu" for s in states)
    assert offload_gc["result"].metrics["sft/steps"] == 3


# ----------------------------------------------------------------------------- checkpointing
def test_gradient_checkpointing_recomputes_activations(offload_gc, lora_adapter):
    eng = offload_gc["engine"]
    assert eng.module.is_activation_checkpointing
    assert eng.module.config.use_cache is False
    # with checkpointing each layer runs twice per step: forward, and again in backward
    assert _layer_calls_per_step(eng) == 2
    # control: a run without the option runs each layer once
    assert not lora_adapter["cfg"].model.gradient_checkpointing
    assert _layer_calls_per_step(lora_adapter["engine"]) == 1


# ----------------------------------------------------------------------------- LoRA
def _expected_lora_params(run) -> int:
    """r * (in + out) for every nn.Linear of the base model that LoRA `all-linear` targets
    (all but the output head)."""
    from transformers import AutoModelForCausalLM

    from rlhf_exp.modeling import models

    cfg = run["cfg"]
    assert list(cfg.model.lora.target_modules) == ["all-linear"]
    base = AutoModelForCausalLM.from_pretrained(models.resolve_base_path(cfg.model))
    head = base.get_output_embeddings()
    return sum(cfg.model.lora.r * (m.in_features + m.out_features) for m in base.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)


def test_lora_trains_only_the_adapter(lora_adapter):
    from rlhf_exp.modeling import models

    module = lora_adapter["engine"].module
    trainable, total = models.count_parameters(module)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    assert trainable == _expected_lora_params(lora_adapter)
    assert trainable < total / 5


def test_lora_merged_checkpoint_is_plain_hf(lora_merged):
    from transformers import AutoModelForCausalLM

    from rlhf_exp.modeling import models

    ckpt = Path(lora_merged["result"].checkpoint)
    files = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors"} <= files
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    merged = AutoModelForCausalLM.from_pretrained(ckpt)
    assert not [n for n in merged.state_dict() if "lora" in n]
    cfg = lora_merged["cfg"]
    base = AutoModelForCausalLM.from_pretrained(models.resolve_base_path(cfg.model))
    ms, bs = merged.state_dict(), base.state_dict()
    # targeted linears moved by B @ A; untargeted weights (embeddings, norms) stayed the base's
    assert (ms["model.layers.0.self_attn.q_proj.weight"]
            - bs["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-5
    assert torch.equal(ms["model.embed_tokens.weight"], bs["model.embed_tokens.weight"])
    assert torch.equal(ms["model.norm.weight"], bs["model.norm.weight"])


def test_lora_adapter_checkpoint_holds_only_the_adapter(lora_adapter, lora_merged):
    from safetensors.torch import load_file

    from rlhf_exp.modeling import models
    from rlhf_exp.training import checkpoint
    from rlhf_exp.training.tracking import resolve_init

    ckpt = Path(lora_adapter["result"].checkpoint)
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert not {"config.json", "model.safetensors"} & files
    weights = load_file(ckpt / "adapter_model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    assert sum(t.numel() for t in weights.values()) == _expected_lora_params(lora_adapter)
    base = json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == models.resolve_base_path(lora_adapter["cfg"].model)
    # a later stage finds it (as a checkpoint, or as its run's final one) and loads base+adapter;
    # same data and seed as the merged run (ZeRO-2 here, ZeRO-3 there): the same weights
    assert checkpoint.is_checkpoint(ckpt)
    assert resolve_init(str(ckpt))[0] == ckpt
    assert resolve_init(lora_adapter["result"].run_dir)[0] == ckpt.resolve()
    tok = lora_adapter["tokenizer"]
    cfg = lora_adapter["cfg"]
    from_adapter = models.load_causal_lm(str(ckpt), tok, cfg.model).state_dict()
    from_merged = models.load_causal_lm(lora_merged["result"].checkpoint, tok,
                                        cfg.model).state_dict()
    assert from_adapter.keys() == from_merged.keys()
    for key, value in from_merged.items():
        torch.testing.assert_close(from_adapter[key], value, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- PPO offload
PPO_TINY = ["stage=ppo", *FAST, "ppo.steps=1", "ppo.rollout_batch_size=8",
            "ppo.micro_batch_size_per_device=8", "ppo.eval_every=0", "ppo.eval_num_prompts=8",
            "ppo.eval_batch_size=8", "logger=none", "zero_stage=zero2"]


@pytest.mark.slow  # DeepSpeed ZeRO-3 engines
def test_ppo_offloads_reference_and_reward_model(tmp_path, monkeypatch):
    """ppo.offload_reference / ppo.offload_reward_model: the frozen models PPO actually uses sit
    on a ZeRO-3 engine whose parameter partitions are offloaded to CPU, while the run's own
    ZeRO stage is 2. (The real `engine.build_frozen` runs; it is only observed.)"""
    from rlhf_exp.stages import ppo
    from rlhf_exp.training import engine

    placed = []

    def observed(model, cfg, *, zero_stage, offload):
        kind = type(model).__name__
        out = real_frozen(model, cfg, zero_stage=zero_stage, offload=offload)
        placed.append((kind, out))
        return out

    real_frozen = engine.build_frozen
    monkeypatch.setattr(engine, "build_frozen", observed)
    cfg = compose(*PPO_TINY, "ppo.offload_reference=true", "ppo.offload_reward_model=true")
    actor, _, result = ppo.train(cfg, tmp_path / "ppo")
    assert result.metrics["ppo/steps"] == 1
    assert actor.zero_optimization_stage() == 2
    kinds = sorted(kind for kind, _ in placed)
    assert kinds == ["LlamaForCausalLM", "LlamaForSequenceClassification"]  # reference, reward
    for kind, module in placed:
        manager = getattr(module, "zero_param_manager", None)
        assert manager is not None, f"{kind} is not on a ZeRO-3 engine"
        assert type(manager).__name__ == "DeepSpeedZeRoOffload"
        assert getattr(manager.offload_device, "value", manager.offload_device) == "cpu", kind
        assert all(hasattr(p, "ds_tensor") for p in module.parameters()), kind
        assert not any(p.requires_grad for p in module.parameters())
