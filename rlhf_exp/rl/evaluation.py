"""The held-out evaluator: the prompts, seeded sampling, and the scores of a policy's responses.

One evaluator behind every held-out number of a policy: each stage's own evals (PPO, GRPO, DPO:
`heldout_eval`), the pipeline summary and the shoot-out (`compare_checkpoints`), and
`stage=eval` (`compare_checkpoints` on all of a run's policies). They report the same numbers for
the same policy and settings: the same rows (the PPO share's held-out slice, in order, sharded
over ranks), the same prompt rendering and truncation, the same batches and the same seeded
generator give the same responses, and every score is averaged the same way.

The steps: `heldout_shard` (this rank's rows) -> `score_policy` (generate with `EvalSettings`,
then per response: gold reward, reward-model score, length, finished, KL to a reference) ->
`summarize` (means over all ranks' rows).

pass@k and mean@N (`EvalSettings.pass_k`, from the eval node; stage=eval, the pipeline summary and
the shoot-out): each prompt with a gold reward gets N-1 more samples from a generator of its own,
after the usual one, so the usual sample and every number computed from it stay what they are
for any N (rlhf_exp/rl/pass_at_k.py has the estimator).

Shapes: B prompts per batch, P prompt tokens (left-padded), R = max_new_tokens.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_exp import tasks
from rlhf_exp.data import build_stage_data
from rlhf_exp.data.tokenize import pad_left, pad_right, prompt_ids
from rlhf_exp.modeling import models
from rlhf_exp.rl import ppo_math, scoring
from rlhf_exp.rl.generation import GenerationConfig, Rollout, generate
from rlhf_exp.rl.pass_at_k import PassAtK, prompt_sums
from rlhf_exp.training import dist, runtime


def heldout_rows(cfg: DictConfig, limit: int | None = None) -> list[dict]:
    """The PPO share's held-out rows (never trained on by any stage), first `limit` of them."""
    rows = build_stage_data(cfg.data_mix, "ppo", cfg.seed).eval
    return rows[:limit] if limit else rows


def heldout_shard(cfg: DictConfig, limit: int, rank: int, world: int) -> list[dict]:
    """This rank's share of the first `limit` held-out rows, cut to a multiple of the world size
    so every rank runs the same number of generation batches (collectives under ZeRO-3),
    sharded [rank::world]."""
    rows = heldout_rows(cfg, limit=limit)
    return rows[:len(rows) // world * world][rank::world]


def generation_config(node: DictConfig) -> GenerationConfig:
    """`ppo.generation` / `eval.generation` / `chat.generation` as a GenerationConfig."""
    return GenerationConfig(**OmegaConf.to_container(node, resolve=True))


@dataclass(frozen=True)
class EvalSettings:
    """How the held-out prompts are answered: the same rows + settings = the same responses."""

    gen: GenerationConfig
    template: str  # model.prompt_template
    max_prompt_len: int
    batch_size: int  # prompts per generation batch (the batching shapes the random draws)
    seed: int  # of the one sampling generator
    device: torch.device
    synced_gpus: bool = False  # ZeRO-3 on several ranks: every rank runs all decode steps
    pass_k: PassAtK | None = None  # N samples per prompt for pass@k and mean@N; None: not measured


# the extra samples' generator: seeded this far from the usual one (seed + rank), so the two
# streams never coincide on any rank
EXTRA_SAMPLES_SEED_OFFSET = 1_000_003


def pass_at_k_settings(eval_node: DictConfig) -> PassAtK:
    """`eval.num_samples`, `eval.pass_k`, `eval.pass_threshold` as a PassAtK."""
    return PassAtK.from_node(eval_node)


def stage_settings(cfg: DictConfig, node: DictConfig, zero_stage: int = 0) -> EvalSettings:
    """The held-out eval settings of a stage node with `generation`, `max_prompt_len` and
    `eval_batch_size` (ppo, grpo) on this rank: seed + rank, as the RL stages sample."""
    return EvalSettings(gen=generation_config(node.generation),
                        template=cfg.model.prompt_template, max_prompt_len=node.max_prompt_len,
                        batch_size=node.eval_batch_size, seed=cfg.seed + dist.rank(),
                        device=dist.device_for(cfg.hardware.device),
                        synced_gpus=zero_stage == 3 and dist.world_size() > 1)


def encode_prompts(tokenizer, rows: list[dict], template: str,
                   max_prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' prompts (data.tokenize.prompt_ids), left-padded:
    (input_ids [B, P], attention_mask [B, P])."""
    ids = [prompt_ids(tokenizer, row, template, max_prompt_len) for row in rows]
    return pad_left(ids, tokenizer.pad_token_id), pad_left([[1] * len(s) for s in ids], 0)


@dataclass
class Samples:
    """One policy's responses to the held-out prompts, in prompt order."""

    texts: list[str]  # decoded response, without EOS and special tokens
    lengths: list[int]  # generated tokens, the EOS included (as PPO's response_length)
    finished: list[bool]  # the response ended with EOS (not cut at max_new_tokens)
    rollouts: list[Rollout]  # per batch: token ids and masks (for log-probs / KL)


def sample_responses(model, tokenizer, rows: list[dict], gen: GenerationConfig, *,
                     template: str, max_prompt_len: int, batch_size: int, seed: int,
                     device: torch.device, synced_gpus: bool = False) -> Samples:
    """Generate for every row's prompt, `batch_size` prompts at a time, from one generator
    seeded with `seed`: same rows + settings + batch size + seed = same responses.
    `synced_gpus`: ZeRO-3 on several ranks (every rank runs all decode steps)."""
    rng = torch.Generator().manual_seed(seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = Samples([], [], [], [])
    for lo in range(0, len(rows), batch_size):
        ids, mask = encode_prompts(tokenizer, rows[lo:lo + batch_size],
                                   template, max_prompt_len)
        rollout = generate(model, ids.to(device), mask.to(device), gen, eos_token_id=eos,
                           pad_token_id=pad, generator=rng, synced_gpus=synced_gpus)
        responses, rmask = rollout.responses.cpu(), rollout.response_mask.cpu()
        for tokens, m in zip(responses, rmask):
            kept = tokens[m.bool()].tolist()
            done = bool(kept) and kept[-1] == eos
            out.texts.append(tokenizer.decode(kept[:-1] if done else kept,
                                              skip_special_tokens=True))
            out.lengths.append(len(kept))
            out.finished.append(done)
        out.rollouts.append(rollout)
    return out


def gold_scores(rows: list[dict], texts: list[str]) -> list[float | None]:
    """The task's gold reward of each response; None where the row's source has none."""
    return [tasks.gold_reward(r.get("task"), r["prompt"], t) for r, t in zip(rows, texts)]


def reward_scores(reward_model, tokenizer, rows: list[dict], texts: list[str],
                  finished: list[bool], *, template: str, max_prompt_len: int, batch_size: int,
                  device: torch.device) -> list[float]:
    """The reward model's score of each (prompt, response), encoded as the reward stage encodes
    its pairs (rendered prompt + response + EOS) with the reward model's own tokenizer, so a
    policy with a different tokenizer is scored fairly. A response cut off before EOS gets no
    EOS: the score is read at its last token, as PPO reads it."""
    seqs = []
    for row, text, done in zip(rows, texts, finished):
        p = prompt_ids(tokenizer, row, template, max_prompt_len)
        r = tokenizer(text, add_special_tokens=False)["input_ids"]
        seqs.append(p + r + ([tokenizer.eos_token_id] if done else []))
    scores: list[float] = []
    with torch.no_grad():
        for lo in range(0, len(seqs), batch_size):
            chunk = seqs[lo:lo + batch_size]
            ids = pad_right(chunk, tokenizer.pad_token_id).to(device)
            mask = pad_right([[1] * len(s) for s in chunk], 0).to(device)
            scores += scoring.sequence_scores(reward_model, ids, mask).tolist()
    return scores


def response_logprobs(model, rollout: Rollout) -> torch.Tensor:
    """[B, R] log-prob of each generated token under `model` (fp32, on CPU); positions count
    real tokens only, as during generation, so left padding does not shift them."""
    device = next(model.parameters()).device
    seq = rollout.sequences.to(device)
    mask = rollout.attention_mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=mask, position_ids=pos).logits
    model.train(was_training)
    P = rollout.prompt_len
    return ppo_math.logprobs_from_logits(logits[:, P - 1:-1], seq[:, P:]).cpu()


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
                estimator: str = "k1") -> torch.Tensor:
    """[B] KL(policy || reference) of each response: the per-token estimate summed over the
    response tokens (EOS included), as PPO's per-sequence KL."""
    per_token = ppo_math.kl_per_token(logprobs, ref_logprobs, estimator)
    return ppo_math.masked_sum(per_token, response_mask.to(per_token.dtype), dim=-1)


@dataclass
class PolicyScores:
    """One policy's responses to this rank's held-out rows, and each response's scores."""

    samples: Samples
    gold: list[float | None]  # the task's gold reward; None where the row's source has none
    reward: list[float] | None  # the reward model's score; None: no reward model
    kl: list[float] | None  # KL(policy || reference) of the response; None: no reference
    # with EvalSettings.pass_k: each row's N gold rewards (the usual sample first); None in a
    # row without one
    gold_samples: list[list[float] | None] | None = None
    pass_k: PassAtK | None = None  # the settings gold_samples were drawn with


def extra_golds(policy, tokenizer, rows: list[dict], gold: list[float | None],
                settings: EvalSettings) -> list[list[float]]:
    """The gold rewards of N-1 more samples of each row, from a generator of their own (the
    usual sample's stream is untouched). Only the rows with a gold reward are sampled, all of
    them under synced_gpus (every rank must run the same number of batches)."""
    s, extra = settings, settings.pass_k.num_samples - 1
    if extra == 0:
        return [[] for _ in rows]
    chosen = [i for i, g in enumerate(gold) if g is not None or s.synced_gpus]
    repeated = [rows[i] for i in chosen for _ in range(extra)]
    samples = sample_responses(policy, tokenizer, repeated, s.gen, template=s.template,
                               max_prompt_len=s.max_prompt_len, batch_size=s.batch_size,
                               seed=s.seed + EXTRA_SAMPLES_SEED_OFFSET, device=s.device,
                               synced_gpus=s.synced_gpus)
    golds = gold_scores(repeated, samples.texts)
    out: list[list[float]] = [[] for _ in rows]
    for j, i in enumerate(chosen):
        out[i] = golds[j * extra:(j + 1) * extra]
    return out


@torch.no_grad()
def score_policy(policy, tokenizer, rows: list[dict], settings: EvalSettings, *,
                 reward_model=None, reward_tokenizer=None, reference=None,
                 kl_estimator: str = "k1") -> PolicyScores:
    """Generate for every row (`sample_responses`), then score each response: gold reward,
    the reward model's score (encoded with `reward_tokenizer`, default the policy's), and the
    KL to `reference` (a model with the policy's vocabulary; the policy itself: 0). With
    `settings.pass_k`: the gold rewards of N-1 more samples of each row (`extra_golds`)."""
    s = settings
    samples = sample_responses(policy, tokenizer, rows, s.gen, template=s.template,
                               max_prompt_len=s.max_prompt_len, batch_size=s.batch_size,
                               seed=s.seed, device=s.device, synced_gpus=s.synced_gpus)
    reward = None if reward_model is None else reward_scores(
        reward_model, reward_tokenizer or tokenizer, rows, samples.texts, samples.finished,
        template=s.template, max_prompt_len=s.max_prompt_len, batch_size=s.batch_size,
        device=s.device)
    kl = None
    if reference is policy:
        kl = [0.0] * len(rows)
    elif reference is not None:
        kl = []
        for rollout in samples.rollouts:
            kl += sequence_kl(response_logprobs(policy, rollout),
                              response_logprobs(reference, rollout),
                              rollout.response_mask.cpu(), kl_estimator).tolist()
    gold = gold_scores(rows, samples.texts)
    gold_samples = None
    if s.pass_k is not None:
        more = extra_golds(policy, tokenizer, rows, gold, s)
        gold_samples = [None if g is None else [g, *m] for g, m in zip(gold, more)]
    return PolicyScores(samples, gold, reward, kl, gold_samples, s.pass_k)


def summarize(scores: PolicyScores, device: torch.device) -> dict[str, float]:
    """The means over every rank's rows (each rank passes its own PolicyScores; all must call):
    `response_length`, `finished` (the share of responses that ended with EOS), `reward_score`
    (with a reward model), `gold_reward` (over the rows that have one, where any does) and
    `kl_to_sft` (KL to the reference, where there is one); with N samples per prompt
    (`scores.pass_k`) `pass@<k>` and `mean@<N>` over the rows with a gold reward."""
    pass_k = scores.pass_k
    golds = [g for g in scores.gold if g is not None]
    per_prompt = [g for g in scores.gold_samples or [] if g is not None]
    passed = prompt_sums(per_prompt, pass_k) if pass_k is not None else []
    s = dist.all_reduce_mean([sum(golds), len(golds), float(sum(scores.reward or [])),
                              len(scores.gold), float(sum(scores.samples.lengths)),
                              float(sum(scores.samples.finished)), float(sum(scores.kl or [])),
                              float(len(per_prompt)), *passed], device)
    n = max(s[3], 1e-9)
    metrics = {"response_length": s[4] / n, "finished": s[5] / n}
    if scores.reward is not None:
        metrics["reward_score"] = s[2] / n
    if s[1] > 0:
        metrics["gold_reward"] = s[0] / s[1]
    if scores.kl is not None:
        metrics["kl_to_sft"] = s[6] / n
    if pass_k is not None and s[7] > 0:
        metrics.update({name: value / s[7]
                        for name, value in zip(pass_k.metric_names(), s[8:])})
    return metrics


def heldout_eval(policy, tokenizer, rows: list[dict], settings: EvalSettings, *, prefix: str,
                 reward_model=None) -> dict[str, float]:
    """A training stage's held-out evaluation of its policy on this rank's rows
    (`heldout_shard`), averaged over ranks: `<prefix>/eval_response_length`,
    `<prefix>/eval_reward_score` (with a reward model), `<prefix>/eval_gold_reward` (where the
    rows have a gold reward): the same numbers as `stage=eval` and the pipeline summary give
    for the same policy and settings."""
    m = summarize(score_policy(policy, tokenizer, rows, settings, reward_model=reward_model),
                  settings.device)
    return {f"{prefix}/eval_{key}": m[key]
            for key in ("response_length", "reward_score", "gold_reward") if key in m}


def compare_checkpoints(policies: dict[str, str], rows: list[dict], settings: EvalSettings, *,
                        model_cfg: DictConfig, precision: str, reward_model: str | None = None,
                        reference: str | None = None, kl_estimator: str = "k1"
                        ) -> dict[str, PolicyScores]:
    """Each policy checkpoint (name -> local path), one at a time, through `score_policy` on
    the same rows with the same settings. Frozen scorers are loaded once: the reward model
    (with its own tokenizer, so a policy with another tokenizer is scored fairly) and the KL
    reference (a policy at the reference's path is the reference itself: KL 0; a policy with
    another vocabulary gets no KL)."""
    rm = rm_tok = ref_model = ref_tok = None
    if reward_model:
        rm_tok = models.load_tokenizer(reward_model, model_cfg)
        rm = models.load_reward_model(reward_model, rm_tok, model_cfg, precision)
        rm = rm.to(settings.device).eval()
    if reference:
        ref_tok = models.load_tokenizer(reference, model_cfg)
        ref_model = models.load_causal_lm(reference, ref_tok, model_cfg, precision)
        ref_model = ref_model.to(settings.device).eval()
    out: dict[str, PolicyScores] = {}
    for name, path in policies.items():
        if ref_model is not None and path == reference:
            tok, model = ref_tok, ref_model
        else:
            tok = models.load_tokenizer(path, model_cfg)
            model = models.load_causal_lm(path, tok, model_cfg, precision)
            model = model.to(settings.device).eval()
        same_vocab = ref_model is not None and tok.get_vocab() == ref_tok.get_vocab()
        if ref_model is not None and not same_vocab:
            runtime.say(f"eval: {name} has another vocabulary than the reference; no KL for it")
        out[name] = score_policy(model, tok, rows, settings, reward_model=rm,
                                 reward_tokenizer=rm_tok,
                                 reference=ref_model if same_vocab else None,
                                 kl_estimator=kl_estimator)
        del model
        gc.collect()
    return out
