"""Kahneman-Tversky Optimization (KTO) of a policy on unpaired good / bad completions, against a
frozen reference (Ethayarajh et al. 2024; TRL 1.16's KTOTrainer, loss_type="kto").

Run: rlhf-exp stage=kto kto.init_from=<sft run dir, checkpoint or artifact>
     rlhf-exp 'stage.stages=[sft,kto]'             (SFT, then KTO from its output)

Reads `cfg.kto` (conf/kto/default.yaml). The data are the reward share's rows as unpaired
(prompt, completion, label) rows: each preference pair gives its chosen completion (desirable)
and its rejected one (undesirable), as TRL's unpair_preference_dataset; a source of format
`unpaired` gives its rows as they are (rlhf_exp/data/unpaired.py). Batch sizes count rows. The
loss and metrics are TRL's (rlhf_exp/rl/kto_math.py, docs/kto.md). The mechanics are DPO's
(rlhf_exp/stages/dpo.py): each row is scored with its KL sequence (its prompt, another row's
completion) in one forward, as a DPO pair is with its rejected side.

The steps, in order:
  data       the reward share's rows, unpaired, tokenized with their KL sequences
  policy     from `kto.init_from` (null = the base model), LoRA per `model.lora`, dropout off
  reference  one precomputed pass, before the engine exists (dpo.score_with_reference): the
             frozen reference (`kto.reference`, null = the starting policy) scores every row the
             run trains on and every held-out row, with their KL sequences; then it is freed
  gold       the held-out gold reward of the starting policy (`kto/init_eval_gold_reward`), as
             DPO's (PPO's held-out eval settings and seed)
  loop       rlhf_exp/training/train_loop.py with `kto_step` and `evaluate` (held-out metrics
             every `kto.eval_every` steps and after the last)
  gold       the held-out gold reward after the last step, then the final checkpoint (HF format,
             AutoModelForCausalLM) and its `model` artifact
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from rlhf_exp.data import build_stage_data
from rlhf_exp.data import cache_dir as data_cache_dir
from rlhf_exp.data.unpaired import collate_kto, tokenize_unpaired, unpaired_rows
from rlhf_exp.errors import DataError
from rlhf_exp.modeling import models
from rlhf_exp.rl import evaluation, gold_evals, kto_math
from rlhf_exp.stages.dpo import pair_logps, pairs_used, score_with_reference
from rlhf_exp.training import dist, runtime, stage_kit, train_loop


# ----------------------------------------------------------------------------- the loss
def batch_loss(model, batch: dict[str, torch.Tensor], node: DictConfig, rank_mean=None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KTO loss of one collate_kto batch: one forward over the B rows and their B KL
    sequences; the KL sequences only give the (detached) estimate z0."""
    logps, kl_logps = pair_logps(model, batch).halves("logps")
    kl = kto_math.kl_estimate(kl_logps, batch["ref_rejected_logps"], rank_mean)
    return kto_math.kto_loss(logps, batch["ref_chosen_logps"], batch["label"], kl,
                             beta=node.beta, desirable_weight=node.desirable_weight,
                             undesirable_weight=node.undesirable_weight)


def kto_step(eng, batch: dict[str, torch.Tensor], node: DictConfig, device: torch.device
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: the loss (z0 averaged over ranks, as TRL gathers it) and the training
    log's `kto/kl` and `kto/desirable_fraction` (the per-side rewards are eval metrics: a
    micro-batch may hold one side only)."""
    loss, terms = batch_loss(eng, batch, node,
                             rank_mean=lambda v: dist.all_reduce_mean([v], device)[0])
    return loss, {"kl": float(terms["kl"][0]),
                  "desirable_fraction": float(terms["label"].float().mean())}


def evaluate(eng, loader: DataLoader, node: DictConfig, device: torch.device) -> dict[str, float]:
    """The KTO metrics on the held-out rows (`kto/eval_loss`, `kto/eval_kl`,
    `kto/eval_rewards/*`, ...), each batch with its own z0 as in training. Every rank scores the
    whole (small) slice, as DPO's evaluate."""
    eng.module.eval()
    parts = []
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            parts.append({k: v.cpu() for k, v in batch_loss(eng, batch, node)[1].items()})
    eng.module.train()
    terms = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return {f"kto/eval_{k}": v for k, v in kto_math.kto_metrics(terms).items()}




# ----------------------------------------------------------------------------- the stage
def load_features(cfg: DictConfig, data, tokenizer) -> tuple[list[dict], list[dict], int]:
    """(train, eval) KTO features of the reward share and how many rows were dropped as
    over-long; DataError when nothing is left to train on."""
    kc = cfg.kto
    tok = partial(tokenize_unpaired, tokenizer=tokenizer, template=cfg.model.prompt_template,
                  max_prompt_len=kc.max_prompt_len, max_len=kc.max_len,
                  overlong=cfg.data_mix.overlong, chunk=kc.micro_batch_size_per_device,
                  cache_dir=data_cache_dir(cfg.data_mix))
    train_set, dropped = tok(unpaired_rows(data.train))
    eval_set, eval_dropped = tok(unpaired_rows(data.eval))
    if not train_set:
        raise DataError(f"kto: no training rows: the reward share has no preference pairs or "
                        f"labelled rows, or all {dropped} are longer than kto.max_len="
                        f"{kc.max_len} / max_prompt_len={kc.max_prompt_len} with "
                        "data_mix.overlong=drop")
    return train_set, eval_set, dropped + eval_dropped


def train(cfg: DictConfig, run_dir: Path) -> tuple[object, object, runtime.StageResult]:
    """Train and save; returns (engine, tokenizer, result) so callers and tests can inspect."""
    kc = cfg.kto
    with stage_kit.begin(cfg, run_dir, "kto") as run:
        # --- inputs first: bad data stops the run here, before anything is written
        data = build_stage_data(cfg.data_mix, "reward", cfg.seed)
        if not unpaired_rows(data.train):
            raise DataError(f"kto: data_mix {cfg.data_mix.name!r} gives the reward share no "
                            "preference pairs or labelled rows (formats preference, hh, chat "
                            "with chosen/rejected, or unpaired)")
        gold_rows = evaluation.heldout_shard(cfg, cfg.ppo.eval_num_prompts, run.rank, run.world)
        tracker = run.open()  # run config, resume point, W&B run

        # --- the policy (dropout off) and the frozen reference's path
        start, init_artifact = stage_kit.start_point(kc.init_from,
                                                     models.resolve_base_path(cfg.model), tracker)
        reference_path = stage_kit.start_point(kc.reference, start, tracker)[0]
        tracker.summary({"kto/init_path": start, "kto/init_artifact": init_artifact or "",
                         "kto/reference_path": reference_path})
        tokenizer, model, trainable, total = stage_kit.load_model(cfg, start, dropout=False)

        # --- features: unpaired rows with their KL sequences (cached on disk)
        train_set, eval_set, dropped = load_features(cfg, data, tokenizer)
        shared = kc.shared_prompt and not cfg.model.gradient_checkpointing
        collate = partial(collate_kto, pad_id=tokenizer.pad_token_id, shared_prompt=shared)
        batches = stage_kit.global_batches(run, kc, train_set, collate, "training rows")

        # --- the reference pass: every row the run trains on and every held-out row, once
        used = pairs_used(batches.sampler, batches.total_steps)
        scores = score_with_reference(
            cfg, reference_path, tokenizer,
            [(train_set, used), (eval_set, list(range(len(eval_set))))], run.device, collate,
            micro_batch_size=kc.micro_batch_size_per_device)
        train_set, eval_set = scores.sets
        batches.loader = DataLoader(train_set, batch_sampler=batches.sampler, collate_fn=collate)

        # --- DeepSpeed engine
        eng = stage_kit.build_engine(model, cfg, kc, total_steps=batches.total_steps)
        desirable = sum(f["label"] for f in train_set)
        runtime.say(f"kto: {len(train_set)} train rows ({desirable} desirable) / "
                    f"{len(eval_set)} eval rows ({dropped} dropped as over-long), "
                    f"{batches.describe('rows')}, beta {kc.beta}, weights "
                    f"{kc.desirable_weight}/{kc.undesirable_weight}; reference {reference_path} "
                    f"scored {len(used)} + {len(eval_set)} rows in {sum(scores.score_s):.1f} s; "
                    f"{trainable:,}/{total:,} trainable params")
        logged = {"kto/dropped_overlong": dropped}
        tracker.summary({"kto/global_batch_size": batches.global_batch,
                         "kto/train_examples": len(train_set), "kto/eval_examples": len(eval_set),
                         "kto/desirable_examples": desirable, **logged,
                         "kto/trainable_params": trainable, **scores.metrics()})
        init_gold = gold_evals.starting_gold("kto", run, eng, tokenizer, gold_rows, logged)

        # --- the optimizer-step loop (rlhf_exp/training/train_loop.py)
        loop = train_loop.Loop(stage="kto", node=kc, total_steps=batches.total_steps,
                               steps_per_epoch=batches.sampler.steps_per_epoch, run_dir=run_dir,
                               tokenizer=tokenizer, device=run.device,
                               lora_save=cfg.model.lora.save,
                               extra_state={"init_gold": init_gold})
        eval_fn = (partial(evaluate, loader=DataLoader(eval_set, kc.micro_batch_size_per_device,
                                                       collate_fn=collate),
                           node=kc, device=run.device) if eval_set else None)
        state = train_loop.train(eng, batches.loader, batches.sampler, loop,
                                 partial(kto_step, node=kc, device=run.device), eval_fn,
                                 tracker, run.resume_from)

        # --- held-out gold reward after the last step; the final checkpoint and its artifact
        gold_evals.final_gold("kto", run, eng, tokenizer, gold_rows, state)
        result = train_loop.save_final(eng, cfg, loop, state, tracker, init_from=kc.init_from,
                                       init_artifact=init_artifact,
                                       extra_metrics={**init_gold, **logged,
                                                      **scores.metrics(),
                                                      "perf/loop_s": state.loop_s})
        stage_kit.close(run, result, done_line(loop, state, result.metrics))
    return eng, tokenizer, result


def done_line(loop: train_loop.Loop, state: train_loop.LoopState, m: dict[str, float]) -> str:
    gold = (f", held-out gold reward {m['kto/init_eval_gold_reward']:.3f} -> "
            f"{m['kto/eval_gold_reward']:.3f}" if "kto/init_eval_gold_reward" in m else "")
    return (f"kto: done. {train_loop.loss_change(loop, state)}, eval KL "
            f"{m.get('kto/eval_kl', math.nan):.3f}{gold}")


run = stage_kit.runner("kto", train)  # the dispatcher's entry point
