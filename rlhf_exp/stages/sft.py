"""Stage 1: supervised fine-tuning of a causal LM on prompt/response demonstrations.

Run: rlhf-exp stage=sft [model=...] [zero_stage=...] [sft.lr=...]

Reads `cfg.sft` (conf/sft/default.yaml). The loss covers response tokens only (prompt tokens are
labelled -100), every response ends with EOS, and EOS is distinct from the pad token.
Batch sizes: `sft.micro_batch_size_per_device` per device per forward; one optimizer step sees
micro * gradient_accumulation_steps * world_size sequences (logged as sft/global_batch_size).
The optimizer-step loop (logging, eval, checkpoints, resume) is rlhf_exp/training/train_loop.py.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from rlhf_exp.data import build_stage_data
from rlhf_exp.data import cache_dir as data_cache_dir
from rlhf_exp.data.tokenize import collate_sft, collate_sft_packed, tokenize_sft
from rlhf_exp.errors import DataError
from rlhf_exp.modeling import models
from rlhf_exp.training import dist, packing, runtime, stage_kit, train_loop


def lm_step(eng, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: the mean next-token loss over its response tokens (HF's loss)."""
    return eng(**batch).loss, {}


def packed_lm_step(eng, batch: dict[str, torch.Tensor],
                   token_budget: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """lm_step on a collate_sft_packed micro-batch: the same mean over the micro-batch's
    response tokens, in packed forwards of at most `token_budget` tokens (0: one). A token-budget
    micro-batch (packing.TokenBudget: `w_tokens` [N]) returns its share of the step's loss
    instead: each sequence's token losses x its weight, 1 / (accum x the response tokens of
    its sampler micro-batch)."""
    labels, lengths = batch["labels"][0], batch["seq_lengths"]
    weights = batch.get("w_tokens")
    loss_sum = labels.new_zeros((), dtype=torch.float32)
    for s0, s1, lo, hi in packing.chunk_ranges(lengths.tolist(), token_budget):
        rows = packing.from_flat(batch["input_ids"][:, lo:hi], lengths[s0:s1])
        # HF's causal-LM loss: fp32 logits, position t predicts label t+1 (a sequence's first
        # label is -100, so no position predicts across a boundary). The LM head runs only at
        # the positions that predict a response token: with a 49k vocabulary the prompt's
        # logits (a chat template's system prompt alone is 30 tokens) would be most of the
        # step's memory and a large share of its compute, for nothing.
        targets = labels[lo + 1:hi]
        keep = (targets != -100).nonzero().squeeze(1)
        logits = eng(**rows.forward_kwargs(), logits_to_keep=keep).logits[0]
        per_token = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        if weights is not None:
            per_token = per_token * weights[s0 + rows.seq_ids[1:][keep]]
        loss_sum = loss_sum + per_token.sum()
    if weights is not None:
        return loss_sum, {}
    return loss_sum / (labels != -100).sum().clamp(min=1), {}


def response_tokens(micro_batch: list[dict]) -> dict[str, float]:
    """A sampler micro-batch's loss normaliser (packing.TokenBudget.norms): the response tokens
    its mean is over (labels after a sequence's first, which no position predicts)."""
    return {"tokens": float(sum(sum(x != -100 for x in f["labels"][1:]) for f in micro_batch))}


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
    with stage_kit.begin(cfg, run_dir, "sft") as run:
        data = build_stage_data(cfg.data_mix, "sft", cfg.seed)  # bad data stops the run here
        tracker = run.open()  # run config, resume point, W&B run

        # --- model and tokenizer: from a previous stage (path / artifact) or the base model
        base, init_artifact = stage_kit.start_point(sc.init_from,
                                                    models.resolve_base_path(cfg.model), tracker)
        tokenizer, model, trainable, total = stage_kit.load_model(cfg, base)

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
        # packed micro-batches (the same rows, no padding) where the model packs exactly
        packed = packing.enabled(sc, model, "sft")
        budget = packing.TokenBudget(sc.micro_batch_tokens, lambda f: len(f["input_ids"]),
                                     response_tokens, collate_sft_packed) \
            if packed and sc.micro_batch_tokens > 0 else None
        batches = stage_kit.global_batches(
            run, sc, train_set,
            packing.raw_rows if budget else collate_sft_packed if packed else collate,
            "training examples")
        step_fn = packed_lm_step if packed else lm_step
        eval_loader = DataLoader(eval_features_for_rank(eval_set, run.rank, run.world),
                                 batch_size=sc.micro_batch_size_per_device, collate_fn=collate)

        # --- DeepSpeed engine
        eng = stage_kit.build_engine(model, cfg, sc, total_steps=batches.total_steps)
        runtime.say(f"sft: {len(train_set)} train / {len(eval_set)} eval examples ({dropped} "
                    f"dropped as over-long), {batches.describe()}"
                    f"{packing.describe(packed, budget)}, {trainable:,}/{total:,} "
                    f"trainable params, zero stage {cfg.zero_stage.stage}")
        tracker.summary({"sft/global_batch_size": batches.global_batch,
                         "sft/train_examples": len(train_set),
                         "sft/eval_examples": len(eval_set), "sft/dropped_overlong": dropped,
                         "sft/trainable_params": trainable})

        # --- the optimizer-step loop (rlhf_exp/training/train_loop.py)
        loop = train_loop.Loop(stage="sft", node=sc, total_steps=batches.total_steps,
                               steps_per_epoch=batches.sampler.steps_per_epoch, run_dir=run_dir,
                               tokenizer=tokenizer, device=run.device,
                               lora_save=cfg.model.lora.save, budget=budget)
        eval_fn = partial(evaluate, loader=eval_loader, device=run.device) if eval_set else None
        state = train_loop.train(eng, batches.loader, batches.sampler, loop, step_fn, eval_fn,
                                 tracker, run.resume_from)

        # --- final checkpoint (HF format), marked final, logged as a `model` artifact
        result = train_loop.save_final(eng, cfg, loop, state, tracker, init_from=sc.init_from,
                                       init_artifact=init_artifact)
        eval_loss = state.eval_metrics.get("sft/eval_loss", float("nan"))
        stage_kit.close(run, result, f"sft: done. {train_loop.loss_change(loop, state)}, eval loss "
                                     f"{eval_loss:.4f}")
    return eng, tokenizer, result


run = stage_kit.runner("sft", train)  # the dispatcher's entry point
