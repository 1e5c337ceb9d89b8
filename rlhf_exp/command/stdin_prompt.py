"""The chat prompt piped on stdin: read and checked once by preflight (before the model loads),
handed to the chat stage. Its own small module so that the stage reads it without importing the
command-line layer (rlhf_exp/command/preflight.py)."""

from __future__ import annotations

import sys

from rlhf_exp.errors import UserError

_PIPED: list[str] = []  # the prompt preflight read from stdin, until the chat stage takes it


def read_piped_prompt(stream) -> str:
    """The chat prompt piped on stdin: UTF-8 text (a BOM is dropped) without control
    characters other than tab and newline, not blank."""
    raw = stream.read()
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"chat: stdin is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start}); pipe a text prompt, or give chat.prompt=...") from None
    from rlhf_exp.config import is_control

    bad = next((i for i, c in enumerate(text) if is_control(c)), None)
    if bad is not None:
        raise UserError(f"chat: stdin holds the control character {text[bad]!r} at offset "
                        f"{bad}; pipe plain text, or give chat.prompt=...")
    if not text.strip():
        raise UserError("chat: stdin is empty and not a terminal; pipe a prompt in or set "
                        "chat.prompt=...")
    return text.strip()


def read_ahead(stream) -> None:
    """Preflight: read and check the piped prompt now, keep it for the chat stage."""
    _PIPED.clear()
    _PIPED.append(read_piped_prompt(stream))


def clear() -> None:
    _PIPED.clear()


def piped_prompt() -> str:
    """For the chat stage: the prompt preflight read from stdin, or stdin read (and checked)
    now when preflight did not run in this process."""
    return _PIPED.pop() if _PIPED else read_piped_prompt(sys.stdin.buffer)
