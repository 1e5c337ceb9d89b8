"""Bad input never starts or damages a run: each case goes through the whole CLI path
(cli.main() in this process) and must exit 2 with exactly one stderr line naming the key or
file, no traceback, no W&B run, and an existing run dir handed in left byte-for-byte as it was.
Nothing here loads a model or trains (unit tier)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_exit_2, compose

SMALL = "data_mix.sources.0.synthetic.num_examples=400"  # cases that reach the data check


def local_source(path: Path | str, fmt: str = "preference") -> str:
    return (f"data_mix.sources=[{{name: mine, kind: local, path: '{path}', "
            f"format: {fmt}}}]")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The bad (and one good) inputs the cases point at."""
    d = tmp_path_factory.mktemp("inputs")
    pair = {"prompt": "sort:21=", "chosen": "12", "rejected": "21"}
    out = {"dir": d, "a_file": d / "a_file.txt", "empty_dir": d / "empty_dir",
           "not_model": d / "not_model"}
    out["a_file"].write_text("hello\n")
    out["empty_dir"].mkdir()
    out["not_model"].mkdir()
    (out["not_model"] / "readme.txt").write_text("no config.json here\n")
    line = (json.dumps(pair) + "\n").encode()
    out["latin1_jsonl"] = d / "latin1.jsonl"
    latin1 = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'
    out["latin1_jsonl"].write_bytes(line + latin1 + b"\n")
    out["latin1_json"] = d / "latin1.json"
    out["latin1_json"].write_bytes(b"[\n " + latin1 + b"\n]")
    out["utf16"] = d / "utf16.jsonl"
    out["utf16"].write_bytes(json.dumps(pair).encode("utf-16"))
    out["empty_chosen"] = d / "empty_chosen.jsonl"
    out["empty_chosen"].write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "chosen": ""}))
    out["blank_rejected"] = d / "blank_rejected.json"
    out["blank_rejected"].write_text(json.dumps([pair, {**pair, "rejected": "  \n"}]))
    out["junk_parquet"] = d / "junk.parquet"
    out["junk_parquet"].write_bytes(b"PAR1 this is not parquet at all \x00\x01\x02")
    out["prompts_only"] = d / "prompts.jsonl"
    out["prompts_only"].write_text("".join(json.dumps({"prompt": f"sort:{i}=", "response": "1"})
                                           + "\n" for i in range(100, 200)))
    out["few_pairs"] = d / "few.jsonl"
    out["few_pairs"].write_text("".join(json.dumps(pair) + "\n" for _ in range(30)))
    return out


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> Path:
    """A finished-looking run dir every case passes as its hydra.run.dir / hydra.sweep.dir."""
    run = tmp_path_factory.mktemp("existing") / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- stage=sft\n- sft.max_steps=40\n")
    (run / "checkpoints" / "step_000040").mkdir(parents=True)
    (run / "checkpoints" / "step_000040" / "config.json").write_text("{}")
    (run / "checkpoints" / "step_000040" / "trainer_state.json").write_text(json.dumps(
        {"stage": "sft", "step": 40, "world_size": 1}))
    (run / "result.json").write_text(json.dumps({"stage": "sft", "metrics": {}}))
    return run


def _cases():
    """(id, overrides, text the error line must hold); @name@ is a path from `files`."""
    return [
        # training lengths, sizes and shares (config.py validate)
        ("sft_max_steps_0", ["stage=sft", "sft.max_steps=0"], "sft.max_steps=0"),
        ("sft_max_steps_neg", ["stage=sft", "sft.max_steps=-5"], "sft.max_steps=-5"),
        ("reward_max_steps_0", ["stage=reward", "reward.max_steps=0"], "reward.max_steps=0"),
        ("ppo_steps_0", ["stage=ppo", "ppo.steps=0"], "ppo.steps=0"),
        ("lr_nan", ["stage=sft", "sft.lr=nan"], "sft.lr=nan"),
        ("micro_batch_0", ["stage=sft", "sft.micro_batch_size_per_device=0"],
         "sft.micro_batch_size_per_device"),
        ("actor_weight_decay", ["stage=ppo", "ppo.actor.weight_decay=-1"],
         "ppo.actor.weight_decay"),
        ("zero_share_sft", ["stage=sft", "data_mix.split=[0,4,4]"], "data_mix.split"),
        ("zero_share_ptx", ["stage=ppo", "ppo.ptx_coef=0.5", "data_mix.split=[0,4,4]"],
         "ppo.ptx_coef"),
        ("synthetic_0", ["stage=sft", "data_mix.sources.0.synthetic.num_examples=0"],
         "synthetic.num_examples"),
        ("lora_r_0", ["stage=sft", "model.lora.enabled=true", "model.lora.r=0"], "model.lora.r"),
        ("stages_order", ["stage.stages=[ppo,sft]"], "stage.stages"),
        ("experiment_name_slash", ["experiment_name=a/b"], "experiment_name"),
        ("objective_other_stage", ["stage=sft", "objective=ppo/gold_reward"], "objective"),
        ("template_no_prompt", ["stage=sft", "model.prompt_template=Q: {question}"],
         "model.prompt_template"),
        ("empty_model_path", ["stage=sft", "model=opt-125m", "model.path="], "model.path"),
        ("empty_chat_prompt", ["stage=chat", "chat.prompt="], "chat.prompt"),
        # environment (preflight.py)
        ("hardware_1gpu", ["stage=sft", "hardware=1gpu"], "hardware.device=cuda"),
        ("device_cuda", ["stage=sft", "hardware.device=cuda"], "hardware.device=cuda"),
        ("submitit_single_run", ["stage=sft", "hardware.launcher=submitit"],
         "hardware.launcher=submitit"),
        ("attention_typo", ["stage=sft", "model.attn_implementation=spda"],
         "model.attn_implementation='spda'"),
        ("output_dir_under_file", ["stage=sft", "hydra.run.dir=@a_file@/run"], "hydra.run.dir="),
        ("data_cache_under_file", ["stage=sft", "data_mix.cache_dir=@a_file@/cache"],
         "data_mix.cache_dir"),
        # models and starting points
        ("model_path_missing", ["stage=sft", "model.path=@dir@/nope"], "model.path="),
        ("model_path_not_model", ["stage=sft", "model.path=@not_model@"], "not a model dir"),
        ("model_hub_offline", ["stage=sft", "model=opt-125m"], "model.path=facebook/opt-125m"),
        ("reward_path_missing", ["stage=reward", "model.reward_path=@dir@/nope"],
         "model.reward_path="),
        ("tokenizer_path_missing", ["stage=sft", "model.tokenizer_path=@dir@/nope"],
         "model.tokenizer_path="),
        ("sft_init_missing", ["stage=sft", "sft.init_from=@dir@/nope"], "sft.init_from="),
        ("reward_init_not_run", ["stage=reward", "reward.init_from=@empty_dir@"],
         "reward.init_from="),
        ("actor_init_artifact", ["stage=ppo", "ppo.actor_init=no-such-artifact:v3"],
         "ppo.actor_init=no-such-artifact:v3"),
        ("critic_init_missing", ["stage=ppo", "ppo.critic_init=@dir@/nope"], "ppo.critic_init="),
        ("reward_model_missing", ["stage=ppo", "ppo.reward_model=@dir@/nope"],
         "ppo.reward_model="),
        ("eval_policy_missing", ["stage=eval", "eval.policies.sft=@dir@/nope"],
         "eval.policies.sft="),
        ("eval_from_run_missing", ["stage=eval", "eval.from_run=@dir@/nope"], "eval.from_run="),
        ("eval_nothing", ["stage=eval"], "eval.from_run"),
        ("chat_policy_missing", ["stage=chat", "chat.policy=@dir@/nope"], "chat.policy="),
        # data
        ("data_path_typo", ["stage=reward", local_source("@dir@/prefs.jsonl")],
         "data_mix.sources[0].path="),
        ("data_empty_dir", ["stage=reward", local_source("@empty_dir@")],
         "folder holds no"),
        ("data_latin1_jsonl", ["stage=reward", local_source("@latin1_jsonl@")],
         "latin1.jsonl:2: not UTF-8 text"),
        ("data_latin1_json", ["stage=reward", local_source("@latin1_json@")],
         "latin1.json:2: not UTF-8 text"),
        ("data_utf16", ["stage=reward", local_source("@utf16@")], "UTF-16"),
        ("data_empty_chosen", ["stage=reward", local_source("@empty_chosen@")],
         "empty_chosen.jsonl:2: empty chosen"),
        ("data_blank_rejected", ["stage=sft", local_source("@blank_rejected@")],
         "blank_rejected.json[1]: empty rejected"),
        ("data_junk_parquet", ["stage=reward", local_source("@junk_parquet@")],
         "not a readable Parquet file"),
        ("data_no_pairs", ["stage=reward", local_source("@prompts_only@",
                                                        "prompt_response")],
         "no preference pairs"),
        ("data_pipeline_reward_no_pairs",
         ["stage=pipeline", local_source("@prompts_only@", "prompt_response"),
          "sft.micro_batch_size_per_device=4"],
         "no preference pairs"),
        ("data_smaller_than_batch", ["stage=reward", local_source("@few_pairs@")],
         "global batch"),
        ("data_smaller_than_rollout", ["stage=ppo", SMALL, "ppo.rollout_batch_size=512",
                                       "ppo.micro_batch_size_per_device=8"],
         "ppo.rollout_batch_size=512"),
        # the existing run dir itself
        ("run_dir_of_another_stage", ["stage=reward", SMALL], "holds a sft run"),
        ("resume_other_world_size", ["stage=sft", SMALL, "hardware.nproc_per_node=2"],
         "saved by 1 ranks, this run has 2"),
        # Optuna search spaces (checked before the first trial)
        ("optuna_low_gt_high", ["-m", "hydra/sweeper=optuna", "stage=sft",
                                "sft.lr=interval(1e-2,1e-4)"], "sft.lr=interval(1e-2,1e-4)"),
        ("optuna_log_zero", ["-m", "hydra/sweeper=optuna", "stage=sft",
                             "sft.lr=tag(log,interval(0,1e-2))"], "low > 0"),
        ("optuna_unknown_key", ["-m", "hydra/sweeper=optuna", "stage=sft",
                                "sft.lrr=interval(1e-4,1e-2)"], "sft.lrr"),
        ("optuna_value_rejected", ["-m", "hydra/sweeper=optuna", "stage=sft",
                                   "sft.warmup_steps=range(-4,4)"], "sft.warmup_steps"),
        ("optuna_n_trials_0", ["-m", "hparams_search=sft_optuna", "hydra.sweeper.n_trials=0"],
         "hydra.sweeper.n_trials=0"),
        ("optuna_empty_range", ["-m", "hydra/sweeper=optuna", "stage=sft",
                                "sft.warmup_steps=range(5,1)"], "empty"),
    ]


CASES = _cases()


@pytest.mark.parametrize("args, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(args, needle, files,
                                                              existing_run, rlhf_exp):
    for name, path in files.items():
        args = [a.replace(f"@{name}@", str(path)) for a in args]
    before = snapshot(existing_run)
    run_key = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
    if not any(a.startswith(run_key) for a in args):
        args.append(f"{run_key}={existing_run}")
    proc = rlhf_exp(*args)
    assert_one_line_exit_2(proc, needle)
    assert snapshot(existing_run) == before, "the existing run dir changed"
    assert not (existing_run / "wandb").exists()


def test_chat_stdin_junk_exits_2_before_the_model_loads(existing_run, rlhf_exp, monkeypatch):
    """Piped stdin that is not UTF-8 text, or holds control characters, or is empty."""
    cases = [(b"\xff\xfe\x00binary\x9c\x80junk", "stdin is not UTF-8 text"),
             (b"sort:123=\x00\x1b[31m", "control character"),
             (b"  \n", "stdin is empty")]
    for data, needle in cases:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
        before = snapshot(existing_run)
        proc = rlhf_exp("stage=chat", f"hydra.run.dir={existing_run}")
        assert_one_line_exit_2(proc, needle)
        assert snapshot(existing_run) == before


def test_hub_id_without_network_fails_at_once(existing_run, rlhf_exp, monkeypatch):
    """Not offline by setting, but no hub reachable (or no such model): one short request,
    then one line (not a minute of retries)."""
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    proc = rlhf_exp("stage=sft", "model.path=rlhf-exp-test/no-such-model",
                    f"hydra.run.dir={existing_run}")
    assert_one_line_exit_2(proc, "model.path=rlhf-exp-test/no-such-model")
    assert time.monotonic() - start < 30


def test_utf8_bom_is_accepted(tmp_path):
    """A byte-order mark at the start of a JSONL or JSON file is harmless."""
    from rlhf_exp.command.preflight import check_data
    from rlhf_exp.data import load_source

    rows = [{"prompt": f"sort:{i}=", "chosen": "".join(sorted(str(i))), "rejected": str(i)}
            for i in range(100, 160)]
    jsonl, js = tmp_path / "bom.jsonl", tmp_path / "bom.json"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    js.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    for path in (jsonl, js):
        cfg = compose("stage=reward", local_source(path), "reward.micro_batch_size_per_device=4")
        loaded = load_source(cfg.data_mix.sources[0], seed=0)
        assert [r["prompt"] for r in loaded] == [r["prompt"] for r in rows]
        check_data(cfg)  # the reward stage gets its pairs from it


def test_free_text_is_taken_as_typed(rlhf_exp):
    """The README's `chat.prompt="sort:52813="` reaches the CLI without its quotes (the shell
    removes them); text keys take it as typed, commas and braces included."""
    proc = rlhf_exp("stage=chat", "chat.prompt=sort:52813=", "chat.system=Be brief, please!",
                    "model.prompt_template={prompt} =>", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(proc.stdout)
    assert cfg.chat.prompt == "sort:52813=" and cfg.chat.system == "Be brief, please!"
    assert cfg.model.prompt_template == "{prompt} =>"


def test_quoted_text_resolves_to_exactly_what_was_typed():
    """rlhf_exp/command/quoting.py: whatever the text, Hydra's parser and OmegaConf give it back."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from rlhf_exp.command.quoting import quote_text_values

    texts = ["sort:52813=", "Hi! a, b = c?", "{prompt}\n=>", "it's", "say \"hi\"", "back\\",
             "a\\'b", "${x} and \\${y}", "[1, 2]", "null-ish", "tail\\\\", "日本語 ünï"]
    parser = OverridesParser.create()
    for text in texts:
        (arg,) = quote_text_values([f"chat.prompt={text}"])
        value = parser.parse_overrides([arg])[0].value()
        assert OmegaConf.create({"v": value}).v == text, (text, arg)
    # other string keys only when Hydra cannot read them; numbers and null untouched
    assert quote_text_values(["sft.init_from=/runs/a=b", "sft.init_from=/runs/ab", "sft.lr=1e-3",
                              "chat.prompt=null", "hydra.run.dir=/x"]) == [
        "sft.init_from='/runs/a=b'", "sft.init_from=/runs/ab", "sft.lr=1e-3", "chat.prompt=null",
        "hydra.run.dir=/x"]


def test_failing_reward_function_stops_before_hydra_writes_anything(tmp_path, rlhf_exp):
    run_dir = tmp_path / "never"
    proc = rlhf_exp("stage=ppo", "ppo.reward_model_weight=0",
                    "ppo.reward_functions=[{fn: 'rlhf_exp.tasks:no_such_fn'}]",
                    f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("rlhf-exp: error: ppo.reward_functions[0].fn=") and "no_such_fn" in line
    assert not run_dir.exists()
