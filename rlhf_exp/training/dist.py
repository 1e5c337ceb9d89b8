"""Process-group helpers. Every stage works the same in one process and under torchrun.

torch is imported inside the functions that need it: the dispatcher imports this module to
know whether it is a launched rank, and `rlhf-exp --help` / `--cfg job` must not pay for torch.
"""

from __future__ import annotations

import os
import socket
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inside_launch() -> bool:
    """True when a launcher (torchrun, deepspeed) started this process as one of several ranks."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def adopt_submitit_env(master_port: int = 0) -> int:
    """Inside a submitit job (Slurm via hydra/launcher=submitit_slurm, or submitit_local), make
    each task one rank: RANK / LOCAL_RANK / WORLD_SIZE from the job's tasks, MASTER_ADDR = the
    job's first host, MASTER_PORT = `master_port` or one derived from the job id (the same in
    every task, no communication needed). Returns the world size."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError as exc:
        from rlhf_exp.errors import UserError

        raise UserError("hardware.launcher=submitit runs only inside a submitit job: add "
                        "`-m hydra/launcher=submitit_slurm` (or submitit_local) and set "
                        "hydra.launcher.tasks_per_node / hydra.launcher.nodes") from exc
    port = master_port or 20000 + int("".join(c for c in env.job_id if c.isdigit()) or 0) % 20000
    os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank),
                      WORLD_SIZE=str(env.num_tasks), LOCAL_WORLD_SIZE=str(env.num_tasks
                                                                         // env.num_nodes),
                      NODE_RANK=str(env.node), MASTER_ADDR=env.hostnames[0],
                      MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        # as torchrun does: ranks sharing a node must not each start one thread per core.
        # Slurm binds each task to its cpus_per_task; the local executor shares all cores.
        per_task = os.environ.get("SLURM_CPUS_PER_TASK")
        local = max(1, env.num_tasks // env.num_nodes)
        torch.set_num_threads(int(per_task) if per_task else
                              max(1, len(os.sched_getaffinity(0)) // local))
    return env.num_tasks


def init(device: str) -> None:
    """Initialise the process group once per process (gloo on CPU, nccl on CUDA).

    A plain single process gets RANK/WORLD_SIZE/MASTER_* set here, else DeepSpeed tries MPI
    discovery (and fails on mpi4py)."""
    import torch
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        return
    # DeepSpeed's ZeRO collectives call torch APIs that torch 2.13 deprecates; the warning would
    # repeat on every step of every rank and bury the real output
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.\w+` is deprecated")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    if device == "cuda":
        torch.cuda.set_device(local_rank())
    else:
        _skip_shm_comm_build(deepspeed)
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo",
                               verbose=False)


def _skip_shm_comm_build(deepspeed) -> None:
    """On CPU, DeepSpeed's comm backend JIT-compiles its `deepspeed_shm_comm` op with gcc (about
    1.5 minutes on first use, gcc lines on the console, a `lock` file left behind by a killed
    build that hangs every later run). The op only serves `inference_all_reduce` (tensor-parallel
    inference), which we never call; every collective we use goes through torch.distributed
    (gloo). Marking the op incompatible makes DeepSpeed skip the build, as it does on platforms
    without it (deepspeed/comm/torch.py: build_shm_op reads `deepspeed.ops.__compatible_ops__`,
    DeepSpeed's cached probe of which ops can build, "meant to be edited").

    The probe itself compiles test programs with gcc; build_shm_op is its only reader in
    DeepSpeed 0.19 (pinned), so when it has not run yet we answer for the one op it asks about."""
    ops = deepspeed.ops
    if "__compatible_ops__" in vars(ops):  # probed already: keep its other answers
        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


def rank() -> int:
    import torch.distributed as torch_dist

    return torch_dist.get_rank() if torch_dist.is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    import torch.distributed as torch_dist

    if torch_dist.is_initialized():
        return torch_dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as torch_dist

    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.barrier()


def device_for(device: str) -> torch.device:
    import torch

    return torch.device(f"cuda:{local_rank()}") if device == "cuda" else torch.device("cpu")


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean of each value over ranks (metrics computed on each rank's shard)."""
    if world_size() == 1:
        return list(values)
    import torch
    import torch.distributed as torch_dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return (t / world_size()).tolist()


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    if world_size() == 1:
        return obj
    import torch.distributed as torch_dist

    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """The concatenation of every rank's (equal-shaped) tensor, in rank order."""
    if world_size() == 1:
        return x
    import torch
    import torch.distributed as torch_dist

    parts = [torch.empty_like(x) for _ in range(world_size())]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
