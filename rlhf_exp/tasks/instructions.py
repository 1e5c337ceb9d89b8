"""A verifiable instruction-following task for chat models (in the spirit of IFEval and the
RL-with-verifiable-rewards stage of Tulu 3).

    prompt:   "Write one sentence about owls. Use only lowercase letters. Do not use any commas."
    response: "owls are quiet hunters that fly at night."            -> gold reward 1.0

A prompt is a request about a topic followed by one or two constraints, each one sentence in a
fixed phrasing (CONSTRAINTS), so the checker parses them back from the prompt text: the gold
reward keeps the `gold_reward(prompt, response)` interface of every task (rlhf_exp/tasks).
Constraints in one prompt never contradict each other (`compatible`).

Train and held-out prompts come from disjoint topics (`split_topics`, fixed by a seed).

The gold reward is the share of constraints met, in [0, 1], and 0 for a degenerate answer
(`degenerate`): empty or too short, unfinished, the prompt copied back, off topic, or one
phrase repeated. An answer cannot score by saying nothing. docs/instructions.md lists the rules.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

# ----------------------------------------------------------------------------- topics
# (phrase used in the prompt, word stems that count as mentioning it: a word starting with a stem)
TOPICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("owls", ("owl",)), ("dolphins", ("dolphin",)), ("elephants", ("elephant",)),
    ("bees", ("bee",)), ("penguins", ("penguin",)), ("horses", ("horse",)),
    ("cats", ("cat",)), ("dogs", ("dog",)), ("whales", ("whale",)), ("foxes", ("fox",)),
    ("turtles", ("turtle", "tortoise")), ("butterflies", ("butterfl",)),
    ("Paris", ("paris",)), ("Tokyo", ("tokyo",)), ("London", ("london",)),
    ("Rome", ("rome", "roman")), ("Cairo", ("cairo",)), ("New York", ("new york",)),
    ("Sydney", ("sydney",)), ("Venice", ("venice", "venetian")),
    ("bread", ("bread",)), ("cheese", ("chees",)), ("apples", ("apple",)),
    ("rice", ("rice",)), ("chocolate", ("chocolate",)), ("soup", ("soup",)),
    ("pizza", ("pizza",)), ("honey", ("honey",)), ("coffee", ("coffee",)), ("tea", ("tea",)),
    ("gardening", ("garden",)), ("chess", ("chess",)), ("painting", ("paint",)),
    ("cycling", ("cycl", "bike", "bicycl")), ("swimming", ("swim",)), ("hiking", ("hik",)),
    ("reading", ("read", "book")), ("cooking", ("cook",)), ("fishing", ("fish",)),
    ("photography", ("photo", "camera")), ("music", ("music",)), ("dancing", ("danc",)),
    ("the ocean", ("ocean", "sea")), ("the moon", ("moon", "lunar")),
    ("mountains", ("mountain",)), ("rivers", ("river",)), ("forests", ("forest",)),
    ("deserts", ("desert",)), ("volcanoes", ("volcan",)), ("rain", ("rain",)),
    ("snow", ("snow",)), ("the sun", ("sun", "solar")), ("clouds", ("cloud",)),
    ("trains", ("train",)), ("bicycles", ("bicycl", "bike")), ("ships", ("ship",)),
    ("computers", ("computer",)), ("libraries", ("librar",)), ("bridges", ("bridge",)),
    ("clocks", ("clock",)), ("umbrellas", ("umbrella",)), ("castles", ("castle",)),
)
TOPIC_STEMS = dict(TOPICS)


def split_topics(seed: int, heldout_share: float = 0.25) -> tuple[list[str], list[str]]:
    """(train topics, held-out topics): a seeded shuffle of TOPICS cut in two, disjoint."""
    names = [t for t, _ in TOPICS]
    random.Random(f"instructions-topics:{seed}").shuffle(names)
    n_heldout = max(1, round(len(names) * heldout_share))
    return sorted(names[n_heldout:]), sorted(names[:n_heldout])


# ----------------------------------------------------------------------------- requests
ONE_SENTENCE = "Write one sentence about {topic}."
REQUESTS = (ONE_SENTENCE, "Write a short answer about {topic}.", "Tell me about {topic}.",
            "Describe {topic} briefly.")
_REQUEST_RES = [re.compile("^" + re.escape(r).replace(r"\{topic\}", "(?P<topic>.+?)"))
                for r in REQUESTS]


# ----------------------------------------------------------------------------- constraints
@dataclass(frozen=True)
class Constraint:
    kind: str
    arg: str | int | None = None

    def text(self) -> str:
        return CONSTRAINTS[self.kind].format(arg=self.arg)


# kind -> its sentence in a prompt; {arg} is a number or a quoted phrase. Every sentence parses
# back unambiguously (`parse_prompt`), so a prompt carries all that the checker needs.
CONSTRAINTS = {
    "lowercase": "Use only lowercase letters.",
    "max_words": "Use at most {arg} words.",
    "min_words": "Use at least {arg} words.",
    "include_word": 'Include the word "{arg}".',
    "avoid_word": 'Do not use the word "{arg}".',
    "start_with": 'Start your answer with "{arg}".',
    "end_with": 'End your answer with "{arg}"',  # the phrase ends with its own full stop
    "no_commas": "Do not use any commas.",
    "quoted": "Wrap your whole answer in double quotes.",
    "n_sentences": "Answer in exactly {arg} sentences.",
}
ARGS: dict[str, tuple] = {
    "max_words": (12, 15, 20, 25),
    "min_words": (12, 15, 20),
    "include_word": ("because", "often", "many", "small", "beautiful", "important", "people",
                     "every", "usually", "water"),
    "avoid_word": ("the", "is", "and", "very", "are", "of"),
    "start_with": ("Here is", "Did you know", "I think", "In short", "Fun fact:"),
    "end_with": ("That is all.", "The end.", "Thank you.", "Have a nice day!"),
    "n_sentences": (2, 3),
}
# pairs of kinds that never share a prompt: the same property twice, a contradiction (capitalised
# start/end phrases vs lowercase), or an undefined case (a start/end phrase inside quotes)
EXCLUSIVE = {frozenset(p) for p in (
    ("max_words", "min_words"), ("include_word", "avoid_word"), ("lowercase", "start_with"),
    ("lowercase", "end_with"), ("quoted", "start_with"), ("quoted", "end_with"),
    ("start_with", "end_with"), ("n_sentences", "max_words"),
)}
_ARG_RE = {"max_words": r"(\d+)", "min_words": r"(\d+)", "n_sentences": r"(\d+)"}
_CONSTRAINT_RES = {
    kind: re.compile(re.escape(text).replace(re.escape("{arg}"), _ARG_RE.get(kind, '([^"]+)')))
    for kind, text in CONSTRAINTS.items()
}


def words(text: str) -> list[str]:
    """The words of a text: runs of letters/digits, with inner apostrophes and hyphens."""
    return re.findall(r"[^\W_]+(?:['’-][^\W_]+)*", text)


def _norm_words(text: str) -> list[str]:
    return [w.lower() for w in words(text)]


def sentences(text: str) -> list[str]:
    """Sentences: text cut after . ! ? (runs of them, and closing quotes) before a space or the
    end; pieces without a word are dropped."""
    parts = re.split(r"(?<=[.!?])[\"'”’)]*\s+", text.strip())
    return [p for p in parts if words(p)]


def compatible(constraints: list[Constraint], request: str) -> bool:
    """Whether a request and its constraints can all be met at once."""
    kinds = [c.kind for c in constraints]
    if len(set(kinds)) != len(kinds):
        return False
    if any(frozenset((a, b)) in EXCLUSIVE for i, a in enumerate(kinds) for b in kinds[i + 1:]):
        return False
    if "n_sentences" in kinds and request == ONE_SENTENCE:
        return False
    avoid = {str(c.arg) for c in constraints if c.kind == "avoid_word"}
    phrases = " ".join(str(c.arg) for c in constraints if c.kind in ("start_with", "end_with"))
    return not avoid & set(_norm_words(phrases))


def make_prompt(topic: str, request: str, constraints: list[Constraint]) -> str:
    return " ".join([request.format(topic=topic), *(c.text() for c in constraints)])


@dataclass(frozen=True)
class Instruction:
    topic: str
    constraints: tuple[Constraint, ...]
    request: str  # the request sentence, topic filled in


def parse_prompt(prompt: str) -> Instruction | None:
    """The topic and constraints of a task prompt, or None if the text is not one. The inverse
    of make_prompt: every sentence after the request must be a known constraint."""
    text = prompt.strip()
    for rx in _REQUEST_RES:
        m = rx.match(text)
        if m:
            break
    else:
        return None
    topic, rest = m.group("topic"), text[m.end():].strip()
    found = []
    while rest:
        for kind, rx in _CONSTRAINT_RES.items():
            c = rx.match(rest)
            if c:
                arg = c.group(1) if c.groups() else None
                found.append(Constraint(kind, int(arg) if kind in _ARG_RE else arg))
                rest = rest[c.end():].strip()
                break
        else:
            return None
    return Instruction(topic=topic, constraints=tuple(found), request=text[:m.end()])


# ----------------------------------------------------------------------------- generation
def sample_constraints(rng: random.Random, request: str) -> list[Constraint]:
    """One or two compatible constraints (two in about 60% of prompts)."""
    n = 2 if rng.random() < 0.6 else 1
    while True:
        kinds = rng.sample(sorted(CONSTRAINTS), n)
        out = [Constraint(k, rng.choice(ARGS[k]) if k in ARGS else None) for k in kinds]
        if compatible(out, request):
            return out


def make_prompts(split: str, n: int, seed: int) -> list[dict]:
    """`n` prompts of one split ("train" or "heldout") as rows {prompt, topic, constraints}:
    topics from that split's share (split_topics), cycled so each is used about as often."""
    train, heldout = split_topics(seed)
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: use 'train' or 'heldout'")
    topics = train if split == "train" else heldout
    rng = random.Random(f"instructions:{seed}:{split}")
    rows, order = [], []
    for _ in range(n):
        if not order:
            order = rng.sample(topics, len(topics))
        topic = order.pop()
        request = rng.choice(REQUESTS)
        constraints = sample_constraints(rng, request)
        rows.append({"prompt": make_prompt(topic, request, constraints), "topic": topic,
                     "constraints": [c.kind for c in constraints]})
    return rows


# ----------------------------------------------------------------------------- the checker
MIN_WORDS = 3  # an answer needs a subject, a verb and something about the topic
TERMINAL = ".!?"
CLOSERS = "\"'”’)]*_ "
QUOTES = ('"', "“", "”")


def met(c: Constraint, response: str) -> bool:
    """Whether `response` (already stripped) meets one constraint."""
    text = response
    if c.kind == "lowercase":
        return not any(ch.isupper() for ch in text)
    if c.kind == "max_words":
        return len(words(text)) <= int(c.arg)
    if c.kind == "min_words":
        return len(words(text)) >= int(c.arg)
    if c.kind == "include_word":
        return str(c.arg).lower() in _norm_words(text)
    if c.kind == "avoid_word":
        return str(c.arg).lower() not in _norm_words(text)
    if c.kind == "start_with":
        return text.lower().startswith(str(c.arg).lower())
    if c.kind == "end_with":
        return text.lower().endswith(str(c.arg).lower())
    if c.kind == "no_commas":
        return "," not in text and "，" not in text
    if c.kind == "quoted":
        return len(text) > 2 and text[0] in QUOTES and text[-1] in QUOTES
    if c.kind == "n_sentences":
        return len(sentences(text)) == int(c.arg)
    raise ValueError(f"unknown constraint kind {c.kind!r}")


def mentions(topic: str, response: str) -> bool:
    """Whether the response names the topic: a word starting with one of its stems."""
    stems = TOPIC_STEMS.get(topic) or (topic.lower().split()[-1],)
    low = " ".join(_norm_words(response))
    return any(re.search(r"\b" + re.escape(s), low) for s in stems)


def _ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def copies_prompt(prompt: str, response: str) -> bool:
    """The prompt (or most of the answer) copied from the prompt: the whole prompt inside the
    answer, or at least half of the answer's word trigrams taken from the prompt."""
    p, r = _norm_words(prompt), _norm_words(response)
    if " ".join(p) in " ".join(r):
        return True
    n = min(3, len(r))
    grams = _ngrams(r, n)
    source = set(_ngrams(p, n))
    return bool(grams) and sum(g in source for g in grams) * 2 >= len(grams)


def repetitive(response: str) -> bool:
    """One phrase looping: a sentence said twice, or a word n-gram (n = 1..4) said at least
    three times whose copies make up half the words or more."""
    said = [" ".join(_norm_words(s)) for s in sentences(response)]
    if len(said) != len(set(said)):
        return True
    ws = _norm_words(response)
    for n in range(1, 5):
        counts = Counter(_ngrams(ws, n))
        if counts:
            top = max(counts.values())
            if top >= 3 and top * n * 2 >= len(ws):
                return True
    return False


def unfinished(response: str) -> bool:
    """Cut off: the last character, after closing quotes and brackets, is not . ! or ?"""
    tail = response.rstrip(CLOSERS)
    return not tail or tail[-1] not in TERMINAL


def degenerate(instruction: Instruction, prompt: str, response: str) -> str | None:
    """Why an answer scores 0 whatever its constraints, or None."""
    text = response.strip()
    if not any(ch.isalnum() for ch in text):
        return "empty"
    if len(words(text)) < MIN_WORDS:
        return "too short"
    if unfinished(text):
        return "unfinished"
    if copies_prompt(prompt, text):
        return "copies the prompt"
    if not mentions(instruction.topic, text):
        return "off topic"
    if repetitive(text):
        return "repetitive"
    return None


@dataclass
class Verdict:
    score: float  # share of constraints met, 0 for a degenerate answer
    met: dict[str, bool]  # constraint kind -> met
    reason: str | None  # why it is degenerate, else None


def check(prompt: str, response: str) -> Verdict:
    """The full verdict on one answer: which constraints it meets and whether it is degenerate."""
    instruction = parse_prompt(prompt)
    if instruction is None:
        raise ValueError(f"not an instructions prompt: {prompt[:80]!r}")
    text = response.strip()
    hits = {c.kind: met(c, text) for c in instruction.constraints}
    reason = degenerate(instruction, prompt, text)
    share = sum(hits.values()) / len(hits) if hits else 1.0
    return Verdict(score=0.0 if reason else share, met=hits, reason=reason)


def gold_reward(prompt: str, response: str) -> float:
    """Share of the prompt's constraints the response meets; 0 for a degenerate answer."""
    return check(prompt, response).score
