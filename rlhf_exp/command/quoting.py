"""Text values on the command line, as typed: quote what Hydra's override grammar would misread.

The shell removes the quotes a user types, so `chat.prompt="sort:52813="` reaches Hydra as
`chat.prompt=sort:52813=`, which its grammar rejects (`=`, `!`, `{`, `,` and friends are
syntax there). The dispatcher passes every override through `quote_text_values` first:

- free-text keys (FREE_TEXT: a prompt, a system message, a template) always take the text as
  typed, commas, braces, `${...}` and quotes included; a value already quoted for Hydra
  ('...' or "...") and `null` keep their Hydra meaning;
- any other string-typed key (a path, a name) is quoted only when Hydra cannot parse it.

Everything else (numbers, lists, sweeps, interpolations Hydra can parse) passes unchanged.
"""

from __future__ import annotations

import dataclasses
import re
import typing

FREE_TEXT = ("chat.prompt", "chat.system", "model.prompt_template")


def hydra_quote(text: str) -> str:
    """`text` as a single-quoted Hydra value that resolves to exactly `text`."""
    # OmegaConf: `${` starts an interpolation; `\${` is a literal one, and backslashes right
    # before it must be doubled to stay backslashes
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    # Hydra: inside '...', backslashes escape only a quote or the closing end
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"'{text}'"


def _parses(line: str):
    """The parsed override, or None when Hydra's grammar rejects the line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides([line])[0]
    except Exception:
        return None


def _field_type(key: str) -> typing.Any:
    """The schema type of a dotted key (rlhf_exp/config/schema.py RootConfig), or None if unknown.
    List items (`data_mix.sources.0.path`) and dict values (`eval.policies.sft`) included."""
    from rlhf_exp.config import RootConfig

    tp: typing.Any = RootConfig
    for part in key.split("."):
        tp = _strip_optional(tp)
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return None
            tp = hints[part]
        elif typing.get_origin(tp) is list and part.isdigit():
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return _strip_optional(tp)


def _strip_optional(tp: typing.Any) -> typing.Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp) and len(args) == 1:
        return args[0]
    return tp


def quote_text_values(argv: list[str]) -> list[str]:
    """argv with the values of text keys quoted where Hydra would misread them (module doc)."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        name = key.lstrip("+~")
        if arg.startswith("-") or not eq or name.startswith(("hydra.", "hydra/")):
            out.append(arg)
            continue
        if name in FREE_TEXT:
            parsed = _parses(arg) if value[:1] in ("'", '"') else None
            keep = value == "null" or (parsed is not None and isinstance(parsed.value(), str))
            out.append(arg if keep else f"{key}={hydra_quote(value)}")
        elif _parses(arg) is None and _field_type(name) is str:
            out.append(f"{key}={hydra_quote(value)}")
        else:
            out.append(arg)
    return out
