"""PPO step throughput of the real `stage=ppo` runner: samples (rollouts) per second.

    python bench/bench_ppo.py --model tiny
    python bench/bench_ppo.py --model llama --hidden 512 --layers 4 --heads 8 --kv-heads 2 \
        --vocab 32000                                    # a small Llama shape on CPU
    python bench/bench_ppo.py --model llama --hidden 2048 --layers 22 --heads 32 --kv-heads 4 \
        --vocab 32000 --device cuda --dtype bf16 --rollout 64 --micro 16 \
        --prompt-len 256 --new-tokens 256                # the 1.1B Llama shape on one GPU

Random weights: the actor, reference, critic and reward model all start from one random model of
the given shape (the tiny model's character tokenizer; ids beyond it decode to nothing), so this
measures speed, not learning. The stage runs in this process with W&B offline in a temp dir;
the per-step `perf/*` metrics are read back from the W&B run and the first `--skip` steps
(warm-up) are dropped. Extra config overrides: `--set ppo.ppo_epochs=2 --set zero_stage=zero3`.
Prints the median seconds of each phase and samples/s (rollouts per second of a whole step).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def build_model_dir(args: argparse.Namespace, out: Path) -> Path:
    """A random-weight Llama of the requested shape saved as an HF dir with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_exp.modeling.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, vocab_size=max(args.vocab, len(tok)),
        intermediate_size=args.intermediate or int(args.hidden * 2.75),
        max_position_embeddings=args.prompt_len + args.new_tokens + 64,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["tiny", "llama"], default="tiny")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--intermediate", type=int, default=0, help="0 = 2.75 x hidden")
    p.add_argument("--rollout", type=int, default=64, help="ppo.rollout_batch_size")
    p.add_argument("--micro", type=int, default=32, help="ppo.micro_batch_size_per_device")
    p.add_argument("--prompt-len", type=int, default=32, help="ppo.max_prompt_len")
    p.add_argument("--new-tokens", type=int, default=12, help="ppo.generation.max_new_tokens")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=1, help="warm-up steps left out of the median")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (run, W&B, model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override (repeatable)")
    args = p.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from rlhf_exp.cli import CONF_DIR, check
    from rlhf_exp.stages import ppo
    from rlhf_exp.training.wandb_reader import read_runs

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_ppo_"))
    os.environ.setdefault("RLHF_EXP_CACHE", str(work / "cache"))
    overrides = [
        "stage=ppo", "logger.log_checkpoints=false", "logger.table_every=0",
        f"hardware={'cpu' if args.device == 'cpu' else '1gpu'}",
        f"hardware.precision={args.dtype}", f"ppo.steps={args.steps}",
        f"ppo.rollout_batch_size={args.rollout}", f"ppo.micro_batch_size_per_device={args.micro}",
        f"ppo.max_prompt_len={args.prompt_len}", f"ppo.generation.max_new_tokens={args.new_tokens}",
        "ppo.eval_every=0", "ppo.eval_num_prompts=1", "experiment_name=bench_ppo",
        "data_mix.sources.0.synthetic.num_examples=4000",
    ]
    if args.model == "llama":
        overrides.append(f"model.path={build_model_dir(args, work / 'model')}")
    overrides += args.set
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    check(cfg)
    run_dir = work / "run"
    _, _, result = ppo.train(cfg, run_dir)
    run = read_runs(run_dir / "wandb")[0]

    def median(key: str) -> float:
        values = run.metric(key)[args.skip:] or run.metric(key)
        return statistics.median(values)

    gen_s, exp_s = median("perf/gen_s"), median("perf/experience_s")
    train_s = median("perf/train_s")
    length = median("ppo/response_length")
    n_params = sum(p.numel() for p in _load_shape(cfg).parameters())
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"{platform.machine()}, {torch.get_num_threads()} threads, "
                   f"{os.cpu_count()} cores")
    print(f"\n# PPO step, model {args.model} ({n_params / 1e6:.1f}M params per model, 4 models), "
          f"{args.dtype}, {device}")
    print(f"# rollout {args.rollout} x ({args.prompt_len} prompt + {args.new_tokens} new tokens), "
          f"micro {args.micro}, epochs {cfg.ppo.ppo_epochs} x minibatches "
          f"{cfg.ppo.num_minibatches}, zero {cfg.zero_stage.stage}; median of steps "
          f"{args.skip + 1}..{args.steps}")
    print(f"{'phase':<12} {'s/step':>8}")
    for name, value in (("generate", gen_s), ("experience", exp_s), ("train", train_s)):
        print(f"{name:<12} {value:>8.3f}")
    print(f"{'samples/s':<12} {median('perf/samples_per_s'):>8.2f}")
    print(f"{'gen tok/s':<12} {args.rollout * length / gen_s:>8.0f}   "
          f"(mean response {length:.1f} tokens)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _load_shape(cfg):
    """A meta-device copy of the policy, only to count its parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_exp.modeling.models import resolve_base_path

    config = AutoConfig.from_pretrained(resolve_base_path(cfg.model))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


if __name__ == "__main__":
    main()
