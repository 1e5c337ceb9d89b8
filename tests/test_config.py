"""Composition of every group option, validation errors, and DeepSpeed config rendering."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_exp.config import ConfigError
from rlhf_exp.training.engine import deepspeed_config
from tests.conftest import ROOT, cli, compose

GROUPS = ["model", "stage", "zero_stage", "hardware", "data_mix", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose(f"{group}={option}")
    if group != "experiment":
        assert cfg[group].name == option
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_defaults_are_the_offline_demo():
    cfg = compose()
    assert (cfg.model.name, cfg.stage.name, cfg.hardware.name, cfg.data_mix.name,
            cfg.logger.name, cfg.logger.mode) == ("tiny", "pipeline", "cpu", "synthetic",
                                                  "wandb", "offline")
    assert cfg.model.path is None and cfg.model.tiny.hidden_size > 0


def test_overrides_reach_nested_keys():
    cfg = compose("stage=ppo", "ppo.kl.coef=0.05", "model.path=/some/dir", "seed=7")
    assert cfg.stage.name == "ppo" and cfg.ppo.kl.coef == 0.05 and cfg.seed == 7
    assert cfg.model.path == "/some/dir"


@pytest.mark.parametrize("zero", options("zero_stage"))
def test_every_zero_stage_renders(zero):
    cfg = compose(f"zero_stage={zero}", "sft.micro_batch_size_per_device=4",
                  "sft.gradient_accumulation_steps=3")
    ds = deepspeed_config(cfg, micro_batch_size=4, grad_accum=3, max_grad_norm=1.0, world_size=2)
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["zero_optimization"]["stage"] == cfg.zero_stage.stage
    assert "auto" not in str(ds)
    if zero == "zero3":
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    if zero == "zero3_offload":
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    else:
        assert "offload_optimizer" not in ds["zero_optimization"]


@pytest.mark.parametrize("overrides,needle", [
    (["hardware.precision=fp8"], "hardware.precision='fp8' is not allowed"),
    (["sft.max_prompt_len=200", "sft.max_len=100"], "sft.max_prompt_len"),
    (["data_mix.split=[1,2]"], "data_mix.split"),
    (["zero_stage=zero2", "zero_stage.offload_param=cpu"], "offload_param needs"),
    (["ppo.rollout_batch_size=10", "ppo.num_minibatches=3"], "divisible"),
])
def test_semantic_validation(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        compose(*overrides)


@pytest.mark.parametrize("args,needle", [
    (["zero_stage=zero9"], "zero_stage=zero9 is not an option of group 'zero_stage'; available: "
                           "zero0, zero1, zero2, zero3, zero3_offload"),
    (["sft.lr=abc"], "sft.lr: Value 'abc' of type 'str' could not be converted to Float"),
    (["hardware.nproc_per_node=two"], "hardware.nproc_per_node"),
    (["sft.no_such_key=1"], "unknown key sft.no_such_key"),
    (["hardware.precision=fp8"], "choose one of: fp32, bf16, fp16"),
])
def test_bad_input_exits_2_with_one_line(args, needle, tmp_path):
    proc = cli(*args, f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr
    assert not Path(f"{tmp_path}/run").exists()  # nothing half-written
