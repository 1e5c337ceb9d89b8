"""The shared training loop's pieces (rlhf_exp/training/train_loop.py) and what it relies on: the
NaN/inf stop (on one rank and agreed across two), equal eval shares per rank, atomic checkpoint
pruning, and the merged W&B history of a resumed run.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path

import pytest

from rlhf_exp.errors import NonFiniteLossError, UserError
from rlhf_exp.training import checkpoint, resume, train_loop
from rlhf_exp.training.wandb_reader import LocalRun, merge_parts


# ----------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_names_the_step(bad):
    train_loop.check_finite(2.5, 6, "sft")  # finite: nothing happens
    with pytest.raises(NonFiniteLossError) as exc:
        train_loop.check_finite(bad, 7, "sft")
    assert str(exc.value) == f"sft: the training loss is {bad} at step 7; stopped"
    assert isinstance(exc.value, UserError) and "\n" not in str(exc.value)


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks: rank 1 sees NaN at step 3; both must stop there."""
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                  world_size=2)
    outcome = "finished"
    for step in (1, 2, 3, 4):
        try:
            train_loop.check_finite(math.nan if (rank, step) == (1, 3) else 1.0, step, "reward")
        except NonFiniteLossError as exc:
            outcome = str(exc)
            break
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)
    torch_dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_check_finite_agrees_across_ranks(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "init"), str(tmp_path)))
             for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank was left waiting in a collective"
    assert (tmp_path / "rank1.txt").read_text() == \
        "reward: the training loss is nan at step 3; stopped"
    assert (tmp_path / "rank0.txt").read_text() == \
        "reward: the training loss is not finite on another rank at step 3; stopped"


@pytest.mark.slow  # trains
def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, rlhf_exp):
    """An absurd LR blows the weights up after step 1: step 2's gradients overflow (DeepSpeed
    would skip the update, and every later one). The run exits 2 with one line naming step 2;
    checkpoint 1 (written before) is intact and loads."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    proc = rlhf_exp("stage=sft", "sft.lr=1e30", "sft.lr_scheduler=constant", "sft.warmup_steps=0",
                    "sft.max_steps=4", "sft.save_every=1", "sft.log_every=1", "sft.eval_every=0",
                    "sft.micro_batch_size_per_device=8", "logger.log_checkpoints=false",
                    "data_mix.sources.0.synthetic.num_examples=600", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("rlhf-exp:")]
    step1 = checkpoint.step_dir(run_dir, 1)
    assert line.startswith("rlhf-exp: error: sft: the gradient norm is inf at step 2; stopped. "
                           f"The last checkpoint {step1} is kept"), line
    assert resume.latest(run_dir) == step1 and not (run_dir / "result.json").exists()
    assert resume.read_state(step1)["step"] == 1
    model = AutoModelForCausalLM.from_pretrained(step1)
    assert all(p.isfinite().all() for p in model.parameters())


# ----------------------------------------------------------------------------- eval shares
@pytest.mark.parametrize("n,world", [(17, 2), (5, 3), (4, 2), (1, 2)])
def test_rank_share_pads_every_rank_to_the_same_length(n, world):
    shares = [train_loop.rank_share(n, r, world) for r in range(world)]
    assert len({len(indices) for indices, _ in shares}) == 1  # same number of forwards
    real = sorted(i for indices, k in shares for i in indices[:k])
    assert real == list(range(n))  # every item scored once


def test_sft_eval_padding_rows_count_no_tokens():
    from rlhf_exp.stages.sft import eval_features_for_rank

    feats = [{"input_ids": [1, 5, i], "labels": [-100, 5, i]} for i in range(3)]
    rank1 = eval_features_for_rank(feats, 1, 2)  # items 1, then padding
    assert [f["input_ids"][-1] for f in rank1] == [1, 0]
    assert rank1[0]["labels"] == [-100, 5, 1] and rank1[1]["labels"] == [-100] * 3
    assert feats[0]["labels"] == [-100, 5, 0]  # the real row is untouched


# ZeRO-3 that really gathers every parameter in every forward (the tiny model's parameters are
# otherwise below the persistence threshold and stay whole), and an SFT eval slice of 17
# examples: split 9 / 8 over 2 ranks in micro-batches of 8, the ranks would run 2 and 1
# forwards, and the run used to hang in the final eval.
ODD_EVAL_ZERO3 = ["stage=sft", "zero_stage=zero3",
                  "zero_stage.stage3_param_persistence_threshold=0",
                  "+zero_stage.extra.stage3_max_reuse_distance=0",
                  "+zero_stage.extra.stage3_max_live_parameters=0",
                  "zero_stage.stage3_prefetch_bucket_size=0",
                  "data_mix.sources.0.synthetic.num_examples=1700", "sft.max_steps=2",
                  "sft.micro_batch_size_per_device=8", "sft.eval_every=0", "sft.log_every=1",
                  "logger=none"]


@pytest.mark.slow  # torchrun, 2 ranks
def test_two_ranks_zero3_eval_of_an_odd_slice_finishes_with_the_one_rank_value(tmp_path):
    from rlhf_exp.stages import sft
    from tests.conftest import cli, compose

    proc = cli(*ODD_EVAL_ZERO3, "hardware.nproc_per_node=2",
               f"hydra.run.dir={tmp_path / 'two'}", timeout=420)  # a hang fails here
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "/ 17 eval examples" in proc.stdout
    two = json.loads((tmp_path / "two" / "result.json").read_text())["metrics"]
    # one rank, accumulation 2: the same global batches (rlhf_exp/data/sampler.py)
    _, _, one = sft.train(compose(*ODD_EVAL_ZERO3, "sft.gradient_accumulation_steps=2"),
                          tmp_path / "one")
    assert abs(two["sft/eval_loss"] - one.metrics["sft/eval_loss"]) < 1e-4


# ----------------------------------------------------------------------------- prune
def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    path = checkpoint.step_dir(run_dir, step)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")
    (path / resume.STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_prune_killed_half_way_leaves_no_checkpoint_without_weights(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)

    def killed_while_deleting(path, ignore_errors=False):
        (Path(path) / "model.safetensors").unlink()  # the weights go first...
        raise KeyboardInterrupt  # ...then the process dies

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune(tmp_path, keep_last=1)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    for path in root.glob("step_*"):  # what resume would look at: only whole checkpoints
        assert (path / "model.safetensors").exists(), f"{path.name} lost its weights"
    assert resume.latest(tmp_path) == checkpoint.step_dir(tmp_path, 3)
    checkpoint.prune(tmp_path, keep_last=1)  # the next save prunes again and clears the rest
    assert sorted(p.name for p in root.iterdir()) == ["step_000003"]


# ----------------------------------------------------------------------------- W&B history
def _part(steps: list[int], value: float, **kw) -> LocalRun:
    rows = [{"sft/step": s, "sft/loss": value + s} for s in steps]
    return LocalRun(file=Path("x"), run_id="abc", job_type="sft", history=rows, **kw)


def test_merged_history_holds_each_step_once_later_part_wins():
    # killed after checkpoint 2 with steps 3-4 already on disk; resumed from 2, ran to 6
    killed = _part([1, 2, 3, 4], 0.0, summary={"a": 1}, config={"seed": 1})
    resumed = _part([3, 4, 5, 6], 100.0, summary={"b": 2}, config={"seed": 1}, exit_code=0)
    run = merge_parts([killed, resumed])
    assert [r["sft/step"] for r in run.history] == [1, 2, 3, 4, 5, 6]
    assert run.metric("sft/loss") == [1.0, 2.0, 103.0, 104.0, 105.0, 106.0]
    assert run.summary == {"a": 1, "b": 2} and run.exit_code == 0
    # a part without rows (killed before its first log) changes nothing
    assert merge_parts([killed, _part([], 0.0)]).history == killed.history
