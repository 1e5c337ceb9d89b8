"""Rollout generation for PPO and evaluation: prompts in, fixed-shape `Rollout` out.

Two paths, same sampling and EOS logic:

- plain (CPU, or `compile: none`): our own decode loop calling the HF model eagerly, with a
  `DynamicCache`, or a `StaticCache` when `use_static_cache`. Stops as soon as every row is done.
- graphed (CUDA): the decode step (one token per row) runs over a transformers `StaticCache` whose
  shapes never change, so it is captured once as a CUDA graph (`cuda_graphs`) or compiled with
  `torch.compile(mode="reduce-overhead")` (`compile`), then replayed every step. Per step the host
  only copies the new token in, replays, and samples; nothing waits on the GPU except an
  "all rows done?" check every `_DONE_CHECK_EVERY` steps. The prefill always runs eagerly.

Captured graphs (with their KV cache) are kept per model and per (batch, cache length), and are
re-captured when a parameter's storage moves (in-place optimizer updates are seen by the graph).
`release_generation_buffers()` frees them.

Shapes: B rows, P prompt tokens (left-padded), R = max_new_tokens, V vocab.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

# The settings' one declaration is the config schema (`ppo.generation`, `eval.generation`, ...):
# defaults, validation (a bad value raises ConfigError, a ValueError) and the allowed modes.
from rlhf_exp.config import COMPILE_MODES, GenerationSettings  # noqa: F401

GenerationConfig = GenerationSettings  # the name generate()'s callers use

log = logging.getLogger(__name__)

_DONE_CHECK_EVERY = 16  # graphed path: steps between "all rows finished?" host syncs
_CACHE_LEN_MULTIPLE = 64  # graphed path: round P+R up so nearby prompt lengths share one graph
_MAX_GRAPHS_PER_MODEL = 2  # e.g. one rollout shape and one eval shape


@dataclass
class Rollout:
    sequences: torch.LongTensor  # [B, P+R]: the left-padded prompt then the response, pad after EOS
    prompt_len: int  # P (prompts are left-padded to this)
    response_mask: torch.Tensor  # [B, R] 1 for generated tokens up to and INCLUDING the first EOS
    attention_mask: torch.Tensor  # [B, P+R] 1 for real prompt tokens and real response tokens

    @property
    def responses(self) -> torch.LongTensor:
        """[B, R] the generated part of `sequences`."""
        return self.sequences[:, self.prompt_len:]


# ----------------------------------------------------------------------------- public entry
def generate(model: torch.nn.Module, input_ids: torch.LongTensor, attention_mask: torch.Tensor,
             gen: GenerationConfig, *, eos_token_id: int, pad_token_id: int,
             generator: torch.Generator | None = None, synced_gpus: bool = False,
             prompt_repeats: int = 1) -> Rollout:
    """Sample `gen.max_new_tokens` tokens after left-padded prompts.

    The response always has R = max_new_tokens columns (pad after a row's EOS, or after the loop
    stopped early because every row finished), so rollouts have fixed shapes. Runs in eval mode
    (no dropout) under `torch.no_grad`; the model's train/eval flags are restored afterwards.
    `generator` makes sampling reproducible; a CPU generator with a CUDA model seeds a CUDA one.
    `synced_gpus`: never stop before R steps. Needed when the weights are ZeRO-3 partitioned
    over several ranks: every forward is a collective, so all ranks must run the same number.
    `prompt_repeats` = G > 1: rows come in runs of G identical prompts (GRPO's groups); the eager
    dynamic-cache path prefills each prompt once and repeats its KV cache (the other paths
    prefill every row). The samples are the same either way (up to float rounding).
    """
    model = _unwrap(model)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    prompt_mask = attention_mask.to(device=device, dtype=torch.long)
    if input_ids.ndim != 2 or prompt_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, P], got "
                         f"{tuple(input_ids.shape)} and {tuple(prompt_mask.shape)}")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be LEFT-padded (attention_mask[:, -1] must be all 1); "
                         "set tokenizer.padding_side = 'left'")
    mode = _resolve_mode(gen, model, device)
    rng = _device_generator(generator, device)

    with torch.no_grad(), _eval_mode(model):
        if mode == "none" and not gen.use_static_cache:
            decoder = _DynamicDecoder(model, input_ids.shape[1] + gen.max_new_tokens)
            check_every = 1
        else:
            decoder = _static_decoder(model, input_ids.shape[0],
                                      input_ids.shape[1] + gen.max_new_tokens, mode)
            check_every = 1 if mode == "none" else _DONE_CHECK_EVERY
        if synced_gpus:
            check_every = gen.max_new_tokens + 1  # the "all done?" early exit never fires
        response = _decode_loop(decoder, input_ids, prompt_mask, gen, eos_token_id,
                                pad_token_id, rng, check_every, prompt_repeats)

    response_mask = _response_mask(response, eos_token_id)
    return Rollout(
        sequences=torch.cat([input_ids, response], dim=1),
        prompt_len=input_ids.shape[1],
        response_mask=response_mask,
        attention_mask=torch.cat([prompt_mask.to(response_mask.dtype), response_mask], dim=1),
    )


def release_generation_buffers(model: torch.nn.Module | None = None) -> None:
    """Free the captured decode graphs and static KV caches (of one model, or of all)."""
    if model is None:
        _GRAPHS.clear()
    else:
        _GRAPHS.pop(_unwrap(model), None)


# ----------------------------------------------------------------------------- decode loop
def _decode_loop(decoder: _DynamicDecoder | _StaticDecoder, input_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, gen: GenerationConfig, eos: int, pad: int,
                 rng: torch.Generator | None, check_every: int,
                 prompt_repeats: int = 1) -> torch.Tensor:
    """Returns the [B, R] response tokens, pad after each row's first EOS."""
    B, R = input_ids.shape[0], gen.max_new_tokens
    # positions count real tokens only, so left padding does not shift them (HF does the same)
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
    next_pos = prompt_mask.sum(-1, keepdim=True)  # [B, 1] position of the first response token
    if prompt_repeats > 1 and isinstance(decoder, _DynamicDecoder):
        logits = decoder.prefill_repeated(input_ids, prompt_mask, prompt_pos, prompt_repeats)
    else:
        logits = decoder.prefill(input_ids, prompt_mask, prompt_pos)  # [B, V]

    response = input_ids.new_full((B, R), pad)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for t in range(R):
        tok = _sample(logits, gen, rng).masked_fill(done, pad)  # finished rows emit pad
        response[:, t] = tok
        done |= tok == eos
        if t == R - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        logits = decoder.step(tok[:, None], next_pos + t)  # token t sits at slot P + t
    return response


def _sample(logits: torch.Tensor, gen: GenerationConfig,
            rng: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids. No host syncs."""
    if not gen.do_sample:
        return logits.argmax(-1)
    logits = logits.float()
    if gen.temperature != 1.0:
        logits = logits / gen.temperature
    if gen.top_k > 0:
        kth = torch.topk(logits, min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        # keep the smallest prefix (by probability) whose mass reaches top_p; the top token stays
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before > gen.top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    # exponential race: argmax p_i / E_i with E_i ~ Exp(1) is a sample from p (like multinomial,
    # but without its host sync); the clamp keeps 0/0 out when a draw is exactly 0
    noise = torch.empty_like(probs).exponential_(generator=rng).clamp_min_(1e-20)
    return (probs / noise).argmax(-1)


def _response_mask(response: torch.Tensor, eos: int) -> torch.Tensor:
    """[B, R] 1 up to and including the first EOS, 0 after."""
    is_eos = (response == eos).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS count strictly before each position
    return (eos_before == 0).long()


# ----------------------------------------------------------------------------- decoders
class _DynamicDecoder:
    """Eager steps over a growing `DynamicCache`."""

    def __init__(self, model: torch.nn.Module, max_len: int) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.cache_arg = _cache_arg(model)
        self.mask: torch.Tensor | None = None  # [B, P+R], sliced to the seen length each step
        self.max_len = max_len
        self.seen = 0

    def prefill(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor,
                prompt_pos: torch.Tensor) -> torch.Tensor:
        B, P = input_ids.shape
        # generated tokens are always attended to (rows after EOS are discarded anyway)
        self.mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, self.max_len - P)], dim=1)
        self.seen = P
        return _forward(self.model, input_ids, self.mask[:, :P], prompt_pos,
                        {self.cache_arg: self.cache}, last_only=True)

    def prefill_repeated(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         prompt_pos: torch.Tensor, repeats: int) -> torch.Tensor:
        """prefill of rows that come in runs of `repeats` equal prompts: each prompt once, then
        its KV cache and logits repeated."""
        first = slice(None, None, repeats)
        logits = self.prefill(input_ids[first], prompt_mask[first], prompt_pos[first])
        self.cache.batch_repeat_interleave(repeats)
        self.mask = self.mask.repeat_interleave(repeats, dim=0)
        return logits.repeat_interleave(repeats, dim=0)

    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return _forward(self.model, ids, self.mask[:, :self.seen], pos,
                        {self.cache_arg: self.cache})


class _StaticDecoder:
    """Decode steps over a fixed-shape `StaticCache`, optionally captured as a CUDA graph.

    All step inputs live in persistent buffers (ids [B, 1], pos [B, 1], mask [B, L]) so a captured
    graph or a compiled function always sees the same addresses. The cache tracks its own write
    offset on the device, so replays need no host-side step counter.
    """

    def __init__(self, model: torch.nn.Module, batch: int, cache_len: int, mode: str) -> None:
        device = next(model.parameters()).device
        self.model_ref = weakref.ref(model)  # no strong ref: the module-level store is weak
        self.mode = mode
        self.cache_len = cache_len
        self.param_ptrs = _param_ptrs(model)
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        self.cache_arg = _cache_arg(model)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.mask = torch.ones(batch, cache_len, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None
        self.compiled = None
        if mode != "none":
            self._capture(model)

    def _decode_forward(self, model: torch.nn.Module) -> torch.Tensor:
        return _forward(model, self.ids, self.mask, self.pos, {self.cache_arg: self.cache})

    def _capture(self, model: torch.nn.Module) -> None:
        # the first forward allocates the cache tensors (lazily, from the real K/V shapes), so it
        # must run outside any graph; the steps here write junk that reset() clears below
        self._decode_forward(model)
        if self.mode == "cuda_graphs":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up kernels/workspaces off the capture stream
                for _ in range(2):
                    self._decode_forward(model)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.graph_logits = self._decode_forward(model)
        else:  # "compile": cudagraph trees record on the first calls
            for buf in (self.ids, self.pos, self.mask):
                torch._dynamo.mark_static_address(buf)
            self.compiled = torch.compile(self._decode_forward, mode="reduce-overhead",
                                          fullgraph=True)
            for _ in range(3):
                torch.compiler.cudagraph_mark_step_begin()
                self.compiled(model)
        self.cache.reset()

    def matches(self, model: torch.nn.Module) -> bool:
        # a moved parameter (ZeRO-3 gather, .to(), reload) would leave a graph reading stale memory
        return self.model_ref() is model and self.param_ptrs == _param_ptrs(model)

    def prefill(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor,
                prompt_pos: torch.Tensor) -> torch.Tensor:
        P = input_ids.shape[1]
        self.cache.reset()  # zero K/V and the device-side write offset
        self.mask[:, :P].copy_(prompt_mask)
        self.mask[:, P:].fill_(1)  # future slots: the causal mask hides those not yet written
        return _forward(self.model_ref(), input_ids, self.mask, prompt_pos,
                        {self.cache_arg: self.cache}, last_only=True)

    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        if self.graph is not None:
            self.graph.replay()
            return self.graph_logits  # overwritten by the next replay: consume before then
        if self.compiled is not None:
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(self.model_ref())
        return self._decode_forward(self.model_ref())


# model -> OrderedDict[(batch, cache_len, mode), _StaticDecoder]; weak so models can be freed
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _static_decoder(model: torch.nn.Module, batch: int, min_len: int, mode: str) -> _StaticDecoder:
    if mode == "none":  # nothing expensive to keep
        return _StaticDecoder(model, batch, min_len, mode)
    cache_len = -(-min_len // _CACHE_LEN_MULTIPLE) * _CACHE_LEN_MULTIPLE
    store = _GRAPHS.setdefault(model, OrderedDict())
    key = (batch, cache_len, mode)
    decoder = store.pop(key, None)
    if decoder is None or not decoder.matches(model):
        decoder = None  # drop the stale one before allocating a new cache
        while len(store) >= _MAX_GRAPHS_PER_MODEL:
            store.popitem(last=False)
        decoder = _StaticDecoder(model, batch, cache_len, mode)
    store[key] = decoder  # most recently used last
    return decoder


# ----------------------------------------------------------------------------- helpers
def _forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
             cache: dict, last_only: bool = False) -> torch.Tensor:
    """One forward with a KV cache ({_cache_arg(model): cache}) -> logits of the last position,
    [B, V]."""
    kwargs = dict(cache)
    if last_only and _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1  # skip the [B, P, V] prompt logits
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs)
    return out.logits[:, -1]


def _cache_arg(model: torch.nn.Module) -> str:
    """The model's KV-cache argument: transformers 5 renamed `past_key_values` to `cache` (the
    old name warns, and goes in 5.40); earlier 5.x releases and remote code know the old one."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether the HF model's forward takes `name` (a peft wrapper passes its keyword arguments
    through to the model it wraps, so that model's forward is the one asked)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return name in inspect.signature(model.forward).parameters


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DeepSpeed engines and DDP hold the HF model in `.module`
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _param_ptrs(model: torch.nn.Module) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in model.parameters())


def _resolve_mode(gen: GenerationConfig, model: torch.nn.Module, device: torch.device) -> str:
    mode = gen.compile
    if mode == "auto":
        mode = "cuda_graphs" if device.type == "cuda" and gen.use_static_cache else "none"
    elif mode != "none" and not gen.use_static_cache:
        raise ValueError(f"generation.compile={mode!r} needs generation.use_static_cache=true")
    elif mode == "cuda_graphs" and device.type != "cuda":
        log.warning("generation.compile=cuda_graphs needs CUDA; model is on %s, running eagerly",
                    device)
        mode = "none"
    if mode != "none" and not static_cache_graphable(model):
        if gen.compile != "auto":
            raise ValueError(f"generation.compile={mode!r}: this model's cache has sliding-window "
                             "layers, which cannot be replayed from a graph; use compile: none")
        mode = "none"
    return mode


def _device_generator(generator: torch.Generator | None,
                      device: torch.device) -> torch.Generator | None:
    """Sampling noise is drawn on the model's device; seed a generator there from the given one."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """eval() for the duration (no dropout), then restore each submodule's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def static_cache_graphable(model: torch.nn.Module) -> bool:
    """True when every layer of the model's StaticCache is a plain full-attention StaticLayer.

    Sliding-window layers keep a host-side counter that a captured graph would freeze.
    """
    cache = StaticCache(config=_unwrap(model).config, max_cache_len=8)
    return all(type(layer) is StaticLayer for layer in cache.layers)
