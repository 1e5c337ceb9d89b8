"""Sources: where rows come from, and how each format maps to the internal row schema.

A source (`data_mix.sources[i]`, SourceConfig) names a place - `kind`: the bundled `synthetic`
task, a `local` .jsonl/.json/.parquet file or a folder of them, or a `hub` dataset loaded with
`datasets` - and a `format`:

    prompt_response  columns prompt, response                 (SFT demonstrations, PPO prompts)
    preference       columns prompt, chosen, rejected          (response optional; else = chosen)
    hh               HH-RLHF dialogue text "\\n\\nHuman: ...\\n\\nAssistant: ...": columns chosen,
                     rejected hold whole transcripts (Anthropic/hh-rlhf), or a `prompt` column
                     holds the dialogue and chosen/rejected only the last reply (Dahoas/rm-static)
    chat             message lists [{role, content}, ...]: columns chosen + rejected (a pair; the
                     last message is the assistant reply), with the prompt's turns in front of it
                     or as a message list in column prompt (TRL's conversational format), or
                     messages (one conversation)
    unpaired         columns prompt, completion, label (bool: desirable or not): TRL's unpaired
                     preference format, for stage=kto (rlhf_exp/data/unpaired.py)

A hub source's `path` is a dataset id, or a local copy of one (see _read_hub_local).

`columns` maps an internal field to the source's column name (e.g. {prompt: question}).
Every row becomes {id, prompt, response, chosen, rejected, source, task} (+ `messages`, the
prompt as a message list, for hh and chat rows so chat templates see the real turns). Bad
data raises DataError naming the file, line and column; nothing is trained before that.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.errors import DataError
from rlhf_exp.tasks import sort_digits

FIELDS = ("prompt", "response", "chosen", "rejected", "messages")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
PKG_PREFIX = "pkg://"


# ----------------------------------------------------------------------------- paths
def launch_dir() -> Path:
    """The directory the user launched from (Hydra's runtime cwd; `hydra.job.chdir` is false, so
    normally also os.getcwd())."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.cwd)
    except Exception:  # outside a Hydra app (tests, scripts)
        pass
    return Path(os.getcwd())


def resolve_path(path: str) -> Path:
    """`pkg://<package>/<file>` -> a file shipped inside that installed package (works from any
    cwd); `~` expanded; relative paths against the launch directory."""
    if path.startswith(PKG_PREFIX):
        import importlib.util

        package, _, rest = path[len(PKG_PREFIX):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"{path}: no installed package {package!r}")
        return Path(list(spec.submodule_search_locations)[0]) / rest
    p = Path(path).expanduser()
    return p if p.is_absolute() else launch_dir() / p


def local_files(path: Path) -> list[Path]:
    """The data files of a local source: the file itself, or a folder's .jsonl/.json/.parquet
    files (recursively, sorted so the row order is reproducible)."""
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use "
                        f"{', '.join(LOCAL_SUFFIXES)}")
    return [path]


# ----------------------------------------------------------------------------- raw records
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark: harmless, dropped
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    """UTF-8 text of one line (or a whole file) read as bytes; bad bytes name file and line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if lineno == 1 and raw.startswith(UTF16_BOMS):
            raise DataError(f"{path}: the file is UTF-16 text; save it as UTF-8") from None
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        line = lineno + raw.count(b"\n", 0, exc.start)
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                        f"{exc.start - line_start + 1}); save the file as UTF-8") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    records = []
    try:
        fh = path.open("rb")  # bytes: a bad byte is reported with its line, not as a traceback
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw[len(BOM):] if lineno == 1 and raw.startswith(BOM) else raw,
                           path, lineno)
            if line.strip():
                records.append((f"{path}:{lineno}", _json_object(line, path, lineno)))
    return records


def _json_object(line: str, path: Path, lineno: int) -> dict:
    """One JSONL line as a dict."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column "
                        f"{exc.colno}); expected one JSON object per line") from None
    except RecursionError:
        raise DataError(f"{path}:{lineno}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object per line, got "
                        f"{type(obj).__name__}")
    return obj


def _read_json(path: Path) -> list[tuple[str, dict]]:
    raw = _read_bytes(path)
    offset = len(BOM) if raw.startswith(BOM) else 0
    text = _decode(raw[offset:], path, 1)
    try:
        data = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column "
                        f"{exc.colno}); expected a list of objects") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    records = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: item {i} is a {type(obj).__name__}, expected an object")
        records.append((f"{path}[{i}]", obj))
    return records


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow's errors are many and sometimes several lines long
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from None
    return [(f"{path}[row {i}]", row) for i, row in enumerate(rows)]


def _read_local(src: SimpleNamespace) -> list[tuple[str, dict]]:
    records = []
    for f in local_files(resolve_path(src.path)):
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
        got = reader[f.suffix](f)
        if not got:
            raise DataError(f"{f}: no examples (empty file); source {src.name!r} needs rows")
        records += got
    return records


def _read_jsonl_gz(path: Path) -> list[tuple[str, dict]]:
    """A gzipped JSONL file (the hub's Anthropic/hh-rlhf ships its splits so)."""
    import gzip

    records = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column "
                                f"{exc.colno}); expected one JSON object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got "
                                f"{type(obj).__name__}")
            records.append((f"{path}:{lineno}", obj))
    return records


HUB_FILE_SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet")


def local_hub_dir(path: str) -> Path | None:
    """The local folder a hub source's `path` names, or None when it is a hub dataset id.
    pkg://, absolute, ~ and ./ paths are local (and must exist); any other path is local when
    such a folder exists (as `datasets.load_dataset` decides), else a hub id."""
    explicit = path.startswith((PKG_PREFIX, "/", "~", "./", "../"))
    folder = resolve_path(path)
    if folder.is_dir():
        return folder
    if explicit:
        where = "" if str(folder) == path else f" ({folder})"
        raise DataError(f"{path!r}: no such folder{where}; a hub source's path is a dataset id "
                        "or a local copy (a save_to_disk folder, or a folder of "
                        ".parquet/.jsonl/.json files named by split)")
    return None


def _split_name(file: Path) -> str:
    """The split a data file holds, by the hub's naming: train.jsonl, train-00000-of-00001.parquet,
    data/train_prefs-00000-of-00001.parquet -> train, train, train_prefs."""
    name = file.name
    for suffix in HUB_FILE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.split("-")[0]


def _read_hub_local(src: SimpleNamespace, folder: Path) -> list[tuple[str, dict]]:
    """A local copy of a hub dataset, split `hub_split` (subset `hub_subset` = a subfolder):
    a folder written by `DatasetDict.save_to_disk` (or one `Dataset.save_to_disk`), or a folder
    of data files named by split, as in the hub's repositories (train.jsonl,
    data/train_prefs-00000-of-00001.parquet, helpful-base/train.jsonl.gz, ...)."""
    import datasets

    split = src.hub_split
    if src.hub_subset:
        sub = folder / src.hub_subset
        if not sub.is_dir():
            found = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise DataError(f"source {src.name!r}: {folder} has no subset folder "
                            f"{src.hub_subset!r} (hub_subset); subfolders: "
                            f"{', '.join(found) or 'none'}")
        folder = sub
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"source {src.name!r}: {folder} has the splits "
                                f"{', '.join(ds)}, not hub_split={split!r}; set hub_split")
            ds = ds[split]
        if src.max_examples:
            ds = ds.select(range(min(len(ds), src.max_examples)))
        return [(f"{folder}[{split}][{i}]", row) for i, row in enumerate(ds)]
    files = sorted(f for f in folder.rglob("*") if f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(folder).parts)
                   and f.name.endswith(HUB_FILE_SUFFIXES))
    chosen = [f for f in files if _split_name(f) == split]
    if not chosen:
        splits = sorted({_split_name(f) for f in files})
        raise DataError(f"source {src.name!r}: no {split!r} split in {folder} (hub_split; "
                        f"data files there hold: {', '.join(splits) or 'nothing'}); expected "
                        f"{split}.jsonl, {split}-00000-of-00001.parquet, ... or a save_to_disk "
                        "folder")
    reader = {".jsonl.gz": _read_jsonl_gz, ".jsonl": _read_jsonl, ".json": _read_json,
              ".parquet": _read_parquet}
    records = []
    for f in chosen:
        suffix = next(x for x in HUB_FILE_SUFFIXES if f.name.endswith(x))
        records += reader[suffix](f)
    return records


def _read_hub(src: SimpleNamespace) -> list[tuple[str, dict]]:
    import datasets

    folder = local_hub_dir(src.path)
    if folder is not None:
        return _read_hub_local(src, folder)

    where = f"hub dataset {src.path!r} (split {src.hub_split!r}"
    where += f", subset {src.hub_subset!r})" if src.hub_subset else ")"
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # offline, every retry warns; the one-line error says it all
    try:
        ds = datasets.load_dataset(src.path, name=src.hub_subset, split=src.hub_split)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"source {src.name!r}: cannot load {where}: {reason} - offline? load it "
                        "once with network access (it is cached), or point the source's path at "
                        "a local copy (docs/data.md)") from None
    finally:
        hub_log.setLevel(level)
    if src.max_examples:
        ds = ds.select(range(min(len(ds), src.max_examples)))
    return [(f"{src.path}[{i}]", row) for i, row in enumerate(ds)]


# ----------------------------------------------------------------------------- formats
REQUIRED = {
    "prompt_response": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}


def _get(rec: dict, field: str, src: SimpleNamespace, where: str, kind: type | None = str,
         required: bool = True) -> Any:
    """The value of internal `field` in a raw record, through the `columns` map."""
    column = src.columns.get(field, field)
    if column not in rec or rec[column] is None:
        if not required:
            return None
        needed = REQUIRED.get(src.format) or ("messages", "or chosen + rejected")
        raise DataError(f"{where}: missing column {column!r} (format {src.format} needs "
                        f"{', '.join(needed)}; if it has another name, set columns.{field} of "
                        f"source {src.name!r})")
    value = rec[column]
    if kind is not None and not isinstance(value, kind):
        raise DataError(f"{where}: column {column!r} must be a {kind.__name__} for format "
                        f"{src.format}, got {type(value).__name__}")
    return value


def split_hh(text: str, where: str, column: str) -> tuple[str, str]:
    """HH dialogue text -> (prompt: the dialogue up to and including the last "\\n\\nAssistant:",
    response: the rest)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}: column {column!r} is not HH dialogue text (expected "
                        f"'\\n\\nHuman: ...\\n\\nAssistant: ...'; no {ASSISTANT.strip()!r} turn)")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def hh_messages(dialogue: str) -> list[dict]:
    """HH dialogue text (ending with "\\n\\nAssistant:") -> [{role, content}, ...] of its turns."""
    messages, rest = [], dialogue
    while rest:
        h, a = rest.find(HUMAN), rest.find(ASSISTANT)
        starts = [(i, m) for i, m in ((h, HUMAN), (a, ASSISTANT)) if i >= 0]
        if not starts:
            break
        i, marker = min(starts)
        rest = rest[i + len(marker):]
        nxt = [j for j in (rest.find(HUMAN), rest.find(ASSISTANT)) if j >= 0]
        content, rest = (rest[:min(nxt)], rest[min(nxt):]) if nxt else (rest, "")
        if content.strip():
            messages.append({"role": "user" if marker == HUMAN else "assistant",
                             "content": content.strip()})
    return messages


def messages_text(messages: list[dict]) -> str:
    """A message list as a plain prompt: the user's text when it is one user turn, else the
    HH-style transcript ending with the assistant cue (models without a chat template)."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    parts = [f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content']}" for m in messages
             if m["role"] in ("user", "assistant")]
    system = [m["content"] for m in messages if m["role"] == "system"]
    return "\n".join(system) + "".join(parts) + ASSISTANT


def _check_messages(value: Any, where: str, column: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{where}: column {column!r} must be a non-empty list of "
                        "{role, content} messages for format chat")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_row(rec: dict, src: SimpleNamespace, where: str) -> dict:
    """One raw record -> the internal row schema."""
    fmt, col = src.format, src.columns
    row: dict[str, Any] = {"prompt": None, "response": None, "chosen": None, "rejected": None}
    if fmt == "prompt_response":
        row["prompt"] = _get(rec, "prompt", src, where)
        row["response"] = _get(rec, "response", src, where)
    elif fmt == "preference":
        row["prompt"] = _get(rec, "prompt", src, where)
        row["chosen"] = _get(rec, "chosen", src, where)
        row["rejected"] = _get(rec, "rejected", src, where)
        row["response"] = _get(rec, "response", src, where, required=False) or row["chosen"]
    elif fmt == "hh":
        chosen = _get(rec, "chosen", src, where)
        rejected = _get(rec, "rejected", src, where)
        dialogue = _get(rec, "prompt", src, where, required=False)
        if dialogue is None:  # whole transcripts: the shared dialogue, then the two replies
            dialogue, chosen = split_hh(chosen, where, col.get("chosen", "chosen"))
            other, rejected = split_hh(rejected, where, col.get("rejected", "rejected"))
            if other != dialogue:
                raise DataError(f"{where}: chosen and rejected transcripts differ before their "
                                "last Assistant turn (expected the same dialogue, two replies)")
        elif not dialogue.rstrip().endswith(ASSISTANT.strip()):
            raise DataError(f"{where}: column {col.get('prompt', 'prompt')!r} is not an HH "
                            f"dialogue ending with {ASSISTANT.strip()!r}")
        # replies without the space after "Assistant:" (the rendered prompt ends the turn cue)
        chosen, rejected = chosen.strip(), rejected.strip()
        row.update(prompt=dialogue, chosen=chosen, rejected=rejected, response=chosen,
                   messages=hh_messages(dialogue))
    elif fmt == "chat":
        pair_col = col.get("chosen", "chosen")
        if pair_col in rec and rec[pair_col] is not None:
            chosen = _check_messages(_get(rec, "chosen", src, where, kind=None), where, pair_col)
            rejected = _check_messages(_get(rec, "rejected", src, where, kind=None), where,
                                       col.get("rejected", "rejected"))
            prompt_col = col.get("prompt", "prompt")
            explicit = isinstance(rec.get(prompt_col), list)  # TRL: prompt = the message list
            for side, msgs in (("chosen", chosen), ("rejected", rejected)):
                if msgs[-1]["role"] != "assistant" or (len(msgs) < 2 and not explicit):
                    raise DataError(f"{where}: column {col.get(side, side)!r} must end with an "
                                    "assistant reply" + ("" if explicit else
                                                         " after at least one user turn"))
            context = (_check_messages(rec[prompt_col], where, prompt_col) if explicit
                       else chosen[:-1])
            row.update(chosen=chosen[-1]["content"], rejected=rejected[-1]["content"],
                       response=chosen[-1]["content"])
        else:
            column = col.get("messages", "messages")
            msgs = _check_messages(_get(rec, "messages", src, where, kind=None), where, column)
            if msgs[-1]["role"] == "assistant" and len(msgs) > 1:
                context, row["response"] = msgs[:-1], msgs[-1]["content"]
            else:  # prompt only (PPO prompts)
                context = msgs
        row.update(prompt=messages_text(context), messages=context)
    elif fmt == "unpaired":  # KTO's rows; no pair, no demonstration
        row["prompt"] = _get(rec, "prompt", src, where)
        row["completion"] = _get(rec, "completion", src, where)
        row["label"] = _get(rec, "label", src, where, kind=bool)
        if not row["completion"].strip():
            raise DataError(f"{where}: empty completion (column "
                            f"{col.get('completion', 'completion')!r})")
    else:
        raise DataError(f"source {src.name!r}: unknown format {fmt!r}")
    if not row["prompt"] or not row["prompt"].strip():
        raise DataError(f"{where}: empty prompt")
    return row


def load_source(src: DictConfig, seed: int) -> list[dict]:
    """All rows of one source in the internal schema, in the source's own order."""
    if src.kind == "synthetic":
        task, name = src.synthetic, str(src.name)  # (OmegaConf access is slow in a loop)
        rows = _synthetic_rows(task.num_examples, seed, task.min_digits, task.max_digits,
                               task.demo_noise)
        return [{**row, "id": f"{name}:{i}", "source": name, "task": "sort_digits"}
                for i, row in enumerate(rows)]
    # a plain copy: OmegaConf attribute access costs ~1 ms, and to_row reads it per field per row
    src = SimpleNamespace(**OmegaConf.to_container(src, resolve=True))
    if src.kind == "local":
        records = _read_local(src)
    elif src.kind == "hub":
        records = _read_hub(src)
    else:
        raise DataError(f"source {src.name!r}: unknown kind {src.kind!r}")
    if src.max_examples:
        records = records[: src.max_examples]
    if not records:
        raise DataError(f"source {src.name!r} ({src.path}): no examples")
    rows, skipped = [], []
    for i, (where, rec) in enumerate(records):
        row = to_row(rec, src, where)
        empty = _empty_reply(row)
        if empty is not None:
            if src.kind != "hub":  # your own file: say which row to fix
                column = src.columns.get(empty, empty)
                raise DataError(f"{where}: empty {empty} (column {column!r}); every "
                                f"{src.format} row needs non-empty text there: fill it in or "
                                "remove the row")
            skipped.append(where)  # a hub dataset cannot be fixed here: leave the row out
            continue
        row["id"], row["source"], row["task"] = f"{src.name}:{i}", src.name, src.task
        rows.append(row)
    if skipped and os.environ.get("RANK", "0") == "0":
        print(f"data: source {src.name!r}: left out {len(skipped)} rows with an empty reply "
              f"(first: {skipped[0]})", file=sys.stderr, flush=True)
    if not rows:
        raise DataError(f"source {src.name!r} ({src.path}): no usable examples")
    return rows


@functools.lru_cache(maxsize=4)
def _synthetic_rows(num_examples: int, seed: int, min_digits: int, max_digits: int,
                    demo_noise: float) -> tuple[dict, ...]:
    """The generated task rows, made once per process: every stage of a run (and the preflight
    before it) reads the same source with the same seed. Callers copy each row."""
    return tuple(sort_digits.generate(num_examples, seed, min_digits, max_digits, demo_noise))


def _empty_reply(row: dict) -> str | None:
    """The first of chosen / rejected / response that the row has but is blank, else None.
    (chosen == rejected is allowed: public preference sets hold some such pairs.)"""
    return next((f for f in ("chosen", "rejected", "response")
                 if row[f] is not None and not row[f].strip()), None)
