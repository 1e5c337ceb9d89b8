"""The bundled task: sort a short string of digits.

    prompt:   "sort:52813="      response: "12358"

The gold reward of a response is the share of positions that hold the right digit,
divided by the longer of the two lengths, so it lies in [0, 1] with partial credit:
"12385" scores 0.6, "1235" scores 0.8, "12358" scores 1.0, "" scores 0.0.

SFT demonstrations are deliberately imperfect: a share `demo_noise` of them carries one or two
mistakes (a swapped pair, a wrong digit, a dropped or doubled digit), so a policy that imitates
them is right only part of the time and RL against a reward model has room to improve on SFT.
Preference pairs hold two candidate responses ranked by the gold reward (ties never appear).
"""

from __future__ import annotations

import random

PREFIX = "sort:"
SUFFIX = "="


def make_prompt(digits: str) -> str:
    return f"{PREFIX}{digits}{SUFFIX}"


def parse_prompt(prompt: str) -> str | None:
    """The digits of a task prompt, or None if the text is not one (other sources)."""
    start = prompt.rfind(PREFIX)
    if start < 0 or not prompt.rstrip().endswith(SUFFIX):
        return None
    digits = prompt.rstrip()[start + len(PREFIX): -len(SUFFIX)]
    return digits if digits.isdigit() else None


def target(digits: str) -> str:
    return "".join(sorted(digits))


def gold_reward(prompt: str, response: str) -> float:
    """Share of positions with the right digit over the longer length; in [0, 1]."""
    digits = parse_prompt(prompt)
    if digits is None:
        raise ValueError(f"not a sort_digits prompt: {prompt!r}")
    want, got = target(digits), response.strip()
    if not got:
        return 0.0
    hits = sum(a == b for a, b in zip(want, got))
    return hits / max(len(want), len(got))


def corrupt(answer: str, rng: random.Random, n_mistakes: int) -> str:
    """Apply n deliberate mistakes; always returns a string different from `answer`."""
    out = list(answer)
    for _ in range(n_mistakes):
        kind = rng.choice(("swap", "replace", "drop", "double"))
        i = rng.randrange(len(out))
        if kind == "swap" and len(out) > 1:
            j = min(i + 1, len(out) - 1) if i + 1 < len(out) else i - 1
            out[i], out[j] = out[j], out[i]
        elif kind == "replace":
            out[i] = rng.choice([d for d in "0123456789" if d != out[i]])
        elif kind == "drop" and len(out) > 1:
            del out[i]
        else:
            out.insert(i, out[i])
    text = "".join(out)
    if text == answer:  # a swap of equal digits changes nothing: force a visible mistake
        text = answer + answer[-1]
    return text


def make_example(rng: random.Random, min_digits: int, max_digits: int, demo_noise: float) -> dict:
    """One row with every field the stages use: prompt, response (SFT demo), chosen, rejected."""
    n = rng.randint(min_digits, max_digits)
    digits = "".join(rng.choice("0123456789") for _ in range(n))
    prompt, answer = make_prompt(digits), target(digits)
    demo = corrupt(answer, rng, rng.randint(1, 2)) if rng.random() < demo_noise else answer
    # Two distinct candidates of different quality; most pairs pit the right answer against a
    # near miss, the rest compare two flawed answers so the reward model learns partial credit.
    a = answer if rng.random() < 0.6 else corrupt(answer, rng, 1)
    b = corrupt(answer, rng, rng.randint(1, 3))
    ra, rb = gold_reward(prompt, a), gold_reward(prompt, b)
    while ra == rb:
        b = corrupt(answer, rng, rng.randint(1, 3))
        rb = gold_reward(prompt, b)
    chosen, rejected = (a, b) if ra > rb else (b, a)
    return {"prompt": prompt, "response": demo, "chosen": chosen, "rejected": rejected}


def generate(num_examples: int, seed: int, min_digits: int = 3, max_digits: int = 7,
             demo_noise: float = 0.6) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(rng, min_digits, max_digits, demo_noise) for _ in range(num_examples)]


# The characters of the task text; the tiny model's tokenizer covers them and printable ASCII.
ALPHABET = "0123456789" + PREFIX + SUFFIX
