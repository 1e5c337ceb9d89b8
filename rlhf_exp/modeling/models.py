"""Model and tokenizer loading: hub ids, local dirs, and the locally built tiny model.

Every model, the tiny one included, is loaded through `from_pretrained`, so a stage never knows
where its weights came from. Tokenizers always get a pad token distinct from EOS (DeepSpeed-Chat
used pad == eos, so its models never learned to stop).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_exp.modeling import tiny_models
from rlhf_exp.modeling.model_cache import cache_root  # noqa: F401  (models.cache_root, as before)

PAD = tiny_models.PAD


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ----------------------------------------------------------------------------- tiny models
def build_tiny_tokenizer():
    """`model=tiny`'s character-level tokenizer (tiny_models.build_char_tokenizer)."""
    return tiny_models.build_char_tokenizer()


SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings")


def tiny_model_dir(spec: DictConfig | dict) -> Path:
    """Cache dir of the tiny model `spec` (model.tiny: family, tokenizer, vocab_size and shape);
    built deterministically on first use, keyed by a hash of the shape and the tokenizer recipe.
    """
    spec = OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else dict(spec)
    family, kind = spec.get("family", "llama"), spec.get("tokenizer", "char")
    if family not in tiny_models.FAMILIES or kind not in tiny_models.TOKENIZERS:
        raise ValueError(f"model.tiny: family={family!r} tokenizer={kind!r}; families "
                         f"{tiny_models.FAMILIES}, tokenizers {tiny_models.TOKENIZERS}")
    if kind == "char" and family != "llama":
        raise ValueError("model.tiny.tokenizer=char is only built for family=llama (model=tiny)")
    shape = {k: spec[k] for k in SHAPE_KEYS}
    vocab_size = int(spec.get("vocab_size", 1024))
    ident = {"v": 2, "shape": shape,
             "tokenizer": tiny_models.recipe(family, kind, vocab_size)}
    key = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"tiny-{family}-{kind}-{key}"
    if (out / "config.json").exists():
        return out
    if kind == "char":
        from transformers import LlamaConfig

        tokenizer = tiny_models.build_char_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True, rope_theta=10000.0, **shape,
        )
    else:
        tokenizer = tiny_models.build_tokenizer(family, vocab_size,
                                                shape["max_position_embeddings"])
        config = tiny_models.build_config(family, shape, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tiny_models.build_model(family, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    # build in a temp dir and rename: concurrent first uses (2 ranks, parallel tests) stay safe
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tiny-", dir=out.parent))
    # not model.save_pretrained: under torch.distributed it writes only on global rank 0, and a
    # rank that wins the rename below with an empty dir would leave a cache without weights.
    # A tied lm_head is left out, as save_pretrained does (it is re-tied on load).
    from safetensors.torch import save_file

    config.save_pretrained(tmp)
    tied = config.tie_word_embeddings
    weights = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_base_path(model_cfg: DictConfig) -> str:
    """The policy base: model.path (with model.fetch: the copy model_cache.resolve picks, hub or
    fetched), or the cached tiny model."""
    if model_cfg.path:
        if model_cfg.get("fetch"):
            from rlhf_exp.modeling import model_cache

            return model_cache.resolve(str(model_cfg.path), str(model_cfg.fetch))
        return str(model_cfg.path)
    return str(tiny_model_dir(model_cfg.tiny))


def resolve_reward_base_path(model_cfg: DictConfig) -> str:
    return str(model_cfg.reward_path) if model_cfg.reward_path else resolve_base_path(model_cfg)


# ----------------------------------------------------------------------------- loading
def load_tokenizer(path: str, model_cfg: DictConfig | None = None):
    from transformers import AutoTokenizer

    tok_path = (model_cfg.tokenizer_path if model_cfg is not None else None) or path
    trust = bool(model_cfg.trust_remote_code) if model_cfg is not None else False
    tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {tok_path} has no EOS token; set one before training")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # a distinct pad token: the model must learn to emit EOS, which pad masking would hide
        tokenizer.add_special_tokens({"pad_token": PAD})
    tokenizer.padding_side = "right"
    return tokenizer


def _fit_embeddings(model, tokenizer) -> None:
    """Grow the embeddings to the tokenizer (the pad token load_tokenizer added). The new rows
    are the mean of the old ones, not a random draw (HF's mean_resizing samples around it): the
    same base then always becomes the same model, which an adapter checkpoint, rebuilt from its
    base on every load, relies on."""
    old = model.get_input_embeddings().weight.shape[0]
    if old < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None:  # (tied: the same weight twice)
                    emb.weight[old:] = emb.weight[:old].mean(0)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id


def adapter_base(path: str | Path) -> str | None:
    """The base model of a LoRA adapter checkpoint (`model.lora.save=adapter`), else None."""
    cfg_file = Path(path) / "adapter_config.json"
    if not cfg_file.is_file():
        return None
    base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg_file} names no base_model_name_or_path: cannot rebuild the model")
    return str(base)


def _load(auto_cls, path: str, tokenizer, model_cfg: DictConfig, precision: str, **kwargs):
    """`from_pretrained` of a full checkpoint, or of an adapter checkpoint: its base (which may
    itself be an adapter checkpoint) with the adapter merged in, so every stage starts from plain
    weights whichever way the previous stage saved them."""
    base = adapter_base(path)
    if base is None:
        model = auto_cls.from_pretrained(
            path, dtype=torch_dtype(precision), attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code, **kwargs)
        _fit_embeddings(model, tokenizer)
        return model
    from peft import PeftConfig, PeftModel

    if base.startswith(("/", ".")) and not Path(base).exists():
        raise FileNotFoundError(f"{path} is a LoRA adapter whose base model {base} is gone")
    model = _load(auto_cls, base, tokenizer, model_cfg, precision, **kwargs)
    config = PeftConfig.from_pretrained(path)
    if config.task_type == "CAUSAL_LM" and not hasattr(model, "prepare_inputs_for_generation"):
        # an SFT adapter under a reward model: its weights merge into the same backbone, but
        # peft's causal-LM wrapper expects a generating model; the generic wrapper merges too
        config.task_type = None
    with _quiet_peft():
        model = PeftModel.from_pretrained(model, path, config=config).merge_and_unload()
    model.requires_grad_(True)  # peft froze the base; merged, it is a plain model like any other
    # a LoRA trained on top of these weights must record this dir (not the bare base) as its base
    model.name_or_path = str(path)
    return model


def _memory_options(model, model_cfg: DictConfig):
    if model_cfg.gradient_checkpointing:
        # recompute each decoder layer's activations in backward instead of keeping them;
        # non-reentrant checkpointing also passes gradients to LoRA weights behind frozen
        # embeddings
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False  # a KV cache is useless when activations are recomputed
    return model


def load_causal_lm(path: str, tokenizer, model_cfg: DictConfig, precision: str = "fp32"):
    from transformers import AutoModelForCausalLM

    model = _load(AutoModelForCausalLM, path, tokenizer, model_cfg, precision)
    return _memory_options(model, model_cfg)


def load_reward_model(path: str, tokenizer, model_cfg: DictConfig, precision: str = "fp32"):
    """A scalar-head model (`AutoModelForSequenceClassification`, num_labels=1)."""
    from transformers import AutoModelForSequenceClassification

    model = _load(AutoModelForSequenceClassification, path, tokenizer, model_cfg, precision,
                  num_labels=1)
    return _memory_options(model, model_cfg)


def apply_lora(model, lora_cfg: DictConfig, task_type: str = "CAUSAL_LM"):
    """Wrap with a peft LoRA adapter when enabled; returns the model unchanged otherwise."""
    if not lora_cfg.enabled:
        return model
    from peft import LoraConfig

    targets = list(lora_cfg.target_modules)
    peft_cfg = LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type=task_type,
    )
    return peft_wrap(model, peft_cfg)


def peft_wrap(model, peft_cfg):
    """peft's get_peft_model, quietly (_quiet_peft)."""
    from peft import get_peft_model

    with _quiet_peft():
        return get_peft_model(model, peft_cfg)


@contextlib.contextmanager
def _quiet_peft():
    """Without the FutureWarning peft 0.21 raises when it wraps a model, by reading
    transformers' deprecated `is_gradient_checkpointing` alias (peft's code, not ours; the
    flag's value is still right)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
