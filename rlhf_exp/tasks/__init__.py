"""Tasks whose true (gold) reward is computable. Rows of such a source carry `task: <name>`."""

from __future__ import annotations

from collections.abc import Callable

from rlhf_exp.tasks import sort_digits

GOLD_REWARDS: dict[str, Callable[[str, str], float]] = {"sort_digits": sort_digits.gold_reward}


def gold_reward(task: str | None, prompt: str, response: str) -> float | None:
    """The gold reward in [0, 1] of a response, or None when the row's task has none."""
    fn = GOLD_REWARDS.get(task) if task else None
    return None if fn is None else fn(prompt, response)
