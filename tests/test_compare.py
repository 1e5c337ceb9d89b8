"""rlhf-exp-compare: differing config keys, final/best metrics and a PNG, from offline W&B runs."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from rlhf_exp.command.compare import Run, differing_keys, final_and_best, flatten, main


@pytest.fixture
def compare(capsys):
    """`rlhf-exp-compare ARGS` (its main(), in this process: no interpreter start-up)."""
    def run(*args: str) -> SimpleNamespace:
        code = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


def test_flatten_and_differing_keys():
    a = Run("a", config={"seed": 1, "sft": {"lr": 0.1, "steps": 3}, "run_dir": "/x/0",
                         "data_mix": {"sources": [{"name": "s", "weight": 1.0}]}})
    b = Run("b", config={"seed": 1, "sft": {"lr": 0.2, "steps": 3}, "run_dir": "/x/1",
                         "data_mix": {"sources": [{"name": "s", "weight": 2.0}]}})
    assert flatten(a.config)["data_mix.sources.0.weight"] == 1.0
    # run_dir always differs and is not an experiment setting
    assert differing_keys([a, b]) == ["data_mix.sources.0.weight", "sft.lr"]


def test_final_and_best_keep_the_last_value_of_a_repeated_step():
    """A resumed run logs the steps after its checkpoint again: the later value counts."""
    run = Run("r", job_type="sft", history=[
        {"sft/step": 1, "sft/loss": 3.0}, {"sft/step": 2, "sft/loss": 2.0},
        {"sft/step": 3, "sft/loss": 9.0},                      # killed after this
        {"sft/step": 3, "sft/loss": 1.5}, {"sft/step": 4, "sft/loss": 1.8},
        {"sft/step": 4, "sft/eval_accuracy": 0.5}])
    assert run.series("sft/loss") == [(1.0, 3.0), (2.0, 2.0), (3.0, 1.5), (4.0, 1.8)]
    assert final_and_best(run, "sft/loss") == (1.8, 1.5)          # loss: lower is better
    assert final_and_best(run, "sft/eval_accuracy") == (0.5, 0.5)
    assert final_and_best(run, "sft/missing") == (None, None)


def test_bad_path_is_one_line_exit_2(tmp_path, compare):
    proc = compare(str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr
    proc = compare(str(tmp_path))  # exists, but holds no W&B run
    assert proc.returncode == 2 and "no W&B run logs" in proc.stderr


@pytest.mark.slow
def test_compare_sweep_dir(sft_sweep, tmp_path, compare):
    sweep_dir = sft_sweep["sweep_dir"]
    assert sft_sweep["proc"].returncode == 0, sft_sweep["proc"].stderr[-3000:]
    png = tmp_path / "curves.png"
    proc = compare(str(sweep_dir), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "4 runs; differing config keys: seed, sft.lr", proc.stdout
    header = lines[1].split()
    assert header[:4] == ["run", "id", "seed", "sft.lr"]
    assert "sft/loss" in header and "sft/eval_loss" in header
    rows = [ln.split() for ln in lines[2:6]]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    for row in rows:
        result = json.loads((sweep_dir / row[0] / "result.json").read_text())
        assert row[1] == result["wandb_run_id"]
        # final sft/loss and sft/eval_loss as the stage reported them
        assert float(row[4]) == pytest.approx(result["metrics"]["sft/loss"], rel=1e-4)
        assert float(row[6]) == pytest.approx(result["metrics"]["sft/eval_loss"], rel=1e-4)
    assert {(r[2], r[3]) for r in rows} == {("1", "0.001"), ("1", "0.003"), ("2", "0.001"),
                                            ("2", "0.003")}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert re.search(rf"plot: {re.escape(str(png))}$", proc.stdout.strip())
    # chosen metrics
    proc = compare(str(sweep_dir / "0"), str(sweep_dir / "3"), "--metrics", "sft/lr",
                   "--plot", str(tmp_path / "lr.png"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "2 runs; differing config keys: seed, sft.lr"
    assert lines[1].endswith("sft/lr final  sft/lr best(max)") and len(lines) == 5


def test_stage_placeholder_and_wall_time_axis(tmp_path):
    """`{stage}` names each run's own metric; x="time" uses W&B's `_runtime`."""
    from rlhf_exp.command.compare import Run, final_and_best, plot, table

    history = [{"_runtime": 2.0, "ppo/step": 0, "ppo/eval_gold_reward": 0.5},
               {"_runtime": 9.5, "ppo/step": 10, "ppo/eval_gold_reward": 0.8}]
    ppo = Run(run_id="a", label="ppo", job_type="ppo", history=history)
    dpo = Run(run_id="b", label="dpo", job_type="dpo", history=[],
              summary={"dpo/eval_gold_reward": 0.9})
    metric = "{stage}/eval_gold_reward"
    assert ppo.series(metric) == [(0.0, 0.5), (10.0, 0.8)]
    assert ppo.series(metric, x="time") == [(2.0, 0.5), (9.5, 0.8)]
    assert final_and_best(ppo, metric) == (0.8, 0.8)
    assert final_and_best(dpo, metric) == (0.9, 0.9)  # from the summary: no history rows
    text = table([ppo, dpo], [], [metric])
    assert "0.8" in text and "0.9" in text
    assert plot([ppo, dpo], [], [metric], tmp_path / "x.png", x="time").stat().st_size > 0
