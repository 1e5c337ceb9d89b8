"""Blending sources and splitting them disjointly across the sft / reward / ppo stages."""

from __future__ import annotations

import random
from dataclasses import dataclass

from omegaconf import DictConfig

from rlhf_exp.data.sources import load_source

STAGE_INDEX = {"sft": 0, "reward": 1, "ppo": 2}


@dataclass
class StageData:
    train: list[dict]
    eval: list[dict]


def build_stage_data(data_mix: DictConfig, stage: str, seed: int) -> StageData:
    """The rows of one stage: each source is shuffled by seed, cut into the three stage shares of
    `data_mix.split` (so stages never share a row), and the stage's share split into train and a
    held-out eval slice."""
    shares = [float(s) for s in data_mix.split]
    train, held_out = [], []
    for i, src in enumerate(data_mix.sources):
        rows = load_source(src, seed=seed + 1000 * i)
        rng = random.Random(f"{seed}:{src.name}")
        rng.shuffle(rows)
        bounds = [0]
        for share in shares:
            bounds.append(bounds[-1] + share)
        lo = int(len(rows) * bounds[STAGE_INDEX[stage]] / bounds[-1])
        hi = int(len(rows) * bounds[STAGE_INDEX[stage] + 1] / bounds[-1])
        part = rows[lo:hi]
        n_eval = min(int(len(part) * data_mix.eval_fraction), data_mix.max_eval_examples)
        held_out += part[:n_eval]
        train += part[n_eval:]
    random.Random(seed).shuffle(train)
    return StageData(train=train, eval=held_out)
