"""Build the instructions task's data from a model's own answers (docs/instructions.md):

    python -m rlhf_exp.tasks.build_instructions --model smollm2-135m --out data/instructions \\
        --n-prompts 200 --samples 4 --seed 0

`--model` is a model preset (conf/model/<name>.yaml) or a model directory. For every train
prompt (tasks/instructions.py, train topics) the model samples `--samples` answers, rendered as
every stage renders a prompt (data/tokenize.py prompt_ids: the chat template where there is one)
and sampled by the stages' own generation (rollout.sample); the checker scores each one. Written
to `--out`:

    sft.jsonl        prompt, response: best-of-n rejection sampling, the best answer when it
                     scores >= --threshold                        (format prompt_response)
    pairs.jsonl      prompt, chosen, rejected: the best and the worst answer of a prompt whose
                     answers do not all tie; response = chosen        (format preference;
                     conf/data_mix/instructions.yaml reads it)
    train.jsonl      the prompts in both: a passing demonstration and a ranked pair per row
                     (format preference; purer SFT rows, fewer of them)
    heldout.jsonl    the held-out prompts (held-out topics), messages only (format chat), with
                     the model's mean score over its samples (`base_score`)
    samples.jsonl    every sampled answer with its verdict (score, constraints met, reason)
    manifest.json    the settings, their hash, the model, counts and mean scores

Seeded (the same settings give the same files), cached (a folder whose manifest has the same
settings hash is left as it is; --force rebuilds), written atomically (each file renamed into
place, the manifest last: a cut-off build leaves no manifest and is rebuilt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from rlhf_exp.errors import ConfigError, UserError
from rlhf_exp.tasks import instructions

BUILD_VERSION = 1  # bump when the selection or the file layout changes: part of the hash
FILES = ("sft.jsonl", "pairs.jsonl", "train.jsonl", "heldout.jsonl", "samples.jsonl")


@dataclass(frozen=True)
class Settings:
    model: str
    n_prompts: int = 200
    n_heldout: int = 64
    samples: int = 4
    heldout_samples: int = 4  # answers per held-out prompt, for `base_score` (0 = none)
    seed: int = 0
    # SmolLM2-135M-Instruct at T=1.0 rambles past 64 tokens (a third of its answers were cut
    # off, unfinished); at T=0.7 its answers are shorter and more on topic
    max_new_tokens: int = 80
    temperature: float = 0.7
    top_p: float = 0.9
    threshold: float = 1.0
    batch_prompts: int = 8
    max_prompt_len: int = 128

    def check(self) -> None:
        """One ConfigError naming the flag, before anything loads."""
        minimums = (("--n-prompts", self.n_prompts, 1), ("--n-heldout", self.n_heldout, 0),
                    ("--samples", self.samples, 2), ("--heldout-samples", self.heldout_samples, 0),
                    ("--max-new-tokens", self.max_new_tokens, 1),
                    ("--batch-prompts", self.batch_prompts, 1),
                    ("--max-prompt-len", self.max_prompt_len, 16))
        for flag, value, low in minimums:
            if value < low:
                raise ConfigError(f"{flag}={value} must be >= {low}"
                                  + (" (a pair needs two answers)" if flag == "--samples" else ""))
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"--threshold={self.threshold} must be in (0, 1] (share of "
                              "constraints met)")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature={self.temperature} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p={self.top_p} must be in (0, 1]")


# ----------------------------------------------------------------------------- selection
def select(prompt: str, answers: list[str], scores: list[float],
           threshold: float) -> tuple[dict | None, dict | None]:
    """(SFT row, preference row) of one prompt's scored answers. The SFT row holds the best
    answer when it scores >= threshold (rejection sampling); the pair holds the best (chosen)
    and the worst (rejected) answer, none when all scores tie. Ties go to the earlier answer."""
    best = max(range(len(answers)), key=lambda i: (scores[i], -i))
    worst = min(range(len(answers)), key=lambda i: (scores[i], i))
    sft = ({"prompt": prompt, "response": answers[best], "score": scores[best]}
           if scores[best] >= threshold else None)
    pair = None
    if scores[best] > scores[worst]:
        pair = {"prompt": prompt, "chosen": answers[best], "rejected": answers[worst],
                "response": answers[best], "chosen_score": scores[best],
                "rejected_score": scores[worst]}
    return sft, pair


# ----------------------------------------------------------------------------- model
def model_node(model: str):
    """The model config of a preset name or a model directory (composed as the app does)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf_exp.command.composition import CONF_DIR
    from rlhf_exp.config import register_configs

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConfigError(f"--model={model}: folder has no config.json (not a model "
                              "directory)")
        override = f"model.path={path.resolve()}"
    else:
        presets = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
        if model not in presets:
            raise ConfigError(f"--model={model!r}: neither a model directory nor a model preset; "
                              f"presets: {', '.join(presets)}")
        override = f"model={model}"
    register_configs()  # the schema, `base_config`, that conf/config.yaml starts from
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[override]).model


def model_fingerprint(path: str) -> str:
    """What identifies the weights: the directory, its config and the sizes and times of its
    files (cheap: a 500 MB checkpoint is not read)."""
    p = Path(path)
    if not p.is_dir():
        return path  # a hub id: its name
    h = hashlib.sha256(str(p.resolve()).encode())
    for f in sorted(p.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def provenance(path: str) -> dict | None:
    """Where the weights came from, when the model folder says (`rlhf-exp-fetch` writes a
    provenance.json beside a converted copy)."""
    try:
        return json.loads((Path(path) / "provenance.json").read_text())
    except (OSError, ValueError):
        return None


def settings_hash(settings: Settings, fingerprint: str) -> str:
    blob = json.dumps({"v": BUILD_VERSION, "settings": asdict(settings), "model": fingerprint},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- sampling
def sample_answers(policy, tokenizer, template: str, prompts: list[str], settings: Settings,
                   k: int, desc: str) -> list[list[str]]:
    """`k` answers per prompt, `batch_prompts` prompts per generate call."""
    import torch
    from tqdm import tqdm

    from rlhf_exp.data.tokenize import prompt_ids
    from rlhf_exp.rl.generation import GenerationConfig
    from rlhf_exp.rl.rollout import sample

    gen = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=True,
                           temperature=settings.temperature, top_p=settings.top_p,
                           use_static_cache=False, compile="none")
    device = next(policy.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    out: list[list[str]] = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr) as bar:
        for lo in range(0, len(prompts), settings.batch_prompts):
            batch = prompts[lo:lo + settings.batch_prompts]
            rows = [{"prompt": p} for p in batch for _ in range(k)]
            tokens = [prompt_ids(tokenizer, r, template, settings.max_prompt_len) for r in rows]
            traj = sample(policy, tokenizer, rows, tokens, gen, generator=generator,
                          synced_gpus=False, device=device, group_size=k)
            out += [[t.strip() for t in traj.texts[i * k:(i + 1) * k]] for i in range(len(batch))]
            bar.update(len(batch))
    return out


# ----------------------------------------------------------------------------- writing
def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_atomic(out: Path, files: dict[str, str], manifest: dict) -> None:
    """Each file written to a temp name in `out` and renamed into place; the manifest last, so
    that a folder with a manifest is always complete."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    for name, text in [*files.items(), ("manifest.json", json.dumps(manifest, indent=2) + "\n")]:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, out / name)


def up_to_date(out: Path, digest: str) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("settings_hash") == digest and all((out / f).exists() for f in FILES)


def build(settings: Settings, out: Path, force: bool = False, threads: int | None = None) -> dict:
    """Build (or find up to date) the data in `out`; returns the manifest."""
    settings.check()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out={out}: exists and is not a folder")
    node = model_node(settings.model)

    from rlhf_exp.modeling import models

    path = models.resolve_base_path(node)
    digest = settings_hash(settings, model_fingerprint(path))
    if not force and up_to_date(out, digest):
        print(f"build_instructions: {out} is up to date (settings hash {digest}); --force "
              "rebuilds", file=sys.stderr)
        return json.loads((out / "manifest.json").read_text())

    import torch

    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    tokenizer = models.load_tokenizer(path, node)
    policy = models.load_causal_lm(path, tokenizer, node)
    if torch.cuda.is_available():
        policy = policy.cuda()
    template = node.prompt_template

    train = instructions.make_prompts("train", settings.n_prompts, settings.seed)
    heldout = instructions.make_prompts("heldout", settings.n_heldout, settings.seed)
    train_answers = sample_answers(policy, tokenizer, template, [r["prompt"] for r in train],
                                   settings, settings.samples, "train prompts")
    heldout_answers = (sample_answers(policy, tokenizer, template,
                                      [r["prompt"] for r in heldout], settings,
                                      settings.heldout_samples, "held-out prompts")
                       if heldout and settings.heldout_samples else [[] for _ in heldout])

    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    samples, sft, pairs, both, heldout_rows = [], [], [], [], []
    train_scores, heldout_scores = [], []
    for split, rows, answers in (("train", train, train_answers),
                                 ("heldout", heldout, heldout_answers)):
        for row, texts in zip(rows, answers):
            verdicts = [instructions.check(row["prompt"], t) for t in texts]
            scores = [v.score for v in verdicts]
            samples += [{"split": split, "prompt": row["prompt"], "response": t,
                         "score": v.score, "met": v.met, "reason": v.reason}
                        for t, v in zip(texts, verdicts)]
            if split == "heldout":
                heldout_scores += scores
                heldout_rows.append({"messages": [{"role": "user", "content": row["prompt"]}],
                                     "topic": row["topic"], "base_score": mean(scores)})
                continue
            train_scores += scores
            demo, pair = select(row["prompt"], texts, scores, settings.threshold)
            sft += [demo] if demo else []
            pairs += [pair] if pair else []
            if demo and pair:
                both.append(pair)

    manifest = {
        "settings_hash": digest, "settings": asdict(settings), "model_path": path,
        "model_provenance": provenance(path),
        "build_version": BUILD_VERSION, "wall_s": round(time.time() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "train_topics": instructions.split_topics(settings.seed)[0],
        "heldout_topics": instructions.split_topics(settings.seed)[1],
        "counts": {"train_prompts": len(train), "heldout_prompts": len(heldout),
                   "samples": len(samples), "sft": len(sft), "pairs": len(pairs),
                   "train": len(both)},
        "mean_score": {"train": mean(train_scores), "heldout": mean(heldout_scores)},
        "degenerate_share": mean([float(s["reason"] is not None) for s in samples]),
    }
    write_atomic(out, {"sft.jsonl": _jsonl(sft), "pairs.jsonl": _jsonl(pairs),
                       "train.jsonl": _jsonl(both), "heldout.jsonl": _jsonl(heldout_rows),
                       "samples.jsonl": _jsonl(samples)}, manifest)
    print(f"build_instructions: wrote {out}: {len(sft)} demonstrations, {len(pairs)} pairs, "
          f"{len(both)} rows with both, {len(heldout_rows)} held-out prompts; mean score "
          f"train {manifest['mean_score']['train']}, held-out "
          f"{manifest['mean_score']['heldout']} ({manifest['wall_s']} s)", file=sys.stderr)
    return manifest


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path, bool, int | None]:
    d = Settings(model="")
    ap = argparse.ArgumentParser(prog="python -m rlhf_exp.tasks.build_instructions",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model preset name or model directory")
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--n-prompts", type=int, default=d.n_prompts, help="train prompts")
    ap.add_argument("--n-heldout", type=int, default=d.n_heldout, help="held-out prompts")
    ap.add_argument("--samples", type=int, default=d.samples, help="answers per prompt")
    ap.add_argument("--heldout-samples", type=int, default=d.heldout_samples,
                    help="answers per held-out prompt for the base score (0 = none)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--top-p", type=float, default=d.top_p)
    ap.add_argument("--threshold", type=float, default=d.threshold,
                    help="least score of an SFT demonstration")
    ap.add_argument("--batch-prompts", type=int, default=d.batch_prompts,
                    help="prompts per generate call (x samples rows)")
    ap.add_argument("--max-prompt-len", type=int, default=d.max_prompt_len)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    a = ap.parse_args(argv)
    settings = Settings(**{f.name: getattr(a, f.name) for f in fields(Settings)})
    return settings, a.out, a.force, a.threads


def main(argv: list[str] | None = None) -> int:
    settings, out, force, threads = parse_args(argv)
    try:
        build(settings, out, force=force, threads=threads)
    except UserError as exc:
        print(f"build_instructions: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
