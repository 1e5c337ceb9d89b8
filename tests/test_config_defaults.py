"""One source of truth for defaults: the YAML in conf/ and the schemas in rlhf_exp/config agree.

For every config group option and per-stage node, every YAML key must exist in the schema; for
the options the app composes by default (conf/config.yaml's defaults list) every value the YAML
sets must equal the schema's default (interpolations compared resolved). Non-default options
(`zero_stage=zero3`, `hardware=1gpu`, ...) change values on purpose, so only their keys are
checked.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from omegaconf import MISSING, OmegaConf

from rlhf_exp import config as schema
from tests.conftest import ROOT, compose

CONF = ROOT / "conf"


def _schema_nodes() -> tuple[dict[str, type], tuple[str, ...]]:
    """RootConfig's nodes, read from the schema itself: a node without a default is a group
    (an option is chosen: model, stage, ...) -> its dataclass; one with a default is a
    per-stage node (sft, ppo, grpo, ...) whose defaults are RootConfig's."""
    hints = typing.get_type_hints(schema.RootConfig)
    groups, nodes = {}, []
    for f in dataclasses.fields(schema.RootConfig):
        cls = _dataclass_of(hints[f.name])
        if cls is None:
            continue
        if f.default is MISSING:
            groups[f.name] = cls
        else:
            nodes.append(f.name)
    return groups, tuple(nodes)


def _default_choices() -> dict[str, str]:
    """conf/config.yaml's defaults list: group -> option."""
    choices = {}
    for entry in OmegaConf.load(CONF / "config.yaml").defaults:
        if isinstance(entry, str) or entry is None:
            continue
        for key, value in OmegaConf.to_container(entry).items():
            if value is not None and not key.startswith("optional "):
                choices[key] = value
    return choices


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass inside `tp` (X, X | None, list[X]), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        found = _dataclass_of(arg)
        if found is not None:
            return found
    return None


def _is_list(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(tp))
    return origin is list


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _walk(yaml: Any, cls: type, default: Any, key: str, where: str, resolved: Any,
          compare: bool, problems: list[str]) -> None:
    """Check the YAML mapping `yaml` against dataclass `cls` whose default instance is
    `default`; `resolved` is the same node in the composed config (for interpolations)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in yaml.items():
        path = f"{key}.{name}"
        if name not in fields:
            problems.append(f"{where}: {path} is not in the schema {cls.__name__}")
            continue
        tp = hints[name]
        want = getattr(default, name) if default is not None else _field_default(fields[name])
        got_resolved = resolved.get(name) if resolved is not None else None
        inner = _dataclass_of(tp)
        if inner is not None and isinstance(value, dict):
            _walk(value, inner, want if isinstance(want, inner) else inner(), path, where,
                  got_resolved, compare, problems)
        elif inner is not None and _is_list(tp) and isinstance(value, list):
            for i, item in enumerate(value):  # e.g. data_mix.sources: each against the element
                _walk(item, inner, inner(), f"{path}[{i}]", where,
                      got_resolved[i] if got_resolved is not None else None, compare, problems)
        elif compare and want is not MISSING:
            if isinstance(value, str) and value.startswith("${"):
                value = got_resolved  # an interpolation: compare what it resolves to
            if isinstance(value, (dict, list)):
                value = OmegaConf.to_container(OmegaConf.create(value))
            if value != want:
                problems.append(f"{where}: {path} = {value!r}, schema {cls.__name__}.{name} "
                                f"= {want!r}")


GROUPS, NODES = _schema_nodes()


def drift(root_default: schema.RootConfig | None = None) -> list[str]:
    """Every disagreement between conf/ and rlhf_exp/config (or `root_default`, a changed
    schema), as readable lines."""
    problems: list[str] = []
    composed = OmegaConf.to_container(compose(), resolve=True)
    choices = _default_choices()
    root_default = root_default or schema.RootConfig()
    # the top-level keys of conf/config.yaml
    top = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml")).items()
           if k not in ("defaults", "hydra")}
    _walk(top, schema.RootConfig, root_default, "", "conf/config.yaml", composed, True, problems)
    for node in NODES:
        yaml = OmegaConf.to_container(OmegaConf.load(CONF / node / "default.yaml"))
        cls = type(getattr(root_default, node))
        _walk(yaml, cls, getattr(root_default, node), node, f"conf/{node}/default.yaml",
              composed[node], True, problems)
    for group, cls in GROUPS.items():
        for path in sorted((CONF / group).glob("*.yaml")):
            is_default = path.stem == choices.get(group)
            yaml = OmegaConf.to_container(OmegaConf.load(path))
            where = f"conf/{group}/{path.name}"
            if "# @package _global_" in path.read_text():  # keys from the root (e.g. slurm)
                yaml = {k: v for k, v in yaml.items() if k not in ("defaults", "hydra")}
                _walk(yaml, schema.RootConfig, root_default, "", where, None, False, problems)
                continue
            _walk(yaml, cls, cls(), group, where, composed[group] if is_default else None,
                  is_default, problems)
    return [p.replace(": .", ": ") for p in problems]


def test_yaml_and_schema_defaults_agree():
    problems = drift()
    assert not problems, "conf/ and rlhf_exp/config disagree:\n" + "\n".join(problems)


def test_drift_check_sees_a_changed_default():
    """The check can fail: a schema default that differs from the YAML is reported by key."""
    changed = dataclasses.replace(schema.RootConfig(), sft=schema.SFTConfig(lr=1.0))
    assert drift(changed) == ["conf/sft/default.yaml: sft.lr = 0.003, schema SFTConfig.lr = 1.0"]


@pytest.mark.parametrize("name", ["GenerationSettings", "GenerationConfig"])
def test_generation_settings_are_declared_once(name):
    from rlhf_exp.rl import generation

    assert schema.GenerationSettings is getattr(generation, name)
    assert schema.KL_ESTIMATORS is importlib.import_module("rlhf_exp.rl.ppo_math").KL_ESTIMATORS


def test_the_walk_covers_every_node_of_the_schema():
    """The nodes are the schema's own, not a hand-written list (one missed grpo)."""
    assert set(GROUPS) == {"model", "stage", "zero_stage", "hardware", "data_mix", "logger"}
    assert set(NODES) == {"sft", "reward", "ppo", "grpo", "dpo", "kto", "eval", "chat"}
    for node in NODES:
        assert (CONF / node / "default.yaml").is_file(), node


def test_drift_check_sees_a_changed_grpo_default():
    changed = dataclasses.replace(schema.RootConfig(), grpo=schema.GRPOConfig(beta=0.5))
    assert drift(changed) == [
        "conf/grpo/default.yaml: grpo.beta = 0.3, schema GRPOConfig.beta = 0.5"]


def test_group_options_exist():
    # the check above walks real files: make sure it found the groups it claims to check
    for group in GROUPS:
        assert list(Path(CONF / group).glob("*.yaml")), group
