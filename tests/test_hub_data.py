"""Hub dataset schemas offline: the shipped samples (rlhf_exp/data/examples/hub_samples) are in
the exact columns, split names and file layouts of the hub datasets the data_mix presets name,
and every preset loads its sample when its source's path points at the local copy (a
save_to_disk folder, or data files named by split). Training on them: tests/test_families_e2e.py.
"""

from __future__ import annotations

import gzip
import json
import shutil

import pyarrow.parquet as pq
import pytest

from rlhf_exp.data import DataError, build_stage_data, load_source, resolve_path
from tests.conftest import compose

SAMPLES = "pkg://rlhf_exp/data/examples/hub_samples"


def _preset(name: str, *overrides: str):
    return compose(f"data_mix={name}", f"data_mix.sources.0.path={SAMPLES}/{name}", *overrides)


def test_samples_have_the_hub_schemas_and_split_names():
    import datasets

    root = resolve_path(SAMPLES)
    rm = pq.read_table(root / "rm_static" / "data" / "train-00000-of-00001.parquet")
    assert rm.column_names == ["prompt", "response", "chosen", "rejected"]
    assert (root / "rm_static" / "data" / "test-00000-of-00001.parquet").is_file()
    first = rm.to_pylist()[0]
    assert first["prompt"].startswith("\n\nHuman: ") and first["prompt"].endswith("\n\nAssistant:")
    assert first["chosen"].startswith(" ") and first["response"] == first["chosen"]
    for subset in ("helpful-base", "harmless-base"):
        for split in ("train", "test"):
            line = (root / "hh_rlhf" / subset / f"{split}.jsonl").read_text().splitlines()[0]
            rec = json.loads(line)
            assert sorted(rec) == ["chosen", "rejected"]
            assert rec["chosen"].startswith("\n\nHuman: ") and "\n\nAssistant: " in rec["chosen"]
    uf = datasets.load_from_disk(str(root / "ultrafeedback_binarized"))
    assert sorted(uf) == sorted(f"{s}_{k}" for s in ("train", "test")
                                for k in ("prefs", "sft", "gen"))
    assert uf["train_prefs"].column_names == ["prompt", "prompt_id", "chosen", "rejected",
                                              "messages", "score_chosen", "score_rejected"]
    ex = uf["train_prefs"][0]
    assert [m["role"] for m in ex["chosen"]] == ["user", "assistant"]
    assert ex["chosen"][0]["content"] == ex["prompt"] and ex["messages"] == ex["chosen"]
    trl = json.loads((root / "trl_conversational" / "train.jsonl").read_text().splitlines()[0])
    assert sorted(trl) == ["chosen", "prompt", "rejected"]
    assert trl["prompt"][-1]["role"] == "user" and trl["chosen"][0]["role"] == "assistant"


@pytest.mark.parametrize("preset", ["hh_rlhf", "rm_static", "ultrafeedback_binarized",
                                    "trl_conversational"])
def test_presets_load_their_local_samples(preset):
    cfg = _preset(preset, "data_mix.eval_fraction=0.2")
    assert cfg.data_mix.sources[0].kind == "hub"  # the preset itself, only the path changed
    rows = load_source(cfg.data_mix.sources[0], seed=0)
    assert len(rows) >= 40
    for row in rows:
        assert row["chosen"] and row["rejected"] and row["chosen"] != row["rejected"]
        assert row["messages"][-1]["role"] == "user"
        assert not row["chosen"].startswith(" ")  # the reply, without the cue's space
    if preset != "ultrafeedback_binarized":  # (its prompts are single turns)
        assert any(len(r["messages"]) == 3 for r in rows)
    sizes = [len(build_stage_data(cfg.data_mix, s, cfg.seed).train) for s in ("sft", "reward",
                                                                            "ppo")]
    assert all(sizes)


def test_hub_split_and_subset_choose_from_the_local_copy():
    prefs = load_source(_preset("ultrafeedback_binarized").data_mix.sources[0], 0)
    test = load_source(_preset("ultrafeedback_binarized", "data_mix.sources.0.hub_split="
                                                          "test_prefs").data_mix.sources[0], 0)
    assert {r["prompt"] for r in prefs}.isdisjoint({r["prompt"] for r in test})
    both = load_source(_preset("hh_rlhf").data_mix.sources[0], 0)
    helpful = load_source(_preset("hh_rlhf", "data_mix.sources.0.hub_subset=helpful-base")
                          .data_mix.sources[0], 0)
    assert 0 < len(helpful) < len(both)
    with pytest.raises(DataError, match="has the splits .*train_prefs.*not hub_split='train'"):
        load_source(_preset("ultrafeedback_binarized", "data_mix.sources.0.hub_split=train")
                    .data_mix.sources[0], 0)
    with pytest.raises(DataError, match="no 'validation' split .* hold: test, train"):
        load_source(_preset("rm_static", "data_mix.sources.0.hub_split=validation")
                    .data_mix.sources[0], 0)
    with pytest.raises(DataError, match="no subset folder 'red-team'.*harmless-base"):
        load_source(_preset("hh_rlhf", "data_mix.sources.0.hub_subset=red-team")
                    .data_mix.sources[0], 0)


def test_hub_layouts_gzip_and_parquet_shards(tmp_path):
    """A clone of Anthropic/hh-rlhf holds <subset>/train.jsonl.gz; a hub parquet export holds
    data/<split>-0000N-of-0000M.parquet shards: both load as the split."""
    src = resolve_path(f"{SAMPLES}/hh_rlhf")
    for f in src.rglob("*.jsonl"):
        out = tmp_path / "hh" / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(out.with_suffix(".jsonl.gz"), "wt") as fh:
            fh.write(f.read_text())
    (tmp_path / "hh" / ".git").mkdir()  # a clone's git folder is not data
    (tmp_path / "hh" / ".git" / "train.jsonl").write_text("not json\n")
    cfg = compose("data_mix=hh_rlhf", f"data_mix.sources.0.path={tmp_path / 'hh'}")
    plain = load_source(_preset("hh_rlhf").data_mix.sources[0], 0)
    assert [r["prompt"] for r in load_source(cfg.data_mix.sources[0], 0)] == \
        [r["prompt"] for r in plain]
    shards = tmp_path / "rm" / "data"
    shards.mkdir(parents=True)
    table = pq.read_table(resolve_path(f"{SAMPLES}/rm_static/data/train-00000-of-00001.parquet"))
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), shards / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(half), shards / "train-00001-of-00002.parquet")
    shutil.copy(resolve_path(f"{SAMPLES}/rm_static/data/test-00000-of-00001.parquet"), shards)
    cfg = compose("data_mix=rm_static", f"data_mix.sources.0.path={tmp_path / 'rm'}")
    assert len(load_source(cfg.data_mix.sources[0], 0)) == table.num_rows


def test_a_missing_local_copy_is_a_preflight_error(tmp_path, rlhf_exp):
    from rlhf_exp.command import preflight
    from rlhf_exp.errors import UserError

    cfg = compose("data_mix=hh_rlhf", f"data_mix.sources.0.path={tmp_path / 'nope'}")
    with pytest.raises(UserError, match=r"sources\[0\]\.path=.*no such folder"):
        preflight.check_sources(cfg)  # what the config points at: preflight's
    out = rlhf_exp("stage=sft", "data_mix=rm_static", f"data_mix.sources.0.path={tmp_path}/x")
    assert out.returncode == 2
    assert "no such folder" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("preset,override,needle", [
    # UltraFeedback's splits are train_prefs, test_prefs, ...: no plain train
    ("ultrafeedback_binarized", "data_mix.sources.0.hub_split=train", "not hub_split='train'"),
    ("rm_static", "+data_mix.sources.0.columns.chosen=better", "missing column 'better'"),
])
def test_hub_data_problems_stop_before_any_model_loads(preset, override, needle, tmp_path,
                                                       rlhf_exp, monkeypatch):
    """A local copy without the split, or a row without the column, is one line and exit 2 from
    the preflight: no model loads, no run dir is written."""
    from rlhf_exp.modeling import models

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the data was checked")

    monkeypatch.setattr(models, "load_tokenizer", no_model)
    monkeypatch.setattr(models, "resolve_base_path", no_model)
    out = rlhf_exp("stage=sft", f"data_mix={preset}", f"data_mix.sources.0.path={SAMPLES}/{preset}",
                   override,
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
