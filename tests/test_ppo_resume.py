"""PPO's resumable state across ranks: with two ranks every rank holds the same adaptive KL
coefficient (the kill-then-resume test of every stage, PPO included: tests/test_resume.py)."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_exp.training import checkpoint
from tests.conftest import cli, compose

# everything stateful switched on: adaptive KL, reward normalisation, EMA, ptx, two epochs x two
# minibatches (the minibatch shuffle generator), sampling (the sampling generator)
ARGS = ["stage=ppo", "seed=7", "data_mix.sources.0.synthetic.num_examples=600",
        "ppo.steps=4", "ppo.rollout_batch_size=8", "ppo.micro_batch_size_per_device=2",
        "ppo.ppo_epochs=2", "ppo.num_minibatches=2", "ppo.eval_every=2",
        "ppo.eval_num_prompts=8", "ppo.eval_batch_size=8", "ppo.save_every=2", "ppo.keep_last=1",
        "ppo.ema.enabled=true", "ppo.ema.decay=0.9", "ppo.kl.adaptive=true", "ppo.kl.target=0.2",
        "ppo.kl.horizon=50", "ppo.normalize_reward=true", "ppo.ptx_coef=0.1", "ppo.log_every=1",
        "logger.log_checkpoints=false", "logger.table_every=0"]


@pytest.mark.slow
def test_two_ranks_hold_the_same_adaptive_kl_coefficient(tmp_path):
    run_dir = tmp_path / "ppo2"
    proc = cli(*ARGS, "ppo.steps=3", "ppo.save_every=1", "ppo.keep_last=5",
               "hardware.nproc_per_node=2", "ppo.ema.enabled=false", f"hydra.run.dir={run_dir}",
               timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (1, 2):
        ckpt = checkpoint.step_dir(run_dir, step)
        shared = json.loads((ckpt / "trainer_state.json").read_text())["kl_ctl"]["value"]
        per_rank = [torch.load(ckpt / f"rank{r}.pt", weights_only=False)["local"]["kl_coef"]
                    for r in range(2)]
        assert per_rank == [shared, shared], step
    assert shared != 0.1


def _finish_step_on_rank(rank: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as torch_dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    from types import SimpleNamespace

    from rlhf_exp.stages import ppo

    cfg = compose("stage=ppo", "ppo.kl.adaptive=true", "ppo.kl.target=1.0",
                  "ppo.kl.horizon=100", "ppo.rollout_batch_size=8")
    state = ppo.fresh_state(cfg, None)
    # the ranks' own KLs differ (0.5 and 1.5); the global one is exactly the target
    local = {"ppo/kl": 0.5 + rank, "ppo/actor_loss": 0.1, "ppo/critic_loss": 0.1,
             "_gold_sum": 0.0, "_gold_n": 0.0}
    ppo.finish_step(SimpleNamespace(ema=None), cfg, state, local)
    torch.save(state.kl_ctl.value, f"{out_dir}/rank{rank}.pt")
    torch_dist.destroy_process_group()


@pytest.mark.slow
def test_finish_step_feeds_the_controller_the_global_kl_on_every_rank(tmp_path):
    """Two real gloo ranks with different local KLs: both end with the coefficient of the
    global KL (on target: unchanged), not of their own (which would move them apart)."""
    import torch.multiprocessing as mp

    from rlhf_exp.training.dist import free_port

    mp.spawn(_finish_step_on_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    values = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert values == [0.1, 0.1]  # KL == target: the coefficient stays at ppo.kl.coef
