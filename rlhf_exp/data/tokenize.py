"""Rows -> token features, and padding-aware collation.

One rendering of a row: `prompt_ids` (render_messages, then the tokenizer's BOS where it adds
one, then cut to max_prompt_len) is the prompt of the row in SFT and reward features, PPO
rollouts, evaluation and reward scoring, and chat renders its conversation with the same
`messages_ids` (docs/models.md). SFT features mask the prompt out of the loss (label -100) and
end with EOS, which is distinct from the pad token. Batches for training are right-padded;
prompts for generation left-padded.
Tokenized features are cached on disk (`cache_dir`), keyed by the rows, the tokenizer and the
settings, so a rerun or another stage of the same data skips tokenization.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

# a conversation needs role markers: a bare "{prompt}" template gets DeepSpeed-Chat's HH ones
HH_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant: "
# bump when the rendering below changes: it is part of the tokenized-data cache key
RENDER_VERSION = 2


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_messages(tokenizer, messages: list[dict], template: str = "{prompt}") -> str:
    """A conversation ending with a user turn as prompt text, ready for the reply.

    With a tokenizer chat template: the template renders the turns (and the generation cue).
    Without one, `template` (the model preset's `prompt_template`) wraps every user turn and the
    assistant turns follow as they are: "\n\nHuman: {prompt}\n\nAssistant: " turns [u1, a1, u2]
    into an HH transcript, the role markers written once. A bare "{prompt}" template has no
    role markers, so it is used for a single user turn only; a longer conversation gets the HH
    markers. System messages go first, on their own line."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=True)
    turns = [m for m in messages if m["role"] in ("user", "assistant")]
    bare = template.replace("{prompt}", "").strip() == ""
    if bare and not (len(turns) == 1 and turns[0]["role"] == "user"):
        template = HH_TEMPLATE
    text = "".join(template.format(prompt=m["content"]) if m["role"] == "user" else m["content"]
                   for m in turns)
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    if system:
        text = system + ("" if text.startswith("\n") else "\n") + text
    return text


def row_messages(row: dict) -> list[dict]:
    """A row's prompt as a conversation: hh/chat rows carry their turns as `messages`; a plain
    `prompt` is one user turn."""
    return list(row.get("messages") or [{"role": "user", "content": row["prompt"]}])


def render_row(tokenizer, row: dict, template: str = "{prompt}") -> str:
    """A row's prompt as model input text (render_messages of its turns)."""
    return render_messages(tokenizer, row_messages(row), template)


def render_prompt(tokenizer, prompt: str, template: str = "{prompt}") -> str:
    """One user message as model input text."""
    return render_messages(tokenizer, [{"role": "user", "content": prompt}], template)


_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS in front of the text it encodes (OPT, Llama-2), as
    the model saw every document in pretraining."""
    if tokenizer not in _ADDS_BOS:
        bos = tokenizer.bos_token_id
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        _ADDS_BOS[tokenizer] = (bos is not None and bool(with_special) and with_special[0] == bos
                                and with_special != _ids(tokenizer, "a"))
    return _ADDS_BOS[tokenizer]


def messages_ids(tokenizer, messages: list[dict], template: str = "{prompt}") -> list[int]:
    """Token ids of render_messages: the text's tokens, after the tokenizer's BOS where it adds
    one. Chat-template text is taken as it is (a template that wants a BOS writes it)."""
    ids = _ids(tokenizer, render_messages(tokenizer, messages, template))
    if not has_chat_template(tokenizer) and adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def cut_prompt(tokenizer, ids: list[int], max_prompt_len: int) -> list[int]:
    """The last `max_prompt_len` tokens of a prompt, keeping a leading BOS in front."""
    if len(ids) <= max_prompt_len:
        return ids
    if ids and ids[0] == tokenizer.bos_token_id and max_prompt_len > 1:
        return [ids[0], *ids[len(ids) - max_prompt_len + 1:]]
    return ids[-max_prompt_len:]


def prompt_ids(tokenizer, row: dict, template: str, max_prompt_len: int) -> list[int]:
    """The token ids a policy is prompted with for `row`: its turns rendered (messages_ids), cut
    to the last `max_prompt_len` tokens. SFT and reward features, PPO rollouts, evaluation,
    reward scoring and (for one turn) chat all encode a prompt this way, so a row becomes the
    same tokens everywhere."""
    return cut_prompt(tokenizer, messages_ids(tokenizer, row_messages(row), template),
                      max_prompt_len)


# ----------------------------------------------------------------------------- cache
def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that changes token ids: the full tokenizer definition (vocab,
    merges, normalizer), special tokens, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.all_special_tokens,
                         tokenizer.pad_token_id, tokenizer.eos_token_id,
                         getattr(tokenizer, "chat_template", None)], default=str).encode())
    return h.hexdigest()


def cached(kind: str, rows: list[dict], tokenizer, settings: dict,
           cache_dir: str | Path | None, build: Callable[[], tuple[list[dict], int]]
           ) -> tuple[list[dict], int]:
    """`build()` once per (rows, tokenizer, settings); later calls read the pickle. Written to a
    unique temp file and renamed into place, so concurrent ranks or jobs on a shared disk never
    see a partial file (the last writer wins with identical content)."""
    if cache_dir is None:
        return build()
    h = hashlib.sha256(json.dumps([kind, settings], sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    path = Path(cache_dir) / f"{kind}-{h.hexdigest()[:24]}.pkl"
    if path.exists():
        try:
            with path.open("rb") as fh:
                return pickle.load(fh)
        except Exception:  # unreadable (truncated by a full disk...): rebuild it
            pass
    out = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(out, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, prompt: list[int], response: str, max_prompt_len: int, max_len: int,
                overlong: str) -> tuple[list[int], int] | None:
    """(prompt + response + EOS ids, prompt length), or None when dropped as over-long.
    `prompt` is the full prompt's ids (messages_ids). Truncation keeps the end of the prompt
    (cut_prompt: a leading BOS stays) and the start of the response (EOS always kept)."""
    p = prompt
    r = _ids(tokenizer, response) + [tokenizer.eos_token_id]
    if len(p) > max_prompt_len or len(p) + len(r) > max_len:
        if overlong == "drop":
            return None
        p = cut_prompt(tokenizer, p, max_prompt_len)
        room = max_len - len(p)
        if len(r) > room:
            r = r[: room - 1] + [tokenizer.eos_token_id]
    return p + r, len(p)


def tokenize_sft(rows: list[dict], tokenizer, template: str, max_prompt_len: int, max_len: int,
                 overlong: str = "truncate", cache_dir: str | Path | None = None
                 ) -> tuple[list[dict], int]:
    """Features {input_ids, labels}; returns (features, number dropped as over-long). Rows
    without a response (prompt-only sources) are skipped."""
    def build() -> tuple[list[dict], int]:
        feats, dropped = [], 0
        for row in rows:
            response = row.get("response") or row.get("chosen")
            if response is None:
                continue
            prompt = messages_ids(tokenizer, row_messages(row), template)
            enc = encode_pair(tokenizer, prompt, response, max_prompt_len, max_len, overlong)
            if enc is None:
                dropped += 1
                continue
            ids, n_prompt = enc
            feats.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
        return feats, dropped
    settings = {"template": template, "max_prompt_len": max_prompt_len, "max_len": max_len,
                "overlong": overlong, "render": RENDER_VERSION}
    return cached("sft", rows, tokenizer, settings, cache_dir, build)


def pad_right(seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)


def pad_left(seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[pad] * (width - len(s)) + s for s in seqs], dtype=torch.long)


def collate_sft(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids = pad_right([b["input_ids"] for b in batch], pad_id)
    labels = pad_right([b["labels"] for b in batch], -100)
    mask = pad_right([[1] * len(b["input_ids"]) for b in batch], 0)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def tokenize_pairs(rows: list[dict], tokenizer, template: str, max_prompt_len: int, max_len: int,
                   overlong: str = "truncate", cache_dir: str | Path | None = None
                   ) -> tuple[list[dict], int]:
    """Preference features {chosen_ids, rejected_ids} (prompt + response + EOS each) and
    `prompt_len` (the prompt's tokens at the start of both: encode_pair cuts a prompt the same
    way for either response), keeping the row's text and task for gold-reward evaluation;
    returns (features, number dropped). A pair is dropped when either side is over-long under
    `overlong=drop`; rows without a pair (prompt_response sources) are skipped."""
    def build() -> tuple[list[dict], int]:
        feats, dropped = [], 0
        for row in rows:
            if row.get("chosen") is None or row.get("rejected") is None:
                continue
            prompt = messages_ids(tokenizer, row_messages(row), template)
            chosen = encode_pair(tokenizer, prompt, row["chosen"], max_prompt_len, max_len,
                                 overlong)
            rejected = encode_pair(tokenizer, prompt, row["rejected"], max_prompt_len, max_len,
                                   overlong)
            if chosen is None or rejected is None:
                dropped += 1
                continue
            feats.append({"chosen_ids": chosen[0], "rejected_ids": rejected[0],
                          "prompt_len": chosen[1], "prompt": row["prompt"], "chosen": row["chosen"],
                          "rejected": row["rejected"], "task": row.get("task")})
        return feats, dropped
    settings = {"template": template, "max_prompt_len": max_prompt_len, "max_len": max_len,
                "overlong": overlong, "render": RENDER_VERSION}
    # "pairs-2": the features gained prompt_len (a cache of the older kind is not read)
    return cached("pairs-2", rows, tokenizer, settings, cache_dir, build)


def collate_pairs(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones (one
    forward scores both sides)."""
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    return {"input_ids": pad_right(seqs, pad_id),
            "attention_mask": pad_right([[1] * len(s) for s in seqs], 0)}


def collate_dpo(batch: list[dict], pad_id: int, shared_prompt: bool = False
                ) -> dict[str, torch.Tensor]:
    """collate_pairs plus `completion_mask` (1 on each row's response tokens, EOS included; the
    DPO log-probabilities count these) and, where the features carry them (rlhf_exp/stages/
    dpo.py adds them), the reference log-probabilities `ref_chosen_logps` / `ref_rejected_logps`
    [B] of the pairs.

    shared_prompt=True: the layout in which each pair's prompt is computed once
    (stages/dpo.py shared_prompt_logps) instead: `prompt_ids` / `prompt_mask` [B, P] (the B
    prompts left-padded, so that every response starts at column P) and `response_ids` /
    `response_mask` [2B, R] (the chosen responses + EOS, then the rejected ones, right-padded),
    and `num_tokens` (the pairs' tokens as 2B sequences)."""
    if shared_prompt:
        n = [b["prompt_len"] for b in batch]
        out = {"prompt_ids": pad_left([b["chosen_ids"][:k] for b, k in zip(batch, n)], pad_id),
               "prompt_mask": pad_left([[1] * k for k in n], 0)}
        responses = [b["chosen_ids"][k:] for b, k in zip(batch, n)] + \
            [b["rejected_ids"][k:] for b, k in zip(batch, n)]
        out["response_ids"] = pad_right(responses, pad_id)
        out["response_mask"] = pad_right([[1] * len(r) for r in responses], 0)
        # the pairs' tokens as sequences (each prompt twice): perf/tokens_per_s (train_loop)
        # counts what the batch holds, not what the shared layout computes
        out["num_tokens"] = torch.tensor(2 * sum(n) + sum(len(r) for r in responses))
    else:
        out = collate_pairs(batch, pad_id)
        sides = [(b["chosen_ids"], b["prompt_len"]) for b in batch] + \
            [(b["rejected_ids"], b["prompt_len"]) for b in batch]
        out["completion_mask"] = pad_right([[0] * n + [1] * (len(ids) - n) for ids, n in sides],
                                           0)
    if "ref_chosen_logps" in batch[0]:
        out["ref_chosen_logps"] = torch.tensor([b["ref_chosen_logps"] for b in batch])
        out["ref_rejected_logps"] = torch.tensor([b["ref_rejected_logps"] for b in batch])
    return out


# ----------------------------------------------------------------------------- packed batches
# One row [1, T] holding the micro-batch's sequences end to end, no padding
# (rlhf_exp/training/packing.py): `seq_lengths` [N] says where each ends, `num_tokens` counts
# them for perf/tokens_per_s. The stages' packed steps read these; the rows and their order are
# the padded collate's.
def _flat(seqs: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[t for s in seqs for t in s]], dtype=torch.long)


def collate_sft_packed(batch: list[dict]) -> dict[str, torch.Tensor]:
    """collate_sft packed: `input_ids` / `labels` [1, T], `seq_lengths` [N]. Each sequence's
    first label is -100: in a packed row the previous sequence's last position would predict
    it (a padded row's shift never does)."""
    ids = [b["input_ids"] for b in batch]
    labels = [[-100, *b["labels"][1:]] for b in batch]
    return {"input_ids": _flat(ids), "labels": _flat(labels),
            "seq_lengths": torch.tensor([len(s) for s in ids]),
            "num_tokens": torch.tensor(sum(len(s) for s in ids))}


def collate_pairs_packed(batch: list[dict]) -> dict[str, torch.Tensor]:
    """collate_pairs packed: the B chosen sequences then the B rejected ones in one row."""
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    return {"input_ids": _flat(seqs), "seq_lengths": torch.tensor([len(s) for s in seqs]),
            "num_tokens": torch.tensor(sum(len(s) for s in seqs))}


def collate_dpo_packed(batch: list[dict], shared_prompt: bool = False) -> dict[str, torch.Tensor]:
    """collate_dpo packed. shared_prompt=False: collate_pairs_packed plus `completion_mask`
    [1, T] (1 on response tokens; 0 on each sequence's first token, which nothing predicts).
    shared_prompt=True: pair by pair, the prompt once then the chosen and the rejected response
    (`input_ids` [1, T]; `prompt_lens`, `chosen_lens`, `rejected_lens` [B]; packing.tree gives
    the mask that keeps each response off its sibling). `num_tokens` counts the pairs' tokens as
    2B sequences either way (what the padded layouts count)."""
    n = [b["prompt_len"] for b in batch]
    if shared_prompt:
        seqs, chosen, rejected = [], [], []
        for b, k in zip(batch, n):
            seqs.append(b["chosen_ids"][:k] + b["chosen_ids"][k:] + b["rejected_ids"][k:])
            chosen.append(len(b["chosen_ids"]) - k)
            rejected.append(len(b["rejected_ids"]) - k)
        out = {"input_ids": _flat(seqs), "prompt_lens": torch.tensor(n),
               "chosen_lens": torch.tensor(chosen), "rejected_lens": torch.tensor(rejected)}
    else:
        out = collate_pairs_packed(batch)
        sides = [(b["chosen_ids"], k) for b, k in zip(batch, n)] + \
            [(b["rejected_ids"], k) for b, k in zip(batch, n)]
        out["completion_mask"] = _flat([[0] * max(k, 1) + [1] * (len(ids) - max(k, 1))
                                        for ids, k in sides])
    out["num_tokens"] = torch.tensor(sum(len(b["chosen_ids"]) + len(b["rejected_ids"])
                                         for b in batch))
    if "ref_chosen_logps" in batch[0]:
        out["ref_chosen_logps"] = torch.tensor([b["ref_chosen_logps"] for b in batch])
        out["ref_rejected_logps"] = torch.tensor([b["ref_rejected_logps"] for b in batch])
    return out
