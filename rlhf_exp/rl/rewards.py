"""Where the RL stages' rewards come from: a reward model, Python functions, or a weighted sum.

Config (the same keys under `ppo.` and `grpo.`):

    reward_model: <path, run dir or W&B artifact>   # a sequence-classification checkpoint
    reward_model_weight: 1.0                         # 0 = no reward model at all (none loaded)
    reward_functions:                                # any number, each weighted
      - fn: rlhf_exp.tasks:gold_reward_fn
        weight: 1.0

A reward function is named `package.module:function` and called once per batch of responses:

    fn(prompts: list[str], responses: list[str], **columns) -> list[float]

where `columns` are the rows' other fields as lists of the same length (`task`, `id`,
`source`, `chosen`, ...: whatever the data_mix's rows carry), TRL's convention. The score of a
response is reward_model_weight * reward-model score + sum of weight_i * fn_i(...). The bundled
task's gold reward is the function `rlhf_exp.tasks:gold_reward_fn`.

Every function is imported and called once on a few real rows before any model loads (`load`),
so a bad name, a function that raises or one that returns the wrong thing stops the run with one
line.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rlhf_exp.errors import RewardFunctionError

ROW_FIELDS_SKIPPED = ("prompt", "messages")  # prompts are passed as `prompts`


@dataclass
class RewardFunction:
    spec: str  # "package.module:function"
    fn: Callable[..., Sequence[float]]
    weight: float

    @property
    def name(self) -> str:
        """The function's name, as its metrics are named (`<stage>/reward_fn/<name>`)."""
        return self.spec.rsplit(":", 1)[-1]


def import_function(spec: str, key: str) -> Callable[..., Sequence[float]]:
    """`package.module:function` -> the callable; one-line error naming `key` otherwise."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardFunctionError(f"{key}={spec!r}: name a function as 'package.module:function' "
                                  "(e.g. rlhf_exp.tasks:gold_reward_fn)")
    # a module may fail on import in any way, even exit: argparse at import parses rlhf-exp's
    # own command line and exits with a usage message that blames rlhf-exp's arguments; its
    # output is held back and the function named instead
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            module = importlib.import_module(module_name)
    except SystemExit as exc:
        last = (said.getvalue().strip().splitlines() or [""])[-1][:160]
        raise RewardFunctionError(
            f"{key}={spec!r}: importing module {module_name!r} exited (SystemExit {exc.code}"
            f"{': ' + repr(last) if last else ''}); does it parse the command line (argparse) at "
            "import? Move that under `if __name__ == '__main__':`") from None
    except Exception as exc:  # ImportError, or the module itself failing on import
        raise RewardFunctionError(f"{key}={spec!r}: cannot import module {module_name!r} "
                                  f"({type(exc).__name__}: {exc})") from None
    if said.getvalue():  # what a module that imported fine printed, shown as it would be
        sys.stderr.write(said.getvalue())
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardFunctionError(f"{key}={spec!r}: module {module_name!r} has no function "
                                  f"{attr!r}")
    return fn


def columns(rows: list[dict]) -> dict[str, list]:
    """The rows' fields (other than the prompt) as lists: the keyword arguments of a call."""
    keys = [k for k in rows[0] if k not in ROW_FIELDS_SKIPPED] if rows else []
    return {k: [row.get(k) for row in rows] for k in keys}


def call(function: RewardFunction, rows: list[dict], responses: list[str],
         key: str = "reward_functions") -> list[float]:
    """One batch through one function, its output checked: a finite number per response."""
    try:
        out = function.fn([r["prompt"] for r in rows], list(responses), **columns(rows))
    except (Exception, SystemExit) as exc:  # sys.exit() in a reward function: no silent stop
        raise RewardFunctionError(f"{key}: {function.spec} raised {type(exc).__name__}: {exc}") \
            from None
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise RewardFunctionError(f"{key}: {function.spec} must return a list of numbers, got "
                                  f"{type(out).__name__}") from None
    if len(values) != len(rows):
        raise RewardFunctionError(f"{key}: {function.spec} returned {len(values)} values for "
                                  f"{len(rows)} responses")
    if not all(math.isfinite(v) for v in values):
        raise RewardFunctionError(f"{key}: {function.spec} returned a NaN or infinite reward")
    return values


def load(nodes, key: str, sample_rows: list[dict]) -> list[RewardFunction]:
    """Import each configured function and call it once on `sample_rows` (with their reference
    responses, or empty ones for prompt-only rows), before any model loads."""
    functions = []
    for i, node in enumerate(nodes):
        where = f"{key}[{i}].fn"
        functions.append(RewardFunction(str(node.fn), import_function(str(node.fn), where),
                                        float(node.weight)))
        responses = [r.get("response") or r.get("chosen") or "" for r in sample_rows]
        call(functions[-1], sample_rows, responses, where)
    return functions


def function_scores(functions: list[RewardFunction], rows: list[dict], responses: list[str],
                    device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """([n] the weighted sum of every function's rewards, {name: mean reward} for logging)."""
    total = torch.zeros(len(rows), dtype=torch.float32, device=device)
    means = {}
    for function in functions:
        values = torch.tensor(call(function, rows, responses), dtype=torch.float32,
                              device=device)
        total += function.weight * values
        means[function.name] = float(values.mean()) if len(values) else 0.0
    return total, means
