"""Preference data: pairs and ranked lists from files, and synthetic pairs for the quickstart.

A record is one of (per line of a .jsonl[.gz|.zst] file; every file under a directory is read):

- pair: `{"prompt": P, "chosen": str, "rejected": str}`
- ranked: `{"prompt": P, "ranked": [best, ..., worst]}`, which becomes every (better, worse) pair

P is a string (one user turn) or OpenAI-style messages `[{role, content}, ...]`, tool calling
included (assistant `tool_calls`, `tool` results, the record's `tools`, as a feedback export
writes a served tool request); a response may also be TRL's conversational form, a one-message
list `[{"role": "assistant", "content": ...}]`. A record that fits neither shape is an
InputError naming the file and line. Every pair becomes `{"prompt": [messages], "chosen": str,
"rejected": str}`, the prompt as role/content turns (a tool conversation's Hermes turns), and a
tool conversation keeps its OpenAI form under `tool_conversation` (prompt_fields) for the
encoding, which renders it as finetune and serve do.

The built-in synthetic pairs are align.synthetic's; KTO's unpaired records are align.unpaired's
(which reads through record_files too). The serving feedback store is a source too:
pass the directory `lmforge data feedback-export` wrote (its preferences.jsonl is read), or the
store's SQLite file itself, which is exported first through the stage registry (kind
"feedback-export": align does not import serve's internals) into a temporary directory.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.common.io import read_user_jsonl
from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer.hermes_tools import has_tool_turns, hermes_messages

Pair = dict[str, Any]
ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
EXPECTED = '{"prompt", "chosen", "rejected"} or {"prompt", "ranked": [best, ..., worst]}'
FEEDBACK_EXPORT = "feedback-export"  # the stage kind that turns the serving store into pairs
SQLITE_MAGIC = b"SQLite format 3\x00"


def _turns(value: Any) -> list[dict[str, Any]]:
    """A prompt (a string or messages) as messages, checked; ValueError says what is wrong."""
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError("prompt must be a non-empty string or a list of {role, content} messages")
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in (*ROLES, "tool"):
            raise ValueError(f"prompt messages need a role in {(*ROLES, 'tool')}")
        calls = m["role"] == "assistant" and m.get("tool_calls")
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise ValueError("prompt messages need string content (null only beside calls)")
    if value[-1]["role"] == "assistant":
        raise ValueError("the prompt's last message is the assistant's; it must await one")
    return value


def _role_content(turns: list[dict[str, Any]], tools: list | None) -> list[dict[str, str]]:
    """Checked turns as role/content messages: a tool conversation's Hermes turns."""
    if not (tools or has_tool_turns(turns)):
        return [{"role": m["role"], "content": m["content"]} for m in turns]
    try:
        return hermes_messages(turns, tools)
    except InputError as err:  # arguments that are not JSON, a result answering no call
        raise ValueError(str(err)) from None
    except (KeyError, TypeError) as err:
        raise ValueError(f"a tool call needs function.name and arguments ({err})") from None


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    """A record's `tools` (OpenAI tool definitions) checked; None without any."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be a list of OpenAI tool definitions ({type, function})")
    return tools


def prompt_fields(record: dict[str, Any]) -> dict[str, Any]:
    """{"prompt": role/content turns} of a record with a prompt, plus, for a tool conversation,
    `tool_conversation`: {"messages": its OpenAI form as it came, "tools"}, which align's
    encoding renders as finetune's does (hermes_tools.template_turns: through a template that
    reads `tools`, else as the Hermes turns), so a policy is scored on the prompt it was served
    with. ValueError says what is wrong."""
    turns, tools = _turns(record["prompt"]), _tools(record.get("tools"))
    fields: dict[str, Any] = {"prompt": _role_content(turns, tools)}
    if tools or has_tool_turns(turns):
        fields["tool_conversation"] = {"messages": turns, "tools": tools}
    return fields


def response_text(value: Any, key: str) -> str:
    """A reply (a string or one assistant message) as its text; ValueError names `key`."""
    one = isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
    if one and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a non-empty string (or one assistant message)")
    return value


def pairs_of(record: dict[str, Any]) -> list[Pair]:
    """The pairs one record holds; ValueError says what is wrong with it."""
    if "prompt" not in record:
        raise ValueError(f"record with keys {sorted(record)} has no prompt; expected {EXPECTED}")
    prompt = prompt_fields(record)
    if "ranked" in record:
        ranked = record["ranked"]
        if not isinstance(ranked, list) or len(ranked) < 2:
            raise ValueError("ranked must list at least two responses, best first")
        texts = [response_text(r, f"ranked[{i}]") for i, r in enumerate(ranked)]
        return [
            {**prompt, "chosen": texts[i], "rejected": texts[j]}
            for i in range(len(texts))
            for j in range(i + 1, len(texts))
            if texts[i] != texts[j]
        ]
    if "chosen" in record and "rejected" in record:
        chosen = response_text(record["chosen"], "chosen")
        rejected = response_text(record["rejected"], "rejected")
        if chosen == rejected:
            raise ValueError("chosen and rejected are the same text: nothing to prefer")
        pair = {**prompt, "chosen": chosen, "rejected": rejected}
        if isinstance(record.get("kind"), str):  # e.g. the synthetic pairs' rejection kind
            pair["kind"] = record["kind"]
        return [pair]
    raise ValueError(
        f"record with keys {sorted(record)} fits no preference shape; expected {EXPECTED}"
    )


def preference_files(
    path: Path, export_file: str = "preferences.jsonl", options: dict[str, Any] | None = None
) -> list[Path]:
    """The JSONL files under `path` (itself when it is a file; a feedback export's export_file,
    e.g. preferences.jsonl, not its sft.jsonl). options: export settings the export's manifest
    must hold (a ConfigError names both values and the command that re-exports)."""
    from lmforge.artifacts import read_manifest

    path = Path(path)
    if not path.exists():
        raise InputError(f"preference data {path} does not exist; pass a .jsonl file or directory")
    if path.is_file():
        return [path]
    manifest = read_manifest(path)
    if manifest is not None and manifest.get("kind") == FEEDBACK_EXPORT:
        _check_export(path, manifest, export_file, options or {})
        return [path / export_file]
    files = sorted(p for p in path.iterdir() if p.name.endswith(SUFFIXES))
    if not files:
        raise InputError(f"{path} holds no {', '.join(SUFFIXES)} preference files")
    return files


def _check_export(path: Path, manifest: dict, export_file: str, options: dict[str, Any]) -> None:
    """A feedback export read as data must hold export_file, made with these settings."""
    redo = f"lmforge data feedback-export --db DB --out {path} --force"
    if not (path / export_file).is_file():
        raise InputError(f"feedback export {path} has no {export_file} (an older lmforge): {redo}")
    made = manifest.get("config", {})
    for key, want in options.items():
        if made.get(key) != want:
            raise ConfigError(
                f"feedback export {path} was made with {key}={made.get(key)}, this run asks "
                f"{want}: {redo} --set {key}={want}, or pass the feedback store (.db) itself"
            )


def is_sqlite(path: Path) -> bool:
    """Whether path is an SQLite database file (the serving feedback store)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC


@contextlib.contextmanager
def record_files(
    path: Path, export_file: str = "preferences.jsonl", options: dict[str, Any] | None = None
) -> Iterator[list[Path]]:
    """The preference files of `path`; a feedback store is exported (with `options`, its
    export_file read) into a temporary directory (through the stage registry) that lives as long
    as the context."""
    if not is_sqlite(path):
        yield preference_files(path, export_file, options)
        return
    from lmforge.artifacts import run_stage
    from lmforge.stages import get_stage

    stage = get_stage(FEEDBACK_EXPORT)
    with tempfile.TemporaryDirectory(prefix="lmforge-feedback-") as tmp:
        cfg = stage.config_cls(db=Path(path), out=Path(tmp) / "export", **(options or {}))
        out = run_stage(FEEDBACK_EXPORT, cfg, stage.build, kind=FEEDBACK_EXPORT).out
        yield [out / export_file]


def load_pairs(path: Path) -> list[Pair]:
    """Every pair in a file or directory of preference records; a bad record names file and line."""
    pairs: list[Pair] = []
    with record_files(path) as files:
        for file in files:
            for line, record in read_user_jsonl(file):
                try:
                    pairs.extend(pairs_of(record))
                except ValueError as err:
                    raise InputError(f"{file} line {line}: {err}") from None
    if not pairs:
        raise InputError(f"{path} holds no preference pairs; pass prompt/chosen/rejected records")
    return pairs
