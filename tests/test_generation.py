"""rlhf_exp.rl.generation on CPU with tiny random models (Llama, OPT, Qwen2)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlhf_exp.rl.generation import GenerationConfig, _sample, _StaticDecoder, generate

PAD, EOS, VOCAB = 0, 2, 50
PROMPT_LENS = [7, 3, 5, 1]  # real tokens per row; left-padded to 7


def _tiny(kind: str = "llama", **over) -> torch.nn.Module:
    torch.manual_seed(0)
    # initializer_range 0.2 (not 0.02) so logits are far apart and greedy has no near-ties
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
    if kind == "llama":
        cfg = LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2,
                          initializer_range=0.2, **over)
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2,
                          initializer_range=0.2, **over)
        model = Qwen2ForCausalLM(cfg)
    else:
        cfg = OPTConfig(**common, ffn_dim=128, word_embed_proj_dim=64, init_std=0.2, **over)
        model = OPTForCausalLM(cfg)
    return model.eval()


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return _tiny("llama")


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    P = max(PROMPT_LENS)
    ids = torch.randint(3, VOCAB, (len(PROMPT_LENS), P), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(PROMPT_LENS):  # left padding
        ids[row, : P - n] = PAD
        mask[row, : P - n] = 0
    return ids, mask


def _greedy(**kw) -> GenerationConfig:
    return GenerationConfig(do_sample=False, **kw)


def _run(model, gen, eos=EOS, generator=None):
    ids, mask = _prompts()
    return generate(model, ids, mask, gen, eos_token_id=eos, pad_token_id=PAD, generator=generator)


def _eos_mid_response(model) -> tuple[int, torch.Tensor]:
    """An EOS id that greedy decoding emits mid-response in some rows, and the no-EOS responses."""
    free = _run(model, _greedy(max_new_tokens=20, use_static_cache=False), eos=-1).responses
    eos = int(free[0, 4])  # row 0 stops at step 4 at the latest
    return eos, free


# ----------------------------------------------------------------------------- greedy vs HF
@pytest.mark.parametrize("kind", ["llama", "opt", "qwen2"])
@pytest.mark.parametrize("static", [False, True])
def test_greedy_matches_hf_generate(kind, static):
    model = _tiny(kind)
    eos, _ = _eos_mid_response(model)
    ids, mask = _prompts()
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                         eos_token_id=eos, pad_token_id=PAD)[:, ids.shape[1]:]
    out = _run(model, _greedy(max_new_tokens=20, use_static_cache=static), eos=eos)
    assert out.responses.shape == (4, 20)
    # HF stops once all rows are done; beyond that ours must be pad
    assert torch.equal(out.responses[:, : ref.shape[1]], ref)
    assert (out.responses[:, ref.shape[1]:] == PAD).all()
    assert (ref == eos).any(), "the test should exercise EOS"


def test_static_cache_matches_dynamic_cache(llama):
    dyn = _run(llama, _greedy(max_new_tokens=24, use_static_cache=False), eos=-1)
    sta = _run(llama, _greedy(max_new_tokens=24, use_static_cache=True, compile="none"), eos=-1)
    assert torch.equal(dyn.sequences, sta.sequences)
    assert len(set(dyn.responses.flatten().tolist())) > 5  # not a degenerate repeat


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("knobs", [dict(top_k=1, temperature=0.7), dict(top_p=1e-6),
                                   dict(top_k=1, top_p=0.5, temperature=3.0)])
def test_sampling_with_one_candidate_equals_greedy(llama, knobs):
    greedy = _run(llama, _greedy(max_new_tokens=16), eos=-1)
    sampled = _run(llama, GenerationConfig(max_new_tokens=16, do_sample=True, **knobs), eos=-1,
                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled.sequences, greedy.sequences)


def test_generator_seed_reproducible_and_different_seeds_differ(llama):
    gen = GenerationConfig(max_new_tokens=16, do_sample=True)

    def sample(seed):
        return _run(llama, gen, eos=-1, generator=torch.Generator().manual_seed(seed)).sequences

    a, b, c = sample(7), sample(7), sample(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, _run(llama, _greedy(max_new_tokens=16), eos=-1).sequences)


def test_sample_filters_and_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4).contiguous()
    g = torch.Generator().manual_seed(0)

    def freq(**kw):
        toks = _sample(logits, GenerationConfig(do_sample=True, **kw), g)
        return torch.bincount(toks, minlength=4).float() / toks.numel()

    assert torch.allclose(freq(), probs, atol=0.015)
    top2 = probs[:2] / probs[:2].sum()
    assert torch.allclose(freq(top_k=2), torch.cat([top2, torch.zeros(2)]), atol=0.015)
    # top_p 0.6: 0.5 alone is short of 0.6, so {0, 1} are kept
    assert torch.allclose(freq(top_p=0.6), torch.cat([top2, torch.zeros(2)]), atol=0.015)
    # temperature 0.5 squares the probabilities (then renormalises)
    sharp = probs**2 / (probs**2).sum()
    assert torch.allclose(freq(temperature=0.5), sharp, atol=0.015)


# ----------------------------------------------------------------------------- EOS and shapes
@pytest.mark.parametrize("static", [False, True])
def test_eos_masks_and_padding(llama, static):
    eos, free = _eos_mid_response(llama)
    out = _run(llama, _greedy(max_new_tokens=20, use_static_cache=static), eos=eos)
    ids, mask = _prompts()
    stopped = 0
    for row in range(4):
        hits = (free[row] == eos).nonzero().flatten().tolist()
        n = hits[0] + 1 if hits else 20  # tokens up to and including the first EOS
        stopped += bool(hits) and n < 20
        expected = torch.cat([free[row, :n], torch.full((20 - n,), PAD)])
        assert torch.equal(out.responses[row], expected)
        assert out.response_mask[row].tolist() == [1] * n + [0] * (20 - n)
    assert stopped >= 1, "some row should stop early"
    assert out.prompt_len == 7
    assert torch.equal(out.sequences[:, :7], ids)
    assert torch.equal(out.attention_mask, torch.cat([mask, out.response_mask], dim=1))


@pytest.mark.parametrize("n", [1, 5, 13])
def test_max_new_tokens_respected(llama, n):
    out = _run(llama, _greedy(max_new_tokens=n), eos=-1)
    assert out.sequences.shape == (4, 7 + n)
    assert out.response_mask.shape == (4, n) and bool(out.response_mask.all())


@pytest.mark.parametrize("static", [False, True])
def test_stops_early_when_all_rows_done(static):
    model = _tiny("llama")
    model.model.norm.weight.data.zero_()  # all logits 0: argmax is token 0 for every row
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    out = _run(model, _greedy(max_new_tokens=10, use_static_cache=static, compile="none"), eos=0)
    assert len(calls) == 1  # the prefill only: every row emitted EOS at step 0
    assert out.responses[:, 0].eq(0).all() and out.responses[:, 1:].eq(PAD).all()
    assert out.response_mask.tolist() == [[1] + [0] * 9] * 4


# ----------------------------------------------------------------------------- model handling
def test_eval_mode_during_generation_and_flags_restored():
    model = _tiny("llama", attention_dropout=0.9)
    ref = _run(model, _greedy(max_new_tokens=12), eos=-1).sequences
    model.train()
    model.model.layers[0].eval()  # a submodule deliberately left in eval
    out = _run(model, _greedy(max_new_tokens=12), eos=-1).sequences
    assert torch.equal(out, ref)  # dropout 0.9 would change the tokens
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training
    assert not out.requires_grad and not out.is_inference()


def test_unwraps_engine_module(llama):
    class Engine(torch.nn.Module):  # stands in for a DeepSpeed engine
        def __init__(self, module):
            super().__init__()
            self.module = module

    ref = _run(llama, _greedy(max_new_tokens=8), eos=-1).sequences
    assert torch.equal(_run(Engine(llama), _greedy(max_new_tokens=8), eos=-1).sequences, ref)


def test_right_padding_rejected(llama):
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(llama, ids.flip(1), mask.flip(1), _greedy(), eos_token_id=EOS, pad_token_id=PAD)


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1),
                                 dict(compile="fast"), dict(max_new_tokens=0)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


def test_decode_step_traces_without_graph_breaks(llama):
    """What CUDA-graph capture needs: no host sync or data-dependent Python in the decode step.

    dynamo with fullgraph=True raises on either; backend="eager" keeps this fast on CPU.
    """
    model = copy.deepcopy(llama)
    ids, mask = _prompts()
    dec = _StaticDecoder(model, batch=4, cache_len=32, mode="none")
    with torch.no_grad():
        dec.prefill(ids, mask, (mask.cumsum(-1) - 1).clamp_min(0))
        dec.ids.fill_(5)
        dec.pos.copy_(mask.sum(-1, keepdim=True))
        traced = torch.compile(dec._decode_forward, backend="eager", fullgraph=True)
        logits = traced(model)
    assert logits.shape == (4, VOCAB) and torch.isfinite(logits).all()
