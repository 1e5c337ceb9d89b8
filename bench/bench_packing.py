"""Packed vs padded micro-batches (issue #21): training tokens/s and peak RSS of the SFT, reward
and DPO steps, on the bundled task and on free text.

    OMP_NUM_THREADS=1 python bench/bench_packing.py                  # all cases, one table
    OMP_NUM_THREADS=1 python bench/bench_packing.py --steps 20 --micro 16 --repeats 5
    python bench/bench_packing.py --data sort --stage dpo            # a subset
    python bench/bench_packing.py --data text --stage sft reward dpo --model smollm2-135m \
        --micro 8 --steps 3 --repeats 1                              # the real model

What one case measures: the stage's own step function (stages/sft.py lm_step / packed_lm_step,
reward.pair_step, dpo.dpo_step) on its own collate (padded, or packed), forward + backward + a
torch AdamW step per micro-batch, on the same micro-batches in the same order for both layouts;
`--warmup` micro-batches first, then `--steps` timed. Tokens/s counts real (non-pad) tokens, as
perf/tokens_per_s does, so the two layouts are compared on the same work. The DeepSpeed engine
and the loop's logging are left out (the same cost in both layouts). Each case runs in its own
child process, so its peak RSS (ru_maxrss) is its own.

Data:
  sort   the bundled task (rlhf_exp/tasks/sort_digits.py, 3-7 digits), model=tiny (char-level
         Llama): rows of nearly equal length, where packing has little padding to remove
  text   free text with a realistic length spread: the shipped HH-RLHF hub-schema samples
         (rlhf_exp/data/examples/hub_samples/hh_rlhf, chosen / rejected transcripts split at the
         last "Assistant:" turn) and the instruction data (rlhf_exp/data/examples/instructions),
         model=tiny-llama (byte-fallback BPE), max_len 256; shuffled once (seed 0) as a
         sampler would draw them: 99 SFT rows of 16-256 tokens (mean 79), real tokens 37% of a
         padded micro-batch of 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "rlhf_exp" / "data" / "examples"
MODELS = {"sort": "tiny", "text": "tiny-llama"}
MAX_LEN = {"sort": (32, 48), "text": (192, 256)}  # (max_prompt_len, max_len)


def rows(data: str) -> list[dict]:
    """Rows with prompt, response, chosen, rejected (the fields tokenize_sft / _pairs read)."""
    if data == "sort":
        from rlhf_exp.tasks import sort_digits

        return sort_digits.generate(512, seed=0)
    out = []
    for line in (EXAMPLES / "hub_samples/hh_rlhf/helpful-base/train.jsonl").open():
        r = json.loads(line)
        cut_c, cut_r = r["chosen"].rfind("Assistant:"), r["rejected"].rfind("Assistant:")
        prompt = r["chosen"][:cut_c + len("Assistant:")]
        if r["rejected"][:cut_r + len("Assistant:")] != prompt:
            continue
        chosen, rejected = r["chosen"][cut_c + 10:].strip(), r["rejected"][cut_r + 10:].strip()
        out.append({"prompt": prompt, "response": chosen, "chosen": chosen,
                    "rejected": rejected})
    for line in (EXAMPLES / "instructions/pairs.jsonl").open():
        r = json.loads(line)
        out.append({"prompt": r["prompt"], "response": r["chosen"], "chosen": r["chosen"],
                    "rejected": r["rejected"]})
    random.Random(0).shuffle(out)  # mixed, as the training sampler draws them
    return out


def compose(model: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf_exp.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=[f"model={model}", "logger=none"])


def one_case(data: str, stage: str, packed: bool, micro: int, steps: int, warmup: int,
             grpo_tokens: int | None = None, model_name: str | None = None) -> dict:
    """Time `steps` micro-batches of one stage in one layout (this process); `model_name`: a
    conf/model preset instead of the data's own (SFT, reward and DPO)."""
    if stage == "grpo":  # the RL update: its own rollout-shaped data
        return one_grpo_case(data, packed, steps, warmup, grpo_tokens)
    if stage == "ppo":
        return one_ppo_case(data, packed, steps, warmup, grpo_tokens)
    import torch
    from omegaconf import OmegaConf

    from rlhf_exp.data import tokenize as tk
    from rlhf_exp.modeling import models
    from rlhf_exp.stages import dpo, reward, sft
    from rlhf_exp.training import packing

    torch.manual_seed(0)
    cfg = compose(model_name or MODELS[data])
    path = models.resolve_base_path(cfg.model)
    tok = models.load_tokenizer(path, cfg.model)
    load = models.load_reward_model if stage == "reward" else models.load_causal_lm
    model = load(path, tok, cfg.model)
    model.train()
    if packed:  # what the stages do (packing.enabled): per-sequence sdpa on CPU
        packing.use_per_sequence_attention(model)
    max_prompt, max_len = MAX_LEN[data]
    template = cfg.model.prompt_template
    if stage == "sft":
        feats, _ = tk.tokenize_sft(rows(data), tok, template, max_prompt, max_len)
        collate = tk.collate_sft_packed if packed else partial(tk.collate_sft,
                                                                pad_id=tok.pad_token_id)
        step = sft.packed_lm_step if packed else sft.lm_step
    else:
        feats, _ = tk.tokenize_pairs(rows(data), tok, template, max_prompt, max_len)
        if stage == "reward":
            collate = tk.collate_pairs_packed if packed else partial(tk.collate_pairs,
                                                                      pad_id=tok.pad_token_id)
            step = reward.pair_step
        else:  # dpo with its default shared prompt (packed: a Tree), made-up reference log-probs
            feats = [{**f, "ref_chosen_logps": -10.0, "ref_rejected_logps": -10.0} for f in feats]
            collate = (partial(tk.collate_dpo_packed, shared_prompt=True) if packed else
                       partial(tk.collate_dpo, pad_id=tok.pad_token_id, shared_prompt=True))
            # the stage's own node (every key dpo_step reads), with the loss pinned
            node = OmegaConf.merge(cfg.dpo, {"loss_type": "sigmoid", "beta": 0.1,
                                             "label_smoothing": 0.0, "rpo_alpha": 1.0,
                                             "micro_batch_tokens": 0})
            step = partial(dpo.dpo_step, node=node)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = [[feats[(i * micro + j) % len(feats)] for j in range(micro)]
               for i in range(warmup + steps)]
    tokens, t0 = 0, 0.0
    for i, chunk in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        batch = collate(chunk)
        loss, _ = step(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            tokens += real_tokens(batch)
    elapsed = time.perf_counter() - t0
    return {"data": data, "stage": stage, "layout": "packed" if packed else "padded",
            "tokens_per_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------- attention choice
def attention_case(data: str, kernel: str, micro: int, steps: int, warmup: int) -> dict:
    """Packed SFT steps with sdpa's block-diagonal mask (what transformers builds from the
    position ids) or with packing.per_sequence_sdpa (one sdpa call per sequence): which is
    faster on this machine (the stages use the latter on CPU)."""
    import torch

    from rlhf_exp.data import tokenize as tk
    from rlhf_exp.modeling import models
    from rlhf_exp.stages import sft
    from rlhf_exp.training import packing

    torch.manual_seed(0)
    cfg = compose(MODELS[data])
    path = models.resolve_base_path(cfg.model)
    tok = models.load_tokenizer(path, cfg.model)
    model = models.load_causal_lm(path, tok, cfg.model)
    model.train()
    if kernel == "per_sequence":  # every packed row split, whatever its lengths
        assert packing.use_per_sequence_attention(model)
        packing.PER_SEQUENCE_MIN_MEAN = 1
    feats, _ = tk.tokenize_sft(rows(data), tok, cfg.model.prompt_template, *MAX_LEN[data])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens, t0 = 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        batch = tk.collate_sft_packed([feats[(i * micro + j) % len(feats)] for j in range(micro)])
        loss, _ = sft.packed_lm_step(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += real_tokens(batch) if i >= warmup else 0
    return {"kernel": kernel, "tokens_per_s": tokens / (time.perf_counter() - t0)}


GRPO_GROUP = {"sort": 8, "text": 4}  # completions per prompt (text: the 4 shipped samples)
GRPO_COMPLETIONS = 64  # per update: grpo's default micro-batch (prompts_per_step 8 x 8)
GRPO_MAX_NEW = {"sort": 12, "text": 160}  # response columns (grpo.generation.max_new_tokens)


def grpo_groups(data: str) -> list[tuple[str, list[str]]]:
    """(prompt, completions) of GRPO groups. sort: the task's prompts, each group the correct
    answer G times (a trained policy's nearly equal lengths); text: the shipped instruction
    prompts with their 4 answers sampled from SmolLM2-135M-Instruct (instructions/samples.jsonl:
    a real rollout's length spread)."""
    if data == "sort":
        from rlhf_exp.tasks import sort_digits

        return [(r["prompt"], [r["response"]] * GRPO_GROUP["sort"])
                for r in sort_digits.generate(256, seed=0)]
    groups: dict[str, list[str]] = {}
    for line in (EXAMPLES / "instructions/samples.jsonl").open():
        r = json.loads(line)
        groups.setdefault(r["prompt"], []).append(r["response"])
    return [(p, a) for p, a in groups.items() if len(a) == GRPO_GROUP["text"]]


def grpo_rollout(data: str, tok, template: str, max_prompt: int):
    """The groups as one fixed rollout (rollout.Trajectory's tensors): left-padded prompts,
    responses closed by EOS (cut at GRPO_MAX_NEW), padding after."""
    import torch

    from rlhf_exp.data.tokenize import pad_left

    R, prompts, responses = GRPO_MAX_NEW[data], [], []
    for prompt, answers in grpo_groups(data):
        ids = tok(template.format(prompt=prompt))["input_ids"][-max_prompt:]
        for a in answers:
            prompts.append(ids)
            responses.append((tok(a, add_special_tokens=False)["input_ids"]
                              + [tok.eos_token_id])[:R])
    seq_p = pad_left(prompts, tok.pad_token_id)
    mask_p = pad_left([[1] * len(x) for x in prompts], 0)
    resp = torch.full((len(responses), R), tok.pad_token_id)
    mask = torch.zeros(len(responses), R)
    for i, r in enumerate(responses):
        resp[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    attn = torch.cat([mask_p, mask.long()], 1)
    return torch.cat([seq_p, resp], 1), attn, (attn.cumsum(-1) - 1).clamp_min(0), mask


def one_grpo_case(data: str, packed: bool, steps: int, warmup: int,
                  budget: int | None = None) -> dict:
    """Time `steps` GRPO updates of GRPO_COMPLETIONS completions (whole groups, one
    minibatch) with grpo_step's own micro-batching, forward and loss: padded rows (today's
    path: micro_batch_size_per_device 64, each group's prompt once through the KV cache) or
    packed rows (`budget`, default grpo.micro_batch_tokens). A torch AdamW step per update."""
    import torch

    from rlhf_exp.modeling import models
    from rlhf_exp.rl import grpo_math
    from rlhf_exp.stages import grpo

    torch.manual_seed(0)
    cfg = compose(MODELS[data])
    path = models.resolve_base_path(cfg.model)
    tok = models.load_tokenizer(path, cfg.model)
    model = models.load_causal_lm(path, tok, cfg.model)
    model.train()
    seq, attn, pos, mask = grpo_rollout(data, tok, cfg.model.prompt_template, MAX_LEN[data][0])
    G, n = GRPO_GROUP[data], GRPO_COMPLETIONS
    geo = grpo.Geometry(n // G, n, n, n, 1, 1, G, True, G,
                        (budget or cfg.grpo.micro_batch_tokens) if packed else None)
    m = grpo.Models(tok, model, None, None, [], 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    tokens, t0, rows_total = 0, 0.0, len(seq)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        lo = (i * n) % (rows_total - rows_total % n)
        idx = torch.arange(lo, lo + n)
        exp = grpo.Experience(seq[idx], attn[idx], pos[idx], mask[idx], None, None,
                              torch.randn(n, generator=gen), torch.ones(n))
        rows = torch.arange(n)
        total = float(exp.mask.sum())
        for b_rows in grpo.micro_batches(exp, rows, geo):
            b = exp.select(b_rows)
            logp, _ = grpo.update_forward(m, geo, b, 1.0, False)
            loss, _ = grpo_math.grpo_loss(logp, logp.detach(), b.advantages, b.mask,
                                          epsilon=0.2, total_tokens=total,
                                          total_sequences=float(n))
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            tokens += int(exp.attention_mask.sum())
    elapsed = time.perf_counter() - t0
    return {"data": data, "stage": "grpo", "layout": "packed" if packed else "padded",
            "tokens_per_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed,
            "pad_fraction": 1 - float(attn.sum()) / attn.numel(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def one_ppo_case(data: str, packed: bool, steps: int, warmup: int,
                 budget: int | None = None) -> dict:
    """Time `steps` PPO update micro-batches (ppo.micro_batch_size_per_device = 32 sequences
    drawn from the GRPO rollout above, one per row): ppo_step's actor forward (policy loss)
    and critic forward (value loss), backward of both, a torch AdamW step each; padded rows or
    packed rows of at most `budget` tokens (default ppo.micro_batch_tokens)."""
    import torch

    from rlhf_exp.modeling import models
    from rlhf_exp.rl import packed_rows, ppo_math
    from rlhf_exp.stages import ppo

    torch.manual_seed(0)
    cfg = compose(MODELS[data])
    path = models.resolve_base_path(cfg.model)
    tok = models.load_tokenizer(path, cfg.model)
    actor = models.load_causal_lm(path, tok, cfg.model).train()
    critic = ppo.as_value_model(models.load_reward_model(path, tok, cfg.model)).train()
    opt = torch.optim.AdamW([*actor.parameters(), *critic.parameters()], lr=1e-5)
    seq, attn, pos, mask = grpo_rollout(data, tok, cfg.model.prompt_template, MAX_LEN[data][0])
    R, micro, gen = mask.shape[1], cfg.ppo.micro_batch_size_per_device, torch.Generator()
    gen.manual_seed(0)
    tokens, t0 = 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        idx = torch.randperm(len(seq), generator=gen)[:micro]
        b = ppo.Experience(seq[idx], attn[idx], pos[idx], mask[idx], None, None, None, None)
        p = (packed_rows.pack(b.sequences, b.attention_mask, b.mask,
                              row_tokens=budget or cfg.ppo.micro_batch_tokens)
             if packed else None)
        logp, _ = ppo.actor_forward(actor, b, p, 1.0)
        values = (packed_rows.token_values(critic, p) if packed else
                  critic(input_ids=b.sequences, attention_mask=b.attention_mask,
                         position_ids=b.position_ids)[:, -(R + 1):-1])
        (ppo_math.masked_mean(logp, b.mask) + ppo_math.masked_mean(values, b.mask)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            tokens += int(b.attention_mask.sum())
    elapsed = time.perf_counter() - t0
    return {"data": data, "stage": "ppo", "layout": "packed" if packed else "padded",
            "tokens_per_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def real_tokens(batch: dict) -> int:
    """What perf/tokens_per_s counts: num_tokens where the batch has it, else the mask's."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    return int(batch["attention_mask"].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["sort", "text"], choices=["sort", "text"])
    ap.add_argument("--stage", nargs="+", default=["sft", "reward", "dpo", "grpo"],
                    choices=["sft", "reward", "dpo", "grpo", "ppo"])
    ap.add_argument("--micro", type=int, default=16, help="rows (pairs) per micro-batch")
    ap.add_argument("--steps", type=int, default=0,
                    help="timed micro-batches per run; 0 = 48 on sort (short steps), 12 on text")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per layout, alternating; the median tokens/s is reported")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--grpo-tokens", type=int, default=None,
                    help="grpo / ppo: packed token budget (default <stage>.micro_batch_tokens)")
    ap.add_argument("--model", help="sft / reward / dpo: a conf/model preset instead of the "
                    "data's own (e.g. smollm2-135m on text: the real model, full fine-tuning)")
    ap.add_argument("--attention", action="store_true",
                    help="instead: packed SFT with sdpa's block mask vs per-sequence sdpa calls")
    ap.add_argument("--one", nargs=3, metavar=("DATA", "STAGE", "LAYOUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        data, stage, layout = args.one
        print(json.dumps(one_case(data, stage, layout == "packed", args.micro, args.steps,
                                  args.warmup, args.grpo_tokens, args.model)))
        return
    if args.attention:
        for data in args.data:
            for kernel in ("sdpa", "per_sequence"):
                r = attention_case(data, kernel, args.micro, args.steps, args.warmup)
                print(f"{data} packed sft, attention {kernel}: {r['tokens_per_s']:.0f} tok/s",
                      flush=True)
        return
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load {os.getloadavg()}; "
          f"model {args.model or 'per data'}; "
          f"micro {args.micro}, {args.steps or '48 (sort) / 12 (text)'} timed steps, median of "
          f"{args.repeats} runs per layout")
    print("| data | stage | padded tok/s | packed tok/s | speed-up | padded RSS MB | "
          "packed RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for data in args.data:
        for stage in args.stage:
            steps = args.steps or (48 if data == "sort" else 12)
            runs: dict[str, list[dict]] = {"padded": [], "packed": []}
            for _ in range(args.repeats):  # alternating, so a load change hits both layouts
                for layout in ("padded", "packed"):
                    out = subprocess.run([sys.executable, __file__, "--one", data, stage, layout,
                                          "--micro", str(args.micro), "--steps", str(steps),
                                          "--warmup", str(args.warmup),
                                          *(["--grpo-tokens", str(args.grpo_tokens)]
                                            if args.grpo_tokens else []),
                                          *(["--model", args.model] if args.model else [])],
                                         capture_output=True, text=True, check=True)
                    runs[layout].append(json.loads(out.stdout.strip().splitlines()[-1]))
            a, b = (sorted(runs[k], key=lambda r: r["tokens_per_s"])[len(runs[k]) // 2]
                    for k in ("padded", "packed"))
            print(f"| {data} | {stage} | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | "
                  f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x | {a['peak_rss_mb']:.0f} | "
                  f"{b['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
