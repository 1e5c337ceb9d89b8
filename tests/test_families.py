"""The tiny model families (model=tiny-llama, tiny-qwen2, tiny-opt, tiny-gpt2), untrained:
their tokenizer conventions, reload through the HF Auto classes, reward pooling and greedy
generation equal to HF's with left padding, and one rendering of a row everywhere.

Every stage on every family (training) is in tests/test_families_e2e.py.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_exp.data import build_stage_data
from rlhf_exp.data.tokenize import (
    collate_pairs,
    pad_left,
    pad_right,
    prompt_ids,
    render_row,
    tokenize_pairs,
    tokenize_sft,
)
from rlhf_exp.modeling import models
from rlhf_exp.rl import evaluation, rollout, scoring
from rlhf_exp.rl.generation import GenerationConfig, generate
from rlhf_exp.stages.chat import Chat
from rlhf_exp.stages.reward import pair_scores
from rlhf_exp.training import checkpoint
from tests.conftest import compose

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-opt", "tiny-gpt2"]
SAMPLES = "pkg://rlhf_exp/data/examples/hub_samples"
# data_mix presets whose hub schema has a shipped sample (under the preset's name)
HUB_PRESETS = ["hh_rlhf", "rm_static", "ultrafeedback_binarized", "trl_conversational"]


class Family:
    """One family's base model dir, config and tokenizer (as the stages load them)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cfg = compose(f"model={name}", "stage=sft")
        self.path = models.resolve_base_path(self.cfg.model)
        self.tokenizer = models.load_tokenizer(self.path, self.cfg.model)
        self.template = self.cfg.model.prompt_template

    def causal_lm(self):
        return models.load_causal_lm(self.path, self.tokenizer, self.cfg.model).eval()

    def reward_model(self):
        torch.manual_seed(0)  # the score head is new: seeded
        return models.load_reward_model(self.path, self.tokenizer, self.cfg.model).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> Family:
    return Family(request.param)


@functools.cache
def _hub_rows(preset: str, stage: str = "reward") -> list[dict]:
    cfg = compose(f"data_mix={preset}", f"data_mix.sources.0.path={SAMPLES}/{preset}")
    return build_stage_data(cfg.data_mix, stage, cfg.seed).train


# ----------------------------------------------------------------------------- conventions
def test_tokenizer_conventions(family):
    tok = family.tokenizer
    saved = AutoTokenizer.from_pretrained(family.path)  # as saved, before our loader's pad
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    with_special = tok("Hi", add_special_tokens=True)["input_ids"]
    conventions = {
        "tiny-opt": dict(bos="</s>", eos="</s>", pad="<pad>", pad_id=1, adds_bos=True),
        "tiny-gpt2": dict(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, adds_bos=False),
        "tiny-qwen2": dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", adds_bos=False),
        "tiny-llama": dict(bos="<s>", eos="</s>", pad=None, adds_bos=True),
    }[family.name]
    assert (saved.bos_token, saved.eos_token, saved.pad_token) == (
        conventions["bos"], conventions["eos"], conventions["pad"])
    assert (with_special[0] == tok.bos_token_id) == conventions["adds_bos"]
    if "pad_id" in conventions:
        assert saved.pad_token_id == conventions["pad_id"]
    if conventions["pad"] is None:  # our loader adds a distinct pad; the model grows to fit it
        assert tok.pad_token == models.PAD and len(tok) == len(saved) + 1
        assert family.causal_lm().get_input_embeddings().weight.shape[0] == len(tok)
    assert bool(tok.chat_template) == (family.name == "tiny-qwen2")
    # digits one per token (the sort task stays learnable); text round-trips, bytes included
    digits = tok("sort:52813=", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]).strip() for i in digits[-6:]] == list("52813=")
    text = "Naïve café, 12358 \n\nHuman: ok"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert 300 <= len(saved) <= 1024


def test_tiny_builds_are_deterministic(family, tmp_path, monkeypatch):
    """A second build from scratch (another cache) gives the same tokenizer and weights."""
    from safetensors.torch import load_file

    monkeypatch.setenv("RLHF_EXP_CACHE", str(tmp_path))
    again = models.resolve_base_path(family.cfg.model)
    assert again != family.path and again.split("/")[-1] == family.path.split("/")[-1]
    for name in ("tokenizer.json", "config.json"):
        assert (tmp_path / "models" / again.split("/")[-1] / name).read_text() == \
            open(f"{family.path}/{name}").read()
    a, b = load_file(f"{again}/model.safetensors"), load_file(f"{family.path}/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- reload
def test_checkpoints_reload_with_auto_classes(family, tmp_path):
    """A checkpoint saved as the stages save it (checkpoint.save_hf) loads with the Auto classes
    (model and tokenizer, pad included) and gives the same logits / scores.

    Not bit-exact: the reloaded weights are memory-mapped from the safetensors file, so they sit
    at another address alignment than the in-memory ones (e.g. 56 vs 0 mod 64), and the AVX2 /
    AVX-512 dot-product kernels then split the reduction differently (1.5e-8 apart on the score
    head). fp32 tolerances (a few ulp of the values) cover summation order, not wrong weights."""
    ids = torch.tensor([family.tokenizer("sort:52813=12358")["input_ids"]])
    lm = family.causal_lm()
    checkpoint.save_hf(lm, family.tokenizer, tmp_path / "lm")
    auto_tok = AutoTokenizer.from_pretrained(tmp_path / "lm")
    assert auto_tok.get_vocab() == family.tokenizer.get_vocab()
    assert auto_tok.pad_token_id == family.tokenizer.pad_token_id
    auto_lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    with torch.no_grad():
        torch.testing.assert_close(auto_lm(ids).logits, lm(ids).logits, rtol=1e-5, atol=1e-6)
    rm = family.reward_model()
    checkpoint.save_hf(rm, family.tokenizer, tmp_path / "rm")
    auto_rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert auto_rm.config.pad_token_id == family.tokenizer.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(auto_rm(ids).logits, rm(ids).logits, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- pooling
def test_reward_scores_equal_hf_pooling_left_and_right_padded(family, tmp_path):
    """scoring.sequence_scores / token_values and the reward stage's pair_scores read the score
    HF's AutoModelForSequenceClassification pools, for right- and left-padded batches alike."""
    tok = family.tokenizer
    checkpoint.save_hf(family.reward_model(), tok, tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ours = models.load_reward_model(str(tmp_path / "rm"), tok, family.cfg.model).eval()
    rows = _hub_rows("hh_rlhf")[:4]
    seqs = [prompt_ids(tok, r, family.template, 48) + tok(r["chosen"], add_special_tokens=False)
            ["input_ids"] + [tok.eos_token_id] for r in rows]
    assert len({len(s) for s in seqs}) > 1  # the batch really is padded
    with torch.no_grad():
        alone = torch.cat([hf(torch.tensor([s])).logits[:, 0] for s in seqs])  # no padding
        right_ids, right_mask = pad_right(seqs, tok.pad_token_id), pad_right(
            [[1] * len(s) for s in seqs], 0)
        left_ids, left_mask = pad_left(seqs, tok.pad_token_id), pad_left(
            [[1] * len(s) for s in seqs], 0)
        hf_right = hf(right_ids, attention_mask=right_mask).logits[:, 0]
        torch.testing.assert_close(hf_right, alone, rtol=1e-5, atol=1e-5)
        for ids, mask in ((right_ids, right_mask), (left_ids, left_mask)):
            torch.testing.assert_close(scoring.sequence_scores(ours, ids, mask), alone,
                                       rtol=1e-5, atol=1e-5)
            values = scoring.token_values(ours, ids, mask)
            torch.testing.assert_close(values.gather(1, scoring.last_index(mask)[:, None])[:, 0],
                                       alone, rtol=1e-5, atol=1e-5)
            chosen, rejected = pair_scores(ours, {"input_ids": torch.cat([ids, ids]),
                                                  "attention_mask": torch.cat([mask, mask])})
            torch.testing.assert_close(chosen, alone, rtol=1e-5, atol=1e-5)
        # the same left-padded batch without positions counted from the mask scores differently
        # on an absolute-position model: why scoring passes them
        naive = hf(left_ids, attention_mask=left_mask).logits[:, 0]
        if family.name == "tiny-gpt2":
            assert not torch.allclose(naive, alone, atol=1e-4)


# ----------------------------------------------------------------------------- generation
def test_greedy_generation_equals_hf_generate_left_padded(family):
    """Our decode loop, greedy, on left-padded prompts of real rows = HF generate, token for
    token, and without transformers' `past_key_values` FutureWarning."""
    tok = family.tokenizer
    model = family.causal_lm()
    with torch.no_grad():  # spread the logits so greedy has no float near-ties
        for p in model.get_output_embeddings().parameters():
            p.mul_(8.0)
    rows = _hub_rows("trl_conversational", "ppo")[:4]
    ids, mask = evaluation.encode_prompts(tok, rows, family.template, 48)
    assert not bool(mask[:, 0].all())  # left padding present
    R, eos, pad = 12, tok.eos_token_id, tok.pad_token_id
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=R,
                            do_sample=False, eos_token_id=eos, pad_token_id=pad)
    hf = hf[:, ids.shape[1]:]  # HF stops once every row has its EOS; ours pads to R
    for static in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            ours = generate(model, ids, mask, GenerationConfig(max_new_tokens=R, do_sample=False,
                                                               use_static_cache=static),
                            eos_token_id=eos, pad_token_id=pad).responses
        assert torch.equal(ours[:, :hf.shape[1]], hf), static
        assert (ours[:, hf.shape[1]:] == pad).all()
    # under a fresh LoRA wrapper (B = 0: the same function), as PPO's actor with model.lora
    lora = models.apply_lora(model, compose("model.lora.enabled=true").model.lora)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ours = generate(lora, ids, mask, GenerationConfig(max_new_tokens=R, do_sample=False),
                        eos_token_id=eos, pad_token_id=pad).responses
    assert torch.equal(ours[:, :hf.shape[1]], hf)


# ----------------------------------------------------------------------------- rendering
def _format_rows() -> dict[str, dict]:
    """One row per data format (several per hub schema: a single turn and a multi-turn one)."""
    rows = {}
    for preset in HUB_PRESETS:
        got = _hub_rows(preset)
        rows[f"{preset}/1turn"] = next(r for r in got if len(r["messages"]) == 1)
        multi = [r for r in got if len(r["messages"]) > 1]
        if multi:
            rows[f"{preset}/multiturn"] = multi[0]
    synthetic = compose("data_mix.sources.0.synthetic.num_examples=200")
    rows["synthetic/preference"] = build_stage_data(synthetic.data_mix, "reward", 0).train[0]
    return rows


@pytest.fixture(scope="module")
def format_rows() -> dict[str, dict]:
    return _format_rows()


def test_one_rendering_of_a_row_everywhere(family, format_rows):
    """SFT features, reward features, PPO rollout prompts (prompt_ids), evaluation prompts, the
    reward scoring of a response and chat's prompt for the same conversation are the same
    tokens; role markers appear once per turn."""
    tok, template = family.tokenizer, family.template
    chat = Chat(compose("stage=chat", f"model={family.name}"))
    rm = family.reward_model()
    P, L = 96, 160
    for name, row in format_rows.items():
        expected = prompt_ids(tok, row, template, P)
        (sft,), _ = tokenize_sft([row], tok, template, P, L)
        n_prompt = sft["labels"].count(-100)
        assert sft["input_ids"][:n_prompt] == expected, name
        (pair,), _ = tokenize_pairs([row], tok, template, P, L)
        assert pair["chosen_ids"][:n_prompt] == expected, name
        assert pair["rejected_ids"][:n_prompt] == expected, name
        if row["response"] == row["chosen"]:
            assert pair["chosen_ids"] == sft["input_ids"], name
        ids, mask = evaluation.encode_prompts(tok, [row], template, P)
        assert ids[0].tolist() == expected, name
        # the eval/PPO reward scoring of the chosen reply = the reward stage's score of the pair
        with torch.no_grad():
            batch = collate_pairs([pair], tok.pad_token_id)
            stage_score = pair_scores(rm, batch)[0]
            eval_score = evaluation.reward_scores(rm, tok, [row], [row["chosen"]], [True],
                                                  template=template, max_prompt_len=P,
                                                  batch_size=4, device=torch.device("cpu"))
        assert eval_score[0] == pytest.approx(float(stage_score), abs=1e-5), name
        # chat: the same conversation typed in (history, then the last user message)
        turns = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        history = [(turns[i]["content"], turns[i + 1]["content"])
                   for i in range(0, len(turns) - 1, 2)]
        assert chat._render(history, turns[-1]["content"]) == expected, name
        # role markers once per user turn, never twice
        text = tok.decode(expected)
        users = sum(m["role"] == "user" for m in turns)
        if family.name == "tiny-qwen2":
            assert text.count("<|im_start|>user") == users and "Human:" not in text, name
        elif family.name == "tiny-llama":
            assert text.count("[INST]") == users and "Human:" not in text, name
        elif family.name == "tiny-opt":
            assert text.count("Human:") == users, name
        else:  # bare template: HH markers for a conversation, none for one turn
            assert text.count("Human:") == (users if len(turns) > 1 else 0), name


def test_rollout_reward_scores_equal_the_reward_stage(family, format_rows):
    """PPO's and GRPO's reward (rollout.reward_model_scores) of a rollout laid out as generation
    lays it out (left-padded prompt, then the reply and EOS, right-padded) = the reward stage's
    score of that chosen pair, for every data format at once in one batch."""
    tok, template = family.tokenizer, family.template
    rm = family.reward_model()
    rows = list(format_rows.values())
    pairs, _ = tokenize_pairs(rows, tok, template, 96, 160)
    prompts = [prompt_ids(tok, row, template, 96) for row in rows]
    replies = [p["chosen_ids"][len(q):] for p, q in zip(pairs, prompts)]
    assert all(p["chosen_ids"][:len(q)] == q for p, q in zip(pairs, prompts))
    left, right = pad_left(prompts, tok.pad_token_id), pad_right(replies, tok.pad_token_id)
    mask = torch.cat([pad_left([[1] * len(q) for q in prompts], 0),
                      pad_right([[1] * len(r) for r in replies], 0)], dim=1)
    traj = rollout.Trajectory(rows=rows, sequences=torch.cat([left, right], dim=1),
                              attention_mask=mask, position_ids=scoring.position_ids(mask),
                              response_mask=pad_right([[1] * len(r) for r in replies], 0).float(),
                              texts=[""] * len(rows), gen_s=0.0)
    with torch.no_grad():
        ours = rollout.reward_model_scores(rm, traj, micro_batch=3)
        chosen, _ = pair_scores(rm, collate_pairs(pairs, tok.pad_token_id))
    torch.testing.assert_close(ours, chosen, rtol=1e-5, atol=1e-5)


def test_hh_rows_render_as_their_dialogue_with_an_hh_template():
    """An HH row through an HH prompt_template (the OPT presets') is its own dialogue, as
    DeepSpeed-Chat feeds it: the markers are not added a second time."""
    opt = Family("tiny-opt")
    for preset in ("hh_rlhf", "rm_static"):
        for row in _hub_rows(preset)[:10]:
            assert render_row(opt.tokenizer, row, opt.template) == row["prompt"] + " "
