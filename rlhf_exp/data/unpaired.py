"""Unpaired rows (prompt, completion, label) for KTO, as TRL 1.16 builds them.

Where they come from (the reward share of data_mix.split, as DPO's pairs):
  - a preference pair maps to two rows as TRL's `unpair_preference_dataset` does (a batched
    `datasets.map`, 1000 rows a batch): per batch, every pair's (prompt, chosen, True), then
    every pair's (prompt, rejected, False);
  - a row of an `unpaired` source (columns prompt, completion, label: TRL's unpaired preference
    format; rlhf_exp/data/sources.py) is taken as it is, after its batch's pairs.

The KL estimate of KTO scores each prompt with a mismatched completion. TRL (KTOTrainer.
_prepare_dataset) takes it by rotating the completions by one within consecutive chunks of
`per_device_train_batch_size` rows in dataset order: (x1, y1), ..., (xn, yn) ->
(x1, yn), (x2, y1), ..., (xn, yn-1); `kl_partners` does the same with
`kto.micro_batch_size_per_device`.

Features use the DPO feature layout so that DPO's forward, reference pass and collate serve KTO
unchanged (rlhf_exp/stages/dpo.py): `chosen_ids` = prompt + the row's completion + EOS,
`rejected_ids` = the same prompt + the KL partner's completion + EOS, `prompt_len`, plus `label`
(True = desirable). One forward scores both; the second half is only the KL estimate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_exp.data.tokenize import (
    RENDER_VERSION,
    cached,
    collate_dpo,
    encode_pair,
    messages_ids,
    row_messages,
)

UNPAIR_BATCH = 1000  # datasets.map's default batch_size, which unpair_preference_dataset uses


def unpaired_rows(rows: list[dict]) -> list[dict]:
    """The rows as unpaired (prompt, completion, label) rows (module docstring), each keeping its
    source row's other fields (prompt turns, task). Rows with neither a pair nor a label (a
    prompt_response source) are left out."""
    out: list[dict] = []
    for lo in range(0, len(rows), UNPAIR_BATCH):
        chunk = rows[lo:lo + UNPAIR_BATCH]
        pairs = [r for r in chunk if r.get("chosen") is not None and r.get("rejected") is not None]
        out += [{**r, "completion": r["chosen"], "label": True} for r in pairs]
        out += [{**r, "completion": r["rejected"], "label": False} for r in pairs]
        out += [r for r in chunk if r.get("label") is not None and r.get("chosen") is None]
    return out


def kl_partners(n: int, chunk: int) -> list[int]:
    """For each of n rows, the row whose completion makes its KL sequence: the previous row in
    its chunk of `chunk` rows, the chunk's first taking its last (TRL's rotation by one)."""
    return [lo + (i - lo - 1) % (min(lo + chunk, n) - lo)
            for lo in range(0, n, chunk) for i in range(lo, min(lo + chunk, n))]


def tokenize_unpaired(rows: list[dict], tokenizer, template: str, max_prompt_len: int,
                      max_len: int, overlong: str, chunk: int,
                      cache_dir: str | Path | None = None) -> tuple[list[dict], int]:
    """KTO features (module docstring) of unpaired rows; returns (features, number dropped as
    over-long under overlong=drop). The KL partners are chosen after the drops, among the kept
    rows; a KL sequence longer than max_len keeps the start of its completion (and its EOS)."""
    def build() -> tuple[list[dict], int]:
        kept, dropped = [], 0
        for row in rows:
            prompt = messages_ids(tokenizer, row_messages(row), template)
            enc = encode_pair(tokenizer, prompt, row["completion"], max_prompt_len, max_len,
                              overlong)
            if enc is None:
                dropped += 1
                continue
            kept.append((enc, row))
        feats = []
        for (ids, n_prompt), row in kept:
            feats.append({"chosen_ids": ids, "prompt_len": n_prompt, "label": bool(row["label"]),
                          "prompt": row["prompt"], "completion": row["completion"],
                          "task": row.get("task")})
        for f, j in zip(feats, kl_partners(len(feats), chunk)):
            other = feats[j]
            kl = f["chosen_ids"][:f["prompt_len"]] + other["chosen_ids"][other["prompt_len"]:]
            if len(kl) > max_len:
                kl = kl[:max_len - 1] + [tokenizer.eos_token_id]
            f["rejected_ids"] = kl
        return feats, dropped
    settings = {"template": template, "max_prompt_len": max_prompt_len, "max_len": max_len,
                "overlong": overlong, "render": RENDER_VERSION, "kl_chunk": chunk}
    return cached("unpaired-1", rows, tokenizer, settings, cache_dir, build)


def collate_kto(batch: list[dict], pad_id: int, shared_prompt: bool = False
                ) -> dict[str, torch.Tensor]:
    """collate_dpo of the KTO features (the B rows, then their B KL sequences; the reference
    log-probabilities as `ref_chosen_logps` = the rows', `ref_rejected_logps` = the KL
    sequences') plus `label` [B] (bool)."""
    out = collate_dpo(batch, pad_id, shared_prompt=shared_prompt)
    out["label"] = torch.tensor([b["label"] for b in batch], dtype=torch.bool)
    return out

