"""Model and tokenizer loading: hub ids, local dirs, and the locally built tiny model.

Every model, the tiny one included, is loaded through `from_pretrained`, so a stage never knows
where its weights came from. Tokenizers always get a pad token distinct from EOS (DeepSpeed-Chat
used pad == eos, so its models never learned to stop).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf_exp.tasks import sort_digits

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def cache_root() -> Path:
    """`RLHF_EXP_CACHE`, else ~/.cache/rlhf_exp."""
    return Path(os.environ.get("RLHF_EXP_CACHE", Path.home() / ".cache" / "rlhf_exp"))


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ----------------------------------------------------------------------------- tiny model
def _tiny_vocab() -> list[str]:
    # specials, then the task's characters, then the rest of printable ASCII and newline, so the
    # tiny model can also read HH-style text and chat input
    chars = list(dict.fromkeys(sort_digits.ALPHABET + "".join(map(chr, range(32, 127))) + "\n"))
    return [PAD, BOS, EOS, UNK, *chars]


def build_tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_tiny_vocab())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one char, one token
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        model_max_length=4096, padding_side="right",
    )


def tiny_model_dir(shape: DictConfig | dict) -> Path:
    """Cache dir of the tiny model with this shape; built deterministically on first use."""
    shape = OmegaConf.to_container(shape) if isinstance(shape, DictConfig) else dict(shape)
    key = hashlib.sha1(json.dumps({"v": 1, "vocab": _tiny_vocab(), **shape},
                                  sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"tiny-llama-{key}"
    if (out / "config.json").exists():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True, rope_theta=10000.0, **shape,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    # build in a temp dir and rename: concurrent first uses (2 ranks, parallel tests) stay safe
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tiny-", dir=out.parent))
    # not model.save_pretrained: under torch.distributed it writes only on global rank 0, and a
    # rank that wins the rename below with an empty dir would leave a cache without weights.
    # The tied lm_head is left out, as save_pretrained does (it is re-tied on load).
    from safetensors.torch import save_file

    config.save_pretrained(tmp)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_base_path(model_cfg: DictConfig) -> str:
    """The policy base: model.path, or the cached tiny model."""
    if model_cfg.path:
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
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
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
    from peft import PeftModel

    if base.startswith(("/", ".")) and not Path(base).exists():
        raise FileNotFoundError(f"{path} is a LoRA adapter whose base model {base} is gone")
    model = _load(auto_cls, base, tokenizer, model_cfg, precision, **kwargs)
    model = PeftModel.from_pretrained(model, path).merge_and_unload()
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
    from peft import LoraConfig, get_peft_model

    targets = list(lora_cfg.target_modules)
    peft_cfg = LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type=task_type,
    )
    return get_peft_model(model, peft_cfg)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
