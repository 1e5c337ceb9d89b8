"""Ours against TRL on the same model, data, batch, lengths and step count.

    rlhf-exp experiment=demo 'stage.stages=[sft]' hydra.run.dir=outputs/demo_sft   # once
    pip install -e '.[bench]'                                         # TRL 1.16 (not a runtime dep)
    python bench/bench_vs_trl.py --algo grpo --sft outputs/demo_sft/sft --steps 30
    python bench/bench_vs_trl.py --algo dpo --sft outputs/demo_sft/sft --steps 100
    python bench/bench_vs_trl.py --algo grpo --sft <dir> --device cuda
    rlhf-exp-fetch smollm2-135m                                       # once, the real model
    OMP_NUM_THREADS=1 python bench/bench_vs_trl.py --model smollm2-135m --algo grpo --threads 1
    OMP_NUM_THREADS=1 python bench/bench_vs_trl.py --model smollm2-135m --algo dpo --threads 1

`--model tiny` (the default) is the demo's SFT policy (`--sft`) on the sort task. `--model
smollm2-135m` starts from SmolLM2-135M-Instruct as `model=smollm2-135m` resolves it (`--sft`
optional) on data_mix=instructions (docs/instructions.md) with the settings of
conf/experiment/smollm2_instructions.yaml: LoRA r 16, alpha 32, dropout 0 on every linear layer
in both frameworks (TRL: the same peft LoraConfig as models.apply_lora builds), prompts of at
most 64 tokens rendered by the model's chat template (SmolLM2's ChatML with its default system
prompt: TRL gets conversational rows, and its token ids of every prompt are checked equal to
ours in the child), lr 2e-4 constant. GRPO: the task's checker as the reward function, 4
prompts x 4 completions, 64 new tokens, T 0.7, top-p 0.9, beta 0.04 (the preset's: a reference
in both; TRL's is the base with the adapter disabled, ours a frozen copy), 6 steps, from the
whole train-topic share (56 prompts). DPO: all 56 checker-ranked train-topic pairs (the
reward share set to the whole mix), 8 pairs a step, 20 steps, max_len 144 (the child prints
the longest pair: nothing is cut), beta 0.1, frameworks `ours` (packing, the stage default),
`ours_padded` (dpo.packing=false) and `trl`. The held-out eval is the preset's: all 64
held-out-topic prompts, T 0.7, top-p 0.9, 64 new tokens, seeded, one function for both.

Each framework x algorithm runs in its own child process (so peak memory is its own), one after
the other, from the same SFT checkpoint; the parent prints one table. Per run:
  - throughput of the training loop: completions per second (GRPO; pairs per second for DPO),
    steps x completions per step / wall seconds of the steps (model loading, evaluation and
    checkpoint writes excluded; the whole child's wall time is printed too). Ours is the run's
    `perf/loop_s` (README's metrics table: the wall time of the training steps, rollouts
    included, without held-out evals and checkpoint writes); TRL's is the wall time of
    `trainer.train()`, which here evaluates nothing and saves nothing (save_strategy "no").
    DPO's includes the reference log-probs: TRL computes them inside its steps (or, with
    precompute_ref_log_probs, in a pass before them: framework `trl_precompute`), we in one
    pass over the training pairs before the steps (`perf/reference_s`; the reference model's
    load and its scoring of the held-out pairs are set-up and evaluation work, left out as
    TRL's reference load is: `perf/reference_load_s`, `perf/reference_eval_s`)
  - peak memory: the child's peak RSS on CPU, torch.cuda.max_memory_allocated on CUDA
  - held-out gold reward after the steps: the same function for both frameworks
    (rlhf_exp.rl.evaluation.heldout_eval: the data_mix's held-out prompts, sampled at T=1 (the
    real model: T 0.7, top-p 0.9) from a generator seeded with --seed, batch 64), and the
    starting policy's on the same prompts.

GRPO settings shared by both, on either model (TRL's names): num_generations, per-step prompts
(generation_batch_size = prompts x num_generations), max_completion_length, learning_rate
(constant schedule), beta (0: no reference model), epsilon 0.2, scale_rewards=group,
loss_type=dapo (= our loss_agg=token_mean), one optimizer step per rollout, AdamW, grad clip 1.
The reward is the task's gold reward as a function for both (rlhf_exp.tasks:gold_reward_fn).
Known differences: AdamW betas (ours 0.9/0.95, TRL 0.9/0.999), and each framework's own prompt
order.

DPO settings shared by both (TRL's names): the reward share's preference pairs of the demo's
data mix, per_device_train_batch_size = --pairs, max_length 48 (nothing is cut: the sort
task's sequences are shorter), learning_rate (constant schedule, no warmup), AdamW with betas
0.9/0.95, eps 1e-8, no weight decay, grad clip 1, beta, loss_type sigmoid, fp32, dropout off,
no gradient checkpointing. Frameworks: `ours`, `trl` (TRL's default: the reference model
scores each batch inside the step) and `trl_precompute` (precompute_ref_log_probs=True: one
reference pass over the training set before the steps). Known difference: each framework's own
pair order.

Add an algorithm: a `run_<framework>_<algo>` function per framework returning a Result, and an
entry in RUNNERS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

# the demo's data mix (conf/experiment/demo.yaml): the prompts its SFT policy never trained on
DATA = ["data_mix.sources.0.synthetic.num_examples=40000"]
# --model smollm2-135m: the instructions task, LoRA as conf/experiment/smollm2_instructions.yaml
# (r 16, alpha 32, every linear layer); each stage gets the whole train-topic share (56 rows)
REAL_LORA = {"r": 16, "alpha": 32}
REAL_SPLIT = {"grpo": "[0,0,1]", "dpo": "[0,1,0]"}  # the PPO/GRPO share; the reward (pairs) share


def data_overrides(args: argparse.Namespace) -> list[str]:
    """The model and data mix overrides of every composed config of this bench."""
    if not is_real(args):
        return DATA
    return [f"model={args.model}", "data_mix=instructions",
            f"data_mix.split={REAL_SPLIT[args.algo]}", "model.lora.enabled=true",
            f"model.lora.r={REAL_LORA['r']}", f"model.lora.alpha={REAL_LORA['alpha']}"]


def is_real(args: argparse.Namespace) -> bool:
    return args.model != "tiny"


@dataclass
class Result:
    framework: str
    algo: str
    items: int  # completions (GRPO) or pairs (DPO) trained on
    loop_s: float  # wall seconds of the training steps
    total_s: float  # wall seconds of the whole child (load, train, evaluate)
    peak_mem_mib: float
    init_gold: float | None  # held-out gold reward of the starting policy
    gold: float | None  # after the steps

    @property
    def per_s(self) -> float:
        return self.items / self.loop_s


# ----------------------------------------------------------------------------- shared set-up
def compose(args: argparse.Namespace, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf_exp.cli import CONF_DIR, check

    base = [f"seed={args.seed}", f"hardware={'cpu' if args.device == 'cpu' else '1gpu'}",
            "logger=none", "experiment_name=bench_vs_trl", *data_overrides(args)]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=[*base, *overrides])
    check(cfg)
    return cfg


def heldout_gold(policy, tokenizer, cfg, args: argparse.Namespace) -> float:
    """The held-out gold reward of `policy`, computed identically for every framework."""
    import torch

    from rlhf_exp.rl import evaluation

    rows = evaluation.heldout_rows(cfg, args.eval_prompts)
    # the real model: its preset's held-out eval (T 0.7, top-p 0.9, a dynamic KV cache)
    gen = evaluation.GenerationConfig(max_new_tokens=args.new_tokens, do_sample=True,
                                      temperature=args.temperature, top_p=args.top_p,
                                      use_static_cache=not is_real(args), compile="none")
    policy.eval()
    with torch.no_grad():
        settings = evaluation.EvalSettings(gen=gen, template=cfg.model.prompt_template,
                                           max_prompt_len=args.prompt_len, batch_size=64,
                                           seed=args.seed, device=torch.device(args.device))
        metrics = evaluation.heldout_eval(policy, tokenizer, rows, settings, prefix="bench")
    return metrics["bench/eval_gold_reward"]


def peak_memory_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def print_perf(metrics: dict) -> None:
    """Where our loop's time went: the run's perf/* seconds (README's metrics table)."""
    parts = {k: v for k, v in metrics.items() if k.startswith("perf/") and k.endswith("_s")}
    print("# ours " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items())), flush=True)


def start_path(args: argparse.Namespace, cfg) -> str:
    """The starting policy: --sft, else the model preset's base (as `model=NAME` resolves it)."""
    from rlhf_exp.modeling import models

    return args.sft or models.resolve_base_path(cfg.model)


def init_override(key: str, args: argparse.Namespace) -> list[str]:
    """Our stage's starting policy: --sft, else null (= the model preset's base)."""
    return [f"{key}={args.sft}"] if args.sft else []


def load_start(args: argparse.Namespace, cfg):
    """(tokenizer, starting policy in fp32 on the device) loaded as our stages load it: the same
    tokenizer (a distinct pad token added) and embeddings for both frameworks."""
    from rlhf_exp.modeling import models

    path = start_path(args, cfg)
    tokenizer = models.load_tokenizer(path, cfg.model)
    return tokenizer, models.load_causal_lm(path, tokenizer, cfg.model, "fp32").to(args.device)


def trl_lora(cfg):
    """TRL's peft_config: our model.lora (r, alpha, dropout, target modules) as peft builds it
    for us (rlhf_exp.modeling.models.apply_lora); None when LoRA is off."""
    if not cfg.model.lora.enabled:
        return None
    from peft import LoraConfig

    targets = list(cfg.model.lora.target_modules)
    return LoraConfig(r=cfg.model.lora.r, lora_alpha=cfg.model.lora.alpha,
                      lora_dropout=cfg.model.lora.dropout, task_type="CAUSAL_LM",
                      target_modules="all-linear" if targets == ["all-linear"] else targets)


def real_overrides(args: argparse.Namespace, stage: str) -> list[str]:
    """The real model's prompt length and sampling (its preset's) for our stage; none for tiny."""
    if not is_real(args):
        return []
    out = [f"{stage}.max_prompt_len={args.prompt_len}"]
    if stage == "grpo":
        out += [f"grpo.generation.temperature={args.temperature}",
                f"grpo.generation.top_p={args.top_p}"]
    return out


# ----------------------------------------------------------------------------- GRPO
def run_ours_grpo(args: argparse.Namespace, work: Path) -> Result:
    from rlhf_exp.stages import grpo

    t0 = time.perf_counter()
    cfg = compose(args, "stage=grpo", *init_override("grpo.actor_init", args),
                  f"grpo.steps={args.steps}",
                  f"grpo.prompts_per_step={args.prompts}",
                  f"grpo.num_generations={args.generations}",
                  f"grpo.micro_batch_size_per_device={args.prompts * args.generations}",
                  f"grpo.generation.max_new_tokens={args.new_tokens}",
                  f"grpo.actor.lr={args.lr}", f"grpo.beta={args.beta}",
                  "grpo.loss_agg=token_mean", "grpo.scale_rewards=group", "grpo.epsilon=0.2",
                  "grpo.eval_every=0", "grpo.eval_num_prompts=1",  # evaluated here instead
                  "grpo.save_every=0",  # as TRL's save_strategy="no"
                  "logger.log_checkpoints=false", *real_overrides(args, "grpo"), *args.ours_set)
    tokenizer, start = load_start(args, cfg)
    init_gold = heldout_gold(start, tokenizer, cfg, args)
    del start
    actor, _, result = grpo.train(cfg, work / "ours")
    print_perf(result.metrics)
    gold = heldout_gold(actor.module, tokenizer, cfg, args)
    # perf/loop_s: the steps' wall time (rollout, experience, update), evals and saves left out
    return Result("ours", "grpo", args.steps * args.prompts * args.generations,
                  result.metrics["perf/loop_s"], time.perf_counter() - t0,
                  peak_memory_mib(args.device), init_gold, gold)


def check_prompt_ids(trainer, tokenizer, cfg, rows: list[dict], max_prompt_len: int) -> None:
    """TRL's token ids of every prompt equal ours (data.tokenize.prompt_ids), none of them cut."""
    from rlhf_exp.data.tokenize import prompt_ids, row_messages

    ours = [prompt_ids(tokenizer, r, cfg.model.prompt_template, max_prompt_len) for r in rows]
    theirs = trainer._tokenize_prompts([row_messages(r) for r in rows])[0]
    assert [list(t) for t in theirs] == ours, "TRL renders the prompts differently from ours"
    longest = max(len(t) for t in theirs)
    assert longest <= max_prompt_len, f"a prompt of {longest} tokens would be cut"
    print(f"# prompt ids: TRL's equal ours on all {len(rows)} prompts (longest {longest} tokens, "
          f"none cut); first: {tokenizer.decode(ours[0])!r}", flush=True)


def run_trl_grpo(args: argparse.Namespace, work: Path) -> Result:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_exp import tasks
    from rlhf_exp.data import build_stage_data
    from rlhf_exp.data.tokenize import row_messages
    from rlhf_exp.modeling import models

    t0 = time.perf_counter()
    cfg = compose(args, "stage=grpo")
    rows = build_stage_data(cfg.data_mix, "ppo", args.seed).train
    if is_real(args):
        # conversational prompts: TRL's chat template renders what ours renders (checked below)
        dataset = Dataset.from_list([{"prompt": row_messages(r), "raw_prompt": r["prompt"],
                                      "task": r["task"]} for r in rows])
    else:
        dataset = Dataset.from_list([{"prompt": r["prompt"], "raw_prompt": r["prompt"],
                                      "task": r["task"]} for r in rows])
    # the real model: loaded as ours loads it (its base has no pad token: ours adds one); the
    # tiny path: TRL loads the SFT checkpoint itself
    tokenizer, model = load_start(args, cfg) if is_real(args) else (None, args.sft)
    tokenizer = tokenizer or models.load_tokenizer(args.sft, cfg.model)

    def gold_reward(prompts, completions, task, raw_prompt, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return tasks.gold_reward_fn(raw_prompt, texts, task=task)

    config = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=args.prompts * args.generations,
        gradient_accumulation_steps=1, num_generations=args.generations,
        max_completion_length=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
        beta=args.beta,
        epsilon=0.2, scale_rewards="group", loss_type="dapo", num_iterations=1,
        logging_steps=10, save_strategy="no", report_to="none", seed=args.seed,
        use_cpu=args.device == "cpu", bf16=False, disable_dropout=True)
    trainer = GRPOTrainer(model=model, reward_funcs=gold_reward, args=config,
                          train_dataset=dataset, processing_class=tokenizer,
                          peft_config=trl_lora(cfg))
    if is_real(args):
        check_prompt_ids(trainer, tokenizer, cfg, rows, args.prompt_len)
    init_gold = heldout_gold(trainer.model, tokenizer, cfg, args)
    trainer.model.train()
    t1 = time.perf_counter()
    trainer.train()
    loop_s = time.perf_counter() - t1
    gold = heldout_gold(trainer.model, tokenizer, cfg, args)
    return Result("trl", "grpo", args.steps * args.prompts * args.generations, loop_s,
                  time.perf_counter() - t0, peak_memory_mib(args.device), init_gold, gold)


# ----------------------------------------------------------------------------- DPO
def run_ours_dpo(args: argparse.Namespace, work: Path, *extra: str,
                 name: str = "ours") -> Result:
    from rlhf_exp.stages import dpo

    t0 = time.perf_counter()
    cfg = compose(args, "stage=dpo", *init_override("dpo.init_from", args),
                  f"dpo.max_steps={args.steps}",
                  f"dpo.micro_batch_size_per_device={args.pairs}",
                  "dpo.gradient_accumulation_steps=1", f"dpo.lr={args.lr}",
                  "dpo.lr_scheduler=constant", "dpo.warmup_steps=0", f"dpo.beta={args.beta}",
                  "dpo.loss_type=sigmoid", "dpo.rpo_alpha=0",  # plain DPO, as TRL's default
                  f"dpo.max_len={args.max_len}",
                  "dpo.eval_every=0", "dpo.log_every=10",
                  "ppo.eval_num_prompts=1",  # its own held-out gold: evaluated here instead
                  "logger.log_checkpoints=false", *real_overrides(args, "dpo"), *extra,
                  *args.ours_set)
    tokenizer, start = load_start(args, cfg)
    init_gold = heldout_gold(start, tokenizer, cfg, args)
    del start
    policy, _, result = dpo.train(cfg, work / "ours")
    print_perf(result.metrics)
    gold = heldout_gold(policy.module, tokenizer, cfg, args)
    m = result.metrics
    return Result(name, "dpo", args.steps * args.pairs, m["perf/reference_s"] + m["perf/loop_s"],
                  time.perf_counter() - t0, peak_memory_mib(args.device), init_gold, gold)


def run_ours_padded_dpo(args: argparse.Namespace, work: Path) -> Result:
    """Ours without packing: each micro-batch's pairs right-padded to its longest."""
    return run_ours_dpo(args, work, "dpo.packing=false", name="ours_padded")


def check_pair_lengths(trainer, max_len: int) -> None:
    """Whether TRL's tokenized pairs fit max_length (keep_start cuts the end of longer ones)."""
    data = trainer.train_dataset
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in
                  zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]))
    print(f"# pairs: {len(data)}, longest prompt + answer {longest} tokens "
          f"({'none cut' if longest <= max_len else 'cut at ' + str(max_len)})", flush=True)


def _run_trl_dpo(args: argparse.Namespace, work: Path, precompute: bool) -> Result:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhf_exp.data import build_stage_data
    from rlhf_exp.data.tokenize import row_messages
    from rlhf_exp.modeling import models

    t0 = time.perf_counter()
    cfg = compose(args, "stage=dpo")
    rows = build_stage_data(cfg.data_mix, "reward", args.seed).train
    if is_real(args):  # conversational: the chat template renders prompt and answers
        dataset = Dataset.from_list([
            {"prompt": row_messages(r),
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
        tokenizer, model = load_start(args, cfg)
    else:
        dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                     for r in rows])
        tokenizer, model = models.load_tokenizer(args.sft, cfg.model), args.sft
    config = DPOConfig(
        output_dir=str(work / "trl"), max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
        beta=args.beta, loss_type=["sigmoid"], max_length=args.max_len,
        precompute_ref_log_probs=precompute, logging_steps=10, save_strategy="no",
        report_to="none", seed=args.seed, use_cpu=args.device == "cpu", bf16=False,
        gradient_checkpointing=False, disable_dropout=True)
    # with precompute_ref_log_probs TRL scores the training set in its constructor: that pass
    # is part of the training's cost (as our reference pass is of ours), so it is timed
    ref_s = []
    precompute_pass = DPOTrainer._precompute_ref_logps

    def timed_pass(self, *a, **kw):
        t = time.perf_counter()
        out = precompute_pass(self, *a, **kw)
        ref_s.append(time.perf_counter() - t)
        return out

    DPOTrainer._precompute_ref_logps = timed_pass
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=trl_lora(cfg))
    if is_real(args):
        check_pair_lengths(trainer, args.max_len)
    t_ref = sum(ref_s)
    init_gold = heldout_gold(trainer.model, tokenizer, cfg, args)
    trainer.model.train()
    t1 = time.perf_counter()
    trainer.train()
    loop_s = time.perf_counter() - t1 + t_ref
    gold = heldout_gold(trainer.model, tokenizer, cfg, args)
    name = "trl_precompute" if precompute else "trl"
    return Result(name, "dpo", args.steps * args.pairs, loop_s, time.perf_counter() - t0,
                  peak_memory_mib(args.device), init_gold, gold)


def run_trl_dpo(args: argparse.Namespace, work: Path) -> Result:
    return _run_trl_dpo(args, work, precompute=False)


def run_trl_precompute_dpo(args: argparse.Namespace, work: Path) -> Result:
    return _run_trl_dpo(args, work, precompute=True)


RUNNERS = {("ours", "grpo"): run_ours_grpo, ("trl", "grpo"): run_trl_grpo,
           ("ours", "dpo"): run_ours_dpo, ("ours_padded", "dpo"): run_ours_padded_dpo,
           ("trl", "dpo"): run_trl_dpo,
           ("trl_precompute", "dpo"): run_trl_precompute_dpo}
# per model and algorithm: the defaults of the options that differ. Tiny (the demo's SFT policy
# on the sort task): GRPO with TRL's beta 0 as in its docs; DPO with TRL's beta 0.1 and our dpo
# defaults' lr. SmolLM2 (its base instruct model on the instructions task): the settings of
# conf/experiment/smollm2_instructions.yaml (4 prompts x 4 completions, 64 new tokens, T 0.7,
# top-p 0.9, GRPO beta 0.04, lr 2e-4, prompts <= 64 tokens, DPO max_len 144), a few steps
TINY = {"new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "prompt_len": 32,
        "eval_prompts": 256, "prompts": 8, "generations": 8, "pairs": 32, "max_len": 48}
SMOLLM2 = {"new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "prompt_len": 64,
           "eval_prompts": 64, "prompts": 4, "generations": 4, "pairs": 8, "max_len": 144}
DEFAULTS = {("tiny", "grpo"): {**TINY, "frameworks": "ours,trl", "steps": 30, "lr": 3e-4,
                               "beta": 0.0},
            ("tiny", "dpo"): {**TINY, "frameworks": "ours,trl,trl_precompute", "steps": 100,
                              "lr": 1e-3, "beta": 0.1},
            ("smollm2-135m", "grpo"): {**SMOLLM2, "frameworks": "ours,trl", "steps": 6,
                                       "lr": 2e-4, "beta": 0.04},
            ("smollm2-135m", "dpo"): {**SMOLLM2, "frameworks": "ours,ours_padded,trl",
                                      "steps": 20, "lr": 2e-4, "beta": 0.1}}


# ----------------------------------------------------------------------------- driver
def child(args: argparse.Namespace) -> None:
    """One framework x algorithm in this process; its Result as JSON on the last stdout line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix=f"bench_{args.child}_"))
    try:
        framework, algo = args.child.split(":")
        result = RUNNERS[(framework, algo)](args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("RESULT " + json.dumps(asdict(result)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--algo", choices=sorted({a for _, a in RUNNERS}), default="grpo")
    p.add_argument("--model", choices=sorted({m for m, _ in DEFAULTS}), default="tiny",
                   help="tiny: the demo's SFT policy (--sft); smollm2-135m: its base instruct "
                        "model (model=smollm2-135m), data_mix=instructions, LoRA r16")
    p.add_argument("--frameworks", help="comma-separated, run in order (grpo: ours,trl; dpo: "
                                        "ours,trl,trl_precompute; smollm2 dpo: "
                                        "ours,ours_padded,trl)")
    p.add_argument("--sft", help="the starting policy (SFT checkpoint or run dir); required "
                                 "for tiny, else the model's base")
    p.add_argument("--steps", type=int, help="optimizer steps (grpo: 30, dpo: 100; smollm2: "
                                             "6, 20)")
    p.add_argument("--prompts", type=int, help="GRPO: prompts per step (8; smollm2: 4)")
    p.add_argument("--generations", type=int, help="GRPO: completions per prompt (8; smollm2: 4)")
    p.add_argument("--pairs", type=int, help="DPO: preference pairs per step (32; smollm2: 8)")
    p.add_argument("--max-len", type=int, help="DPO: max prompt + response tokens (48; "
                                               "smollm2: 144)")
    p.add_argument("--new-tokens", type=int,
                   help="max completion tokens (GRPO's training and both evals; 12; smollm2: 64)")
    p.add_argument("--temperature", type=float, help="sampling T (GRPO and evals; 1; smollm2: "
                                                     "0.7)")
    p.add_argument("--top-p", type=float, help="sampling top-p (1; smollm2: 0.9)")
    p.add_argument("--prompt-len", type=int, help="max prompt tokens (32; smollm2: 64)")
    p.add_argument("--lr", type=float, help="constant learning rate (grpo: 3e-4, dpo: 1e-3; "
                                            "smollm2: 2e-4)")
    p.add_argument("--beta", type=float, help="KL / DPO beta (grpo: 0, dpo: 0.1; smollm2 grpo: "
                                              "0.04)")
    p.add_argument("--eval-prompts", type=int, help="held-out prompts (256; smollm2: all 64)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for our run (repeatable), e.g. "
                        "grpo.actor.zero_stage=0, dpo.micro_batch_size_per_device=16")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    for key, value in DEFAULTS[(args.model, args.algo)].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.sft and not is_real(args):
        p.error("--sft is required with --model tiny (the demo's SFT checkpoint or run dir)")
    from rlhf_exp.training.tracking import resolve_init

    if args.sft:
        args.sft = str(resolve_init(args.sft)[0])  # a run dir -> its final checkpoint
    if args.child:
        return child(args)

    results = []
    for framework in args.frameworks.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", f"{framework}:{args.algo}"]
        print(f"# running {framework} {args.algo} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        for line in proc.stdout.splitlines():  # the child's checks (prompt ids, pair lengths)
            if line.startswith("# "):
                print(line, flush=True)
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{framework} {args.algo} failed (exit {proc.returncode})")
        results.append(Result(**json.loads(lines[-1][len("RESULT "):])))

    import torch

    unit = "completions/s" if args.algo == "grpo" else "pairs/s"
    device = (torch.cuda.get_device_name() if args.device == "cuda" else
              f"{platform.machine()}, {args.threads or torch.get_num_threads()} threads, "
              f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    shape = (f"{args.prompts} prompts x {args.generations} completions, {args.new_tokens} new "
             "tokens" if args.algo == "grpo" else f"{args.pairs} pairs, max_len {args.max_len}")
    start = args.sft or f"{args.model} base"
    print(f"\n# {args.algo}: {args.steps} steps x {shape}, lr {args.lr}, beta {args.beta}, "
          f"from {start}; {device}; held-out gold on {args.eval_prompts} prompts "
          f"(T={args.temperature}, top-p {args.top_p}, {args.new_tokens} new tokens, "
          f"seed {args.seed})")
    print(f"{'framework':<15} {unit:>14} {'loop s':>8} {'total s':>8} {'peak MiB':>9} "
          f"{'gold start':>10} {'gold end':>9}")
    for r in results:
        print(f"{r.framework:<15} {r.per_s:>14.1f} {r.loop_s:>8.1f} {r.total_s:>8.1f} "
              f"{r.peak_mem_mib:>9.0f} {r.init_gold or float('nan'):>10.3f} "
              f"{r.gold or float('nan'):>9.3f}")
    for other in results[1:]:
        print(f"{results[0].framework} / {other.framework} throughput: "
              f"{results[0].per_s / other.per_s:.2f}x")


if __name__ == "__main__":
    main()
