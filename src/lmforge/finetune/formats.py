"""Fine-tuning data: read records from JSONL, Parquet or a local HF dataset and normalize them.

These shapes are recognised, per file, from its first record:

- alpaca: `instruction`, optional `input`, `output` (optional `type` / `category` kept as meta)
- sharegpt: `conversations: [{from, value}, ...]`
- openai: `messages: [{role, content}, ...]` (with `tools`, assistant `tool_calls` and `tool`
  turns: kept as they are under `tool_conversation`, rendered as `lmforge serve` renders them:
  through a template that reads `tools`, else as Hermes turns, tokenizer/hermes_tools.py)
- prompt_completion: `prompt`, `completion`
- classification: `text`, `label`, optional `text_pair` (a second text: an encoder reads the
  pair as [CLS] text [SEP] text_pair [SEP] with token type 1 on the second)
- tagging: `tokens` (words), `tags` (one per word, e.g. BIO entity tags)
- seq2seq: `source`, `target` (or `input`, `output` without an `instruction`) for encoder-decoders

Every record of a file must fit that file's shape; one that does not is an InputError naming the
file and line (row for Parquet / HF datasets). Chat shapes become `{"messages": [...], "meta":
{...}}` with roles system/user/assistant (a tool conversation also keeps its OpenAI form:
`"tool_conversation": {"messages": [...], "tools": [...]}`); classification becomes `{"text": str, "label": str}`,
tagging `{"tokens": [str], "tags": [str]}`, seq2seq `{"source": str, "target": str}`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmforge.common.io import read_user_jsonl
from lmforge.errors import InputError
from lmforge.tokenizer.hermes_tools import has_tool_turns, hermes_messages

Record = dict[str, Any]
Example = dict[str, Any]

CHAT_FORMATS = ("alpaca", "sharegpt", "openai", "prompt_completion")
NON_CHAT = ("classification", "tagging", "seq2seq")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names seen in the wild -> chat roles.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "model": "assistant", "system": "system",
}  # fmt: skip
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet")


# --------------------------------------------------------------------------- reading


def _iter_json_array(path: Path) -> Iterator[tuple[int, Record]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:  # maybe JSON lines with a .json name
        yield from read_user_jsonl(path)
        return
    rows = data if isinstance(data, list) else [data]
    for i, obj in enumerate(rows, start=1):
        if not isinstance(obj, dict):
            raise InputError(f"{path} record {i}: expected a JSON object")
        yield i, obj


def _iter_parquet(path: Path) -> Iterator[tuple[int, Record]]:
    import pyarrow.parquet as pq

    yield from enumerate(pq.read_table(path).to_pylist(), start=1)


def _iter_hf_dataset(path: Path) -> Iterator[tuple[int, Record]]:
    try:
        from datasets import load_from_disk
    except ImportError as err:  # pragma: no cover - datasets is in the [hf] extra
        raise ImportError("reading a saved HF dataset needs: pip install 'lmforge[hf]'") from err
    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take "train" (or the only split)
        split = "train" if "train" in ds else next(iter(ds.keys()))
        ds = ds[split]
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").exists()
        or (path / "state.json").exists()
        or (path / "dataset_dict.json").exists()
    )


def data_files(path: Path) -> list[Path]:
    """The record files under `path`: itself, a saved HF dataset dir, or a dir's data files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"fine-tuning data {path} does not exist; pass a .jsonl/.parquet file")
    if path.is_file() or _is_hf_dataset(path):
        return [path]
    files = sorted(p for p in path.iterdir() if p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise InputError(
            f"{path} holds no {', '.join(DATA_SUFFIXES)} files and is not a saved HF dataset"
        )
    return files


def iter_records(path: Path) -> Iterator[tuple[int, Record]]:
    """(line or row number, record) of one data file (JSONL, JSON, Parquet or HF dataset dir)."""
    path = Path(path)
    if _is_hf_dataset(path):
        yield from _iter_hf_dataset(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.suffix == ".json":
        yield from _iter_json_array(path)
    else:
        yield from read_user_jsonl(path)


# --------------------------------------------------------------------------- shapes


def _is_str(x: Any) -> bool:
    return isinstance(x, str)


def _turns(x: Any, key_a: str, key_b: str) -> bool:
    return (
        isinstance(x, list)
        and len(x) > 0
        and all(isinstance(t, dict) and key_a in t and key_b in t for t in x)
    )


def _openai_turns(x: Any) -> bool:
    """OpenAI's messages: each with a role and content, or an assistant's tool_calls alone (as
    OpenAI's fine-tuning examples write a call, with no content key)."""
    return (
        isinstance(x, list)
        and len(x) > 0
        and all(isinstance(t, dict) and "role" in t and ("content" in t or t.get("tool_calls"))
                for t in x)
    )  # fmt: skip


# name -> does a record have this shape?  Checked in this order.
DETECTORS: dict[str, Callable[[Record], bool]] = {
    "openai": lambda r: _openai_turns(r.get("messages")),
    "sharegpt": lambda r: _turns(r.get("conversations"), "from", "value"),
    "alpaca": lambda r: _is_str(r.get("instruction")) and _is_str(r.get("output")),
    "prompt_completion": lambda r: _is_str(r.get("prompt")) and _is_str(r.get("completion")),
    "classification": lambda r: _is_str(r.get("text")) and isinstance(r.get("label"), (str, int)),
    "tagging": lambda r: isinstance(r.get("tokens"), list) and isinstance(r.get("tags"), list),
    "seq2seq": lambda r: _pair(r, "source", "target") or _pair(r, "input", "output"),
}


def _pair(r: Record, source: str, target: str) -> bool:
    return _is_str(r.get(source)) and _is_str(r.get(target)) and "instruction" not in r


EXPECTED = (
    "alpaca {instruction, input?, output}, sharegpt {conversations: [{from, value}]}, "
    "openai {messages: [{role, content}]}, {prompt, completion}, {text, label} "
    "{tokens, tags} or {source, target}"
)


def detect_format(record: Record) -> str | None:
    """The shape a record has (see DETECTORS), or None."""
    return next((name for name, fits in DETECTORS.items() if fits(record)), None)


def _alpaca(r: Record) -> Example:
    user = r["instruction"].strip()
    if r.get("input"):
        user = f"{user}\n\n{str(r['input']).strip()}"
    meta = {k: r[k] for k in ("type", "category") if r.get(k) is not None}
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
    return {"messages": msgs, "meta": meta}


def _sharegpt(r: Record) -> Example:
    msgs = []
    for turn in r["conversations"]:
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise ValueError(
                f"unknown speaker {turn['from']!r} (known: {', '.join(sorted(SHAREGPT_ROLES))})"
            )
        msgs.append({"role": role, "content": str(turn["value"])})
    return {"messages": msgs, "meta": {}}


def _openai(r: Record) -> Example:
    """OpenAI's chat format. Its tool calling (`tools`, assistant `tool_calls`, `tool` turns) is
    kept as it came under `tool_conversation`, for the chat encoding to render as `lmforge
    serve` does (hermes_tools.template_turns: through a template that reads `tools`, else as
    Hermes turns); `messages` holds the Hermes turns, the role/content form every chat reader
    takes. Making them checks the record (arguments are JSON, each result answers a call), so a
    bad one is named by its file and line."""
    msgs = []
    for turn in r["messages"]:
        if turn["role"] not in (*ROLES, "tool"):
            raise ValueError(f"unknown role {turn['role']!r} (known: {', '.join(ROLES)}, tool)")
        msgs.append({**turn, "content": str(turn.get("content") or "")})
    tools = r.get("tools") or None
    try:  # without tools: the same role/content turns
        example = {"messages": hermes_messages(msgs, tools), "meta": {}}
        if tools or has_tool_turns(msgs):
            example["tool_conversation"] = {"messages": msgs, "tools": tools}
        return example
    except InputError as err:  # arguments that are not JSON
        raise ValueError(str(err)) from None
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"a tool call needs function.name and function.arguments ({err})"
        ) from None


def _prompt_completion(r: Record) -> Example:
    msgs = [
        {"role": "user", "content": r["prompt"]},
        {"role": "assistant", "content": r["completion"]},
    ]
    return {"messages": msgs, "meta": {}}


def text_pair(record: Record) -> str | None:
    """A classification record's second text, None without one (absent or null): the one rule
    finetune and eval read pairs by. Anything but a string is a ValueError (callers name the
    record): str() would make a number or a list into text the model was never meant to read."""
    pair = record.get("text_pair")
    if pair is None or isinstance(pair, str):
        return pair
    raise ValueError(
        f"text_pair must be a string (the second text of a pair), got {type(pair).__name__} "
        f"{pair!r:.60}; quote it, or drop the field (null) for a single text"
    )


def _classification(r: Record) -> Example:
    example = {"text": r["text"], "label": str(r["label"])}
    pair = text_pair(r)
    if pair is not None:
        example["text_pair"] = pair
    if isinstance(r.get("fold"), int):  # the data stage's fold assignment, for k-fold
        example["fold"] = r["fold"]
    for key in ("id", "augmented", "source_id"):  # augmented rows stay out of held-out parts
        if r.get(key) is not None:
            example[key] = r[key]
    return example


def _tagging(r: Record) -> Example:
    words, tags = r["tokens"], r["tags"]
    if not words or len(words) != len(tags):
        raise ValueError(f"needs one tag per token, got {len(words)} tokens and {len(tags)} tags")
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError("every token must be a non-empty string")
    return {"tokens": list(words), "tags": [str(t) for t in tags]}


def _seq2seq(r: Record) -> Example:
    source, target = (r["source"], r["target"]) if "source" in r else (r["input"], r["output"])
    if not source.strip() or not target.strip():
        raise ValueError("source and target must be non-empty text")
    return {"source": source, "target": target}


NORMALIZERS: dict[str, Callable[[Record], Example]] = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "openai": _openai,
    "prompt_completion": _prompt_completion,
    "classification": _classification,
    "tagging": _tagging,
    "seq2seq": _seq2seq,
}


def _check_chat(example: Example) -> None:
    roles = [m["role"] for m in example["messages"]]
    if "assistant" not in roles:
        raise ValueError("the conversation has no assistant turn to learn from")


def read_file(path: Path) -> tuple[str, list[Example]]:
    """(detected format, normalized examples) of one data file; every record must fit."""
    fmt: str | None = None
    examples: list[Example] = []
    where = "row" if path.suffix == ".parquet" or path.is_dir() else "line"
    for n, record in iter_records(path):
        if fmt is None:
            fmt = detect_format(record)
            if fmt is None:
                raise InputError(
                    f"{path} {where} {n}: record with keys {sorted(record)} fits no known format; "
                    f"expected {EXPECTED}"
                )
        elif not DETECTORS[fmt](record):
            raise InputError(
                f"{path} {where} {n}: record with keys {sorted(record)} does not fit this file's "
                f"format '{fmt}' (detected from its first record); fix or remove it"
            )
        try:
            example = NORMALIZERS[fmt](record)
            if fmt in CHAT_FORMATS:
                _check_chat(example)
        except ValueError as err:
            raise InputError(f"{path} {where} {n}: {err}") from None
        examples.append(example)
    if fmt is None:
        raise InputError(f"{path} has no records; pass a non-empty data file")
    return fmt, examples


def load_examples(path: Path) -> tuple[str, list[Example]]:
    """Reads every data file under `path`; all chat-shaped, or all of one other shape."""
    formats: dict[str, str] = {}
    examples: list[Example] = []
    for file in data_files(Path(path)):
        fmt, rows = read_file(file)
        formats[str(file)] = fmt
        examples.extend(rows)
    kinds = {f if f in NON_CHAT else "chat" for f in formats.values()}
    if len(kinds) > 1:
        raise InputError(
            f"{path} mixes {' and '.join(sorted(kinds))} files ({formats}); keep them apart"
        )
    fmt = next(iter(formats.values())) if len(set(formats.values())) == 1 else "mixed-chat"
    return fmt, examples


def is_classification(examples: list[Example]) -> bool:
    """True for text+label examples."""
    return bool(examples) and "label" in examples[0]


def is_seq2seq(examples: list[Example]) -> bool:
    """True for source+target examples."""
    return bool(examples) and "source" in examples[0]


def is_tagging(examples: list[Example]) -> bool:
    """True for tokens+tags examples."""
    return bool(examples) and "tags" in examples[0]
