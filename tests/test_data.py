"""The data layer: every format from a small local file, weighted blending with disjoint stage
slices, the tokenized-data cache, bad data through the CLI, and formats round-tripping into real
SFT and reward training steps."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_exp.config import SourceConfig
from rlhf_exp.data import DataError, build_stage_data, cache_dir, load_source
from rlhf_exp.data.sources import resolve_path
from rlhf_exp.data.tokenize import render_row, tokenize_pairs, tokenize_sft
from rlhf_exp.errors import ConfigError
from tests.conftest import cli, compose

HH = [
    {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
     "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A color?\n\nAssistant: Blue.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A color?\n\nAssistant: No."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def source(**kw) -> OmegaConf:
    """A SourceConfig node as composition would build it."""
    return OmegaConf.merge(OmegaConf.structured(SourceConfig(name=kw.pop("name", "src"))), kw)


def sources_override(*specs: dict) -> str:
    """`data_mix.sources=[...]` as a Hydra command-line override."""
    def value(v) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v) if isinstance(v, str) else str(v)
    return f"data_mix.sources=[{', '.join(value(spec) for spec in specs)}]"


# ----------------------------------------------------------------------------- formats
def test_prompt_response_jsonl_with_column_map(tmp_path):
    f = write_jsonl(tmp_path / "pr.jsonl", [{"q": "sort:31=", "a": "13"}, {"q": "hi", "a": "yo"}])
    rows = load_source(source(kind="local", path=str(f), format="prompt_response",
                              columns={"prompt": "q", "response": "a"}), seed=0)
    assert [(r["prompt"], r["response"], r["chosen"]) for r in rows] == [
        ("sort:31=", "13", None), ("hi", "yo", None)]
    assert [r["id"] for r in rows] == ["src:0", "src:1"] and rows[0]["source"] == "src"


def test_preference_json_and_parquet_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prefs = [{"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(3)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps(prefs[:2]))
    pq.write_table(pa.Table.from_pylist(prefs[2:]), tmp_path / "d" / "b.parquet")
    rows = load_source(source(kind="local", path=str(tmp_path / "d"), format="preference",
                              task="sort_digits"), seed=0)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        (p["prompt"], p["chosen"], p["rejected"]) for p in prefs]
    assert rows[0]["response"] == "good0"  # SFT trains on the chosen reply when no response
    assert rows[0]["task"] == "sort_digits"


def test_hh_transcripts_split_into_dialogue_and_replies(tmp_path):
    rows = load_source(source(kind="local", path=str(write_jsonl(tmp_path / "hh.jsonl", HH)),
                              format="hh"), seed=0)
    assert rows[0]["prompt"] == "\n\nHuman: What is 2+2?\n\nAssistant:"
    # replies lose the space after "Assistant:" (the rendered prompt ends with the turn cue)
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("4.", "5.")
    assert rows[1]["messages"] == [{"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello!"},
                                   {"role": "user", "content": "A color?"}]
    # the rm-static layout: the dialogue in `prompt`, only the replies in chosen/rejected
    static = [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hey.", "rejected": " Go."}]
    (row,) = load_source(source(kind="local", format="hh",
                                path=str(write_jsonl(tmp_path / "s.jsonl", static))), seed=0)
    assert (row["prompt"], row["chosen"], row["rejected"]) == (static[0]["prompt"], "Hey.", "Go.")


def test_chat_pairs_and_conversations(tmp_path):
    recs = [
        {"prompt": "Say hi",
         "chosen": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
         "rejected": [{"role": "user", "content": "Say hi"},
                      {"role": "assistant", "content": "no"}]},
        {"messages": [{"role": "user", "content": "Count"},
                      {"role": "assistant", "content": "1 2 3"}]},
        {"messages": [{"role": "user", "content": "Only a prompt"}]},
    ]
    rows = load_source(source(kind="local", format="chat",
                              path=str(write_jsonl(tmp_path / "c.jsonl", recs))), seed=0)
    assert (rows[0]["prompt"], rows[0]["chosen"], rows[0]["rejected"]) == ("Say hi", "hi", "no")
    assert rows[0]["messages"] == [{"role": "user", "content": "Say hi"}]
    assert (rows[1]["prompt"], rows[1]["response"], rows[1]["chosen"]) == ("Count", "1 2 3", None)
    assert (rows[2]["prompt"], rows[2]["response"]) == ("Only a prompt", None)


def test_chat_template_renders_the_turns(tmp_path):
    from rlhf_exp.modeling import models

    tok = models.build_tiny_tokenizer()
    row = {"prompt": "ignored", "messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Yo"},
                                             {"role": "user", "content": "Bye"}]}
    # no chat template: the template wraps each user turn, replies in between
    assert render_row(tok, row, "Q: {prompt} A:") == "Q: Hi A:YoQ: Bye A:"
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render_row(tok, row) == "<user>Hi<assistant>Yo<user>Bye<assistant>"
    assert render_row(tok, {"prompt": "solo"}) == "<user>solo<assistant>"


def test_pkg_paths_resolve_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_path("pkg://rlhf_exp/data/examples/sort_pairs.jsonl")
    assert path.is_file()
    assert resolve_path("rel/x.jsonl") == tmp_path / "rel" / "x.jsonl"
    cfg = compose("data_mix=local_example", "stage=reward")
    rows = build_stage_data(cfg.data_mix, "reward", cfg.seed)
    assert len(rows.train) + len(rows.eval) == 400  # 40% of the shipped 1000 rows
    assert all(r["task"] == "sort_digits" for r in rows.train)


def test_hub_presets_compose_and_fail_offline_with_one_line():
    for preset, hub_id in (("hh_rlhf", "Anthropic/hh-rlhf"), ("rm_static", "Dahoas/rm-static"),
                           ("ultrafeedback_binarized", "HuggingFaceH4/ultrafeedback_binarized")):
        cfg = compose(f"data_mix={preset}")
        assert cfg.data_mix.sources[0].path == hub_id and cfg.data_mix.sources[0].kind == "hub"
    assert cfg.data_mix.sources[0].hub_split == "train_prefs"
    with pytest.raises(DataError, match="cannot load hub dataset 'HuggingFaceH4/ultrafeedback"):
        build_stage_data(cfg.data_mix, "reward", 0)


# ----------------------------------------------------------------------------- blending
@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    a = write_jsonl(d / "a.jsonl", [{"prompt": f"a{i}", "chosen": "x", "rejected": "y"}
                                    for i in range(3000)])
    b = write_jsonl(d / "b.jsonl", [{"prompt": f"b{i}", "chosen": "x", "rejected": "y"}
                                    for i in range(1000)])
    return a, b


def _mix(a: Path, b: Path, *extra: str):
    return compose(sources_override(
        {"name": "a", "kind": "local", "path": str(a), "format": "preference", "weight": 0.7},
        {"name": "b", "kind": "local", "path": str(b), "format": "preference", "weight": 0.3}),
        *extra).data_mix


def test_weights_set_each_sources_share_of_every_stage(two_files):
    data_mix = _mix(*two_files)
    for stage in ("sft", "reward", "ppo"):
        train = build_stage_data(data_mix, stage, seed=7).train
        share = Counter(r["source"] for r in train)["a"] / len(train)
        assert share == pytest.approx(0.7, abs=0.01), (stage, share)
        # a (3000 rows) is subsampled, b (1000 rows) repeated to reach 30%
        assert len({r["id"] for r in train if r["source"] == "a"}) == \
            Counter(r["source"] for r in train)["a"]


def test_stage_slices_are_disjoint_reproducible_and_held_out(two_files):
    data_mix = _mix(*two_files)
    ids = {}
    for stage in ("sft", "reward", "ppo"):
        data = build_stage_data(data_mix, stage, seed=7)
        train_ids, eval_ids = {r["id"] for r in data.train}, {r["id"] for r in data.eval}
        assert eval_ids and not train_ids & eval_ids, stage
        ids[stage] = train_ids | eval_ids
        again = build_stage_data(data_mix, stage, seed=7)
        assert [r["id"] for r in again.train] == [r["id"] for r in data.train]
    assert not ids["sft"] & ids["reward"] and not ids["sft"] & ids["ppo"]
    assert not ids["reward"] & ids["ppo"]
    # DeepSpeed-Chat's 2,4,4: the ppo slice holds about twice the sft slice's distinct rows
    assert len(ids["ppo"]) == pytest.approx(2 * len(ids["sft"]), rel=0.02)
    other = build_stage_data(data_mix, "sft", seed=8)
    assert {r["id"] for r in other.train} != ids["sft"] - {r["id"] for r in other.eval}


def test_eval_only_source_is_every_stages_eval_and_never_trained_on(two_files, tmp_path):
    """An `eval_only: true` source (held-out topics) fills every stage's eval slice, up to its
    weight share of max_eval_examples, gives no stage a training row, and leaves the training
    blend to the other sources; a mix of eval-only sources alone is refused."""
    a, _ = two_files
    held = write_jsonl(tmp_path / "held.jsonl", [{"messages": [{"role": "user",
                                                                "content": f"h{i}"}]}
                                                 for i in range(300)])
    train_src = {"name": "a", "kind": "local", "path": str(a), "format": "preference"}
    held_src = {"name": "held", "kind": "local", "path": str(held), "format": "chat",
                "eval_only": True}
    data_mix = compose(sources_override(train_src, held_src), "data_mix.eval_fraction=0",
                       "data_mix.max_eval_examples=400").data_mix
    alone = compose(sources_override(train_src), "data_mix.eval_fraction=0").data_mix
    evals = []
    for stage in ("sft", "reward", "ppo"):
        data = build_stage_data(data_mix, stage, seed=7)
        assert {r["source"] for r in data.train} == {"a"}, stage
        # the training rows are exactly what the train source alone gives
        assert [r["id"] for r in data.train] == \
            [r["id"] for r in build_stage_data(alone, stage, seed=7).train], stage
        # 400 x weight share 1/2: 200 of the 300 held-out rows, the same ones for every stage
        assert len(data.eval) == 200 and {r["source"] for r in data.eval} == {"held"}, stage
        evals.append([r["id"] for r in data.eval])
    assert evals[0] == evals[1] == evals[2]
    # with eval_fraction > 0 the train source's own eval slice comes on top, still disjoint
    mixed = build_stage_data(compose(sources_override(train_src, held_src),
                                     "data_mix.eval_fraction=0.1").data_mix, "ppo", seed=7)
    assert {r["source"] for r in mixed.eval} == {"a", "held"}
    assert not {r["id"] for r in mixed.train} & {r["id"] for r in mixed.eval}
    with pytest.raises(ConfigError, match="eval_only"):
        compose(sources_override({**train_src, "eval_only": True}, held_src))


def test_tokenized_features_are_cached_by_tokenizer_and_settings(tmp_path):
    from rlhf_exp.modeling import models

    tok = models.build_tiny_tokenizer()
    rows = [{"prompt": "sort:321=", "response": "123", "chosen": "123", "rejected": "132"}]
    feats, _ = tokenize_pairs(rows, tok, "{prompt}", 16, 32, cache_dir=tmp_path)
    files = list(tmp_path.glob("pairs-*.pkl"))
    assert len(files) == 1 and not list(tmp_path.glob(".*"))  # no temp file left behind
    assert tokenize_pairs(rows, tok, "{prompt}", 16, 32, cache_dir=tmp_path)[0] == feats
    tokenize_pairs(rows, tok, "{prompt}", 16, 24, cache_dir=tmp_path)  # other settings
    tok.add_special_tokens({"additional_special_tokens": ["<x>"]})  # another tokenizer
    tokenize_pairs(rows, tok, "{prompt}", 16, 32, cache_dir=tmp_path)
    tokenize_sft(rows, tok, "{prompt}", 16, 32, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("pairs-*.pkl"))) == 3
    assert len(list(tmp_path.glob("sft-*.pkl"))) == 1
    assert cache_dir(compose().data_mix).name == "data"
    assert cache_dir(compose("data_mix.cache=false").data_mix) is None


def test_overlong_pairs_are_dropped_or_truncated():
    from rlhf_exp.modeling import models

    tok = models.build_tiny_tokenizer()
    rows = [{"prompt": "sort:321=", "chosen": "123", "rejected": "1" * 40},
            {"prompt": "sort:21=", "chosen": "12", "rejected": "21"}]
    feats, dropped = tokenize_pairs(rows, tok, "{prompt}", 16, 20, overlong="drop")
    assert (len(feats), dropped) == (1, 1)
    feats, dropped = tokenize_pairs(rows, tok, "{prompt}", 16, 20, overlong="truncate")
    assert dropped == 0 and max(len(f["rejected_ids"]) for f in feats) == 20
    assert feats[0]["rejected_ids"][-1] == tok.eos_token_id


# ----------------------------------------------------------------------------- bad data
@pytest.mark.slow  # launches the CLI
def test_bad_data_exits_2_with_one_line_naming_the_problem(tmp_path):
    missing = write_jsonl(tmp_path / "missing.jsonl",
                          [{"prompt": "p", "chosen": "c", "rejected": "r"},
                           {"prompt": "p", "better": "c", "rejected": "r"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p",\n')
    cases = {
        missing: f"{missing}:2: missing column 'chosen' (format preference needs prompt, chosen, "
                 "rejected",
        empty: f"{empty}: no examples (empty file)",
        malformed: f"{malformed}:2: malformed JSON",
    }

    def run(path: Path):
        return cli("stage=reward", "logger=none", f"hydra.run.dir={tmp_path / path.stem}",
                   sources_override({"name": "mine", "kind": "local", "path": str(path),
                                     "format": "preference"}))

    with ThreadPoolExecutor(len(cases)) as pool:  # three startups at once: they mostly wait
        procs = dict(zip(cases, pool.map(run, cases)))
    for path, expected in cases.items():
        proc = procs[path]
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert lines[-1].startswith("rlhf-exp: error: ") and expected in lines[-1], lines[-3:]
        # stopped before training: no checkpoint, no W&B run, no resolved config
        assert not (tmp_path / path.stem / "checkpoints").exists()
        assert not (tmp_path / path.stem / "config_resolved.yaml").exists()


def test_missing_local_file_fails_in_preflight(tmp_path):
    """What the config points at is preflight's to check (validation judges the config)."""
    from rlhf_exp.command import preflight
    from rlhf_exp.config import ConfigError
    from rlhf_exp.errors import UserError

    cfg = compose(sources_override({"name": "x", "kind": "local", "format": "hh",
                                    "path": str(tmp_path / "nope.jsonl")}))
    with pytest.raises(UserError, match=r"data_mix.sources\[0\].path=.*no such file"):
        preflight.check_sources(cfg)
    with pytest.raises(ConfigError, match=r"columns has 'answer'"):
        compose(sources_override({"name": "x", "kind": "synthetic", "columns": {"answer": "a"}}))


# ----------------------------------------------------------------------------- into training
@pytest.mark.slow
def test_hh_and_preference_files_train_sft_and_reward(tmp_path):
    """A mix of an HH transcript file and a prompt/chosen/rejected file through a few real
    SFT and reward optimizer steps (DeepSpeed on CPU)."""
    from rlhf_exp.stages import reward, sft

    hh = write_jsonl(tmp_path / "hh.jsonl", HH * 40)
    prefs = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": f"sort:{i}=", "chosen": "".join(sorted(str(i))), "rejected": str(i)[::-1]}
        for i in range(100, 180)])
    mix = sources_override(
        {"name": "hh", "kind": "local", "path": str(hh), "format": "hh"},
        {"name": "prefs", "kind": "local", "path": str(prefs), "format": "preference"})
    common = ["logger=none", mix, "sft.max_len=96", "sft.max_prompt_len=64", "reward.max_len=96",
              "reward.max_prompt_len=64", "data_mix.eval_fraction=0.1"]
    cfg = compose("stage=sft", *common, "sft.max_steps=3", "sft.micro_batch_size_per_device=4")
    res = sft.train(cfg, tmp_path / "sft")[2]
    assert res.metrics["sft/steps"] == 3 and res.metrics["sft/loss"] > 0
    cfg = compose("stage=reward", *common, "reward.max_steps=3",
                  "reward.micro_batch_size_per_device=4", f"reward.init_from={tmp_path / 'sft'}")
    res = reward.train(cfg, tmp_path / "rm")[2]
    assert res.metrics["reward/steps"] == 3
    assert 0.0 <= res.metrics["reward/eval_accuracy"] <= 1.0
    assert Path(res.checkpoint).exists()
