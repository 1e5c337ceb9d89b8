"""Data layer: sources -> one internal row schema -> per-stage disjoint splits -> token features.

A row is a dict with `prompt` (str) and, as the source provides them, `response`, `chosen`,
`rejected` (str or None), plus `id` ("<source>:<index>"), `source` (its name), `task` (name of a
gold reward, or None) and, for hh/chat sources, `messages` (the prompt's turns as
[{role, content}], rendered by a chat template when the tokenizer has one; see
tokenize.render_row). Bad data raises DataError (a UserError: one line, exit 2).
See docs/data.md.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from rlhf_exp.data.mix import StageData, build_stage_data
from rlhf_exp.data.sources import DataError, load_source, resolve_path


def cache_dir(data_mix: DictConfig) -> Path | None:
    """Where tokenized features are cached: `data_mix.cache_dir`, else <RLHF_EXP_CACHE>/data;
    None with `data_mix.cache=false`."""
    if not data_mix.get("cache", True):
        return None
    if data_mix.cache_dir:
        return resolve_path(str(data_mix.cache_dir))
    from rlhf_exp.modeling.model_cache import cache_root

    return cache_root() / "data"


__all__ = ["DataError", "StageData", "build_stage_data", "cache_dir", "load_source",
           "resolve_path"]
