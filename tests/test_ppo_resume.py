"""PPO resume: a run killed with SIGKILL after a training checkpoint and restarted with
`resume=<run dir>` ends exactly like an uninterrupted run (actor, critic, both optimizers and
schedules, the KL controller, the running reward statistics, the EMA, RNG and data position, the
same W&B run). And with two ranks every rank holds the same adaptive KL coefficient."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf_exp import checkpoint
from rlhf_exp.wandb_reader import read_merged, read_run, run_files
from tests.conftest import cli, compose
from tests.test_resume import _kill_after_checkpoint, _steps, _wandb_ids

# everything stateful switched on: adaptive KL, reward normalisation, EMA, ptx, two epochs x two
# minibatches (the minibatch shuffle generator), sampling (the sampling generator)
ARGS = ["stage=ppo", "seed=7", "data_mix.sources.0.synthetic.num_examples=600",
        "ppo.steps=4", "ppo.rollout_batch_size=8", "ppo.micro_batch_size_per_device=2",
        "ppo.ppo_epochs=2", "ppo.num_minibatches=2", "ppo.eval_every=2",
        "ppo.eval_num_prompts=8", "ppo.eval_batch_size=8", "ppo.save_every=2", "ppo.keep_last=1",
        "ppo.ema.enabled=true", "ppo.ema.decay=0.9", "ppo.kl.adaptive=true", "ppo.kl.target=0.2",
        "ppo.kl.horizon=50", "ppo.normalize_reward=true", "ppo.ptx_coef=0.1", "ppo.log_every=1",
        "logger.log_checkpoints=false", "logger.table_every=0"]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_ppo_sigkill_then_resume_matches_uninterrupted_run(tmp_path, rlhf_exp):
    from rlhf_exp.stages import ppo

    killed = tmp_path / "killed"
    _kill_after_checkpoint(killed, 2, ARGS)
    assert not (killed / "result.json").exists(), "the run finished before it was killed"
    (id_before,) = set(_wandb_ids(killed))
    proc = rlhf_exp(f"resume={killed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ppo: resumed from" in proc.stdout and "at step 2/4" in proc.stdout
    resumed = json.loads((killed / "result.json").read_text())
    assert set(_wandb_ids(killed)) == {id_before} == {resumed["wandb_run_id"]}

    _, _, ref = ppo.train(compose(*ARGS), tmp_path / "reference")
    for key in ("ppo/eval_gold_reward", "ppo/eval_reward_score", "ppo/init_eval_gold_reward",
                "ppo/kl", "ppo/kl_coef", "ppo/reward_score", "ppo/gold_reward",
                "ppo/response_length"):
        assert abs(resumed["metrics"][key] - ref.metrics[key]) < 1e-5, key
    assert resumed["metrics"]["ppo/kl_coef"] != 0.1  # the controller moved, and resumed
    ckpts, ref_ckpts = killed / "checkpoints", tmp_path / "reference" / "checkpoints"
    for name in ("final", "critic", "ema"):
        a = _weights(ckpts / name if name != "final" else checkpoint.final_checkpoint(killed))
        b = _weights(ref_ckpts / name if name != "final"
                     else checkpoint.final_checkpoint(tmp_path / "reference"))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, name

    # W&B: the killed part holds every row up to the checkpoint (flushed before it was
    # written); the merged history holds each step once, with the uninterrupted run's values
    first_part, second_part = (read_run(f) for f in sorted(
        run_files(killed / "wandb"), key=lambda f: f.parent.name))
    assert _steps(first_part, "ppo/kl", "ppo")[:2] == [1, 2]
    assert min(_steps(second_part, "ppo/step", "ppo")) == 3
    (run,) = read_merged(killed / "wandb")
    (ref_run,) = read_merged(tmp_path / "reference" / "wandb")
    for key in ("ppo/kl", "ppo/actor_loss", "ppo/critic_loss", "ppo/kl_coef"):
        assert _steps(run, key, "ppo") == _steps(ref_run, key, "ppo") == [1, 2, 3, 4], key
        got, want = run.metric(key), ref_run.metric(key)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5, key
    # held-out evals at steps 0, 2 and 4, each once (the resumed run does not redo step 0)
    assert _steps(run, "ppo/eval_gold_reward", "ppo") == [0, 2, 4]
    assert run.metric("ppo/eval_gold_reward") == pytest.approx(
        ref_run.metric("ppo/eval_gold_reward"), abs=1e-5)

    # running the finished run dir again trains nothing and returns its result
    again = ppo.run(compose(*ARGS, f"resume={killed}"), killed)
    assert again.metrics == resumed["metrics"]


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

    from rlhf_exp.dist import free_port

    mp.spawn(_finish_step_on_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    values = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert values == [0.1, 0.1]  # KL == target: the coefficient stays at ppo.kl.coef
