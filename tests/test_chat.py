"""stage=chat: a real terminal session (pexpect), scripted use, streaming and context trimming.

Greedy decoding makes the replies reproducible, so the interactive, the stdin and the in-process
answers to the same first message must be identical.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pexpect
import pytest

from rlhf_exp.errors import UserError
from rlhf_exp.stages.chat import Chat
from tests.conftest import ROOT, compose

GREEDY = ["chat.generation.do_sample=false", "chat.generation.max_new_tokens=16"]
FIRST, SECOND = "sort:52813=", "sort:907="


@pytest.fixture(scope="module")
def chat(sft_run) -> Chat:
    return Chat(compose("stage=chat", f"chat.policy={sft_run['run_dir']}", *GREEDY))


def test_reply_streams_token_by_token(chat):
    class Chunks(io.StringIO):
        def __init__(self):
            super().__init__()
            self.chunks: list[str] = []

        def write(self, text):
            self.chunks.append(text)
            return super().write(text)

    out = Chunks()
    chat.history.clear()
    answer = chat.reply(FIRST, out=out)
    assert answer and out.getvalue() == answer + "\n"
    # the tiny tokenizer has one character per token: one write per generated character
    assert len([c for c in out.chunks if c]) >= len(answer) >= 2
    assert chat.history == [(FIRST, answer)]
    # the trained policy answers in the task's alphabet (the base model babbles ASCII)
    assert set(answer) <= set("0123456789")


def test_history_is_trimmed_oldest_first(chat):
    chat.history[:] = [(f"sort:{i}{i}{i}=", f"{i}{i}{i}") for i in range(1, 9)]
    full = chat._render(chat.history, FIRST)
    budget = chat.budget
    try:
        chat.budget = len(full) - 1  # one token too many: the oldest turn must go
        ids = chat.prompt_ids(FIRST)
        assert ids == chat._render(chat.history[1:], FIRST)
        chat.budget = 5  # not even the message fits: keep its end
        ids = chat.prompt_ids(FIRST)
        assert ids == chat._render([], FIRST)[-5:]
    finally:
        chat.budget = budget
        chat.history.clear()
    # the real budget: the model's context minus the reply
    assert budget == chat.model.config.max_position_embeddings - 16


def test_terminal_session_two_turns_reset_quit(chat, sft_run, tmp_path):
    chat.history.clear()
    expected_first = chat.reply(FIRST, out=io.StringIO())
    expected_second = chat.reply(SECOND, out=io.StringIO())  # answered with FIRST in context
    chat.history.clear()
    child = pexpect.spawn(sys.executable, ["-m", "rlhf_exp", "stage=chat",
                                           f"chat.policy={sft_run['run_dir']}", *GREEDY,
                                           f"hydra.run.dir={tmp_path}"],
                          cwd=str(ROOT), env=dict(os.environ), encoding="utf-8", timeout=180)
    try:
        child.expect("you> ")
        child.sendline(FIRST)
        child.expect(r"bot> (.*)\r\n")
        assert child.match.group(1) == expected_first
        child.expect("you> ")
        child.sendline(SECOND)
        child.expect(r"bot> (.*)\r\n")
        assert child.match.group(1) == expected_second
        child.expect("you> ")
        child.sendline("/reset")
        child.expect(r"\(history cleared\)")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "DeepSpeed" not in child.before and "Loading" not in child.before


def test_scripted_prompt_from_stdin_prints_only_the_answer(chat, sft_run, tmp_path):
    chat.history.clear()
    expected = chat.reply(FIRST, out=io.StringIO())
    chat.history.clear()
    proc = subprocess.run([sys.executable, "-m", "rlhf_exp", "stage=chat",
                           f"chat.policy={sft_run['run_dir']}", *GREEDY,
                           f"hydra.run.dir={tmp_path}"], input=FIRST + "\n", cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == expected + "\n"


@pytest.mark.slow
def test_readme_prompt_as_typed_gives_the_same_answer(chat, sft_run, tmp_path, rlhf_exp):
    """`chat.prompt="sort:52813="` as a shell passes it (quotes removed) through the CLI."""
    chat.history.clear()
    expected = chat.reply(FIRST, out=io.StringIO())
    chat.history.clear()
    proc = rlhf_exp("stage=chat", f"chat.policy={sft_run['run_dir']}", *GREEDY,
                    f"chat.prompt={FIRST}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == expected + "\n"


def test_missing_policy_is_a_user_error(tmp_path):
    """(The CLI turns a UserError into one line and exit 2; tests/test_eval.py runs that path.)"""
    with pytest.raises(UserError, match=r"^chat\.policy=.*nope"):
        Chat(compose("stage=chat", f"chat.policy={tmp_path / 'nope'}"))
