"""The locally built tiny models: small random-weight members of the architecture families users
run, each with a real tokenizer, saved as a Hugging Face model dir and loaded with
`from_pretrained` like a hub checkpoint (models.tiny_model_dir builds and caches them).

    model=tiny         Llama, character-level tokenizer over the sort task's alphabet (the default)
    model=tiny-llama   Llama, sentencepiece-like BPE with byte fallback (Llama-2 conventions:
                       <unk>=0 <s>=1 </s>=2, BOS prepended, no pad token, untied LM head)
    model=tiny-qwen2   Qwen2, byte-level BPE, ChatML chat template (<|im_start|>, <|im_end|> = EOS,
                       <|endoftext|> = pad), no BOS
    model=tiny-opt     OPT (DeepSpeed-Chat's family), byte-level BPE, learned positions;
                       <s>=0 <pad>=1 </s>=2 <unk>=3, </s> is both BOS (prepended) and EOS
    model=tiny-gpt2    GPT-2, byte-level BPE, absolute learned positions; <|endoftext|> is BOS, EOS
                       and UNK, no pad token (models.load_tokenizer adds a distinct one)

The subword tokenizers are trained with the `tokenizers` library on a fixed corpus (the bundled
task's text and the shipped hub-schema samples) with fixed settings, so they are the same on
every machine; digits are always split one per token, so the sort task stays learnable.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

FAMILIES = ("llama", "qwen2", "opt", "gpt2")
TOKENIZERS = ("char", "bpe")
# bump when the tokenizer recipe or the corpus code changes: it is part of the cache key
RECIPE_VERSION = 1
SAMPLES = Path(__file__).resolve().parent.parent / "data" / "examples" / "hub_samples"

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# special tokens of each family, in id order (they take the first ids), and their roles
SPECIALS = {
    "llama": {"tokens": ["<unk>", "<s>", "</s>"],
              "roles": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}},
    "qwen2": {"tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "roles": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}},
    "opt": {"tokens": ["<s>", "<pad>", "</s>", "<unk>"],
            "roles": {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>",
                      "unk_token": "<unk>"}},
    "gpt2": {"tokens": ["<|endoftext|>"],
             "roles": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                       "unk_token": "<|endoftext|>"}},
}
# prompt-template markers of the presets, so a tokenizer knows them as a real one would
MARKERS = ["[INST] ", " [/INST]", "\n\nHuman: ", "\n\nAssistant: "] * 4
ADDS_BOS = {"llama": True, "qwen2": False, "opt": True, "gpt2": False}


# ----------------------------------------------------------------------------- corpus
@functools.cache
def corpus() -> tuple[str, ...]:
    """The tokenizer training text, in a fixed order: the sort task's prompts and answers, then
    every string in the shipped hub-schema samples (the .jsonl files, which hold every sample
    dialogue)."""
    from rlhf_exp.tasks import sort_digits

    texts = []
    for row in sort_digits.generate(2000, 0, 3, 7, 0.6):
        texts += [row["prompt"], row["response"], row["chosen"], row["rejected"]]

    def strings(value) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return []

    texts += MARKERS
    files = sorted(SAMPLES.rglob("*.jsonl"))
    if not files:  # an install without the package data would silently train another tokenizer
        raise FileNotFoundError(f"{SAMPLES}: the hub-schema samples are missing from this "
                                "install of rlhf_exp (package data)")
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts += strings(json.loads(line))
    return tuple(texts)


def recipe(family: str, kind: str, vocab_size: int) -> dict:
    """Everything that determines the tokenizer (hashed into the model's cache key)."""
    if kind == "char":
        return {"kind": "char", "vocab": char_vocab()}
    import tokenizers

    text = hashlib.sha256("\x00".join(corpus()).encode()).hexdigest()
    return {"kind": kind, "family": family, "vocab_size": vocab_size, "corpus": text,
            "version": RECIPE_VERSION, "specials": SPECIALS[family], "bos": ADDS_BOS[family],
            "chat_template": CHATML if family == "qwen2" else None,
            "tokenizers": tokenizers.__version__}  # (its BPE trainer decides the merges)


# ----------------------------------------------------------------------------- tokenizers
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def char_vocab() -> list[str]:
    """`model=tiny`'s vocabulary: specials, then the task's characters, then the rest of
    printable ASCII and newline, so the tiny model can also read HH-style text and chat input."""
    from rlhf_exp.tasks import sort_digits

    chars = list(dict.fromkeys(sort_digits.ALPHABET + "".join(map(chr, range(32, 127))) + "\n"))
    return [PAD, BOS, EOS, UNK, *chars]


def build_char_tokenizer():
    """One character, one token (pad=0, bos=1, eos=2, unk=3); no BOS added, no chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(char_vocab())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one char, one token
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        model_max_length=4096, padding_side="right",
    )


def _byte_level_bpe(family: str, vocab_size: int):
    """GPT-2-style byte-level BPE (GPT-2, OPT, Qwen2), digits split one per token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS[family]["tokens"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def _sentencepiece_bpe(vocab_size: int):
    """Llama-2-style BPE: spaces as "▁", a "▁" before the text, byte fallback (<0x00>..<0xFF>
    take ids 3..258, after <unk> <s> </s>), digits split one per token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = SPECIALS["llama"]["tokens"]
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Digits(individual_digits=True)])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials,
                                  min_frequency=2, show_progress=False)
    trained.train_from_iterator(corpus(), trainer)
    state = json.loads(trained.to_str())["model"]
    by_id = sorted(state["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in by_id:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def build_tokenizer(family: str, vocab_size: int, max_len: int):
    """The family's subword tokenizer as a `PreTrainedTokenizerFast` (deterministic)."""
    from transformers import PreTrainedTokenizerFast

    backend = (_sentencepiece_bpe(vocab_size) if family == "llama"
               else _byte_level_bpe(family, vocab_size))
    extra = {"add_bos_token": True} if ADDS_BOS[family] else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_len,
                                  padding_side="right", **SPECIALS[family]["roles"], **extra)
    if family == "qwen2":
        tok.chat_template = CHATML
    return tok


# ----------------------------------------------------------------------------- models
def build_config(family: str, shape: dict, tokenizer):
    """The family's HF config for `shape` (TinyModelConfig's fields) and this tokenizer."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    layers, heads = shape["num_hidden_layers"], shape["num_attention_heads"]
    positions = shape["max_position_embeddings"]
    if family == "llama":
        return LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads,
                           num_key_value_heads=shape["num_key_value_heads"],
                           max_position_embeddings=positions, rope_theta=10000.0,
                           tie_word_embeddings=False, **ids)
    if family == "qwen2":
        ids["bos_token_id"] = tokenizer.pad_token_id  # Qwen2.5: <|endoftext|>
        return Qwen2Config(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads,
                           num_key_value_heads=shape["num_key_value_heads"],
                           max_position_embeddings=positions, rope_theta=10000.0,
                           tie_word_embeddings=True, **ids)
    if family == "opt":
        return OPTConfig(hidden_size=h, ffn_dim=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=positions,
                         word_embed_proj_dim=h, do_layer_norm_before=True,
                         tie_word_embeddings=True, **ids)
    if family == "gpt2":
        return GPT2Config(n_embd=h, n_inner=inter, n_layer=layers, n_head=heads,
                          n_positions=positions, tie_word_embeddings=True, **ids)
    raise ValueError(f"unknown tiny model family {family!r}; choose one of {FAMILIES}")


def build_model(family: str, config):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, OPTForCausalLM, Qwen2ForCausalLM

    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "opt": OPTForCausalLM,
           "gpt2": GPT2LMHeadModel}[family]
    return cls(config)
