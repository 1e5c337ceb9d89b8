"""Stage 2: a reward model trained on preference pairs (pairwise Bradley-Terry loss).

Run: rlhf-exp stage=reward [reward.init_from=<sft run dir or artifact>] [model=...] [reward.lr=...]

Reads `cfg.reward` (conf/reward/default.yaml). The model is a plain HF
`AutoModelForSequenceClassification` with one label (a scalar head on the backbone), started from
the SFT checkpoint (`reward.init_from`) or the base model (`model.reward_path`, else `model.path`).
Each pair is scored in one forward (chosen rows then rejected rows, right-padded); the score of a
sequence is the head's output at its last non-pad token, the EOS closing the response - the same
place HF's own pooling reads it (rlhf_exp/rl/scoring.py). Loss: -log sigmoid(s_chosen - s_rejected).
Batch sizes count pairs: `reward.micro_batch_size_per_device` pairs per device per forward.
The optimizer-step loop (logging, eval, checkpoints, resume) is rlhf_exp/training/train_loop.py.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from rlhf_exp import tasks
from rlhf_exp.data import build_stage_data
from rlhf_exp.data import cache_dir as data_cache_dir
from rlhf_exp.data.mix import require_pairs
from rlhf_exp.data.tokenize import collate_pairs, collate_pairs_packed, tokenize_pairs
from rlhf_exp.errors import DataError
from rlhf_exp.modeling import models
from rlhf_exp.rl import scoring
from rlhf_exp.training import packing, runtime, stage_kit, train_loop


def pair_scores(model, batch: dict[str, torch.Tensor],
                token_budget: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores, rejected scores), each (B,), from one collate_pairs batch of 2B rows.
    Called through the DeepSpeed engine's forward (its hooks drive ZeRO's backward), which runs
    HF's pooling: the rightmost non-pad token, i.e. the EOS at `scoring.last_index`. Positions
    count real tokens only, so a left-padded batch scores the same (absolute-position models).
    A collate_pairs_packed batch goes to packed_pair_scores."""
    if "seq_lengths" in batch:
        return packed_pair_scores(model, batch, token_budget)
    mask = batch["attention_mask"]
    scores = model(input_ids=batch["input_ids"], attention_mask=mask,
                   position_ids=scoring.position_ids(mask), use_cache=False
                   ).logits.squeeze(-1).float()
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def packed_pair_scores(model, batch: dict[str, torch.Tensor],
                       token_budget: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """pair_scores of a collate_pairs_packed batch, in packed forwards of at most
    `token_budget` tokens (0: one). HF's pooling reads one token per row, so the head's
    per-token output is taken from the `score` module and read at each sequence's last token
    (its EOS, as the padded path's pooling reads it)."""
    head = packing.find_module(getattr(model, "module", model), "score")
    lengths, scores = batch["seq_lengths"], []
    for s0, s1, lo, hi in packing.chunk_ranges(lengths.tolist(), token_budget):
        rows = packing.from_flat(batch["input_ids"][:, lo:hi], lengths[s0:s1])
        with packing.capture_output(head) as out:
            model(**rows.forward_kwargs())
        scores.append(packing.last_token(out[-1], rows).squeeze(-1).float())
    scores = torch.cat(scores)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood that the chosen response wins: -log sigmoid(c - r)."""
    return -F.logsigmoid(chosen - rejected).mean()


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (average ranks for ties); nan when either side is constant."""
    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = torch.argsort(t)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in torch.unique(t):  # ties share their mean rank
            tie = t == value
            r[tie] = r[tie].mean()
        return r
    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def pair_step(eng, batch: dict[str, torch.Tensor],
              token_budget: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch of pairs (padded or packed): the Bradley-Terry loss, and the pairwise
    stats the training log shows (reward/accuracy, reward/chosen_score, reward/rejected_score,
    reward/margin)."""
    c, r = pair_scores(eng, batch, token_budget)
    if "w_pairs" in batch:  # a token-budget micro-batch (packing.TokenBudget): its share of
        w = batch["w_pairs"]  # the step, each pair x 1 / (accum x its micro-batch's pairs)
        loss = (-F.logsigmoid(c - r) * w).sum()
        c, r = c.detach().float(), r.detach().float()
        return loss, {"accuracy": float(((c > r).float() * w).sum()),
                      "chosen_score": float((c * w).sum()),
                      "rejected_score": float((r * w).sum()), "margin": float(((c - r) * w).sum())}
    loss = bradley_terry_loss(c, r)
    c, r = c.detach().float(), r.detach().float()
    return loss, {"accuracy": float((c > r).float().mean()), "chosen_score": float(c.mean()),
                  "rejected_score": float(r.mean()), "margin": float((c - r).mean())}


def pair_tokens(pair: dict) -> int:
    """A pair's tokens, chosen and rejected (its cost in a token budget)."""
    return len(pair["chosen_ids"]) + len(pair["rejected_ids"])


def pair_count(micro_batch: list[dict]) -> dict[str, float]:
    """A sampler micro-batch's loss normaliser (packing.TokenBudget.norms): its pairs."""
    return {"pairs": float(len(micro_batch))}


def evaluate(eng, loader: DataLoader, eval_set: list[dict],
             device: torch.device) -> dict[str, float]:
    """Pairwise metrics on the held-out slice, and (where the rows have a gold reward) the rank
    correlation of every held-out response's score with its gold reward. Every rank scores the
    whole (small) slice: equal forward counts under ZeRO-3 and identical metrics everywhere,
    without gathering."""
    eng.module.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for batch in loader:
            c, r = pair_scores(eng, {k: v.to(device) for k, v in batch.items()})
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
    eng.module.train()
    c, r = torch.cat(chosen), torch.cat(rejected)
    out = {"reward/eval_loss": float(bradley_terry_loss(c, r)),
           "reward/eval_accuracy": float((c > r).float().mean()),
           "reward/eval_chosen_score": float(c.mean()),
           "reward/eval_rejected_score": float(r.mean()),
           "reward/eval_margin": float((c - r).mean())}
    scores, golds = [], []
    for feat, sc, sr in zip(eval_set, c.tolist(), r.tolist()):
        for response, score in ((feat["chosen"], sc), (feat["rejected"], sr)):
            gold = tasks.gold_reward(feat["task"], feat["prompt"], response)
            if gold is not None:
                scores.append(score)
                golds.append(gold)
    if scores:
        out["reward/eval_gold_spearman"] = spearman(scores, golds)
    return out


def train(cfg: DictConfig, run_dir: Path) -> tuple[object, object, runtime.StageResult]:
    """Train and save; returns (engine, tokenizer, result) so callers and tests can inspect."""
    rc = cfg.reward
    with stage_kit.begin(cfg, run_dir, "reward") as run:
        # this stage's disjoint share of the data_mix; bad data stops the run here, before
        # anything is written to the run dir or W&B
        data = build_stage_data(cfg.data_mix, "reward", cfg.seed)
        unpaired = require_pairs(data, cfg.data_mix)
        tracker = run.open()  # run config, resume point, W&B run

        # --- model and tokenizer: from the SFT output (path / artifact) or the reward base model
        base, init_artifact = stage_kit.start_point(
            rc.init_from, models.resolve_reward_base_path(cfg.model), tracker)
        tracker.summary({"reward/init_path": base, "reward/init_artifact": init_artifact or ""})
        tokenizer, model, trainable, total = stage_kit.load_model(cfg, base, reward=True)

        # --- features: the preference pairs, tokenized (cached on disk)
        template, cache = cfg.model.prompt_template, data_cache_dir(cfg.data_mix)
        train_set, dropped = tokenize_pairs(data.train, tokenizer, template, rc.max_prompt_len,
                                            rc.max_len, cfg.data_mix.overlong, cache)
        eval_set, eval_dropped = tokenize_pairs(data.eval, tokenizer, template,
                                                rc.max_prompt_len, rc.max_len,
                                                cfg.data_mix.overlong, cache)
        if not train_set:
            raise DataError(f"reward: all {dropped} training pairs are longer than "
                            f"reward.max_len={rc.max_len} / max_prompt_len={rc.max_prompt_len} "
                            "and data_mix.overlong=drop; raise the limits or use "
                            "overlong=truncate")
        collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id)
        # packed micro-batches (the same pairs, no padding) where the model packs exactly
        packed = packing.enabled(rc, model, "reward")
        budget = packing.TokenBudget(rc.micro_batch_tokens, pair_tokens, pair_count,
                                     collate_pairs_packed) \
            if packed and rc.micro_batch_tokens > 0 else None
        batches = stage_kit.global_batches(
            run, rc, train_set,
            packing.raw_rows if budget else collate_pairs_packed if packed else collate,
            "training pairs")
        eval_loader = DataLoader(eval_set, batch_size=rc.micro_batch_size_per_device,
                                 collate_fn=collate)

        # --- DeepSpeed engine
        eng = stage_kit.build_engine(model, cfg, rc, total_steps=batches.total_steps)
        runtime.say(f"reward: {len(train_set)} train / {len(eval_set)} eval pairs ({dropped} + "
                    f"{eval_dropped} dropped as over-long, {unpaired} rows without a pair "
                    f"skipped), {batches.describe('pairs')}{packing.describe(packed, budget)}, "
                    f"{trainable:,}/{total:,} "
                    f"trainable params, zero stage {cfg.zero_stage.stage}")
        tracker.summary({"reward/global_batch_size": batches.global_batch,
                         "reward/train_examples": len(train_set),
                         "reward/eval_examples": len(eval_set),
                         "reward/dropped_overlong": dropped + eval_dropped,
                         "reward/trainable_params": trainable})
        if run.resume_from is None:  # a data statistic of step 0: a resumed run logged it
            tracker.log({"reward/dropped_overlong": dropped + eval_dropped}, 0)

        # --- the optimizer-step loop (rlhf_exp/training/train_loop.py)
        loop = train_loop.Loop(stage="reward", node=rc, total_steps=batches.total_steps,
                               steps_per_epoch=batches.sampler.steps_per_epoch, run_dir=run_dir,
                               tokenizer=tokenizer, device=run.device,
                               lora_save=cfg.model.lora.save, budget=budget)
        eval_fn = (partial(evaluate, loader=eval_loader, eval_set=eval_set, device=run.device)
                   if eval_set else None)
        state = train_loop.train(eng, batches.loader, batches.sampler, loop,
                                 pair_step, eval_fn,
                                 tracker, run.resume_from)

        # --- final checkpoint (HF format, AutoModelForSequenceClassification), marked final,
        # logged as a `model` artifact
        result = train_loop.save_final(eng, cfg, loop, state, tracker, init_from=rc.init_from,
                                       init_artifact=init_artifact,
                                       extra_metrics={"reward/dropped_overlong": dropped
                                                      + eval_dropped})
        acc = state.eval_metrics.get("reward/eval_accuracy", float("nan"))
        stage_kit.close(run, result, f"reward: done. {train_loop.loss_change(loop, state)}, "
                                     f"eval accuracy {acc:.3f}")
    return eng, tokenizer, result


run = stage_kit.runner("reward", train)  # the dispatcher's entry point
