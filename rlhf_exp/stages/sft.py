"""Stage 1: supervised fine-tuning of a causal LM on prompt/response demonstrations.

Run: rlhf-exp stage=sft [model=...] [zero_stage=...] [sft.lr=...]

Reads `cfg.sft` (conf/sft/default.yaml). The loss covers response tokens only (prompt tokens are
labelled -100), every response ends with EOS, and EOS is distinct from the pad token.
Batch sizes: `sft.micro_batch_size_per_device` per device per forward; one optimizer step sees
micro * gradient_accumulation_steps * world_size sequences (logged as sft/global_batch_size).
The optimizer-step loop (logging, eval, checkpoints, resume) is rlhf_exp/train_loop.py.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from rlhf_exp import dist, engine, models, resume, runtime, train_loop
from rlhf_exp.data import build_stage_data
from rlhf_exp.data import cache_dir as data_cache_dir
from rlhf_exp.data.sampler import GlobalBatchSampler
from rlhf_exp.data.tokenize import collate_sft, tokenize_sft
from rlhf_exp.errors import DataError
from rlhf_exp.tracking import Tracker, resolve_init


def lm_step(eng, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: the mean next-token loss over its response tokens (HF's loss)."""
    return eng(**batch).loss, {}


def evaluate(eng, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Mean per-token loss on the held-out slice over all ranks. Each rank scores its
    `eval_features_for_rank` share: the same number of forwards everywhere (ZeRO-3), padding
    rows carry no labels and so no tokens."""
    eng.module.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = eng(**batch).loss  # a forward on every rank, even for a batch of padding
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n:
                loss_sum += float(loss) * n
                tokens += n
    eng.module.train()
    loss_sum, tokens = dist.all_reduce_mean([loss_sum, tokens], device)
    return {"sft/eval_loss": loss_sum / max(tokens, 1e-9)}


def eval_features_for_rank(eval_set: list[dict], rank: int, world: int) -> list[dict]:
    """This rank's equal-length share of the held-out features; padding rows copy a real one
    with every label masked (-100), so they count no tokens."""
    indices, real = train_loop.rank_share(len(eval_set), rank, world)
    pad = [{**eval_set[i], "labels": [-100] * len(eval_set[i]["labels"])}
           for i in indices[real:]]
    return [eval_set[i] for i in indices[:real]] + pad


def train(cfg: DictConfig, run_dir: Path) -> tuple[object, object, runtime.StageResult]:
    """Train and save; returns (engine, tokenizer, result) so callers and tests can inspect."""
    sc = cfg.sft
    runtime.set_seed(cfg.seed)
    dist.init(cfg.hardware.device)
    device = dist.device_for(cfg.hardware.device)
    world = dist.world_size()
    # bad data stops the run here, before a W&B run or any file exists
    data = build_stage_data(cfg.data_mix, "sft", cfg.seed)
    runtime.save_run_config(cfg, run_dir)
    # resume: the newest training checkpoint of `resume=<run dir>` or of this run dir (automatic);
    # None = from scratch. A resumed run continues its W&B run (same id).
    resume_from = resume.find(cfg, run_dir, "sft")
    saved = resume.read_state(resume_from) if resume_from else {}
    tracker = Tracker(cfg, run_dir, "sft", run_id=saved.get("wandb_run_id"))

    # --- model and tokenizer: from a previous stage (path / artifact) or the base model
    init_artifact = None
    if sc.init_from:
        base, init_artifact = resolve_init(sc.init_from, tracker)
        base = str(base)
    else:
        base = models.resolve_base_path(cfg.model)
    tokenizer = models.load_tokenizer(base, cfg.model)
    model = models.load_causal_lm(base, tokenizer, cfg.model, cfg.hardware.precision)
    model = models.apply_lora(model, cfg.model.lora)
    trainable, total = models.count_parameters(model)

    # --- features: this stage's disjoint share of the data_mix, tokenized (cached)
    template = cfg.model.prompt_template
    cache = data_cache_dir(cfg.data_mix)
    train_set, dropped = tokenize_sft(data.train, tokenizer, template, sc.max_prompt_len,
                                      sc.max_len, cfg.data_mix.overlong, cache_dir=cache)
    eval_set, _ = tokenize_sft(data.eval, tokenizer, template, sc.max_prompt_len, sc.max_len,
                               cfg.data_mix.overlong, cache_dir=cache)
    if not train_set:
        raise DataError(f"sft: all {dropped} training examples are longer than sft.max_len="
                        f"{sc.max_len} / max_prompt_len={sc.max_prompt_len} and "
                        "data_mix.overlong=drop; raise the limits or use overlong=truncate")
    collate = partial(collate_sft, pad_id=tokenizer.pad_token_id)
    # world-size-invariant order: the same global batches for any ranks x accumulation split
    sampler = GlobalBatchSampler(len(train_set), micro_batch_size=sc.micro_batch_size_per_device,
                                 grad_accum=sc.gradient_accumulation_steps, world_size=world,
                                 rank=dist.rank(), seed=cfg.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate)
    eval_loader = DataLoader(eval_features_for_rank(eval_set, dist.rank(), world),
                             batch_size=sc.micro_batch_size_per_device, collate_fn=collate)
    total_steps = sc.max_steps if sc.max_steps > 0 else sc.epochs * sampler.steps_per_epoch
    global_batch = sampler.global_batch_size
    if sampler.steps_per_epoch == 0 or total_steps <= 0:
        raise DataError(f"sft: {len(train_set)} training examples make no full optimizer step at "
                        f"global batch {global_batch} (sft.micro_batch_size_per_device x "
                        "sft.gradient_accumulation_steps x ranks): lower them or add data")

    # --- DeepSpeed engine
    eng = engine.build_train_engine(
        model, cfg, lr=sc.lr, weight_decay=sc.weight_decay, betas=sc.adam_betas, eps=sc.adam_eps,
        micro_batch_size=sc.micro_batch_size_per_device,
        grad_accum=sc.gradient_accumulation_steps, max_grad_norm=sc.max_grad_norm,
        scheduler=sc.lr_scheduler, warmup_steps=sc.warmup_steps, total_steps=total_steps,
        min_lr_ratio=sc.min_lr_ratio)
    runtime.say(f"sft: {len(train_set)} train / {len(eval_set)} eval examples ({dropped} dropped "
                f"as over-long), {total_steps} steps, global batch {global_batch} "
                f"(micro {sc.micro_batch_size_per_device} x accum {sc.gradient_accumulation_steps}"
                f" x {world} ranks), {trainable:,}/{total:,} trainable params, zero stage "
                f"{cfg.zero_stage.stage}")
    tracker.summary({"sft/global_batch_size": global_batch, "sft/train_examples": len(train_set),
                     "sft/eval_examples": len(eval_set), "sft/dropped_overlong": dropped,
                     "sft/trainable_params": trainable})

    # --- the optimizer-step loop (rlhf_exp/train_loop.py)
    loop = train_loop.Loop(stage="sft", node=sc, total_steps=total_steps,
                           steps_per_epoch=sampler.steps_per_epoch, run_dir=run_dir,
                           tokenizer=tokenizer, device=device, lora_save=cfg.model.lora.save)
    eval_fn = partial(evaluate, loader=eval_loader, device=device) if eval_set else None
    state = train_loop.train(eng, loader, sampler, loop, lm_step, eval_fn, tracker, resume_from)

    # --- final checkpoint (HF format), marked final, logged as a `model` artifact
    result = train_loop.save_final(eng, cfg, loop, state, tracker, init_from=sc.init_from,
                                   init_artifact=init_artifact)
    eval_loss = state.eval_metrics.get("sft/eval_loss", float("nan"))
    runtime.say(f"sft: done. loss {state.first_loss:.4f} -> {state.last_loss:.4f}, eval loss "
                f"{eval_loss:.4f}")
    train_loop.finish(tracker, result)
    return eng, tokenizer, result


def run(cfg: DictConfig, run_dir: Path) -> runtime.StageResult:
    done = resume.completed(run_dir, "sft")  # run again in a finished run dir: nothing to do
    if done is not None:
        runtime.say(f"sft: {run_dir} has already finished (checkpoints/final); not training again")
        return done
    return train(cfg, run_dir)[2]
