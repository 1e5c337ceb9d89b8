"""Blending sources and splitting them disjointly across the sft / reward / ppo stages.

For every source (shuffled once by seed and its name, the same for every stage):
    1. stage slices: its rows are cut by `data_mix.split` (e.g. 2,4,4 = 20% sft, 40% reward,
       40% ppo), so no row is ever seen by two stages;
    2. held-out eval: the first `eval_fraction` of its stage slice (at most
       `max_eval_examples` x its weight share), never trained on;
    3. weighted blend: the stage's training set has as many examples as the sources' training
       slices together, and source i supplies weight_i / sum(weights) of them - a source with
       more rows than its share is subsampled, one with fewer is repeated (its slice cycles;
       repetition stays inside the stage).
A source with `eval_only: true` (e.g. prompts of held-out topics) skips all three: its rows, up
to its weight share of `max_eval_examples`, go to every stage's held-out eval, none to training;
its weight does not count in the training blend.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from omegaconf import DictConfig

from rlhf_exp.data.sources import DataError, load_source
from rlhf_exp.registry import SHARES

# share name -> its place in data_mix.split (`stage` below names a share: sft, reward, ppo)
STAGE_INDEX = {share: i for i, share in enumerate(SHARES)}


@dataclass
class StageData:
    train: list[dict]
    eval: list[dict]


def stage_slice(n: int, split: list[float], stage: str) -> tuple[int, int]:
    """[lo, hi) of a source's n shuffled rows that belong to `stage`."""
    bounds = [0.0]
    for share in split:
        bounds.append(bounds[-1] + share)
    s = STAGE_INDEX[stage]
    return int(n * bounds[s] / bounds[-1]), int(n * bounds[s + 1] / bounds[-1])


def quotas(sizes: list[int], weights: list[float]) -> list[int]:
    """Rows each source supplies to a blend of sum(sizes) rows in proportion to `weights`
    (largest remainders, so the quotas add up exactly)."""
    total, wsum = sum(sizes), sum(weights)
    exact = [total * w / wsum for w in weights]
    out = [int(x) for x in exact]
    for i in sorted(range(len(out)), key=lambda i: exact[i] - out[i], reverse=True):
        if sum(out) >= total:
            break
        out[i] += 1
    return out


def _take(rows: list[dict], k: int) -> list[dict]:
    """The first k rows, cycling through them when k > len(rows)."""
    reps, rest = divmod(k, len(rows))
    return rows * reps + rows[:rest]


def build_stage_data(data_mix: DictConfig, stage: str, seed: int) -> StageData:
    """The rows of one stage: the weighted blend of every source's disjoint share of the data
    (module docstring). Deterministic given the seed and the config."""
    split = [float(s) for s in data_mix.split]
    weights = [float(src.weight) for src in data_mix.sources]
    wsum = sum(weights)
    trains, held_out, train_sources = [], [], []
    for i, src in enumerate(data_mix.sources):
        rows = load_source(src, seed=seed + 1000 * i)
        random.Random(f"{seed}:{src.name}").shuffle(rows)
        cap = int(data_mix.max_eval_examples * weights[i] / wsum)
        if src.get("eval_only", False):  # evaluated by every stage, trained on by none
            held_out += rows[:cap]
            continue
        lo, hi = stage_slice(len(rows), split, stage)
        part = rows[lo:hi]
        if not part and split[STAGE_INDEX[stage]] > 0:
            raise DataError(f"source {src.name!r} has {len(rows)} rows: too few to give the "
                            f"{stage} stage its share of data_mix.split={split}")
        n_eval = min(int(len(part) * data_mix.eval_fraction), cap)
        held_out += part[:n_eval]
        trains.append(part[n_eval:])
        train_sources.append(src)
    train: list[dict] = []
    if len(trains) == 1:  # a single source: all of its slice, as it is
        train = trains[0]
    else:
        for src, rows, k in zip(train_sources, trains, quotas(
                [len(t) for t in trains], [float(src.weight) for src in train_sources])):
            if k and not rows:
                raise DataError(f"source {src.name!r} has no {stage} rows left after the eval "
                                "slice; add rows or lower data_mix.eval_fraction")
            train += _take(rows, k) if k else []
    random.Random(seed).shuffle(train)
    return StageData(train=train, eval=held_out)


def require_pairs(data: StageData, data_mix: DictConfig, stage: str = "reward") -> int:
    """The reward and DPO stages train on preference pairs (the reward share): stop when none
    of the training rows has chosen + rejected. Returns how many rows have no pair (the stage
    skips them)."""
    unpaired = sum(row["chosen"] is None or row["rejected"] is None for row in data.train)
    if unpaired == len(data.train):
        names = ", ".join(f"{s.name} ({s.format})" for s in data_mix.sources)
        raise DataError(f"data_mix {data_mix.name!r}: no preference pairs for the {stage} "
                        f"stage in sources {names}; it needs chosen/rejected (formats "
                        "preference, hh, or chat with chosen/rejected)")
    return unpaired
