"""DeepSpeed engine setup: the config dict rendered from the composed run, optimizer, schedule.

No "auto" values: raw `deepspeed.initialize` rejects them, so batch sizes are filled from the
stage config. The optimizer is a client `torch.optim.AdamW` (DeepSpeed's own CPU Adam would
JIT-compile for a minute on a CPU machine).
"""

from __future__ import annotations

import math
import weakref

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_exp.training import dist


def zero_optimization(zero: DictConfig, stage: int | None = None) -> dict:
    """The `zero_optimization` block for a zero_stage option (`stage` overrides its level)."""
    level = zero.stage if stage is None else stage
    block: dict = {"stage": level}
    if level >= 1:
        block.update(reduce_bucket_size=zero.reduce_bucket_size,
                     allgather_bucket_size=zero.allgather_bucket_size)
    if level >= 2:
        block.update(overlap_comm=zero.overlap_comm, contiguous_gradients=zero.contiguous_gradients)
    if level == 3:
        block.update(stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size,
                     stage3_param_persistence_threshold=zero.stage3_param_persistence_threshold,
                     # consolidated weights on save: checkpoints stay plain HF dirs
                     stage3_gather_16bit_weights_on_model_save=True)
        if zero.offload_param != "none":
            block["offload_param"] = {"device": zero.offload_param, "pin_memory": False}
    if level >= 1 and zero.offload_optimizer != "none":
        block["offload_optimizer"] = {"device": zero.offload_optimizer, "pin_memory": False}
    block.update(OmegaConf.to_container(zero.extra, resolve=True) if zero.extra else {})
    return block


def deepspeed_config(cfg: DictConfig, *, micro_batch_size: int, grad_accum: int,
                     max_grad_norm: float, zero_stage: int | None = None,
                     world_size: int | None = None) -> dict:
    """The full DeepSpeed config of one engine; train_batch_size is the global batch."""
    world = dist.world_size() if world_size is None else world_size
    precision = cfg.hardware.precision
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero_optimization(cfg.zero_stage, zero_stage),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage.offload_optimizer != "none":
        ds["zero_force_ds_cpu_optimizer"] = False  # we pass torch AdamW on purpose
    return ds


def lr_lambda(name: str, warmup: int, total: int, min_ratio: float):
    """Multiplier of the base LR at optimizer step s: linear warmup, then the named decay."""
    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if name == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if name == "linear":
            return min_ratio + (1 - min_ratio) * (1 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


# Every engine built in this process and not yet released. A ZeRO engine's gradient hooks hold a
# reference to it that Python's garbage collector cannot see, so an engine outlives its last
# reference (weights, gradients and optimizer states: ~4x the trained weights) until destroy()
# removes the hooks. That matters when several stages run in one process (pipeline, shoot-out).
_LIVE: list[weakref.ref] = []


def release_engines() -> int:
    """Destroy every DeepSpeed engine built in this process since the last call (their hooks
    removed, so their memory can be freed once nothing else refers to them); the count.
    Their modules stay usable for inference."""
    released = 0
    while _LIVE:
        engine = _LIVE.pop()()
        if engine is not None:
            engine.destroy()
            released += 1
    return released


def build_train_engine(model, cfg: DictConfig, *, lr: float, weight_decay: float,
                       betas=(0.9, 0.95), eps: float = 1e-8, micro_batch_size: int,
                       grad_accum: int, max_grad_norm: float, scheduler: str, warmup_steps: int,
                       total_steps: int, min_lr_ratio: float = 0.0,
                       zero_stage: int | None = None):
    """A DeepSpeed engine with AdamW and a LambdaLR schedule stepped per optimizer step."""
    import deepspeed

    dist.init(cfg.hardware.device)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = cfg.hardware.device == "cuda" and cfg.zero_stage.offload_optimizer == "none"
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                  betas=tuple(betas), eps=eps, fused=fused or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(scheduler, warmup_steps, total_steps, min_lr_ratio))
    ds_config = deepspeed_config(cfg, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                                 max_grad_norm=max_grad_norm, zero_stage=zero_stage)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                      config=ds_config)
    _LIVE.append(weakref.ref(engine))
    return engine


def build_eval_engine(model, cfg: DictConfig, *, zero_stage: int | None = None):
    """A frozen model for inference only (PPO's reference and reward models). Under ZeRO-3 the
    weights stay partitioned across ranks; otherwise the module is simply placed on the device."""
    import deepspeed

    dist.init(cfg.hardware.device)
    model.eval().requires_grad_(False)
    level = cfg.zero_stage.stage if zero_stage is None else zero_stage
    if level != 3:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        return model.to(dist.device_for(cfg.hardware.device), dtype[cfg.hardware.precision])
    ds_config = deepspeed_config(cfg, micro_batch_size=1, grad_accum=1, max_grad_norm=0.0,
                                 zero_stage=3)
    ds_config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    _LIVE.append(weakref.ref(engine))
    engine.module.eval()
    # DeepSpeed's ZeRO-3 parameter manager of this model (its hooks keep it alive anyway); kept
    # reachable so callers and tests can see where the partitions live (`.offload_device`)
    engine.module.zero_param_manager = engine.optimizer
    return engine.module


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off for good, also in train mode: nn.Dropout modules (LoRA's included) get p=0,
    and float `*dropout*` attributes (attention dropout read at forward time, e.g. Llama's
    `attention_dropout`, OPT's `dropout`) are set to 0. The RL stages compute log-probs and
    values during the rollout and again in the update: both must be the same function (a
    DeepSpeed-Chat defect). Gradient checkpointing needs train mode, so eval() would not do."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def build_frozen(model, cfg: DictConfig, *, zero_stage: int, offload: bool):
    """An inference-only model (a reference policy, a reward model), dropout off. offload =
    ZeRO-3 with the parameters offloaded to CPU memory (DeepSpeed-Chat's
    --offload_reference_model); placement() says where it ended up."""
    import copy

    disable_dropout(model)
    if not offload:
        return build_eval_engine(model, cfg, zero_stage=zero_stage)
    off = copy.deepcopy(cfg)
    off.zero_stage.offload_param = "cpu"
    off.zero_stage.stage3_param_persistence_threshold = 0  # keep no weight resident
    return build_eval_engine(model, off, zero_stage=3)


def placement(offload: bool, zero_stage: int) -> str:
    """Where build_frozen puts a model: zero3-offload-cpu, zero3 (partitioned) or device."""
    return "zero3-offload-cpu" if offload else ("zero3" if zero_stage == 3 else "device")
