"""Peak memory and step time of one SFT step and one GRPO step on the real model
(model=smollm2-135m, 49,152-token vocabulary), each in a fresh process, on CPU.

    rlhf-exp-fetch smollm2-135m
    python bench/bench_real_model.py [--threads 1]

Each case runs the stage for 1 and for 3 optimizer steps: peak RSS is the process's peak
(VmHWM: model load, engine, the steps; reset after the imports so it starts at the imports'
RSS), the step time is (wall(3) - wall(1)) / 2, which takes load and set-up out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.conftest.compose, and bench.bench_real_model:brevity
SAMPLES = "pkg://rlhf_exp/data/examples/hub_samples/trl_conversational"
COMMON = ["model=smollm2-135m", "data_mix=trl_conversational",
          f"data_mix.sources.0.path={SAMPLES}", "data_mix.eval_fraction=0.2", "logger=none"]
CASES = {
    # full fine-tuning: weights, gradients and Adam states of 135M parameters, logits [8, 128, V]
    "sft (full, 8 x 128 tokens)": (
        "sft", ["stage=sft", "sft.micro_batch_size_per_device=8", "sft.max_prompt_len=64",
                "sft.max_len=128", "sft.lr=1e-5", "sft.warmup_steps=0", "sft.eval_every=0",
                "sft.log_every=1", "data_mix.split=[8,1,1]"],
        "sft.max_steps"),
    # GRPO with LoRA: 4 prompts x 4 completions of up to 32 tokens, rewarded by `brevity` below
    # (no reward model loaded: the policy and its reference are the models in memory)
    "grpo (LoRA, 4 x 4 completions, 32 new tokens)": (
        "grpo", ["stage=grpo", "grpo.prompts_per_step=4", "grpo.num_generations=4",
                 "grpo.micro_batch_size_per_device=16", "grpo.max_prompt_len=64",
                 "grpo.generation.max_new_tokens=32", "grpo.eval_every=0",
                 "grpo.eval_num_prompts=4", "grpo.eval_batch_size=4", "model.lora.enabled=true",
                 "grpo.reward_model_weight=0",
                 "grpo.reward_functions=[{fn: 'bench.bench_real_model:brevity', weight: 1.0}]"],
        "grpo.steps"),
}


def brevity(prompts: list[str], responses: list[str], **_) -> list[float]:
    """A reward function for the benchmark: shorter answers score higher."""
    return [-len(r) / 100 for r in responses]


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(stage: str, overrides: list[str], out: str) -> None:
    """One stage run in this process; writes {wall_s, base_mb, peak_mb} to `out`."""
    import torch  # noqa: F401  (the imports' RSS is the baseline)

    from tests.conftest import compose

    mod = __import__(f"rlhf_exp.stages.{stage}", fromlist=["train"])
    cfg = compose(*COMMON, *overrides)
    Path("/proc/self/clear_refs").write_text("5")
    base = _vmhwm_mb()
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        mod.train(cfg, Path(run_dir))
        wall = time.perf_counter() - t0
    Path(out).write_text(json.dumps({"wall_s": wall, "base_mb": base, "peak_mb": _vmhwm_mb()}))


def run_case(stage: str, overrides: list[str], steps_key: str, steps: int, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline",
               "HF_HUB_OFFLINE": "1"}
        args = [stage, json.dumps([*overrides, f"{steps_key}={steps}"]), f.name]
        subprocess.run([sys.executable, __file__, "--child", *args], check=True, cwd=ROOT,
                       env=env, stdout=subprocess.DEVNULL)
        return json.loads(Path(f.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, overrides, out = args.child
        child(stage, json.loads(overrides), out)
        return
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"{args.threads} thread(s)")
    for name, (stage, overrides, steps_key) in CASES.items():
        one = run_case(stage, overrides, steps_key, 1, args.threads)
        three = run_case(stage, overrides, steps_key, 3, args.threads)
        step = (three["wall_s"] - one["wall_s"]) / 2
        print(f"{name}: step {step:.1f} s; peak RSS {one['peak_mb']:.0f} MB after 1 step, "
              f"{three['peak_mb']:.0f} MB after 3 (imports {one['base_mb']:.0f} MB)", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
