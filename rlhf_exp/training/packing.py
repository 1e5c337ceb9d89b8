"""Packed rows: several sequences in one row, no compute on padding (issue #21).

A padded micro-batch of N sequences is an [N, max_len] tensor: every row is as long as the
longest, and the forward and backward spend the difference on pad tokens. A packed micro-batch
is ONE row [1, sum(len)] that holds the N sequences end to end, with `position_ids` restarting
at 0 at each sequence. transformers 5.x (masking_utils.find_packed_sequence_indices) reads
restarting position ids as sequence boundaries when `attention_mask` is None (and there is no
KV cache) and builds a block-diagonal causal mask, so no token attends across sequences: each
sequence gets the same logits as alone in its own row (to kernel rounding). Flash-attention
(GPU) takes the same position ids as its variable-length path.

The API (used by the supervised stages here and by the RL update):

    plan_microbatches(lengths, token_budget)   consecutive groups of rows within a token budget
    split_to(plan, costs, count)               a plan cut further to `count` groups (equal
                                               pass counts over ranks)
    TokenBudget(tokens, cost, norms, collate)  the supervised loop's token-budget micro-batches:
                                               .cut(step's micro-batches) -> weighted batches
    pack(seqs)                                 -> Packed(input_ids, position_ids, lengths, ...)
    Packed.forward_kwargs()                    what a model forward takes for a packed row
    sequence_sums(values, packed)              [N] per-sequence sums of a per-position value
    last_token(values, packed)                 [N, ...] each sequence's value at its last token
    unpack(values, packed, pad)                [N, max_len, ...] right-padded, as a padded batch
    supports_packing(model)                    does this model family pack exactly (else pad)
    enabled(node, model, stage)                `<stage>.packing` and supports_packing; on CPU
                                               also switches sdpa to per_sequence_sdpa
    chunk_ranges(lengths, token_budget)        the packed forwards of one micro-batch
    tree(ids, prefix_lens, branch_lens)        groups as prefix + branches (a DPO pair: prompt,
                                               chosen, rejected; a GRPO group), branches masked
                                               off each other; tree_rows (the same, cut into
                                               batched rows); tree_forward
    per_sequence_sdpa                          CPU attention: one causal sdpa call per sequence
                                               (measured faster than the block mask)

Positions: a packed row's position t belongs to sequence `packed.seq_ids[t]`; `starts[i]` is
sequence i's first position. Per-token values "at position t predict token t+1" (next-token
log-probs) are never read at a sequence's last position (it would predict the next sequence's
first token): the stages compute logits only at the positions that predict a response token
(`logits_to_keep` as indices), and a sequence's first token is never one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

# model_type of the families whose forward hands its position_ids to masking_utils'
# create_causal_mask (checked in transformers 5.25; tests/test_packing.py compares packed with
# per-sequence logits): restarting positions give a block-diagonal causal mask. OPT is not one:
# its forward calls create_causal_mask without position_ids, so a packed OPT row attends across
# sequences (measured: logits off by ~0.15) and OPT trains on padded batches.
PACKING_FAMILIES = frozenset({"llama", "qwen2", "mistral", "gpt2"})
# the attention implementations that take that mask (sdpa, eager) or the position ids directly
# (flash-attention's variable-length path)
PACKING_ATTENTION = frozenset({"sdpa", "eager", "flash_attention_2", "flash_attention_3",
                               "packed_sdpa"})
# the attention implementation a CPU run switches an sdpa model to (use_per_sequence_attention)
PER_SEQUENCE = "packed_sdpa"
# a Tree (two sdpa calls per group, the second with its own small mask) is split per group only
# where a group's two segments average at least this many tokens; shorter groups take one call
# with the Tree's 4-D mask: the per-group calls cost more than the masked-out scores there
# (measured on CPU: docs/benchmarks.md, Packing). Plain packed rows are always split.
PER_SEQUENCE_MIN_MEAN = 32
# those shorter groups go in rows of at most this many tokens (whole groups, longest first; a
# longer group alone), batched padded under one [rows, L, L] mask: the masked attention costs
# rows x L^2 instead of T^2 for the whole micro-batch in one row (measured on CPU, the sort
# task's ~23-token pairs: 48-128 within noise of each other, all faster than one row and than
# the padded layout; docs/benchmarks.md "DPO against TRL with packing")
TREE_ROW_TOKENS = 64


def plan_microbatches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Cut rows 0..n-1 (in order) into consecutive groups whose total length stays within
    `token_budget`; a row longer than the budget goes alone. Returns the groups' row indices;
    concatenated they are 0..n-1 in order."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > token_budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def split_to(plan: list[range], costs: list[int], count: int) -> list[range]:
    """The plan cut further (its most expensive splittable micro-batch halved by cost, order
    kept) until it has `count` micro-batches: every rank must run the same number of
    forward/backward passes (ZeRO's per-backward collectives). count <= number of units."""
    plan = list(plan)
    while len(plan) < count:
        k = max((j for j in range(len(plan)) if len(plan[j]) > 1),
                key=lambda j: sum(costs[u] for u in plan[j]))
        r = plan[k]
        half, acc, cut = sum(costs[u] for u in r) / 2, 0, r.start + 1
        for u in r[:-1]:
            acc += costs[u]
            cut = u + 1
            if acc >= half:
                break
        plan[k:k + 1] = [range(r.start, cut), range(cut, r.stop)]
    return plan


@dataclass
class Packed:
    """N sequences in one row of T = sum(lengths) positions."""

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long, 0..len-1 per sequence
    lengths: torch.Tensor  # [N] long
    starts: torch.Tensor  # [N] long: each sequence's first position
    seq_ids: torch.Tensor  # [T] long: the sequence of each position

    @property
    def num_seqs(self) -> int:
        return int(self.lengths.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def forward_kwargs(self) -> dict[str, torch.Tensor | bool | int | None]:
        """A model forward's inputs: no attention_mask (the packed mask comes from the position
        ids), no KV cache (transformers only reads packing without one), and the sequence
        boundaries as flash-attention's variable-length kwargs (cu_seq_lens_*, max_length_*),
        which transformers hands to the attention function: flash-attention's varlen path and
        per_sequence_sdpa read them, the others ignore them."""
        cu = torch.nn.functional.pad(torch.cumsum(self.lengths, 0), (1, 0)).to(torch.int32)
        longest = int(self.lengths.max())
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "attention_mask": None, "use_cache": False, "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}

    def to(self, device: torch.device | str) -> Packed:
        return Packed(*(t.to(device) for t in (self.input_ids, self.position_ids, self.lengths,
                                                self.starts, self.seq_ids)))


def layout(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(position_ids [T], starts [N], seq_ids [T]) of sequences of `lengths` packed end to end."""
    lengths = lengths.long()
    starts = torch.cumsum(lengths, 0) - lengths
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    positions = torch.arange(int(lengths.sum()), device=lengths.device) - starts[seq_ids]
    return positions, starts, seq_ids


def pack(seqs: Sequence[Sequence[int]] | Sequence[torch.Tensor]) -> Packed:
    """Sequences (lists of ids or 1-D tensors, each non-empty) as one packed row."""
    if not seqs:
        raise ValueError("pack: no sequences")
    parts = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    if any(p.numel() == 0 for p in parts):
        raise ValueError("pack: an empty sequence has no position to attend from")
    lengths = torch.tensor([p.numel() for p in parts], dtype=torch.long)
    positions, starts, seq_ids = layout(lengths)
    return Packed(torch.cat(parts)[None], positions[None], lengths, starts, seq_ids)


def pack_values(values: Sequence[Sequence], dtype: torch.dtype = torch.long,
                first: float | int | None = None) -> torch.Tensor:
    """Per-token values of the same sequences (labels, masks) concatenated [T]; `first` replaces
    each sequence's first value (e.g. -100 / 0: no position predicts it, as in a padded row,
    where the shift drops column 0; in a packed row the previous sequence's last position would)."""
    out = []
    for v in values:
        v = list(v)
        if first is not None and v:
            v[0] = first
        out.extend(v)
    return torch.tensor(out, dtype=dtype)


def sequence_sums(values: torch.Tensor, packed: Packed, shift: int = 0) -> torch.Tensor:
    """[N] the sum per sequence of per-position `values` [T - shift] (shift=1 for values indexed
    by the predicted token t+1); differentiable."""
    owner = packed.seq_ids[shift:]
    out = torch.zeros(packed.num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, owner, values)


def last_token(values: torch.Tensor, packed: Packed) -> torch.Tensor:
    """[N, ...] each sequence's value at its last position, from values [1, T, ...] or
    [T, ...] (a reward head's per-token scores, a value head's outputs)."""
    flat = values[0] if values.dim() >= 2 and values.shape[0] == 1 and \
        values.shape[1] == packed.num_tokens else values
    return flat[packed.starts + packed.lengths - 1]


def unpack(values: torch.Tensor, packed: Packed, pad: float = 0.0) -> torch.Tensor:
    """[N, max_len, ...] the per-position values [1, T, ...] or [T, ...] put back as a
    right-padded batch (pad value `pad`), for code written for padded batches."""
    flat = values[0] if values.dim() >= 2 and values.shape[0] == 1 and \
        values.shape[1] == packed.num_tokens else values
    width = int(packed.lengths.max())
    out = flat.new_full((packed.num_seqs, width, *flat.shape[1:]), pad)
    positions = packed.position_ids[0]
    return out.index_put((packed.seq_ids, positions), flat)


def supports_packing(model) -> bool:
    """Whether `model` (an HF model, or a DeepSpeed engine / PEFT wrapper around one) gives every
    sequence of a packed row the logits it has alone: a family whose mask is built from restarting
    position ids (PACKING_FAMILIES) under an attention implementation that honours it."""
    config = _config(model)
    if config is None:
        return False
    attn = getattr(config, "_attn_implementation", None) or "eager"
    return config.model_type in PACKING_FAMILIES and attn in PACKING_ATTENTION


def why_not(model) -> str:
    """One line: why `model` falls back to padded batches (for the run's log)."""
    config = _config(model)
    if config is None:
        return "no HF config found on the model"
    attn = getattr(config, "_attn_implementation", None) or "eager"
    return (f"model_type {config.model_type!r} with attention {attn!r} does not build a "
            f"block-diagonal mask from position ids (packing covers {sorted(PACKING_FAMILIES)} "
            f"under {sorted(PACKING_ATTENTION)})")


def _config(model):
    seen = 0
    while model is not None and seen < 6:  # engine.module -> PeftModel.base_model -> HF model
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "model_type") and \
                not isinstance(config, dict):
            return config
        model = getattr(model, "module", None) or getattr(model, "base_model", None)
        seen += 1
    return None


# ----------------------------------------------------------------------------- micro-batch pieces
def from_flat(input_ids: torch.Tensor, lengths: torch.Tensor) -> Packed:
    """The Packed of a collated row [1, T] and its sequence lengths [N] (on their device)."""
    positions, starts, seq_ids = layout(lengths)
    return Packed(input_ids, positions[None], lengths, starts, seq_ids)


def chunk_ranges(lengths: Sequence[int], token_budget: int) -> list[tuple[int, int, int, int]]:
    """The packed forwards of one micro-batch of units (sequences, or pairs) of `lengths`:
    (first unit, end unit, first token, end token) per forward, each within `token_budget`
    tokens (plan_microbatches); token_budget 0 = one forward for all."""
    n = len(lengths)
    if token_budget <= 0:
        return [(0, n, 0, int(sum(lengths)))]
    out, tok = [], 0
    for group in plan_microbatches(lengths, token_budget):
        size = int(sum(lengths[i] for i in group))
        out.append((group[0], group[-1] + 1, tok, tok + size))
        tok += size
    return out


# ----------------------------------------------------------------------------- shared prefixes
@dataclass
class Tree:
    """Groups packed as prefix, branch 1, branch 2, ... each (a DPO pair: prompt, chosen,
    rejected; a GRPO group: prompt, its responses): every branch attends to its own prefix and
    itself, never to a sibling, so the prefix is computed once for all its branches. Branch
    positions continue from the prefix's (each branch starts at position len(prefix))."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    allowed: torch.Tensor  # [T, T] bool: query t may attend to key s
    src: torch.Tensor  # [K] the position whose logits predict branch token tgt[k]
    tgt: torch.Tensor  # [K] the positions of every branch token
    owner: torch.Tensor  # [K] the branch of tgt[k]: group g's branch b is g * branches + b


def tree(input_ids: torch.Tensor, prefix_lens: Sequence[int],
         branch_lens: Sequence[Sequence[int]]) -> Tree:
    """The Tree of a row [1, T] laid out group by group as prefix then branches (each prefix at
    least 1 token: its last position predicts every branch's first token)."""
    t = _tree_layout(input_ids, prefix_lens, branch_lens, [list(range(len(prefix_lens)))],
                     int(input_ids.shape[1]))
    return Tree(t.input_ids, t.position_ids, t.allowed[0], t.src, t.tgt, t.owner)


def fill_rows(sizes: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Units of `sizes` tokens in rows of at most `row_tokens` (one longer unit alone): first
    fit, longest first (ties in order), so the rows come out nearly equally full and a batch
    of them wastes little on padding. Returns each row's unit indices, ascending."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        for r, u in enumerate(used):
            if u + sizes[i] <= row_tokens:
                rows[r].append(i)
                used[r] += sizes[i]
                break
        else:
            rows.append([i])
            used.append(sizes[i])
    return [sorted(r) for r in rows]


def tree_rows(input_ids: torch.Tensor, prefix_lens: Sequence[int],
              branch_lens: Sequence[Sequence[int]], row_tokens: int) -> Tree:
    """The Tree of a row [1, T] (as `tree`) cut into rows of at most `row_tokens` tokens, whole
    groups each (fill_rows), right-padded to the longest and stacked: `input_ids` and
    `position_ids` [R, L], `allowed` [R, L, L] (a pad position attends to itself only, and
    nothing attends to it), `src` / `tgt` index the flattened [R * L] positions, `owner` counts
    the branches of the groups in their order in `input_ids`, as `tree` does."""
    sizes = [p + sum(lens) for p, lens in zip(prefix_lens, branch_lens)]
    plan = fill_rows(sizes, row_tokens)
    width = max(sum(sizes[g] for g in groups) for groups in plan)
    return _tree_layout(input_ids, prefix_lens, branch_lens, plan, width)


def _tree_layout(input_ids: torch.Tensor, prefix_lens: Sequence[int],
                 branch_lens: Sequence[Sequence[int]], plan: list[list[int]],
                 width: int) -> Tree:
    """tree / tree_rows: the groups of each row of `plan` (indices, in order) laid out in rows
    of `width` positions. Built as plain lists and a few batched tensor ops: a DPO step lays out
    hundreds of short pairs, and per-group tensor calls cost a measurable share of it."""
    sizes = [p + sum(lens) for p, lens in zip(prefix_lens, branch_lens)]
    starts = [0] * len(sizes)
    for g in range(1, len(sizes)):
        starts[g] = starts[g - 1] + sizes[g - 1]
    nb = len(branch_lens[0]) if branch_lens else 0
    flat_ids = input_ids[0].tolist()
    cells = len(plan) * width
    ids, positions, branch = [0] * cells, [0] * cells, [0] * cells
    group = list(range(-1, -cells - 1, -1))  # a pad position is its own group: sees itself only
    src: list[int] = []
    tgt: list[int] = []
    owner: list[int] = []
    for r, groups in enumerate(plan):
        t = r * width
        for g in groups:
            p, size = prefix_lens[g], sizes[g]
            if p < 1:
                raise ValueError("tree: an empty prefix has no position to predict from")
            ids[t:t + size] = flat_ids[starts[g]:starts[g] + size]
            group[t:t + size] = [g] * size
            positions[t:t + p] = range(p)
            last_prefix = t + p - 1
            t += p
            for b, n in enumerate(branch_lens[g]):
                positions[t:t + n] = range(p, p + n)
                branch[t:t + n] = [b + 1] * n
                src.extend([last_prefix, *range(t, t + n - 1)])
                tgt.extend(range(t, t + n))
                owner.extend([g * nb + b] * n)
                t += n
    as_long = partial_tensor(input_ids.device)
    group_t = as_long(group).view(len(plan), width)
    branch_t = as_long(branch).view(len(plan), width)
    idx = torch.arange(width, device=input_ids.device)
    allowed = ((group_t[:, :, None] == group_t[:, None, :]) & (idx[None, :] <= idx[:, None])
               & ((branch_t[:, None, :] == 0) | (branch_t[:, None, :] == branch_t[:, :, None])))
    return Tree(as_long(ids).view(len(plan), width), as_long(positions).view(len(plan), width),
                allowed, as_long(src), as_long(tgt), as_long(owner))


def partial_tensor(device: torch.device):
    return lambda values: torch.tensor(values, dtype=torch.long, device=device)


def attention_mask_4d(allowed: torch.Tensor, model, dtype: torch.dtype) -> torch.Tensor:
    """`allowed` [T, T] (or [R, T, T]: a batch of rows) as the 4-D mask transformers passes
    through unchanged to attention: boolean for sdpa, additive (0 / dtype min) for eager."""
    allowed = allowed if allowed.dim() == 3 else allowed[None]
    if attention(model) in ("sdpa", PER_SEQUENCE):
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def attention(model) -> str:
    config = _config(model)
    return (getattr(config, "_attn_implementation", None) or "eager") if config else "eager"


def supports_tree(model) -> bool:
    """Whether `model` takes a custom 4-D mask with packed position ids (sdpa, eager): a Tree
    layout. Flash-attention's variable-length path has no custom masks."""
    return supports_packing(model) and attention(model) in ("sdpa", "eager", PER_SEQUENCE)


# ----------------------------------------------------------------------------- stage helpers
def enabled(node, model, stage: str) -> bool:
    """`<stage>.packing`, where `model` packs exactly; else padded, said in one line."""
    if not node.packing:
        return False
    if supports_packing(model):
        use_per_sequence_attention(model)  # CPU: faster than sdpa's block mask (measured)
        return True
    from rlhf_exp.training import runtime  # the log line; runtime imports nothing of ours

    runtime.say(f"{stage}: packing off, padded micro-batches: {why_not(model)}")
    return False


def param_dtype(model) -> torch.dtype:
    """The dtype of `model`'s first parameter (float32 when it has none)."""
    for p in model.parameters():
        return p.dtype
    return torch.float32


@contextmanager
def capture_output(module: torch.nn.Module):
    """Within the block, the outputs of `module`'s forwards are appended to the yielded list
    (a reward model's per-token head outputs, which its own pooling would reduce to one per
    row: a packed row needs one per sequence)."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


def find_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The outermost submodule called `name` (e.g. "score": the sequence-classification head,
    or its PEFT modules_to_save wrapper)."""
    found = [(k.count("."), m) for k, m in model.named_modules()
             if k == name or k.endswith("." + name)]
    if not found:
        raise ValueError(f"no submodule named {name!r} in {type(model).__name__}")
    return min(found, key=lambda x: x[0])[1]


# ----------------------------------------------------------------------------- CPU attention
def per_sequence_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """Attention of a packed row as one causal sdpa call per sequence (no T x T mask); any other
    call (padded batches, generation, a Tree's 4-D mask) is transformers' own sdpa.

    Why: on CPU, sdpa with the block-diagonal mask transformers builds from the position ids
    computes all T x T scores of the row and masks most of them; per-sequence calls compute
    only each sequence's own (sum of len^2). Measured faster on free text (docs/benchmarks.md,
    Packing; bench/bench_packing.py --attention). query [1, H, T, D], key / value [1, H_kv, T, D]
    -> [1, T, H, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu, segments = kwargs.get("cu_seq_lens_q"), kwargs.get("tree_segments")
    if (cu is None and segments is None) or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    sdpa = partial(torch.nn.functional.scaled_dot_product_attention, scale=scaling,
                   dropout_p=dropout if module.training else 0.0,
                   enable_gqa=query.shape[1] != key.shape[1])
    outs = []
    if segments is not None:  # a Tree of one prefix and two branches per group
        for start, p, a, b in segments.tolist():
            lo, mid, hi = start, start + p + a, start + p + a + b
            outs.append(sdpa(query[:, :, lo:mid], key[:, :, lo:mid], value[:, :, lo:mid],
                             is_causal=True))
            # the second branch: its prefix entirely, then itself causally (not the first)
            keys = torch.cat([key[:, :, lo:lo + p], key[:, :, mid:hi]], dim=2)
            values = torch.cat([value[:, :, lo:lo + p], value[:, :, mid:hi]], dim=2)
            mask = torch.ones(b, p + b, dtype=torch.bool, device=query.device)
            mask[:, p:] = torch.ones(b, b, dtype=torch.bool, device=query.device).tril()
            outs.append(sdpa(query[:, :, mid:hi], keys, values, attn_mask=mask))
    else:
        bounds = cu.tolist()
        outs = [sdpa(query[:, :, lo:hi], key[:, :, lo:hi], value[:, :, lo:hi], is_causal=True)
                for lo, hi in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def tree_forward(input_ids: torch.Tensor, model, prefix_lens: Sequence[int],
                 branch_lens: Sequence[Sequence[int]]) -> tuple[Tree, dict]:
    """The Tree of a row [1, T] of groups and a model forward's inputs for it; the forward's
    logits flattened to [R * T', V] and indexed by `src` predict the branch tokens. Under
    per_sequence_sdpa, where a group's two segments average PER_SEQUENCE_MIN_MEAN tokens: one
    row, the groups' bounds (`tree_segments` [G, 4]: start, prefix, branch 1, branch 2), two
    sdpa calls per group and no T x T mask; otherwise rows of at most TREE_ROW_TOKENS tokens
    (tree_rows) under their 4-D mask (attention_mask_4d)."""
    tokens = input_ids.shape[1]
    if attention(model) == PER_SEQUENCE and all(len(b) == 2 for b in branch_lens) and \
            tokens >= PER_SEQUENCE_MIN_MEAN * 2 * len(prefix_lens):  # else masked rows
        tree_row = tree(input_ids, prefix_lens, branch_lens)
        rows, start = [], 0
        for p, (a, b) in zip(prefix_lens, branch_lens):
            rows.append([start, p, a, b])
            start += p + a + b
        segments = torch.tensor(rows, device=input_ids.device)
        return tree_row, {"input_ids": tree_row.input_ids, "position_ids": tree_row.position_ids,
                          "use_cache": False, "tree_segments": segments, "attention_mask": None}
    batched = tree_rows(input_ids, prefix_lens, branch_lens, TREE_ROW_TOKENS)
    return batched, {"input_ids": batched.input_ids, "position_ids": batched.position_ids,
                     "use_cache": False,
                     "attention_mask": attention_mask_4d(batched.allowed, model,
                                                         param_dtype(model))}


def use_per_sequence_attention(model) -> bool:
    """Switch an sdpa model to per_sequence_sdpa (registered with transformers once) on a
    machine without CUDA; returns whether it did. Padded batches and generation still run
    transformers' sdpa (the same mask function)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    inner = model
    while hasattr(inner, "set_attn_implementation") is False and \
            getattr(inner, "base_model", inner) is not inner:
        inner = inner.base_model
    if torch.cuda.is_available() or attention(model) != "sdpa" or \
            not hasattr(inner, "set_attn_implementation"):
        return False
    AttentionInterface.register(PER_SEQUENCE, per_sequence_sdpa)
    AttentionMaskInterface.register(PER_SEQUENCE, sdpa_mask)
    inner.set_attn_implementation(PER_SEQUENCE)
    return True


# ----------------------------------------------------------------------------- token budgets
@dataclass
class TokenBudget:
    """Token-budget micro-batches of the supervised loop (`<stage>.micro_batch_tokens` > 0 with
    packing): an optimizer step's rows on this rank (the sampler's `gradient_accumulation_steps`
    micro-batches, in order) are re-cut into consecutive groups of at most `tokens` tokens, one
    packed forward and backward each (a row over the budget goes alone).

    The step's loss stays the padded one, (1/accum) x sum over the sampler's micro-batches of
    each one's mean: every row carries a weight per normaliser of its sampler micro-batch,
    `w_<name>` = 1 / (accum x that micro-batch's `norms()[name]`, at least 1), and the stage's
    step function returns the weighted sum over its rows, so the budget micro-batches' losses
    add up to the step's loss (gradients too)."""

    tokens: int  # the budget, > 0
    cost: Callable[[dict], int]  # the tokens of one row (a sequence, or a pair's two)
    norms: Callable[[list[dict]], dict[str, float]]  # a sampler micro-batch's normalisers
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]  # the packed collate of rows

    def cut(self, micro_batches: list[list[dict]], count: Callable[[int], int] | None = None
            ) -> list[dict[str, torch.Tensor]]:
        """The step's collated budget micro-batches, with their `w_<name>` [rows] tensors.
        `count(n)`: how many micro-batches to run given this rank's n (the most over ranks:
        ZeRO reduces gradients in every backward, so the ranks' passes must pair up); the plan
        is split further to reach it."""
        accum = len(micro_batches)
        rows: list[dict] = []
        weights: list[dict[str, float]] = []
        for micro in micro_batches:
            w = {k: 1.0 / (accum * max(float(v), 1.0)) for k, v in self.norms(micro).items()}
            rows.extend(micro)
            weights.extend([w] * len(micro))
        costs = [int(self.cost(r)) for r in rows]
        plan = [range(g[0], g[-1] + 1) for g in plan_microbatches(costs, self.tokens)]
        if count is not None:
            plan = split_to(plan, costs, min(count(len(plan)), len(rows)))
        out = []
        for r in plan:
            batch = self.collate([rows[i] for i in r])
            for name in weights[0]:
                batch[f"w_{name}"] = torch.tensor([weights[i][name] for i in r],
                                                  dtype=torch.float32)
            out.append(batch)
        return out


def describe(packed: bool, budget: TokenBudget | None) -> str:
    """The run line's words for the layout: ", packed", ", packed in passes of <= N tokens"."""
    if budget is not None:
        return f", packed in passes of <= {budget.tokens} tokens"
    return ", packed" if packed else ""


def raw_rows(batch: list[dict]) -> list[dict]:
    """A DataLoader collate that keeps a micro-batch's rows as they are (TokenBudget.cut
    collates the step's rows once they are re-cut)."""
    return list(batch)
