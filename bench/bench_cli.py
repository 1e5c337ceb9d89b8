"""Command-line start-up: `rlhf-exp --help` and `rlhf-exp ... --cfg job` against the floor,
`python -c "import hydra"` (both run nothing heavy: no torch, no DeepSpeed).

    python bench/bench_cli.py             # 15 runs each, median and spread
    python bench/bench_cli.py --runs 31

Each command is a fresh interpreter (wall time of the whole process, as a user waits for it),
run in turns so that a change in the machine's load hits all of them alike. The machine's load
average is printed with the figures: on a shared machine it moves them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c 'import hydra'": [sys.executable, "-c", "import hydra"],
    "rlhf-exp --help": [sys.executable, "-m", "rlhf_exp", "--help"],
    "rlhf-exp stage=sft --cfg job": [sys.executable, "-m", "rlhf_exp", "stage=sft", "--cfg",
                                     "job"],
    "python -c 'import torch' (what --help used to load)": [sys.executable, "-c",
                                                            "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for cmd in COMMANDS.values():  # warm-up: page cache, .pyc files
        subprocess.run(cmd, capture_output=True, check=True)
    load_before = os.getloadavg()
    for _ in range(args.runs):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"{args.runs} runs each; load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.2f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.2f}' for x in load_after)}")
    print("| command | median s | min s | max s |\n|---|---:|---:|---:|")
    for name, values in times.items():
        print(f"| `{name}` | {statistics.median(values):.3f} | {min(values):.3f} | "
              f"{max(values):.3f} |")


if __name__ == "__main__":
    main()
