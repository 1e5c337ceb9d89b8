"""Tasks whose true (gold) reward is computable. Rows of such a source carry `task: <name>`."""

from __future__ import annotations

from collections.abc import Callable

from rlhf_exp.tasks import instructions, sort_digits

GOLD_REWARDS: dict[str, Callable[[str, str], float]] = {
    "sort_digits": sort_digits.gold_reward,
    "instructions": instructions.gold_reward,  # constraint following (tasks/instructions.py)
}


def gold_reward(task: str | None, prompt: str, response: str) -> float | None:
    """The gold reward in [0, 1] of a response, or None when the row's task has none."""
    fn = GOLD_REWARDS.get(task) if task else None
    return None if fn is None else fn(prompt, response)


def gold_reward_fn(prompts: list[str], responses: list[str], task: list[str | None] | None = None,
                   **_) -> list[float]:
    """The gold reward as a reward function for the RL stages (`rlhf_exp.tasks:gold_reward_fn`,
    rlhf_exp/rl/rewards.py): rows whose source names no task have no gold reward, an error."""
    tasks = task if task is not None else [None] * len(prompts)
    out = []
    for name, prompt, response in zip(tasks, prompts, responses):
        value = gold_reward(name, prompt, response)
        if value is None:
            raise ValueError(f"the row with prompt {prompt[:40]!r} has no gold reward: its data "
                             "source sets no `task` (data_mix.sources[i].task)")
        out.append(value)
    return out
