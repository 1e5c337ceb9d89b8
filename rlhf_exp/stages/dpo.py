"""Direct Preference Optimization (DPO) of a policy on preference pairs, against a frozen reference.

Run: rlhf-exp stage=dpo dpo.init_from=<sft run dir, checkpoint or artifact>
     rlhf-exp 'stage.stages=[sft,dpo]'             (SFT, then DPO from its output)

Reads `cfg.dpo` (conf/dpo/default.yaml). The data are the preference pairs of the data_mix's
reward share (as the reward stage reads them); batch sizes count pairs, each pair being two
sequences (chosen, rejected) in one forward. The loss, its variants (`dpo.loss_type`: sigmoid,
hinge, ipo, robust, simpo; `dpo.label_smoothing`; `dpo.rpo_alpha`; `dpo.simpo_gamma`) and the
metrics are TRL's (rlhf_exp/rl/dpo_math.py, docs/dpo.md). simpo (SimPO) is reference-free: no
reference model is loaded and the reference pass is skipped.

The steps, in order:
  data       the reward share's pairs, tokenized (prompt length kept: only response tokens count)
  policy     from `dpo.init_from` (null = the base model), LoRA per `model.lora`, dropout off
  reference  one precomputed pass, before the engine exists: the frozen reference (`dpo.reference`,
             null = the starting policy) scores every pair the run will train on (the sampler
             says which) and every held-out pair, sharded over ranks; then it is freed. One
             forward per pair instead of one per pair per step, and no second model during
             training. A resumed run recomputes the pass (the same numbers: the reference is
             frozen).
  gold       the held-out gold reward of the starting policy (`dpo/eval_gold_reward` at step 0):
             the ppo share's held-out prompts sampled with PPO's eval settings and seed
             (evaluation.heldout_eval, shared with PPO and stage=eval: the numbers compare)
  loop       rlhf_exp/training/train_loop.py with `dpo_step` and `evaluate` (held-out pair
             metrics every `dpo.eval_every` steps and after the last): logging, checkpoints,
             resume, NaN stop
  gold       the held-out gold reward after the last step, then the final checkpoint (HF format,
             AutoModelForCausalLM) and its `model` artifact
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from rlhf_exp.config.choices import REFERENCE_FREE_LOSSES
from rlhf_exp.data import build_stage_data
from rlhf_exp.data import cache_dir as data_cache_dir
from rlhf_exp.data.mix import require_pairs
from rlhf_exp.data.sampler import GlobalBatchSampler
from rlhf_exp.data.tokenize import collate_dpo, collate_dpo_packed, tokenize_pairs
from rlhf_exp.errors import DataError
from rlhf_exp.modeling import models
from rlhf_exp.rl import dpo_math, evaluation, gold_evals
from rlhf_exp.rl.ppo_math import logprobs_from_logits
from rlhf_exp.training import dist, engine, packing, runtime, stage_kit, train_loop


# ----------------------------------------------------------------------------- the loss
def pair_logps(model, batch: dict[str, torch.Tensor],
               token_budget: int = 0) -> dpo_math.SequenceLogps:
    """The response log-probabilities of one collate_dpo batch (B chosen rows, then B rejected)
    under `model` (the DeepSpeed engine, whose forward drives ZeRO, or a frozen model); a batch
    in the shared-prompt layout goes to shared_prompt_logps, a packed one (collate_dpo_packed)
    to packed_pair_logps / tree_pair_logps."""
    if "prompt_lens" in batch:
        return tree_pair_logps(model, batch, token_budget)
    if "seq_lengths" in batch:
        return packed_pair_logps(model, batch, token_budget)
    if "prompt_ids" in batch:
        return shared_prompt_logps(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    return dpo_math.sequence_logps(logits, batch["input_ids"], batch["completion_mask"])


def shared_prompt_logps(model, batch: dict[str, torch.Tensor]) -> dpo_math.SequenceLogps:
    """pair_logps with each pair's prompt computed once (dpo.shared_prompt): a forward over the B
    left-padded prompts keeps its KV cache, each prompt's cache is repeated for its two
    responses, and a second forward runs the 2B responses on it. The same numbers as one forward
    over prompt + response per row (to fp32 rounding; tests/test_dpo_math.py), gradients
    included (both responses' gradients flow into their prompt's one pass), on a third fewer
    tokens when prompts are as long as both responses. Needs the KV cache in training (not with
    gradient checkpointing)."""
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    responses, response_mask = batch["response_ids"], batch["response_mask"]
    B, R = prompt_ids.shape[0], responses.shape[1]
    # rows in pair order (chosen 0, rejected 0, chosen 1, ...): the cache repeats each prompt
    # twice in place; `back` restores chosen-then-rejected
    order = torch.arange(2 * B, device=responses.device).view(2, B).t().reshape(-1)
    back = torch.argsort(order)
    responses, response_mask = responses[order], response_mask[order]
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0), use_cache=True,
                logits_to_keep=1)
    logits = out.logits[:, -1:].repeat_interleave(2, dim=0)  # predicts response token 0
    if R > 1:
        cache = out.cache
        cache.batch_repeat_interleave(2)
        start = prompt_mask.sum(1).repeat_interleave(2)[:, None]  # each response's first position
        rest = model(input_ids=responses[:, :-1],
                     attention_mask=torch.cat([prompt_mask.repeat_interleave(2, dim=0),
                                               response_mask[:, :-1]], dim=1),
                     position_ids=start + torch.arange(R - 1, device=responses.device),
                     cache=cache, use_cache=True).logits
        logits = torch.cat([logits, rest], dim=1)  # [2B, R, V]: predicts response tokens 0..R-1
    per_token = logprobs_from_logits(logits.float(), responses)
    mask = response_mask.to(per_token.dtype)
    logits_sum = (logits.detach().float().mean(-1) * mask).sum(-1)
    return dpo_math.SequenceLogps((per_token * mask).sum(-1)[back], mask.sum(-1)[back],
                                  logits_sum[back])


def packed_pair_logps(model, batch: dict[str, torch.Tensor],
                      token_budget: int = 0) -> dpo_math.SequenceLogps:
    """pair_logps of a collate_dpo_packed batch without shared prompts: the 2B sequences end to
    end, in packed forwards of at most `token_budget` tokens (0: one)."""
    lengths, mask = batch["seq_lengths"], batch["completion_mask"][0]
    parts = []
    for s0, s1, lo, hi in packing.chunk_ranges(lengths.tolist(), token_budget):
        rows = packing.from_flat(batch["input_ids"][:, lo:hi], lengths[s0:s1])
        # the LM head only at the positions t that predict a response token t+1 (a sequence's
        # first token has mask 0, so none predicts across a boundary): with a 49k vocabulary
        # the prompts' logits would be a fifth of the forward, for nothing
        keep = mask[lo + 1:hi].nonzero().squeeze(1)
        logits = model(**rows.forward_kwargs(), logits_to_keep=keep).logits[0]  # [K, V]
        parts.append(response_sums(logits, rows.input_ids[0, keep + 1],
                                   rows.seq_ids[keep + 1], rows.num_seqs))
    return dpo_math.SequenceLogps(*(torch.cat(p) for p in zip(*parts)))


def response_sums(logits: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor,
                  n: int) -> list[torch.Tensor]:
    """[log-prob sum, token count, mean-logit sum], each [n], of response tokens `targets` [K]
    predicted by `logits` [K, V], token k belonging to sequence owner[k] (of n)."""
    per_token = logprobs_from_logits(logits.unsqueeze(1), targets[:, None])[:, 0]
    return [torch.zeros(n, device=logits.device).index_add(0, owner, v)
            for v in (per_token, torch.ones_like(per_token), logits.detach().float().mean(-1))]


def tree_pair_logps(model, batch: dict[str, torch.Tensor],
                    token_budget: int = 0) -> dpo_math.SequenceLogps:
    """pair_logps of a collate_dpo_packed batch with shared prompts: each pair's prompt once,
    then its chosen and its rejected response, which attend to the prompt and never to each
    other (packing.tree), in forwards of at most `token_budget` tokens (0: one). The numbers of
    shared_prompt_logps without its padding, KV-cache copies or second forward."""
    P, C, R = batch["prompt_lens"], batch["chosen_lens"], batch["rejected_lens"]
    ids, chosen, rejected = batch["input_ids"], [], []
    for g0, g1, lo, hi in packing.chunk_ranges((P + C + R).tolist(), token_budget):
        prefixes = P[g0:g1].tolist()
        branches = [[c, r] for c, r in zip(C[g0:g1].tolist(), R[g0:g1].tolist())]
        t, kwargs = packing.tree_forward(ids[:, lo:hi], model, prefixes, branches)
        if "tree_segments" in kwargs:  # one row: the LM head only where a response token is
            logits = model(**kwargs, logits_to_keep=t.src).logits[0]  # predicted, not prompts
        else:  # batched rows: each row's positions differ, and logits_to_keep is one for all
            logits = model(**kwargs).logits.flatten(0, 1)[t.src]
        # sides of the chunk's pairs, pair by pair (chosen, rejected)
        sums = response_sums(logits, t.input_ids.flatten()[t.tgt], t.owner, 2 * (g1 - g0))
        chosen.append([v[0::2] for v in sums])
        rejected.append([v[1::2] for v in sums])
    return dpo_math.SequenceLogps(*(torch.cat([*c, *r]) for c, r in
                                    zip(zip(*chosen), zip(*rejected))))


def dpo_step(eng, batch: dict[str, torch.Tensor],
             node: DictConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch of pairs: the DPO loss against the precomputed reference log-probs, and
    TRL's statistics for the training log (dpo/rewards/*, dpo/logps/*, dpo/logits/*,
    dpo/nll_loss)."""
    loss, terms = dpo_math.dpo_loss(
        pair_logps(eng, batch), batch["ref_chosen_logps"],
        batch["ref_rejected_logps"], loss_type=node.loss_type, beta=node.beta,
        label_smoothing=node.label_smoothing, rpo_alpha=node.rpo_alpha,
        simpo_gamma=node.simpo_gamma, pair_weights=batch.get("w_pairs"),
        chosen_token_weights=batch.get("w_chosen_tokens"))
    if "w_pairs" in batch:  # a token-budget micro-batch: its share of the step's metrics
        return loss, weighted_pair_metrics(terms, batch)
    stats = dpo_math.pair_metrics(terms, node.rpo_alpha)
    del stats["loss"]  # the loop logs the loss it backpropagates as dpo/loss
    return loss, stats


def weighted_pair_metrics(terms: dict[str, torch.Tensor],
                          batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """dpo_math.pair_metrics (less `loss`) as a token-budget micro-batch's share of its step's
    (packing.TokenBudget): the means over pairs and the per-token means of each sampler
    micro-batch become sums weighted by `w_pairs`, `w_chosen_tokens`, `w_rejected_tokens`
    (1 / (accum x that micro-batch's pairs, chosen or rejected response tokens))."""
    wp, wc, wr = batch["w_pairs"], batch["w_chosen_tokens"], batch["w_rejected_tokens"]
    chosen, rejected = terms["rewards/chosen"], terms["rewards/rejected"]

    def total(values: torch.Tensor, w: torch.Tensor) -> float:
        return float((values * w).sum())

    return {"rewards/chosen": total(chosen, wp), "rewards/rejected": total(rejected, wp),
            "rewards/accuracies": total((chosen > rejected).float(), wp),
            "rewards/margins": total(chosen - rejected, wp),
            "logps/chosen": total(terms["logps/chosen"], wp),
            "logps/rejected": total(terms["logps/rejected"], wp),
            "logits/chosen": total(terms["logits_sum/chosen"], wc),
            "logits/rejected": total(terms["logits_sum/rejected"], wr),
            "nll_loss": total(-terms["logps/chosen"], wc)}


def pair_tokens(pair: dict, shared: bool = False) -> int:
    """A pair's tokens in its packed row, chosen and rejected, the prompt once where `shared`
    (its cost in a token budget)."""
    return len(pair["chosen_ids"]) + len(pair["rejected_ids"]) - \
        (pair["prompt_len"] if shared else 0)


def pair_norms(micro_batch: list[dict]) -> dict[str, float]:
    """A sampler micro-batch's loss and metric normalisers (packing.TokenBudget.norms): its
    pairs, and its chosen and rejected response tokens (those after the prompt, as
    collate_dpo_packed's completion_mask counts them)."""
    def response(side: str) -> float:
        return float(sum(len(f[side]) - max(f["prompt_len"], 1) for f in micro_batch))

    return {"pairs": float(len(micro_batch)), "chosen_tokens": response("chosen_ids"),
            "rejected_tokens": response("rejected_ids")}


def evaluate(eng, loader: DataLoader, node: DictConfig, device: torch.device) -> dict[str, float]:
    """The DPO metrics on the held-out pairs (`dpo/eval_loss`, `dpo/eval_rewards/*`, ...), over
    the whole slice at once. Every rank scores the whole (small) slice: equal forward counts
    under ZeRO-3 and identical metrics everywhere, without gathering."""
    eng.module.eval()
    parts = []
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            _, terms = dpo_math.dpo_loss(
                pair_logps(eng, batch), batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                loss_type=node.loss_type, beta=node.beta, label_smoothing=node.label_smoothing,
                rpo_alpha=node.rpo_alpha, simpo_gamma=node.simpo_gamma)
            parts.append({k: v.cpu() for k, v in terms.items()})
    eng.module.train()
    terms = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return {f"dpo/eval_{k}": v for k, v in dpo_math.pair_metrics(terms, node.rpo_alpha).items()}


# ----------------------------------------------------------------------------- the reference
def pairs_used(sampler: GlobalBatchSampler, total_steps: int) -> list[int]:
    """The indices of every training pair the first `total_steps` optimizer steps draw (over all
    ranks), from the sampler's global order: the pairs the reference pass must score."""
    used: set[int] = set()
    for epoch in range(-(-total_steps // sampler.steps_per_epoch)):
        left = total_steps - epoch * sampler.steps_per_epoch
        for batch in sampler.global_batches(epoch)[:left]:
            used.update(batch)
    return sorted(used)


@torch.no_grad()
def reference_logps(reference, features: list[dict], indices: list[int], batch_size: int,
                    collate, device: torch.device) -> torch.Tensor:
    """[len(indices), 2] the reference's (chosen, rejected) log-probabilities of the pairs
    features[indices]. Each rank scores an equal share (train_loop.rank_share: the same number
    of forwards everywhere, as ZeRO-3 needs) and the shares are gathered, so every rank ends
    with all of them."""
    rank, world = dist.rank(), dist.world_size()
    mine, _ = train_loop.rank_share(len(indices), rank, world)
    local = []
    for lo in range(0, len(mine), batch_size):
        chunk = [features[indices[i]] for i in mine[lo:lo + batch_size]]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        chosen, rejected = pair_logps(reference, batch).halves("logps")
        local.append(torch.stack([chosen, rejected], dim=1).float())
    local = torch.cat(local) if local else torch.empty(0, 2, device=device)
    gathered = dist.all_gather_cat(local).cpu()
    values = torch.full((len(indices), 2), math.nan)
    for r in range(world):  # rank r's block holds its share's values, padding after
        share, real = train_loop.rank_share(len(indices), r, world)
        values[share[:real]] = gathered[r * len(mine): r * len(mine) + real]
    return values


def with_reference(features: list[dict], indices: list[int], values: torch.Tensor) -> list[dict]:
    """The features with `ref_chosen_logps` / `ref_rejected_logps` (collate_dpo batches them).
    A pair the pass did not score gets NaN: drawn by mistake, it would stop the run (NaN loss)
    instead of training against a wrong reference."""
    out = [{**f, "ref_chosen_logps": math.nan, "ref_rejected_logps": math.nan}
           for f in features]
    for i, (chosen, rejected) in zip(indices, values.tolist()):
        out[i]["ref_chosen_logps"], out[i]["ref_rejected_logps"] = chosen, rejected
    return out


@dataclass
class ReferenceScores:
    """What score_with_reference returns: each set's features with the reference log-probs, and
    the seconds it took, split so that a throughput figure can count the training rows' pass
    alone (perf/reference_s): loading the model and scoring the held-out rows are set-up and
    evaluation work, as the policy's load and the evals are left out of perf/loop_s."""

    sets: list[list[dict]]
    load_s: float = 0.0
    score_s: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """perf/reference_s (the training rows: the first set), perf/reference_eval_s (the
        held-out rows: the second), perf/reference_load_s (building the frozen model)."""
        train_s, eval_s = (self.score_s + [0.0, 0.0])[:2]
        return {"perf/reference_s": train_s, "perf/reference_eval_s": eval_s,
                "perf/reference_load_s": self.load_s}


def reference_pass(cfg: DictConfig, reference_path: str, tokenizer, batches, train_set: list,
                   eval_set: list, device: torch.device, collate
                   ) -> tuple[ReferenceScores, list]:
    """(the train and eval features with reference log-probs, and the seconds; the training
    pairs scored): the reference's pass over the pairs the run draws and every held-out pair;
    none with no reference (simpo)."""
    if not reference_path:
        return ReferenceScores([without_reference(train_set), without_reference(eval_set)]), []
    used = pairs_used(batches.sampler, batches.total_steps)
    scores = score_with_reference(cfg, reference_path, tokenizer,
                                  [(train_set, used), (eval_set, list(range(len(eval_set))))],
                                  device, collate)
    return scores, used


def without_reference(features: list[dict]) -> list[dict]:
    """The features for a reference-free loss (simpo): reference log-probabilities 0, which
    dpo_math.dpo_loss does not read (collate_dpo batches them as for every loss)."""
    return [{**f, "ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0} for f in features]


def score_with_reference(cfg: DictConfig, path: str, tokenizer, sets: list[tuple[list, list]],
                         device: torch.device, collate, micro_batch_size: int | None = None
                         ) -> ReferenceScores:
    """Load the frozen reference from `path` (dropout off; ZeRO-3 partitions it when the run is
    ZeRO-3), run the precomputed pass over each (features, indices) of `sets` (batches of
    `micro_batch_size`, default dpo.micro_batch_size_per_device; stage=kto passes its own),
    free it."""
    t0 = time.perf_counter()
    model = models.load_causal_lm(path, tokenizer, cfg.model, cfg.hardware.precision)
    if cfg.dpo.packing and packing.supports_packing(model):  # as the policy (dpo_collate)
        packing.use_per_sequence_attention(model)
    reference = engine.build_frozen(model, cfg, zero_stage=cfg.zero_stage.stage, offload=False)
    micro = micro_batch_size or cfg.dpo.micro_batch_size_per_device
    scores = ReferenceScores([], load_s=time.perf_counter() - t0)
    for feats, idx in sets:
        t0 = time.perf_counter()
        values = reference_logps(reference, feats, idx, micro, collate, device)
        scores.sets.append(with_reference(feats, idx, values))
        scores.score_s.append(time.perf_counter() - t0)
    del reference, model
    return scores


# ----------------------------------------------------------------------------- the stage
def train(cfg: DictConfig, run_dir: Path) -> tuple[object, object, runtime.StageResult]:
    """Train and save; returns (engine, tokenizer, result) so callers and tests can inspect."""
    dc = cfg.dpo
    with stage_kit.begin(cfg, run_dir, "dpo") as run:
        # --- inputs first: bad data stops the run here, before anything is written
        data = build_stage_data(cfg.data_mix, "reward", cfg.seed)
        unpaired = require_pairs(data, cfg.data_mix, stage="dpo")
        gold_rows = evaluation.heldout_shard(cfg, cfg.ppo.eval_num_prompts, run.rank, run.world)
        tracker = run.open()  # run config, resume point, W&B run

        # --- the policy: from the SFT output (path / artifact) or the base model; dropout off
        start, init_artifact = stage_kit.start_point(dc.init_from,
                                                     models.resolve_base_path(cfg.model), tracker)
        reference_path = ("" if dc.loss_type in REFERENCE_FREE_LOSSES
                          else stage_kit.start_point(dc.reference, start, tracker)[0])
        tracker.summary({"dpo/init_path": start, "dpo/init_artifact": init_artifact or "",
                         "dpo/reference_path": reference_path})
        tokenizer, model, trainable, total = stage_kit.load_model(cfg, start, dropout=False)

        # --- features: the reward share's preference pairs, tokenized (cached on disk)
        template, cache = cfg.model.prompt_template, data_cache_dir(cfg.data_mix)
        train_set, dropped = tokenize_pairs(data.train, tokenizer, template, dc.max_prompt_len,
                                            dc.max_len, cfg.data_mix.overlong, cache)
        eval_set, eval_dropped = tokenize_pairs(data.eval, tokenizer, template, dc.max_prompt_len,
                                                dc.max_len, cfg.data_mix.overlong, cache)
        if not train_set:
            raise DataError(f"dpo: all {dropped} training pairs are longer than dpo.max_len="
                            f"{dc.max_len} / max_prompt_len={dc.max_prompt_len} and "
                            "data_mix.overlong=drop; raise the limits or use overlong=truncate")
        collate = dpo_collate(cfg, model, tokenizer)
        budget, feed = token_budget(dc, collate)  # feed: the loader's collate
        batches = stage_kit.global_batches(run, dc, train_set, feed, "training pairs")

        # --- the reference pass: every pair the run trains on and every held-out pair, once
        # (none for a reference-free loss: simpo loads and scores no reference model)
        scores, used = reference_pass(cfg, reference_path, tokenizer, batches, train_set,
                                      eval_set, run.device, collate)
        train_set, eval_set = scores.sets
        batches.loader = DataLoader(train_set, batch_sampler=batches.sampler, collate_fn=feed)

        # --- DeepSpeed engine
        eng = stage_kit.build_engine(model, cfg, dc, total_steps=batches.total_steps)
        overlong = {"dpo/dropped_overlong": dropped + eval_dropped}
        runtime.say(f"dpo: {len(train_set)} train / {len(eval_set)} eval pairs ({dropped} + "
                    f"{eval_dropped} dropped as over-long, {unpaired} rows without a pair "
                    f"skipped), {batches.describe('pairs')}{packing.describe(False, budget)}, "
                    f"loss {dc.loss_type} beta {dc.beta}; "
                    f"reference {reference_path or 'none'} scored {len(used)} + "
                    f"{len(eval_set) if reference_path else 0} pairs in "
                    f"{sum(scores.score_s):.1f} s; "
                    f"{trainable:,}/{total:,} trainable params, zero stage "
                    f"{cfg.zero_stage.stage}")
        tracker.summary({"dpo/global_batch_size": batches.global_batch,
                         "dpo/train_examples": len(train_set), "dpo/eval_examples": len(eval_set),
                         **overlong, "dpo/trainable_params": trainable,
                         "dpo/reference_pairs": len(used), **scores.metrics()})
        init_gold = gold_evals.starting_gold("dpo", run, eng, tokenizer, gold_rows, overlong)

        # --- the optimizer-step loop (rlhf_exp/training/train_loop.py)
        loop = train_loop.Loop(stage="dpo", node=dc, total_steps=batches.total_steps,
                               steps_per_epoch=batches.sampler.steps_per_epoch, run_dir=run_dir,
                               tokenizer=tokenizer, device=run.device,
                               lora_save=cfg.model.lora.save,
                               extra_state={"init_gold": init_gold}, budget=budget)
        eval_fn = (partial(evaluate, loader=DataLoader(eval_set, dc.micro_batch_size_per_device,
                                                       collate_fn=collate),
                           node=dc, device=run.device) if eval_set else None)
        state = train_loop.train(eng, batches.loader, batches.sampler, loop,
                                 partial(dpo_step, node=dc), eval_fn, tracker, run.resume_from)

        # --- held-out gold reward after the last step; final checkpoint (HF format,
        # AutoModelForCausalLM), marked final, logged as a `model` artifact
        gold_evals.final_gold("dpo", run, eng, tokenizer, gold_rows, state)
        result = train_loop.save_final(eng, cfg, loop, state, tracker, init_from=dc.init_from,
                                       init_artifact=init_artifact,
                                       extra_metrics={**init_gold, **overlong,
                                                      **scores.metrics(),
                                                      "perf/loop_s": state.loop_s})
        stage_kit.close(run, result, done_line(loop, state, result.metrics))
    return eng, tokenizer, result


def dpo_collate(cfg: DictConfig, model, tokenizer):
    """The collate of the run's layout: packed (dpo.packing, where the model packs exactly),
    the shared prompt as a tree (packing.tree: needs a 4-D mask, sdpa or eager) or not; else
    padded, the shared-prompt layout needing a KV cache in training (no gradient
    checkpointing)."""
    dc = cfg.dpo
    if packing.enabled(dc, model, "dpo"):
        return partial(collate_dpo_packed,
                       shared_prompt=dc.shared_prompt and packing.supports_tree(model))
    shared = dc.shared_prompt and not cfg.model.gradient_checkpointing
    return partial(collate_dpo, pad_id=tokenizer.pad_token_id, shared_prompt=shared)


def token_budget(dc: DictConfig, collate) -> tuple[packing.TokenBudget | None, object]:
    """Token-budget micro-batches (dpo.micro_batch_tokens > 0, packed) and the loader's collate:
    rows (the loop re-cuts each step by the budget), or the run's collate."""
    if dc.micro_batch_tokens <= 0 or collate.func is not collate_dpo_packed:
        return None, collate
    cost = partial(pair_tokens, shared=collate.keywords["shared_prompt"])
    return packing.TokenBudget(dc.micro_batch_tokens, cost, pair_norms, collate), \
        packing.raw_rows


def done_line(loop: train_loop.Loop, state: train_loop.LoopState, m: dict[str, float]) -> str:
    gold = (f", held-out gold reward {m['dpo/init_eval_gold_reward']:.3f} -> "
            f"{m['dpo/eval_gold_reward']:.3f}" if "dpo/init_eval_gold_reward" in m else "")
    return (f"dpo: done. {train_loop.loss_change(loop, state)}, eval reward accuracy "
            f"{m.get('dpo/eval_rewards/accuracies', math.nan):.3f}{gold}")


run = stage_kit.runner("dpo", train)  # the dispatcher's entry point
