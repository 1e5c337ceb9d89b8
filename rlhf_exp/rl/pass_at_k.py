"""pass@k and mean@N of a policy on prompts with a gold reward, from N samples per prompt.

A sample passes when its gold reward is >= a threshold (`eval.pass_threshold`; 1.0: exactly
right). With n samples of a prompt of which c pass, the unbiased estimate of "at least one of k
samples passes" is 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code", eq. 1); pass@k is its mean over the prompts. mean@N is the mean gold reward over
all N samples of all prompts. `pass_at_k` computes the estimate as the paper's numpy code does,
as a product of ratios: C(n, k) itself overflows floats for n in the hundreds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without replacement,
    hold at least one of the c passing ones. Needs 0 <= c <= n and 1 <= k <= n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a passing sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass(frozen=True)
class PassAtK:
    """How many samples per prompt, which k to report, and what passes (`eval.num_samples`,
    `eval.pass_k`, `eval.pass_threshold`)."""

    num_samples: int = 1  # N: sample 0 is the evaluator's usual one, 1..N-1 are extra
    ks: tuple[int, ...] = (1,)
    threshold: float = 1.0  # a sample passes when its gold reward >= threshold

    @classmethod
    def from_node(cls, node) -> PassAtK:
        """From the eval node: `pass_k` null means k = 1 and k = N."""
        n = int(node.num_samples)
        ks = [1, n] if node.pass_k is None else [int(k) for k in node.pass_k]
        return cls(n, tuple(sorted(set(ks))), float(node.pass_threshold))

    def metric_names(self) -> list[str]:
        """`pass@<k>` for each k, then `mean@<N>`."""
        return [f"pass@{k}" for k in self.ks] + [f"mean@{self.num_samples}"]


def prompt_sums(golds_per_prompt: list[list[float]], spec: PassAtK) -> list[float]:
    """Per-prompt sums over the prompts (each: its N gold rewards), in `metric_names` order:
    the sum of each k's pass@k estimate, then the sum of the prompts' mean gold. Divided by the
    number of prompts they are the metrics (summed first, so ranks can add theirs)."""
    sums = [0.0] * (len(spec.ks) + 1)
    for golds in golds_per_prompt:
        n = len(golds)
        c = sum(g >= spec.threshold for g in golds)
        for i, k in enumerate(spec.ks):
            sums[i] += pass_at_k(n, c, k)
        sums[-1] += sum(golds) / n
    return sums
