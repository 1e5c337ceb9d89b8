"""SFT's packed step with the LM head at every position vs only where a response token is
predicted (what `stages/sft.packed_lm_step` does), on one packed micro-batch of real rows.

    rlhf-exp-fetch smollm2-135m                    # once, where the hub copy is not cached
    OMP_NUM_THREADS=1 python bench/bench_sft_head.py [--model smollm2-135m] [--rows 8]

Full fine-tuning, one forward + backward per measurement, the two ways alternating; prints each
step's seconds, the loss (equal both ways) and the size of the fp32 logits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a conf/model preset")
    ap.add_argument("--data-mix", default="instructions", help="a conf/data_mix preset")
    ap.add_argument("--rows", type=int, default=8, help="SFT rows in the packed micro-batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from rlhf_exp.cli import CONF_DIR
    from rlhf_exp.data import build_stage_data
    from rlhf_exp.data.tokenize import collate_sft_packed, tokenize_sft
    from rlhf_exp.modeling import models
    from rlhf_exp.training import packing

    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["stage=sft", f"model={args.model}",
                                           f"data_mix={args.data_mix}", "logger=none"])
    path = models.resolve_base_path(cfg.model)
    tok = models.load_tokenizer(path, cfg.model)
    model = models.load_causal_lm(path, tok, cfg.model, "fp32")
    rows = build_stage_data(cfg.data_mix, "sft", cfg.seed).train[:args.rows]
    feats, _ = tokenize_sft(rows, tok, cfg.model.prompt_template, cfg.sft.max_prompt_len,
                            cfg.sft.max_len)
    batch = collate_sft_packed(feats)
    labels, lengths = batch["labels"][0], batch["seq_lengths"]
    targets = labels[1:]
    print(f"{args.model}: {len(feats)} rows packed, {int(lengths.sum())} tokens, "
          f"{int((targets != -100).sum())} response tokens, {args.threads} thread(s)")

    def step(response_only: bool) -> tuple[float, float, float]:
        packed = packing.from_flat(batch["input_ids"], lengths)
        t0 = time.perf_counter()
        if response_only:
            keep = (targets != -100).nonzero().squeeze(1)
            logits = model(**packed.forward_kwargs(), logits_to_keep=keep).logits[0]
            loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        else:
            logits = model(**packed.forward_kwargs()).logits[0, :-1]
            loss = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item(), logits.numel() * 4 / 2**20

    for _ in range(args.repeats):
        for response_only in (False, True):
            secs, loss, mib = step(response_only)
            name = "response positions" if response_only else "every position"
            print(f"  LM head at {name:18s} {secs:6.2f} s  loss {loss:.4f}  logits {mib:5.0f} MiB")


if __name__ == "__main__":
    main()
