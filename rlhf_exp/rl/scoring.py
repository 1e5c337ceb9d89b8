"""Reading scalar scores out of a sequence-classification model (reward model, PPO critic).

A reward model here is a plain HF `AutoModelForSequenceClassification` with `num_labels=1`: a
backbone and a linear `score` head. HF pools the head's output at the last non-pad token (the
rightmost position whose id != `config.pad_token_id`); with pad != EOS that is the EOS closing
the response, which is exactly where `sequence_scores` reads it. Keeping `config.pad_token_id`
set (models.load_reward_model does) makes the two agree, so a checkpoint scores the same here
and in any HF code.

Positions count real tokens only (`position_ids`), so a sequence scores the same whether its
batch is left- or right-padded, also for absolute-position models (GPT-2, OPT) whose forward
would otherwise number the left padding as positions 0, 1, ...
"""

from __future__ import annotations

import torch


def _unwrap(model):
    """The HF model under DeepSpeed (`.module`) and peft (`.base_model.model`) wrappers. LoRA
    layers are injected in place, so calling the unwrapped modules still runs the adapters."""
    model = getattr(model, "module", model)
    try:
        from peft import PeftModel
    except ImportError:  # peft not installed: no adapters to unwrap
        return model
    # (the HF model inside a PeftModel also has `peft_config`: test the wrapper's type)
    return model.base_model.model if isinstance(model, PeftModel) else model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted from each row's first real token: a left-padded row's tokens
    get the positions they have unpadded (its left padding 0), a right-padded row is numbered
    0, 1, 2, ... throughout, exactly as HF numbers it by default."""
    left_pad = (attention_mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)  # [B, 1]
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions - left_pad).clamp_min(0)


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) the score head applied at every position (a critic's per-token values)."""
    hf = _unwrap(model)
    backbone = getattr(hf, hf.base_model_prefix)
    if positions is None:
        positions = position_ids(attention_mask)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                      use_cache=False).last_hidden_state
    return hf.score(hidden).squeeze(-1).float()


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each row (left- or right-padded; 0 for an empty
    row)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, 0).max(dim=-1).values


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the scalar score of each sequence, read at its last real token (left or right
    padding)."""
    values = token_values(model, input_ids, attention_mask)
    idx = last_index(attention_mask).to(values.device)
    return values.gather(1, idx[:, None]).squeeze(1)
