"""Generation throughput: rlhf_exp.rl.generation versus plain HF `generate`, new tokens per second.

    python bench/bench_generation.py --model tiny
    python bench/bench_generation.py --model llama --hidden 2048 --layers 22 --heads 32 \
        --kv-heads 4 --vocab 32000 --batch 64 --prompt-len 256 --new-tokens 256 \
        --device cuda --dtype bf16                      # the 1.1B Llama shape on a GPU

Random weights (the shape is what matters for speed). Every method samples (temperature 1) exactly
`--new-tokens` tokens per row: ours never sees its EOS id, HF gets min_new_tokens = max_new_tokens.
Methods:
  ours-static    rlhf_exp.rl.generation.generate, StaticCache (CUDA graphs on cuda, eager on cpu)
  ours-dynamic   rlhf_exp.rl.generation.generate, DynamicCache, eager
  hf-dynamic     model.generate(), default DynamicCache
  hf-static      model.generate(cache_implementation="static")
Prints one row per method: new tokens/s (batch * new tokens / wall time), ms per decode step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf_exp.rl.generation import GenerationConfig, generate  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A random-weight Llama of the requested shape (`tiny` = the project's tiny model shape)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.model == "tiny":
        shape = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    else:
        shape = dict(hidden_size=args.hidden, num_hidden_layers=args.layers,
                     num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                     vocab_size=args.vocab,
                     intermediate_size=args.intermediate or int(args.hidden * 2.75))
    config = LlamaConfig(**shape, max_position_embeddings=args.prompt_len + args.new_tokens + 64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(DTYPES[args.dtype])
    return model.eval()


def run_ours(model, ids, mask, args, static: bool) -> None:
    gen = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=True, temperature=1.0,
                           use_static_cache=static, compile="auto")
    # EOS id -1 never matches a token: every row generates exactly new_tokens tokens
    generate(model, ids, mask, gen, eos_token_id=-1, pad_token_id=0,
             generator=torch.Generator().manual_seed(0))


def run_hf(model, ids, mask, args, static: bool) -> None:
    kwargs = {"cache_implementation": "static"} if static else {}
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                       top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=2, **kwargs)


METHODS = {
    "ours-static": lambda m, i, a, args: run_ours(m, i, a, args, True),
    "ours-dynamic": lambda m, i, a, args: run_ours(m, i, a, args, False),
    "hf-dynamic": lambda m, i, a, args: run_hf(m, i, a, args, False),
    "hf-static": lambda m, i, a, args: run_hf(m, i, a, args, True),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["tiny", "llama"], default="tiny")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    ids, mask = ids.to(args.device), mask.to(args.device)
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"{platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"# model {args.model}: {n_params / 1e6:.1f}M params, {args.dtype}, {device_name}")
    print(f"# batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"median of {args.repeats} (after {args.warmup} warm-up)")
    print(f"{'method':<14} {'new tok/s':>11} {'ms/step':>9} {'wall s':>8}")
    for name in args.methods.split(","):
        fn = METHODS[name]
        for _ in range(args.warmup):
            fn(model, ids, mask, args)
        times = []
        for _ in range(args.repeats):
            sync(args.device)
            t0 = time.perf_counter()
            fn(model, ids, mask, args)
            sync(args.device)
            times.append(time.perf_counter() - t0)
        wall = statistics.median(times)
        print(f"{name:<14} {args.batch * args.new_tokens / wall:>11,.0f} "
              f"{1000 * wall / args.new_tokens:>9.2f} {wall:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
