"""Sources: where rows come from. Each returns rows in the internal schema (see rlhf_exp.data)."""

from __future__ import annotations

from omegaconf import DictConfig

from rlhf_exp.tasks import sort_digits


def load_source(src: DictConfig, seed: int) -> list[dict]:
    if src.kind == "synthetic":
        task = src.synthetic
        rows = sort_digits.generate(task.num_examples, seed, task.min_digits, task.max_digits,
                                    task.demo_noise)
        for row in rows:
            row["source"], row["task"] = src.name, "sort_digits"
        return rows
    raise NotImplementedError(f"source kind {src.kind!r}")
