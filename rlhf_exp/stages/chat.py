"""Chat with a policy in the terminal: multi-turn, replies streamed as tokens arrive.

Run: rlhf-exp stage=chat chat.policy=<run dir, checkpoint or artifact>     (interactive)
     rlhf-exp stage=chat chat.policy=<...> chat.prompt="sort:52813="     (one answer, exit 0)
     echo "sort:52813=" | rlhf-exp stage=chat chat.policy=<...>          (stdin not a terminal)

chat.prompt takes the text as typed (rlhf_exp/command/quoting.py). Piped stdin must be UTF-8 text
without control characters; anything else stops with one line before the model loads.

Reads `cfg.chat` (conf/chat/default.yaml); no policy = the base model. The conversation is
rendered as training renders a row's turns (data.tokenize.render_messages): the tokenizer's chat
template when it has one, otherwise `model.prompt_template` around each user turn with the
replies in between, so one turn is exactly the prompt SFT, reward and PPO saw for that text.
The history is trimmed, oldest turns first, to the model's context (max positions minus
chat.generation.max_new_tokens). Typing `/reset` clears the history, `/quit` (or Ctrl-D) exits,
Ctrl-C stops a reply. Scripted use prints only the answer on stdout; notes go to stderr. No W&B
run, no DeepSpeed: one process, inference only.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers.generation.streamers import BaseStreamer

from rlhf_exp.command import stdin_prompt
from rlhf_exp.data.tokenize import cut_prompt, messages_ids
from rlhf_exp.errors import UserError
from rlhf_exp.modeling import models
from rlhf_exp.training import dist, runtime
from rlhf_exp.training.tracking import resolve_init

HELP = "commands: /reset clears the history, /quit exits (also Ctrl-D); Ctrl-C stops a reply"


def _note(text: str) -> None:
    """Status lines go to stderr, so stdout holds only the conversation (or the answer)."""
    print(text, file=sys.stderr, flush=True)


class StreamPrinter(BaseStreamer):
    """Prints a reply as HF `generate` produces it, token by token. The whole reply is decoded
    each time and only the new suffix printed: a token may complete a multi-byte character, so
    text ending in the replacement character waits for the next token."""

    def __init__(self, tokenizer, out=None) -> None:
        # sys.stdout looked up now, not at import: a caller may have replaced it since
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


class Chat:
    """A loaded policy, its tokenizer and the conversation so far."""

    def __init__(self, cfg: DictConfig) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # no load reports or generation hints in the chat
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore")
        self.cfg, self.gen = cfg.chat, cfg.chat.generation
        self.device = dist.device_for(cfg.hardware.device)
        path = self._policy_path(cfg)
        self.tokenizer = models.load_tokenizer(path, cfg.model)
        self.model = models.load_causal_lm(path, self.tokenizer, cfg.model,
                                           cfg.hardware.precision).to(self.device).eval()
        self.template = cfg.model.prompt_template
        context = getattr(self.model.config, "max_position_embeddings", None) or \
            self.tokenizer.model_max_length
        self.budget = context - self.gen.max_new_tokens  # prompt tokens that still fit
        if self.budget < 1:
            raise UserError(f"chat.generation.max_new_tokens={self.gen.max_new_tokens} leaves no "
                            f"room for a prompt in the model's context of {context} tokens")
        self.history: list[tuple[str, str]] = []  # (user, assistant) turns
        self.path = path
        torch.manual_seed(cfg.seed)  # reproducible scripted answers

    @staticmethod
    def _policy_path(cfg: DictConfig) -> str:
        ref = cfg.chat.policy
        if not ref:
            return models.resolve_base_path(cfg.model)
        try:
            return str(resolve_init(ref, None)[0])
        except FileNotFoundError as exc:
            mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
            if cfg.logger.name != "wandb" or mode != "online":
                raise UserError(f"chat.policy={ref}: {exc}") from None
        import wandb  # online: fetch the artifact without starting a run (chat logs nothing)

        return wandb.Api().artifact(ref, type="model").download()

    # ------------------------------------------------------------------------- prompt
    def _render(self, turns: list[tuple[str, str]], user: str) -> list[int]:
        """Token ids of the conversation `turns` followed by the new user message, rendered as
        training renders a row's turns (data.tokenize.messages_ids): one turn is exactly the
        prompt SFT, reward and PPO saw for that text."""
        messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        for u, a in turns:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": user})
        return messages_ids(self.tokenizer, messages, self.template)

    def prompt_ids(self, user: str) -> list[int]:
        """The prompt for `user`, dropping the oldest turns until it fits the context; a single
        message longer than the context keeps its end (and a leading BOS)."""
        turns = list(self.history)
        ids = self._render(turns, user)
        while len(ids) > self.budget and turns:
            turns.pop(0)
            ids = self._render(turns, user)
        if len(turns) < len(self.history):
            _note(f"(context: dropped the {len(self.history) - len(turns)} oldest turn(s))")
        if len(ids) > self.budget:
            _note(f"(context: the message is cut to its last {self.budget} tokens)")
            ids = cut_prompt(self.tokenizer, ids, self.budget)
        return ids

    # ------------------------------------------------------------------------- reply
    def reply(self, user: str, out=None) -> str:
        """Stream the answer to `user` to `out` (default: sys.stdout); the turn joins the
        history."""
        ids = torch.tensor([self.prompt_ids(user)], device=self.device)
        g = self.gen
        sampling = {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p,
                    "top_k": g.top_k} if g.do_sample else {"do_sample": False}
        extra = {"cache_implementation": "static"} if g.use_static_cache else {}
        with torch.no_grad():
            out_ids = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                max_new_tokens=g.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id, streamer=StreamPrinter(self.tokenizer,
                                                                                  out),
                **sampling, **extra)
        answer = self.tokenizer.decode(out_ids[0, ids.shape[1]:], skip_special_tokens=True)
        self.history.append((user, answer))
        return answer

    def loop(self) -> None:
        """The interactive session."""
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        _note(f"chat: {self.path}  ({HELP})")
        while True:
            try:
                user = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return
            except UnicodeDecodeError:  # a terminal sending bytes that are not UTF-8
                print("(that was not UTF-8 text; type it again)", flush=True)
                continue
            text = user.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                return
            if text == "/reset":
                self.history.clear()
                print("(history cleared)", flush=True)
                continue
            if text.startswith("/"):
                print(f"unknown command {text!r}; {HELP}", flush=True)
                continue
            print("bot> ", end="", flush=True)
            try:
                self.reply(user)
            except KeyboardInterrupt:  # stop this reply; it does not join the history
                print("\n(stopped)", flush=True)


def run(cfg: DictConfig, run_dir: Path) -> runtime.StageResult:
    scripted = cfg.chat.prompt
    if scripted is None and not sys.stdin.isatty():
        # read and checked (UTF-8, no control characters) by preflight, before the model loads
        scripted = stdin_prompt.piped_prompt()
    chat = Chat(cfg)
    if scripted is not None:
        chat.reply(str(scripted))
    else:
        chat.loop()
    return runtime.StageResult("chat", str(run_dir))
