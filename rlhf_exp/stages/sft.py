"""Stage 1: supervised fine-tuning of a causal LM on prompt/response demonstrations.

Run: rlhf-exp stage=sft [model=...] [zero_stage=...] [sft.lr=...]

Reads `cfg.sft` (conf/sft/default.yaml). The loss covers response tokens only (prompt tokens are
labelled -100), every response ends with EOS, and EOS is distinct from the pad token.
Batch sizes: `sft.micro_batch_size_per_device` per device per forward; one optimizer step sees
micro * gradient_accumulation_steps * world_size sequences (logged as sft/global_batch_size).
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from rlhf_exp import checkpoint, dist, engine, models, resume, runtime
from rlhf_exp.data import build_stage_data
from rlhf_exp.data import cache_dir as data_cache_dir
from rlhf_exp.data.sampler import GlobalBatchSampler
from rlhf_exp.data.tokenize import collate_sft, tokenize_sft
from rlhf_exp.errors import UserError
from rlhf_exp.tracking import Tracker, resolve_init


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

    # --- data: this stage's disjoint share of the data_mix, tokenized (cached)
    template = cfg.model.prompt_template
    cache = data_cache_dir(cfg.data_mix)
    train_set, dropped = tokenize_sft(data.train, tokenizer, template, sc.max_prompt_len,
                                      sc.max_len, cfg.data_mix.overlong, cache_dir=cache)
    eval_set, _ = tokenize_sft(data.eval, tokenizer, template, sc.max_prompt_len, sc.max_len,
                               cfg.data_mix.overlong, cache_dir=cache)
    if not train_set:
        raise ValueError("sft: no training examples left after tokenization (check data_mix and "
                         "sft.max_len)")
    collate = partial(collate_sft, pad_id=tokenizer.pad_token_id)
    # world-size-invariant order: the same global batches for any ranks x accumulation split
    sampler = GlobalBatchSampler(len(train_set), micro_batch_size=sc.micro_batch_size_per_device,
                                 grad_accum=sc.gradient_accumulation_steps, world_size=world,
                                 rank=dist.rank(), seed=cfg.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate)
    eval_loader = DataLoader(eval_set[dist.rank()::world],
                             batch_size=sc.micro_batch_size_per_device, collate_fn=collate)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = sc.max_steps if sc.max_steps > 0 else sc.epochs * steps_per_epoch
    global_batch = sc.micro_batch_size_per_device * sc.gradient_accumulation_steps * world
    if steps_per_epoch == 0 or total_steps <= 0:
        raise UserError(f"sft: {len(train_set)} training examples make no full optimizer step at "
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
                     "sft/dropped_overlong": dropped, "sft/trainable_params": trainable})

    def evaluate() -> float:
        """Mean per-token loss on the held-out slice, over all ranks."""
        eng.module.eval()
        loss_sum, tokens = 0.0, 0
        with torch.no_grad():
            for batch in eval_loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                n = int((batch["labels"][:, 1:] != -100).sum())
                loss_sum += float(eng(**batch).loss) * n
                tokens += n
        eng.module.train()
        loss_sum, tokens = dist.all_reduce_mean([loss_sum, tokens], device)
        return loss_sum / max(tokens, 1e-9)

    # --- training loop
    eng.module.train()
    bar = runtime.progress(total_steps, "sft")
    step, micro, window_loss, window_n, window_tokens = 0, 0, 0.0, 0, 0
    t_window = time.perf_counter()
    first_loss = last_loss = eval_loss = float("nan")
    if resume_from:  # weights, optimizer, LR schedule, then the loop exactly where it stopped
        saved = resume.load(eng, resume_from)
        step, micro = saved["step"], saved["micro"]
        first_loss, last_loss, eval_loss = saved["losses"]
        window_loss, window_n, window_tokens = saved["window"]
        sampler.start_at(step)  # data position: the next global batch is step `step`'s
        bar.update(step)
        runtime.say(f"sft: resumed from {resume_from} at step {step}/{total_steps}")
    while step < total_steps:
        batches = iter(loader)  # the rest of the sampler's current epoch; it then moves on
        if resume_from:  # RNG after the iterator: creating one draws from torch's RNG
            resume.restore_rng(resume_from)
            resume_from = None
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = eng(**batch).loss
            eng.backward(loss)
            eng.step()
            window_loss += loss.item()
            window_n += 1
            window_tokens += int(batch["attention_mask"].sum())
            micro += 1
            if micro % sc.gradient_accumulation_steps:  # mid-accumulation: no optimizer step yet
                continue
            step += 1
            bar.update(1)
            if step % sc.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - t_window
                mean_loss, tokens = dist.all_reduce_mean([window_loss / window_n,
                                                          window_tokens], device)
                tok_s = tokens * world / elapsed
                metrics = {"sft/loss": mean_loss, "sft/lr": eng.get_lr()[0],
                           "sft/epoch": step / steps_per_epoch,
                           "perf/tokens_per_s": tok_s,
                           "perf/samples_per_s": window_n * sc.micro_batch_size_per_device
                           * world / elapsed}
                grad_norm = eng.get_global_grad_norm()
                if grad_norm is not None:
                    metrics["sft/grad_norm"] = float(grad_norm)
                tracker.log(metrics, step)
                first_loss = mean_loss if math.isnan(first_loss) else first_loss
                last_loss = mean_loss
                bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tok_s:,.0f}")
                window_loss, window_n, window_tokens = 0.0, 0, 0
                t_window = time.perf_counter()
            if eval_set and sc.eval_every > 0 and step % sc.eval_every == 0:
                eval_loss = evaluate()
                tracker.log({"sft/eval_loss": eval_loss}, step)
            if sc.save_every > 0 and step % sc.save_every == 0 and step < total_steps:
                resume.save(eng, tokenizer, run_dir, step, stage="sft",
                            state={"micro": micro, "losses": [first_loss, last_loss, eval_loss],
                                   "wandb_run_id": tracker.run_id},
                            local={"window": [window_loss, window_n, window_tokens]},
                            lora_save=cfg.model.lora.save, keep_last=sc.keep_last,
                            best_metric=sc.keep_best_metric, best_mode=sc.keep_best_mode,
                            metric_value=tracker.latest.get(sc.keep_best_metric))
            if step >= total_steps:
                break
    bar.close()
    if eval_set:
        eval_loss = evaluate()
        tracker.log({"sft/eval_loss": eval_loss}, step)

    # --- final checkpoint (HF format), marked final, logged as a `model` artifact
    artifact = f"{cfg.experiment_name}-sft-model"
    ckpt = checkpoint.save_hf(
        eng, tokenizer, checkpoint.step_dir(run_dir, step),
        zero_stage=eng.zero_optimization_stage(), lora_save=cfg.model.lora.save,
        metadata={"stage": "sft", "step": step, "init_from": sc.init_from,
                  "init_artifact": init_artifact,
                  "artifact": f"{cfg.logger.project}/{artifact}:latest"})
    checkpoint.mark_final(ckpt)
    checkpoint.prune(run_dir, sc.keep_last)
    if cfg.logger.log_checkpoints:
        tracker.log_model(ckpt, artifact, aliases=["final", f"step-{step}"],
                          metadata={"stage": "sft", "step": step, "eval_loss": eval_loss})
    metrics = {"sft/loss": last_loss, "sft/first_loss": first_loss, "sft/eval_loss": eval_loss,
               "sft/steps": step}
    tracker.summary(metrics)
    result = runtime.StageResult("sft", str(run_dir), str(ckpt), tracker.run_id,
                                 str(run_dir / "wandb") if tracker.enabled else None, metrics)
    result.write()
    runtime.say(f"sft: done. loss {first_loss:.4f} -> {last_loss:.4f}, eval loss {eval_loss:.4f}")
    runtime.say(f"sft: checkpoint {ckpt}")
    if tracker.enabled:
        runtime.say(tracker.where())
    tracker.finish()
    return eng, tokenizer, result


def run(cfg: DictConfig, run_dir: Path) -> runtime.StageResult:
    done = resume.completed(run_dir, "sft")  # run again in a finished run dir: nothing to do
    if done is not None:
        runtime.say(f"sft: {run_dir} has already finished (checkpoints/final); not training again")
        return done
    return train(cfg, run_dir)[2]
