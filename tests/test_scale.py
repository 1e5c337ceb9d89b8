"""Scale-out: world-size-invariant data order, 1 rank == 2 ranks (ZeRO-2 and ZeRO-3), ZeRO-3
checkpoint consolidation, the launch commands of the multi-node presets, Slurm via submitit.

The 2-rank runs go through the CLI as a user would start them: `hardware.nproc_per_node=2`
(re-executed under torchrun) and a submitit job of 2 tasks (`hydra/launcher=submitit_local`,
the same code path as `hardware=slurm` on a cluster).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_exp.data.sampler import GlobalBatchSampler
from tests.conftest import CHILD_DROP_ENV, FAST, ROOT, cli, compose


# ----------------------------------------------------------------------------- sampler
def _steps(n: int, micro: int, accum: int, world: int, seed: int = 7, start: int = 0,
           steps: int = 0) -> list[list[list[int]]]:
    """Per optimizer step, the micro-batches of all ranks (rank-major, accumulation order)."""
    samplers = [GlobalBatchSampler(n, micro_batch_size=micro, grad_accum=accum, world_size=world,
                                   rank=r, seed=seed) for r in range(world)]
    streams = []
    for s in samplers:
        s.start_at(start)
        stream = []
        while len(stream) < steps * accum:  # across epochs: each pass moves to the next epoch
            stream += list(s)
        streams.append(stream[:steps * accum])
    return [[mb for stream in streams for mb in stream[i * accum:(i + 1) * accum]]
            for i in range(steps)]


def test_sampler_same_micro_batches_for_any_split_of_the_global_batch():
    # global batch 16 = micro 4 x (accum 4 x 1 rank | accum 2 x 2 ranks | accum 1 x 4 ranks)
    runs = [_steps(103, 4, accum, world, steps=14) for accum, world in ((4, 1), (2, 2), (1, 4))]
    assert runs[0] == runs[1] == runs[2]
    # 103 examples = 6 global batches of 16 per epoch; an epoch is a permutation, no repeats
    epoch0 = [i for step in runs[0][:6] for mb in step for i in mb]
    assert len(epoch0) == len(set(epoch0)) == 96
    assert [i for mb in runs[0][6] for i in mb] != [i for mb in runs[0][0] for i in mb]
    # a different seed, a different order
    assert _steps(103, 4, 4, 1, seed=8, steps=6) != runs[0][:6]


def test_sampler_start_at_resumes_the_same_sequence():
    full = _steps(103, 4, 2, 2, steps=14)
    for start in (0, 1, 5, 6, 9):  # mid-epoch, epoch boundary, next epoch
        assert _steps(103, 4, 2, 2, start=start, steps=14 - start) == full[start:]
    s = GlobalBatchSampler(103, micro_batch_size=4, grad_accum=2, world_size=2, rank=1, seed=7)
    assert s.steps_per_epoch == 6 and s.global_batch_size == 16 and len(s) == 12
    assert s.start_at(9) == 1 and len(s) == (6 - 3) * 2


def test_sampler_rank_slices_are_disjoint():
    micro = [GlobalBatchSampler(64, micro_batch_size=4, grad_accum=2, world_size=2, rank=r,
                                seed=0) for r in (0, 1)]
    a, b = (next(iter(s)) + list(s)[1] for s in micro)
    assert not set(a) & set(b)


# ----------------------------------------------------------------------------- rank equivalence
RANKS = [*FAST, "stage=sft", "sft.max_steps=6", "sft.log_every=1", "sft.warmup_steps=2",
         "sft.micro_batch_size_per_device=8", "data_mix.sources.0.synthetic.num_examples=2000"]


def _one_wandb_run(run_dir: Path):
    from rlhf_exp.training.wandb_reader import read_runs

    runs = read_runs(Path(run_dir) / "wandb")
    assert len(runs) == 1, f"{run_dir}: expected exactly one W&B run, found {len(runs)}"
    return runs[0]


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """Reference: 1 rank, accumulation 2 (global batch 16), ZeRO-2, in process."""
    from rlhf_exp.stages import sft

    run_dir = tmp_path_factory.mktemp("one_rank")
    sft.train(compose(*RANKS, "sft.gradient_accumulation_steps=2", "zero_stage=zero2"), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def two_ranks_zero3(tmp_path_factory):
    """One 2-rank launch under torchrun, ZeRO-3, of the whole recipe: SFT (accumulation 1,
    global batch 16: the side compared with `one_rank`), then the reward model and PPO from it.
    Returns the pipeline run dir (stages in sft/, reward/, ppo/)."""
    run_dir = tmp_path_factory.mktemp("two_z3") / "run"
    proc = cli(*RANKS, "stage=pipeline", "hardware.nproc_per_node=2", "zero_stage=zero3",
               "reward.max_steps=4", "reward.log_every=1", "reward.micro_batch_size_per_device=8",
               "ppo.steps=2", "ppo.rollout_batch_size=16", "ppo.micro_batch_size_per_device=8",
               "ppo.eval_every=0", "ppo.eval_num_prompts=16", "ppo.eval_batch_size=8",
               f"hydra.run.dir={run_dir}")
    _ok(proc)
    assert "launching 2 ranks" in proc.stdout
    return run_dir


@pytest.fixture(scope="module")
def two_tasks_submitit(tmp_path_factory):
    """2 ranks as the 2 tasks of a submitit job (local executor), ZeRO-2: a multirun."""
    sweep = tmp_path_factory.mktemp("submitit")
    proc = cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
               "hardware.launcher=submitit", "hardware.nproc_per_node=2", "zero_stage=zero2",
               *RANKS, f"hydra.sweep.dir={sweep}")
    _ok(proc)
    return sweep / "0"


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_loss_curve(one_rank, two_ranks_zero3, two_tasks_submitit):
    ref = _one_wandb_run(one_rank)
    ref_loss = ref.metric("sft/loss")
    assert len(ref_loss) == 6 and ref_loss[-1] < ref_loss[0]
    for run_dir, zero in ((two_tasks_submitit, "zero2"), (two_ranks_zero3 / "sft", "zero3")):
        run = _one_wandb_run(run_dir)
        assert run.config["hardware"]["nproc_per_node"] == 2
        assert run.config["group_choices"]["zero_stage"] == zero
        assert run.summary["sft/global_batch_size"] == 16
        assert run.metric("sft/loss") == pytest.approx(ref_loss, rel=1e-4, abs=1e-5), zero
        assert run.metric("sft/eval_loss") == pytest.approx(ref.metric("sft/eval_loss"),
                                                            rel=1e-4)


@pytest.mark.slow
def test_zero3_checkpoint_is_consolidated(one_rank, two_ranks_zero3):
    """Saved from 2 ZeRO-3 partitions, the checkpoint is one plain HF model: from_pretrained
    loads every weight (nothing missing or empty) and they equal the 1-rank ZeRO-2 run's."""
    from transformers import AutoModelForCausalLM

    from rlhf_exp.training import checkpoint

    final = checkpoint.final_checkpoint(two_ranks_zero3 / "sft")
    assert final is not None and (final / "model.safetensors").is_file()
    z3, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref = AutoModelForCausalLM.from_pretrained(checkpoint.final_checkpoint(one_rank))
    ref_state = ref.state_dict()
    for key, value in z3.state_dict().items():
        assert value.shape == ref_state[key].shape and value.numel() > 0, key
        torch.testing.assert_close(value, ref_state[key], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_reward_and_ppo_run_on_two_ranks(two_ranks_zero3):
    """The reward model and PPO (ZeRO-3: generation synced across ranks) on 2 ranks: one W&B run
    each, with the 2-rank config and their metrics; consolidated checkpoints that load."""
    import json

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_exp.training import checkpoint

    reward = _one_wandb_run(two_ranks_zero3 / "reward")
    ppo = _one_wandb_run(two_ranks_zero3 / "ppo")
    for run in (reward, ppo):
        assert run.config["hardware"]["nproc_per_node"] == 2
        assert run.config["group_choices"]["zero_stage"] == "zero3"
    assert len(reward.metric("reward/loss")) == 4
    assert len(ppo.metric("ppo/kl")) == 2 and ppo.metric("ppo/reward_score")
    # PPO started from this launch's SFT and reward outputs
    assert ppo.config["ppo"]["actor_init"] == str(two_ranks_zero3 / "sft")
    assert ppo.config["ppo"]["critic_init"] == str(two_ranks_zero3 / "reward")
    AutoModelForSequenceClassification.from_pretrained(
        checkpoint.final_checkpoint(two_ranks_zero3 / "reward"))
    AutoModelForCausalLM.from_pretrained(checkpoint.final_checkpoint(two_ranks_zero3 / "ppo"))
    result = json.loads((two_ranks_zero3 / "result.json").read_text())
    assert result["metrics"]["ppo/steps"] == 2


# ----------------------------------------------------------------------------- launch commands
def _cmd(*overrides: str) -> list[str]:
    from rlhf_exp.cli import launch_command

    cfg = compose(*overrides)
    return launch_command(cfg, list(overrides), "/shared/runs/x")


def test_multinode_torchrun_command():
    ov = ["hardware=multinode_torchrun", "hardware.master_addr=10.0.0.1", "hardware.node_rank=1",
          "stage=sft"]
    assert _cmd(*ov) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=2",
        "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500", "-m", "rlhf_exp",
        *ov, "hydra.run.dir=/shared/runs/x", "hydra.output_subdir=null"]


def test_multinode_deepspeed_command(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=8\nnode-1 slots=8\n")
    ov = ["hardware=multinode_deepspeed", "hardware.master_addr=10.0.0.1",
          f"hardware.hostfile={hostfile}", "stage=ppo", "hardware.dry_run=true"]
    assert _cmd(*ov) == [
        sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_nodes=2",
        "--num_gpus=8", "--master_addr=10.0.0.1", "--master_port=29500",
        f"--hostfile={hostfile}", "--module", "rlhf_exp", *ov[:-1],
        "hydra.run.dir=/shared/runs/x", "hydra.output_subdir=null"]


def test_single_node_cpu_commands():
    ov = ["hardware.nproc_per_node=2", "hardware.master_port=29511"]
    assert _cmd(*ov)[:9] == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--node_rank=0", "--master_addr=127.0.0.1", "--master_port=29511", "-m"]
    ds = _cmd(*ov, "hardware.launcher=deepspeed")
    assert ds[3:8] == ["--no_local_rank", "--num_nodes=1", "--num_accelerators=2",
                       "--master_addr=127.0.0.1", "--master_port=29511"]
    assert not [a for a in ds if a.startswith("--hostfile")]


def test_dry_run_prints_the_command_and_runs_nothing(tmp_path):
    run_dir = tmp_path / "dry"
    proc = cli("stage=sft", "hardware=multinode_torchrun", "hardware.master_addr=10.0.0.1",
               "hardware.node_rank=1", "hardware.dry_run=true", f"hydra.run.dir={run_dir}")
    _ok(proc)
    printed = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert printed[1:8] == ["-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=2",
                            "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500"]
    assert f"hydra.run.dir={run_dir}" in printed
    assert not [a for a in printed if a.startswith("hardware.dry_run")]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "wandb").exists()


def _launched_for(run_dir: Path) -> list[int]:
    """PIDs of the processes started for `run_dir` (the launcher and its ranks carry
    RLHF_EXP_RUN_DIR in their environment)."""
    want = f"RLHF_EXP_RUN_DIR={run_dir}".encode()
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and want in (p / "environ").read_bytes().split(b"\0"):
                pids.append(int(p.name))
        except OSError:  # gone, or not ours
            pass
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
def test_sigkill_of_the_parent_stops_the_launcher_and_its_ranks(tmp_path):
    """Also the first use of an empty cache by 2 ranks at once: both build the tiny model and
    one wins the rename; it must hold the weights whichever rank it was."""
    run_dir, log = tmp_path / "run", tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k not in CHILD_DROP_ENV}
    env["RLHF_EXP_CACHE"] = str(tmp_path / "cache")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_exp", "stage=sft", *FAST,
                                 "sft.max_steps=100000", "hardware.nproc_per_node=2",
                                 f"hydra.run.dir={run_dir}"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 300
        while "/100000 [" not in log.read_text():  # the ranks are training (progress bar)
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the ranks did not start training within 300 s"
            time.sleep(0.2)
        assert len(_launched_for(run_dir)) >= 3  # torchrun, 2 ranks (and W&B's service)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 120
        while _launched_for(run_dir) and time.time() < deadline:
            time.sleep(0.5)
        assert _launched_for(run_dir) == []
    finally:
        for pid in _launched_for(run_dir):
            os.kill(pid, signal.SIGKILL)
        proc.kill()


@pytest.mark.parametrize("overrides, message", [
    (["hardware.master_port=70000"], "hardware.master_port"),
    (["hardware.hostfile=/tmp/h"], "hardware.launcher=deepspeed"),
    (["hardware.launcher=submitit", "hardware.dry_run=true"], "hardware.dry_run"),
    (["hardware.launcher=mpi"], "hardware.launcher"),
    (["hardware.nnodes=2", "hardware.node_rank=2"], "hardware.node_rank"),
])
def test_bad_hardware_settings_are_rejected(overrides, message):
    from rlhf_exp.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        compose("stage=sft", *overrides)


@pytest.mark.parametrize("overrides, message", [
    (["hardware=multinode_torchrun"], "hardware.master_addr"),
    (["hardware.nnodes=2", "hardware.master_addr=10.0.0.1"], "hardware.master_port"),
    (["hardware.nnodes=2", "hardware.master_addr=localhost", "hardware.master_port=29500"],
     "hardware.master_addr"),
    (["hardware=multinode_deepspeed", "hardware.master_addr=10.0.0.1"], "hardware.hostfile"),
])  # that the hostfile is there is preflight's check (tests/test_registry.py)
def test_multinode_launch_needs_a_reachable_rendezvous(overrides, message):
    """The multinode presets compose on their own (node-specific values come on the command
    line); what every node must agree on is checked before the launch command is made."""
    from rlhf_exp.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _cmd("stage=sft", *overrides)


def test_multinode_preset_without_master_addr_fails_in_one_line():
    proc = cli("stage=sft", "hardware=multinode_torchrun")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf-exp: error:")
    assert "hardware.master_addr" in lines[0]


# ----------------------------------------------------------------------------- slurm
def test_slurm_preset_makes_the_sbatch_script(tmp_path, monkeypatch):
    """hardware=slurm picks the submitit_slurm launcher and sizes the Slurm job from the hardware
    node: nodes x tasks-per-node = ranks, one GPU per task. The sbatch text is what submitit
    would submit (no cluster here: a stand-in `srun` satisfies submitit's check)."""
    import submitit
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from rlhf_exp.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=[
            "hardware=slurm", "hardware.nnodes=2", "hydra.launcher.partition=gpu",
            "stage=sft"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm"
    assert cfg.hardware.launcher == "submitit"
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = launcher.params
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 8, 8)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit")
    executor.update_parameters(**{k if k in base_keys else f"slurm_{k}": v
                                  for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -m rlhf_exp", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1440"):
        assert line in script.splitlines(), script
    assert "srun" in script
