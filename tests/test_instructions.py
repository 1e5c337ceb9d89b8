"""The instructions task (rlhf_exp/tasks/instructions.py): prompts, the gold checker on
hand-written answers (hacks included), its use as a reward function and gold metric, the data
builder (rlhf_exp/tasks/build_instructions.py) and the shipped data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_exp import tasks
from rlhf_exp.errors import ConfigError
from rlhf_exp.tasks import build_instructions as builder
from rlhf_exp.tasks import instructions as ins
from rlhf_exp.tasks.instructions import Constraint
from tests.conftest import compose

SHIPPED = Path(ins.__file__).resolve().parent.parent / "data" / "examples" / "instructions"


# ----------------------------------------------------------------------------- prompts
def test_topics_split_disjoint_and_seeded():
    assert len(ins.TOPICS) >= 60 and len(ins.TOPIC_STEMS) == len(ins.TOPICS)
    train, heldout = ins.split_topics(0)
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(ins.TOPIC_STEMS)
    assert len(heldout) == 16
    assert ins.split_topics(0) == (train, heldout)
    assert ins.split_topics(1)[1] != heldout


def test_prompts_parse_back_and_are_compatible():
    rows = ins.make_prompts("train", 500, seed=3)
    assert rows == ins.make_prompts("train", 500, seed=3)
    train, heldout = ins.split_topics(3)
    kinds = set()
    for row in rows:
        parsed = ins.parse_prompt(row["prompt"])
        assert parsed is not None and parsed.topic == row["topic"] and row["topic"] in train
        assert [c.kind for c in parsed.constraints] == row["constraints"]
        assert 1 <= len(parsed.constraints) <= 2
        assert ins.compatible(list(parsed.constraints), parsed.request.replace(
            parsed.topic, "{topic}"))
        # the prompt is rebuilt exactly from what was parsed: nothing is lost
        request = next(r for r in ins.REQUESTS if r.format(topic=parsed.topic) == parsed.request)
        assert ins.make_prompt(parsed.topic, request, list(parsed.constraints)) == row["prompt"]
        kinds |= set(row["constraints"])
    assert kinds == set(ins.CONSTRAINTS) and len(kinds) >= 8
    assert all(r["topic"] in heldout for r in ins.make_prompts("heldout", 100, seed=3))


def test_contradictions_never_share_a_prompt():
    one = ins.ONE_SENTENCE
    assert not ins.compatible([Constraint("lowercase"), Constraint("start_with", "Here is")], one)
    assert not ins.compatible([Constraint("max_words", 12), Constraint("min_words", 15)], one)
    assert not ins.compatible([Constraint("n_sentences", 2)], one)
    assert not ins.compatible([Constraint("avoid_word", "is"),
                               Constraint("end_with", "That is all.")], one)
    assert not ins.compatible([Constraint("quoted"), Constraint("end_with", "The end.")], one)
    assert ins.compatible([Constraint("lowercase"), Constraint("no_commas")], one)
    assert ins.compatible([Constraint("n_sentences", 3)], "Tell me about {topic}.")


def test_not_a_task_prompt():
    assert ins.parse_prompt("sort:123=") is None
    assert ins.parse_prompt("Write one sentence about owls. Dance a little.") is None
    with pytest.raises(ValueError, match="not an instructions prompt"):
        ins.gold_reward("What is the capital of France?", "Paris.")


# ----------------------------------------------------------------------------- the checker
OWLS = "Write one sentence about owls. Use only lowercase letters. Do not use any commas."
CATS = 'Tell me about cats. Do not use the word "the".'
FOXES = "Describe foxes briefly. Answer in exactly 2 sentences. Use at least 12 words."
PARIS = ('Write a short answer about Paris. Start your answer with "Did you know". '
         'Include the word "because".')
MOON = ("Write one sentence about the moon. Wrap your whole answer in double quotes. "
        "Use at most 12 words.")
TRAINS = 'Tell me about trains. End your answer with "That is all."'


@pytest.mark.parametrize("prompt, response, score, reason", [
    # good answers
    (OWLS, "owls are quiet hunters that fly at night.", 1.0, None),
    (CATS, "Cats sleep for most hours of each day.", 1.0, None),
    (FOXES, "Foxes are clever wild animals. They hunt small prey at night and live in dens.",
     1.0, None),
    (PARIS, "Did you know that Paris is busy because millions of tourists visit it?", 1.0, None),
    (MOON, '"The moon lights up the night sky."', 1.0, None),
    (TRAINS, "Trains carry people and goods across long distances. That is all.", 1.0, None),
    # partly good, and answers that meet no constraint (not degenerate: 0 by the constraints)
    (OWLS, "Owls are quiet hunters that fly at night.", 0.5, None),
    (OWLS, "Owls, the quiet hunters, fly at night.", 0.0, None),
    (CATS, "Cats sleep for most of the day.", 0.0, None),
    (FOXES, "Foxes are clever. They hunt.", 0.5, None),
    (FOXES, "Foxes are clever wild animals that hunt small prey at night and live in dens.",
     0.5, None),
    (PARIS, "Paris is busy because many tourists visit.", 0.5, None),
    (MOON, "The moon lights up the night sky.", 0.5, None),
    (MOON, '"The moon is a bright and beautiful sight that lights up the whole night sky."',
     0.5, None),
    (TRAINS, "Trains carry people and goods across long distances.", 0.0, None),
    # hacks: every one scores 0 whatever constraints it happens to meet
    (OWLS, "", 0.0, "empty"),
    (OWLS, "  \n\t ", 0.0, "empty"),
    (OWLS, "a", 0.0, "too short"),
    (OWLS, "owls.", 0.0, "too short"),
    (MOON, '""', 0.0, "empty"),
    (MOON, '"The moon."', 0.0, "too short"),
    (CATS, ".", 0.0, "empty"),  # avoids the word by saying nothing
    (CATS, "Cats.", 0.0, "too short"),
    (OWLS, OWLS, 0.0, "copies the prompt"),
    (OWLS, OWLS.lower().replace(",", ""), 0.0, "copies the prompt"),
    (TRAINS, "That is all.", 0.0, "copies the prompt"),
    (OWLS, "dolphins are clever animals that live in the sea.", 0.0, "off topic"),
    (OWLS, "yes yes yes yes yes yes.", 0.0, "off topic"),
    (OWLS, "owls owls owls owls owls owls.", 0.0, "repetitive"),
    (OWLS, "owls are nice owls are nice owls are nice.", 0.0, "repetitive"),
    (FOXES, "Foxes are clever wild animals. Foxes are clever wild animals.", 0.0,
     "repetitive"),
    (OWLS, "owls are quiet hunters that fly at", 0.0, "unfinished"),
    (MOON, '"The moon lights up the night sky', 0.0, "unfinished"),
])
def test_checker(prompt, response, score, reason):
    verdict = ins.check(prompt, response)
    assert (verdict.score, verdict.reason) == (score, reason)
    assert ins.gold_reward(prompt, response) == score
    assert tasks.gold_reward("instructions", prompt, response) == score


def test_checker_details():
    """Which constraint failed, and the rules behind word and sentence counts."""
    verdict = ins.check(PARIS, "Paris is busy because many tourists visit.")
    assert verdict.met == {"start_with": False, "include_word": True}
    assert ins.words("It's a well-known fact, isn't it?") == ["It's", "a", "well-known", "fact",
                                                               "isn't", "it"]
    assert len(ins.sentences('One. "Two!" Three? ...')) == 3
    assert ins.mentions("the moon", "A lunar eclipse is rare.")
    assert ins.mentions("New York", "I love new york in spring.")
    assert not ins.mentions("cats", "A dog barked.")


# ----------------------------------------------------------------------------- interfaces
def test_reward_function_and_gold_metric():
    """`rlhf_exp.tasks:gold_reward_fn` as the RL stages call it (rewards.call), and the held-out
    gold metric (evaluation.gold_scores) on rows of task instructions next to another task."""
    from rlhf_exp.rl import evaluation, rewards

    rows = [{"prompt": OWLS, "task": "instructions", "id": "a"},
            {"prompt": CATS, "task": "instructions", "id": "b"},
            {"prompt": "sort:321=", "task": "sort_digits", "id": "c"},
            {"prompt": "Hello there.", "task": None, "id": "d"}]
    answers = ["Owls are quiet hunters that fly at night.", "", "123", "Hi."]
    fn = rewards.RewardFunction("rlhf_exp.tasks:gold_reward_fn", rewards.import_function(
        "rlhf_exp.tasks:gold_reward_fn", "grpo.reward_functions[0].fn"), 1.0)
    assert rewards.call(fn, rows[:3], answers[:3]) == [0.5, 0.0, 1.0]
    assert evaluation.gold_scores(rows, answers) == [0.5, 0.0, 1.0, None]


# ----------------------------------------------------------------------------- builder
def test_select_best_of_n_and_pairs():
    p = OWLS
    sft, pair = builder.select(p, ["a", "b", "c", "d"], [0.5, 1.0, 0.0, 1.0], threshold=1.0)
    assert sft == {"prompt": p, "response": "b", "score": 1.0}  # ties: the earlier answer
    assert (pair["chosen"], pair["rejected"], pair["response"]) == ("b", "c", "b")
    assert (pair["chosen_score"], pair["rejected_score"]) == (1.0, 0.0)
    sft, pair = builder.select(p, ["a", "b"], [0.5, 0.0], threshold=1.0)
    assert sft is None and (pair["chosen"], pair["rejected"]) == ("a", "b")
    sft, pair = builder.select(p, ["a", "b"], [0.5, 0.0], threshold=0.5)
    assert sft["response"] == "a"
    sft, pair = builder.select(p, ["a", "b", "c"], [1.0, 1.0, 1.0], threshold=1.0)
    assert sft["response"] == "a" and pair is None  # all tie: no pair
    assert builder.select(p, ["a", "b"], [0.0, 0.0], threshold=1.0) == (None, None)


@pytest.mark.parametrize("args, match", [
    (["--samples", "1"], r"--samples=1 must be >= 2 \(a pair needs two answers\)"),
    (["--threshold", "0"], r"--threshold=0.0 must be in \(0, 1\]"),
    (["--n-prompts", "0"], r"--n-prompts=0 must be >= 1"),
    (["--top-p", "1.5"], r"--top-p=1.5 must be in \(0, 1\]"),
])
def test_builder_bad_flags(args, match, tmp_path, capsys):
    """One line, exit 2, nothing written, before any model loads."""
    out = tmp_path / "out"
    assert builder.main(["--model", "tiny", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("build_instructions: ")
    assert __import__("re").search(match, err) and not out.exists()


def test_builder_bad_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert builder.main(["--model", "no-such-model", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--model='no-such-model': neither a model directory nor a model preset" in err
    assert "tiny" in err and not out.exists()
    with pytest.raises(ConfigError, match="no config.json"):
        builder.model_node(str(tmp_path))


@pytest.mark.slow
def test_build_on_tiny_model(tmp_path, capsys):
    """The whole command on the tiny model: every file, counts that agree with the scores,
    seeded (a forced rebuild writes the same files), cached (a rerun leaves them alone), and a
    changed setting rebuilds."""
    out = tmp_path / "data"
    args = ["--model", "tiny", "--out", str(out), "--n-prompts", "4", "--n-heldout", "2",
            "--samples", "2", "--heldout-samples", "2", "--max-new-tokens", "8",
            "--batch-prompts", "3", "--seed", "5"]
    assert builder.main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    files = {f: (out / f).read_text() for f in builder.FILES}
    lines = {f: [json.loads(x) for x in text.splitlines()] for f, text in files.items()}
    samples = lines["samples.jsonl"]
    assert len(samples) == 4 * 2 + 2 * 2
    assert manifest["counts"] == {"train_prompts": 4, "heldout_prompts": 2, "samples": 12,
                                  "sft": len(lines["sft.jsonl"]),
                                  "pairs": len(lines["pairs.jsonl"]),
                                  "train": len(lines["train.jsonl"])}
    for s in samples:  # every stored verdict is the checker's
        assert ins.gold_reward(s["prompt"], s["response"]) == s["score"]
    train_topics, heldout_topics = ins.split_topics(5)
    assert {ins.parse_prompt(s["prompt"]).topic for s in samples if s["split"] == "train"} <= \
        set(train_topics)
    assert [r["topic"] for r in lines["heldout.jsonl"]] == \
        [r["topic"] for r in ins.make_prompts("heldout", 2, 5)]
    by_prompt: dict[str, list[float]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], []).append(s["score"])
    # a prompt has a pair exactly when its answers do not all tie, a demo when one passes
    train_prompts = [r["prompt"] for r in ins.make_prompts("train", 4, 5)]
    assert [r["prompt"] for r in lines["pairs.jsonl"]] == [
        p for p in train_prompts if max(by_prompt[p]) > min(by_prompt[p])]
    assert [r["prompt"] for r in lines["sft.jsonl"]] == [
        p for p in train_prompts if max(by_prompt[p]) >= 1.0]
    assert "up to date" not in capsys.readouterr().err

    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert builder.main(args) == 0
    assert "up to date" in capsys.readouterr().err
    assert (out / "manifest.json").stat().st_mtime_ns == stamp

    assert builder.main([*args, "--force"]) == 0
    assert {f: (out / f).read_text() for f in builder.FILES} == files
    assert builder.main([*args[:-1], "6"]) == 0  # another seed: rebuilt
    assert json.loads((out / "manifest.json").read_text())["settings_hash"] != \
        manifest["settings_hash"]
    assert not list(out.glob(".*"))  # no temp file left


# ----------------------------------------------------------------------------- shipped data
def test_shipped_data_agrees_with_the_checker():
    """The prebuilt copy: every pair is ranked by the checker as stored, every demonstration
    passes the threshold, train prompts use train topics and held-out prompts the others."""
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    seed, threshold = manifest["settings"]["seed"], manifest["settings"]["threshold"]
    train_topics, heldout_topics = ins.split_topics(seed)
    assert manifest["train_topics"] == train_topics
    def rows(name: str) -> list[dict]:
        return [json.loads(x) for x in (SHIPPED / name).read_text().splitlines()]

    pairs, demos, both = rows("pairs.jsonl"), rows("sft.jsonl"), rows("train.jsonl")
    assert (len(pairs), len(demos), len(both)) == (manifest["counts"]["pairs"],
                                                   manifest["counts"]["sft"],
                                                   manifest["counts"]["train"])
    assert len(pairs) >= 50 and len(both) >= 20
    for row in pairs:
        good = ins.gold_reward(row["prompt"], row["chosen"])
        assert good == row["chosen_score"] and row["response"] == row["chosen"]
        assert ins.gold_reward(row["prompt"], row["rejected"]) == row["rejected_score"] < good
        assert ins.parse_prompt(row["prompt"]).topic in train_topics
    for row in demos:
        assert ins.gold_reward(row["prompt"], row["response"]) == row["score"] >= threshold
    assert both == [r for r in pairs if r["chosen_score"] >= threshold]
    held = [json.loads(x) for x in (SHIPPED / "heldout.jsonl").read_text().splitlines()]
    assert held and all(r["topic"] in heldout_topics for r in held)


def test_data_mix_preset():
    """`data_mix=instructions` reads the shipped copy: every stage's rows carry the task, so the
    gold reward applies (reward functions, eval_gold_reward); training slices are disjoint and
    every stage's eval slice is the held-out topics' prompts (an eval_only source)."""
    from rlhf_exp.data.mix import build_stage_data

    cfg = compose("data_mix=instructions")
    assert cfg.data_mix.sources[0].path == "pkg://rlhf_exp/data/examples/instructions/pairs.jsonl"
    _, heldout_topics = ins.split_topics(0)
    seen: set[str] = set()
    for stage in ("sft", "reward", "ppo"):
        data = build_stage_data(cfg.data_mix, stage, cfg.seed)
        rows = data.train
        assert rows and all(r["task"] == "instructions" for r in rows + data.eval)
        assert all(tasks.gold_reward(r["task"], r["prompt"], r["chosen"]) >
                   tasks.gold_reward(r["task"], r["prompt"], r["rejected"]) for r in rows)
        ids = {r["id"] for r in rows}
        assert not ids & seen
        seen |= ids
        assert len(data.eval) == 64 and all(
            ins.parse_prompt(r["prompt"]).topic in heldout_topics for r in data.eval), stage
