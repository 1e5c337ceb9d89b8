"""Starting the ranks of a multi-process run: when `hardware` asks for more than one process
and we are not yet inside a launch, the dispatcher re-executes itself under torchrun or
`deepspeed --no_local_rank` with the same composition (the user's --config-dir /
hydra.searchpath / --config-name and overrides) and the run dir fixed once, so every rank
composes the same config and writes to the same place. Torch-free."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig

from rlhf_exp.command import composition
from rlhf_exp.command.objective import objective_value
from rlhf_exp.config import check_rendezvous
from rlhf_exp.training import dist, interrupt

CONFIG_DIGEST_ENV = "RLHF_EXP_CONFIG_DIGEST"


def launch_command(cfg: DictConfig, overrides: list[str], run_dir: str) -> list[str]:
    """The command that starts the ranks of this node (printed by hardware.dry_run=true).

    torchrun: run on every node with that node's hardware.node_rank (static rendezvous at
    master_addr:master_port). deepspeed: run once, on node 0; with a hostfile its runner starts
    the other nodes over ssh (pdsh). Both re-run this app with the same overrides and the run dir
    fixed, so every rank writes to one place."""
    hw = cfg.hardware
    check_rendezvous(cfg)
    port = hw.master_port or dist.free_port()
    child = [o for o in overrides if not o.startswith("hardware.dry_run=")]
    child += [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
    if hw.launcher == "deepspeed":
        # `python -m deepspeed.launcher.runner` is the `deepspeed` script, without needing the
        # venv's bin/ on PATH; --no_local_rank because Hydra rejects a --local_rank argument
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank",
               f"--num_nodes={hw.nnodes}",
               f"--{'num_gpus' if hw.device == 'cuda' else 'num_accelerators'}="
               f"{hw.nproc_per_node}",
               f"--master_addr={hw.master_addr}", f"--master_port={port}"]
        if hw.hostfile:  # preflight checked it is a file, ~ expanded
            cmd.append(f"--hostfile={Path(hw.hostfile).expanduser()}")
        return [*cmd, "--module", "rlhf_exp", *child]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={hw.nproc_per_node}",
            f"--nnodes={hw.nnodes}", f"--node_rank={hw.node_rank}",
            f"--master_addr={hw.master_addr}", f"--master_port={port}",
            "-m", "rlhf_exp", *child]


class RanksFailed(RuntimeError):
    """The ranks a multi-process run started exited non-zero (their output says why)."""

    def __init__(self, rc: int):
        super().__init__(f"the launched ranks exited with code {rc}")
        self.rc = rc


def stop_with_parent() -> None:
    """Runs in the launcher's process before exec (Linux): if this process dies, even by
    SIGKILL, the launcher gets SIGTERM and stops its ranks, instead of training on orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def rank_argv(extra: list[str]) -> list[str]:
    """The command line of each launched rank: this run's composition flags (--config-dir,
    --config-path, --config-name, hydra.searchpath) and overrides, plus `extra`."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    return [*composition.rank_args(hc), *hc.overrides.task, *extra]


def relaunch(cfg: DictConfig, run_dir: str, extra: list[str] = ()) -> float | None:
    """Start the ranks of this node and wait for them; returns the objective they reported."""
    cmd = launch_command(cfg, rank_argv(list(extra)), run_dir)
    print(f"rlhf-exp: launching {cfg.hardware.nproc_per_node * cfg.hardware.nnodes} ranks: "
          f"{shlex.join(cmd)}", flush=True)
    # each rank checks it composed this very config (CONFIG_DIGEST_ENV, same_config_as_launcher)
    env = {**os.environ, "RLHF_EXP_RUN_DIR": run_dir,
           CONFIG_DIGEST_ENV: composition.digest(cfg)}
    rc = interrupt.run_launcher(cmd, env, preexec_fn=stop_with_parent)  # Ctrl-C: one line
    if rc != 0:
        raise RanksFailed(rc)
    result = Path(run_dir) / "result.json"
    metrics = json.loads(result.read_text()).get("metrics", {}) if result.exists() else {}
    return objective_value(cfg, metrics)


def same_config_as_launcher(cfg: DictConfig) -> None:
    """In a launched rank: the config composed here must be the launcher's (a rank that lost the
    user's config folder would otherwise train the defaults without a word)."""
    expected = os.environ.get(CONFIG_DIGEST_ENV)
    if expected and composition.digest(cfg) != expected:
        raise RuntimeError(f"rank {dist.rank()} composed a different config than the process "
                           f"that launched it (digest {composition.digest(cfg)} != {expected}); "
                           f"its command line: {shlex.join(sys.argv)}")
