"""Reading scalar scores out of a sequence-classification model (reward model, PPO critic).

A reward model here is a plain HF `AutoModelForSequenceClassification` with `num_labels=1`: a
backbone and a linear `score` head. HF pools the head's output at the last non-pad token (the
rightmost position whose id != `config.pad_token_id`); with right padding and pad != EOS that
is the EOS closing the response, which is exactly where `sequence_scores` reads it. Keeping
`config.pad_token_id` set (models.load_reward_model does) makes the two agree, so a checkpoint
scores the same here and in any HF code.
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


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) the score head applied at every position (a critic's per-token values)."""
    hf = _unwrap(model)
    backbone = getattr(hf, hf.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      use_cache=False).last_hidden_state
    return hf.score(hidden).squeeze(-1).float()


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each right-padded row."""
    return attention_mask.long().sum(-1).clamp(min=1) - 1


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the scalar score of each right-padded sequence, read at its last non-pad token."""
    values = token_values(model, input_ids, attention_mask)
    idx = last_index(attention_mask).to(values.device)
    return values.gather(1, idx[:, None]).squeeze(1)
