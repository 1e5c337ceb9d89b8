"""CPU seconds of bench_vs_trl.py's timed DPO part, for a machine shared with other jobs.

    python bench/dpo_cpu_seconds.py ours --sft outputs/demo_sft/sft [--ours-set dpo.packing=false]
    python bench/dpo_cpu_seconds.py trl --sft outputs/demo_sft/sft

Runs one bench_vs_trl.py DPO child (100 steps x 32 pairs, --threads 1, its defaults) in this
process and adds up the process CPU time (time.process_time) of the same part its wall clock
covers: ours, the reference pass over the training pairs (perf/reference_s: not the model's
load, not the held-out pairs) and the training loop less its held-out pair evals; TRL,
trainer.train() and its precompute pass. On a box where other jobs compete for the cores, wall
seconds swing with their load while CPU seconds barely move (docs/benchmarks.md, "DPO against
TRL with packing"). Prints the child's RESULT line, then `pairs per CPU-second`.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_trl  # noqa: E402  (sets sys.path and the environment first)

CPU = {"timed": 0.0, "excluded": 0.0}


def timed(fn, key: str):
    """`fn`, its process CPU seconds added to CPU[key]."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            CPU[key] += time.process_time() - t
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("framework", choices=["ours", "trl"])
    p.add_argument("--sft", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ours-set", action="append", default=[])
    args = p.parse_args()
    if args.framework == "ours":
        from rlhf_exp.stages import dpo
        from rlhf_exp.training import train_loop

        original, scoring, calls = dpo.reference_logps, timed(dpo.reference_logps, "timed"), []

        def training_pairs_only(*a, **kw):  # score_with_reference scores them first
            calls.append(1)
            return (scoring if len(calls) == 1 else original)(*a, **kw)

        dpo.reference_logps = training_pairs_only
        train_loop.train = timed(train_loop.train, "timed")
        dpo.evaluate = timed(dpo.evaluate, "excluded")  # called inside the loop, not timed
    else:
        from trl import DPOTrainer

        DPOTrainer.train = timed(DPOTrainer.train, "timed")
        DPOTrainer._precompute_ref_logps = timed(DPOTrainer._precompute_ref_logps, "timed")
    sys.argv = ["bench_vs_trl.py", "--algo", "dpo", "--sft", args.sft, "--steps", str(args.steps),
                "--threads", "1", "--child", f"{args.framework}:dpo",
                *[a for kv in args.ours_set for a in ("--ours-set", kv)]]
    bench_vs_trl.main()
    seconds = CPU["timed"] - CPU["excluded"]
    print(f"{args.framework} {' '.join(args.ours_set)}: {seconds:.2f} CPU-s, "
          f"{args.steps * 32 / seconds:.1f} pairs per CPU-second")


if __name__ == "__main__":
    main()
