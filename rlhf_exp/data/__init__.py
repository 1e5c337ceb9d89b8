"""Data layer: sources -> one internal row schema -> per-stage disjoint splits -> token features.

A row is a dict with `prompt` (str) and, as the source provides them, `response`, `chosen`,
`rejected` (str), plus `source` (its name) and `task` (name of a gold reward, or None).
"""

from rlhf_exp.data.mix import StageData, build_stage_data

__all__ = ["StageData", "build_stage_data"]
