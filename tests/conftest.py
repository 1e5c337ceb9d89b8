"""Shared test fixtures. Tests run the real parts: DeepSpeed on CPU, W&B offline, Hydra compose.

Environment: W&B offline, the tiny model built into a per-session cache. DeepSpeed compiles
nothing (rlhf_exp/training/dist.py skips its CPU shm comm op), so no extensions cache is set up.

Two tiers. `make test-fast` (`-m "not slow"`) is the unit tier: no training run and no
subprocess (no CLI launch, no torchrun, no W&B service, no `wandb leet` read). A test that
trains or launches is marked slow: by hand (`@pytest.mark.slow`), or here because it uses a
fixture of TRAINING_FIXTURES (directly or through another fixture) or calls `cli()`. A guard
fails an unmarked test that starts a subprocess or builds a training engine anyway, so the unit
tier stays one. `make test` runs both.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]  # tests/test_unit_tier.py runs the guard below on sample tests
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Small, fast settings for end-to-end runs on 2 CPU cores.
FAST = [
    "data_mix.sources.0.synthetic.num_examples=3000",
    "sft.max_steps=30", "sft.eval_every=0", "sft.log_every=5",
    "reward.max_steps=30", "reward.eval_every=0", "reward.log_every=5",
]


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """One model/artifact cache per test session (the tiny model is built on first use)."""
    if "RLHF_EXP_CACHE" not in os.environ:
        os.environ["RLHF_EXP_CACHE"] = str(tmp_path_factory.mktemp("rlhf_exp_cache"))
    yield


def compose(*overrides: str):
    """The composed and validated config, as the app would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf_exp.cli import CONF_DIR, check

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    check(cfg)
    return cfg


def cli(*args: str, cwd: Path | None = None, timeout: int = 600,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m rlhf_exp ARGS` as a user would (from a fresh shell); output captured."""
    # an in-process stage run (e.g. the sft_run fixture) set RANK/WORLD_SIZE/MASTER_PORT... in
    # this process for its 1-rank process group; a child inheriting them would think it is
    # already a launched rank (and reuse a port this process holds)
    base = {k: v for k, v in os.environ.items() if k not in CHILD_DROP_ENV}
    return subprocess.run([sys.executable, "-m", "rlhf_exp", *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})})


RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
            "MASTER_PORT")
# ... and an in-process W&B run set WANDB_SERVICE: a child would attach to this process's W&B
# service instead of starting its own (a SIGKILLed child then leaves its run id "in use" here)
CHILD_DROP_ENV = (*RANK_ENV, "WANDB_SERVICE")


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """One short SFT run shared by the tests that need a trained policy checkpoint."""
    from rlhf_exp.stages import sft

    run_dir = tmp_path_factory.mktemp("sft_run")
    # an experiment name of its own: the offline artifact index is shared by the whole session,
    # and other tests' runs register "default-sft-model" too
    cfg = compose("stage=sft", *FAST, "sft.max_steps=40", "experiment_name=fixture")
    engine, tokenizer, result = sft.train(cfg, run_dir)
    return {"cfg": cfg, "run_dir": run_dir, "engine": engine, "tokenizer": tokenizer,
            "result": result}


# A user's project: its own model, data mix and experiment options beside the built-in ones.
USER_MODEL = """\
# the built-in tiny Llama, smaller
defaults:
  - tiny
name: mytiny
tiny:
  hidden_size: 64
  intermediate_size: 192
"""
USER_DATA = """\
defaults:
  - synthetic
name: mysort
sources:
  - name: sort_digits
    kind: synthetic
    synthetic:
      num_examples: 600
      max_digits: 5
"""
USER_EXPERIMENT = """\
# @package _global_
defaults:
  - override /model: mytiny
  - override /data_mix: mysort
  - override /stage: sft
  - override /logger: none
experiment_name: myexp
seed: 4242
sft:
  max_steps: 4
  micro_batch_size_per_device: 8
  log_every: 2
  eval_every: 0
"""


def make_user_conf(root: Path) -> Path:
    """<root>/conf/{model,data_mix,experiment}/... as the README's "own project" layout."""
    conf = root / "conf"
    for rel, text in (("model/mytiny.yaml", USER_MODEL), ("data_mix/mysort.yaml", USER_DATA),
                      ("experiment/myexp.yaml", USER_EXPERIMENT)):
        (conf / rel).parent.mkdir(parents=True, exist_ok=True)
        (conf / rel).write_text(text)
    return conf


# ----------------------------------------------------------------------------- kill and resume
def kill_after_checkpoint(run_dir: Path, step: int, args: list[str]) -> None:
    """Start `rlhf-exp ARGS` as a user would and SIGKILL it once checkpoint `step` is complete."""
    import signal
    import time

    marker = run_dir / "checkpoints" / f"step_{step:06d}" / "trainer_state.json"
    env = {k: v for k, v in os.environ.items() if k not in CHILD_DROP_ENV}  # see cli()
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_exp", *args, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 600
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"run ended before checkpoint {step}: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("no checkpoint within 600 s")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def wandb_ids(run_dir: Path) -> list[str]:
    """The run id of each offline W&B log in `run_dir`/wandb (a resumed run adds one log)."""
    return sorted(p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*"))


def logged_steps(run, metric: str, stage: str) -> list[int]:
    """The steps at which `metric` was logged, in history order (a repeat would show twice)."""
    return [int(row[f"{stage}/step"]) for row in run.history if metric in row]


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and every entry's mtime under `run_dir`: equal = nothing touched."""
    return {str(p.relative_to(run_dir)): (p.read_bytes() if p.is_file() else b"",
                                          p.lstat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*"))}


def perturbed_pair_models():
    """The preference-loss parity setup: the tiny model (the reference, eval mode), a policy
    0.05-perturbed from it (seeded, train mode), their tokenizer and path, and 4 sort pairs."""
    import copy
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf

    from rlhf_exp.config import ModelConfig, TinyModelConfig
    from rlhf_exp.modeling import models
    from rlhf_exp.tasks import sort_digits

    model_cfg = OmegaConf.structured(ModelConfig(name="tiny", tiny=TinyModelConfig()))
    path = str(models.tiny_model_dir(model_cfg.tiny))
    tokenizer = models.load_tokenizer(path, model_cfg)
    reference = models.load_causal_lm(path, tokenizer, model_cfg).eval()
    policy = copy.deepcopy(reference).train()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
            for r in sort_digits.generate(4, seed=3)]
    return SimpleNamespace(path=path, tokenizer=tokenizer, reference=reference, policy=policy,
                           rows=rows)


def tiny_groups(cfg):
    """The tiny Llama of `cfg.model` (seeded random weights, dropout off), its tokenizer, and
    `sample(group_size)`: 3 prompts x 4 completions sampled with a fixed seed (8 new tokens)."""
    import torch

    from rlhf_exp.modeling import models
    from rlhf_exp.rl import rollout
    from rlhf_exp.rl.generation import GenerationConfig
    from rlhf_exp.training import engine

    path = models.resolve_base_path(cfg.model)
    tok = models.load_tokenizer(path, cfg.model)
    model = engine.disable_dropout(models.load_causal_lm(path, tok, cfg.model))
    rows = [{"prompt": f"sort:{d}="} for d in ("52813", "31", "9876543")]
    ids = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    gen = GenerationConfig(max_new_tokens=8, compile="none", use_static_cache=False)

    def sample(group_size: int):
        return rollout.sample(model, tok, [r for r in rows for _ in range(4)],
                              [p for p in ids for _ in range(4)], gen,
                              generator=torch.Generator().manual_seed(0), synced_gpus=False,
                              device=torch.device("cpu"), group_size=group_size)
    return model, tok, sample


def assert_one_line_exit_2(proc, needle: str) -> None:
    """A refused command: exit 2, one stderr line `rlhf-exp: error: ...` holding `needle`, no
    traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:] or proc.stdout[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("rlhf-exp: error: "), lines[0]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


# A short SFT run that checkpoints every 2 steps (kill/interrupt-then-resume tests)
SFT_CHECKPOINTING = ["stage=sft", "seed=7", "data_mix.sources.0.synthetic.num_examples=600",
                     "sft.micro_batch_size_per_device=8", "sft.max_steps=6", "sft.log_every=1",
                     "sft.eval_every=2", "sft.save_every=2", "sft.keep_last=1",
                     "sft.keep_best_metric=sft/eval_loss", "sft.keep_best_mode=max",
                     "logger.log_checkpoints=false"]


# Tiny per-job budget for sweep tests: each job is a few optimizer steps on a small data slice.
SWEEP_FAST = [
    "stage=sft", "data_mix.sources.0.synthetic.num_examples=600",
    "sft.micro_batch_size_per_device=8", "sft.max_steps=4", "sft.log_every=2",
    "sft.eval_every=0", "logger.log_checkpoints=false",
]


@pytest.fixture(scope="session")
def sft_sweep(tmp_path_factory):
    """One 2x2 Hydra multirun (seed x sft.lr) shared by the sweep and compare tests."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "sft_2x2"
    proc = cli("-m", *SWEEP_FAST, "seed=1,2", "sft.lr=1e-3,3e-3",
               f"hydra.sweep.dir={sweep_dir}", timeout=900)
    return {"proc": proc, "sweep_dir": sweep_dir}


@pytest.fixture(scope="session")
def reward_run(sft_run, tmp_path_factory):
    """One short reward-model run started from the SFT run's W&B artifact name (the offline
    hand-off), shared by the tests that need a trained reward model."""
    from rlhf_exp.stages import reward

    run_dir = tmp_path_factory.mktemp("reward_run")
    cfg = compose("stage=reward", *FAST, "reward.max_steps=150", "reward.log_every=10",
                  "reward.warmup_steps=10", "experiment_name=fixture",
                  f"reward.init_from={sft_run['cfg'].experiment_name}-sft-model")
    engine, tokenizer, result = reward.train(cfg, run_dir)
    return {"cfg": cfg, "run_dir": run_dir, "engine": engine, "tokenizer": tokenizer,
            "result": result}


def _drop_closed_log_handlers() -> None:
    """A library logger's handler made during an earlier test writes to that test's captured
    stderr, closed since: its next message would print a '--- Logging error ---' traceback into
    this test's output (a real process never closes its stderr)."""
    import logging

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)


@pytest.fixture
def rlhf_exp(capfd, monkeypatch):
    """`rlhf-exp ARGS` through cli.main() in this process: the whole CLI path without another
    interpreter start-up (~15 s on 2 busy cores). Returns returncode, stdout, stderr like cli()."""
    from types import SimpleNamespace

    from rlhf_exp import cli as app_cli
    from rlhf_exp.training import dist

    def run(*args: str) -> SimpleNamespace:
        from hydra.core.hydra_config import HydraConfig

        _drop_closed_log_handlers()
        monkeypatch.setattr(sys, "argv", ["rlhf-exp", *args])
        # an earlier in-process run left RANK/LOCAL_RANK/... set (its process group lives on and
        # DeepSpeed needs them): this process is still no launched rank of a multi-rank run
        monkeypatch.setattr(dist, "inside_launch", lambda: False)
        try:
            app_cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:  # a Hydra app leaves its config behind: later in-process code would see it
            from hydra.core.global_hydra import GlobalHydra
            from hydra.core.hydra_config import HydraConfig

            HydraConfig.instance().cfg = None
            GlobalHydra.instance().clear()
        out = capfd.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


# ----------------------------------------------------------------------------- the unit tier
# fixtures that train a model or launch processes: a test using one (even through another
# fixture) is slow. Add a new such fixture here; the guard below names the ones forgotten.
TRAINING_FIXTURES = {
    "sft_run", "reward_run", "sft_sweep",  # this file
    "offload_gc", "lora_merged", "lora_adapter",  # test_memory.py
    "demo",  # test_pipeline.py
    "sft_dpo",  # test_dpo.py
    "one_rank", "two_ranks_zero3", "two_tasks_submitit",  # test_scale.py
}


def _calls_cli(item) -> bool:
    """The test function itself calls `cli(...)` (the names its code refers to)."""
    code = getattr(getattr(item, "function", None), "__code__", None)
    return code is not None and "cli" in code.co_names


def pytest_sessionstart(session):
    """matplotlib finds the system fonts once per machine (it runs `fc-list`) and caches them:
    do it before any test, so that a unit test drawing a plot on a fresh machine is not taken
    for one that starts a subprocess of ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.font_manager

    matplotlib.font_manager.fontManager  # noqa: B018 (loading it builds the cache)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _calls_cli(item) or TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


class UnitTierViolation(AssertionError):
    pass


@contextlib.contextmanager
def _unit_tier_guard(item):
    """Around an unmarked test (its fixtures' set-up included): starting a subprocess or
    building a training engine fails the test, with what to do (even where the caller catches
    the error, e.g. DeepSpeed probing for its compiler)."""
    if item.get_closest_marker("slow") is not None:
        yield
        return
    seen: list[str] = []

    def refuse(what: str):
        def fail(*args, **kwargs):
            seen.append(f"{item.nodeid} {what} but is not marked slow: mark it "
                        "@pytest.mark.slow, or list its fixture in tests/conftest.py "
                        "TRAINING_FIXTURES")
            raise UnitTierViolation(seen[-1])
        return fail

    from rlhf_exp.training import engine

    try:
        with mock.patch.object(subprocess.Popen, "__init__", refuse("starts a subprocess")), \
                mock.patch.object(engine, "build_train_engine", refuse("trains a model")):
            yield
    finally:
        if seen:
            raise UnitTierViolation(seen[0])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _unit_tier_guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _unit_tier_guard(item):
        return (yield)
