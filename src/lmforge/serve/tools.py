"""Tool calling for chat: what a request's tools and tool_choice ask of decoding, and the answer
as OpenAI's `tool_calls`, whole or as stream deltas.

tool_choice, as vLLM implements it:
- "none": a plain answer (the tools are still in the prompt, as OpenAI shows them to the model);
- "auto": free generation; Hermes `<tool_call>` blocks in the text (tokenizer/hermes_tools.py)
  become tool calls, the text before them the content (parallel_tool_calls false: the first
  call only; a name outside the tools is passed on, as vLLM does);
- a named function: the answer is its arguments, guided by its `parameters` schema;
- "required": the answer is a JSON array of {"name", "arguments"} objects, each one of the
  tools' (anyOf), at least one (exactly one with parallel_tool_calls false). CallArrayReader
  reads it as it arrives, streamed or not: each call's arguments are their text as generated
  (as a named call's are), and an array cut by max_tokens gives the calls begun so far, the last
  one's arguments cut as a named call's are.
The guided schemas compile through constrain's GuideCompiler, which keeps compiled guides per
schema text: a tool set used again reuses its guide. An answer whose calls the model chose (auto,
required) and that ended normally has finish_reason "tool_calls"; a named function's forced call
ends "stop", as OpenAI and vLLM answer it (OpenAI's answers for each choice, streamed and not:
vllm-project/vllm#25054); one cut by max_tokens keeps "length".
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from lmforge.tokenizer.hermes_tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    assistant_text,
    parse_tool_calls,
)

Call = tuple[str, str]  # (function name, arguments as JSON text)


def call_id() -> str:
    """An OpenAI-style tool call id: "call_" + 24 random hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _hoisted(schema: Any, prefix: str, defs: dict[str, Any]) -> Any:
    """`schema` with its local $refs renamed under `prefix`, its definitions moved into `defs`
    (a tool's parameters keep working inside the combined "required" schema)."""

    def rename(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key in ("$defs", "definitions") and node is schema and isinstance(value, dict):
                    continue
                if key == "$ref" and isinstance(value, str):
                    parts = value.split("/")
                    if len(parts) == 3 and parts[0] == "#" and parts[1] in ("$defs", "definitions"):
                        value = f"#/$defs/{prefix}{parts[2]}"
                out[key] = rename(value)
            return out
        if isinstance(node, list):
            return [rename(v) for v in node]
        return node

    if isinstance(schema, dict):
        for where in ("$defs", "definitions"):
            for name, sub in (schema.get(where) or {}).items():
                defs[f"{prefix}{name}"] = rename(sub)
    return rename(schema)


@dataclass(frozen=True)
class ToolPlan:
    """A chat request's tools (OpenAI's dicts) and what tool_choice asks of them."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: tuple[dict[str, Any], ...]
    name: str | None = None  # the function a named tool_choice forces
    parallel: bool = True

    def parameters(self, name: str) -> Any:
        """A function's parameters schema (no parameters: the empty object)."""
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        params = fn.get("parameters")
        if params is None:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return params

    @property
    def guided_functions(self) -> list[str]:
        """The functions whose schemas constrain the answer (none for "none" and "auto")."""
        if self.mode == "named":
            return [self.name]  # type: ignore[list-item]
        if self.mode == "required":
            return [t["function"]["name"] for t in self.tools]
        return []

    @property
    def kept_special(self) -> tuple[str, ...]:
        """The special tokens the answer's text keeps: "auto" finds calls by their Hermes tags,
        which some models (Hermes 2 Pro, Qwen 2.5) make special tokens, dropped otherwise. Only
        the tags, not every special token as vLLM's hermes parser asks (skip_special_tokens
        false): the content stays what a request without tools gets (no <|im_start|> in it)."""
        return (TOOL_CALL_OPEN, TOOL_CALL_CLOSE) if self.mode == "auto" else ()

    def schema(self) -> Any:
        """The JSON schema the answer is guided by (named and required only)."""
        if self.mode == "named":
            return self.parameters(self.name)  # type: ignore[arg-type]
        defs: dict[str, Any] = {}
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    "arguments": _hoisted(self.parameters(name), f"t{i}.", defs),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for i, name in enumerate(self.guided_functions)
        ]
        out: dict[str, Any] = {"type": "array", "items": {"anyOf": options}, "minItems": 1}
        if not self.parallel:
            out["maxItems"] = 1
        if defs:
            out["$defs"] = defs
        return out

    def calls(self, text: str) -> tuple[str | None, list[Call]]:
        """(content, calls) of a generated answer."""
        if self.mode == "named":
            return None, [(self.name, text)]  # type: ignore[list-item]
        if self.mode == "auto":
            content, calls = parse_tool_calls(text)
            return content, calls if self.parallel else calls[:1]
        if self.mode == "required":  # read as the stream reads it: the same calls
            reader = CallArrayReader()
            reader.feed(text)
            return None, [(n, a) for n, a in reader.calls]
        return text, []

    def message(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The choice's message and finish_reason for a generated answer."""
        content, calls = self.calls(text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [
                {"id": call_id(), "type": "function", "function": {"name": n, "arguments": a}}
                for n, a in calls
            ]
        return message, self.finish_reason(calls, reason)

    def finish_reason(self, calls: list[Call], reason: str | None) -> str | None:
        """ "tool_calls" when the model chose to call (auto, required) and stopped on its own; a
        forced named call keeps "stop" (OpenAI's answer, and vLLM's)."""
        return "tool_calls" if calls and reason == "stop" and self.mode != "named" else reason

    def record(self) -> dict[str, Any]:
        """What the feedback store's params get: the tools and the choice, and that the row's
        messages are in OpenAI's form (older rows hold Hermes turns: feedback_export reads both)."""
        return {"tools": list(self.tools), "tool_choice": self.mode, "tool_name": self.name,
                "messages_form": "openai"}  # fmt: skip


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:  # named arguments cut by max_tokens: kept as written
        return arguments


def calls_tools(prep: Any) -> bool:
    """Whether a prepared request's answer may be tool calls (tools, tool_choice not "none")."""
    return prep.tools is not None and prep.tools.mode != "none"


def message_text(message: dict[str, Any]) -> str:
    """An answer's message as the feedback store keeps it: in the Hermes format, so that an
    exported conversation teaches the model the calls it made (hermes_tools.assistant_text)."""
    calls = [
        (c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []
    ]
    return assistant_text(message["content"], [(n, _json_or_text(a)) for n, a in calls])


def renew_call_ids(body: dict[str, Any]) -> dict[str, Any]:
    """A cached response with new tool call ids (ids are unique per response)."""
    choices = []
    for choice in body["choices"]:
        calls = choice.get("message", {}).get("tool_calls")
        if calls:
            message = {**choice["message"], "tool_calls": [{**c, "id": call_id()} for c in calls]}
            choice = {**choice, "message": message}
        choices.append(choice)
    return {**body, "choices": choices}


def _string(raw: str) -> str:
    """A JSON string's value from the text between its quotes."""
    try:
        return json.loads(f'"{raw}"')
    except json.JSONDecodeError:  # not the guide's (an output redaction changed it): as written
        return raw


class CallArrayReader:
    """Reads a "required" answer -- a JSON array of {"name", "arguments"} objects -- piece by
    piece: a call opens once its name's string is complete, and its arguments come as their raw
    text (held until the name is known, if the object gives them first). The guide makes the
    array well-formed, so a small state machine over depth and strings suffices (any key order,
    whitespace wherever JSON allows it; the whitespace between a call's fields is not part of
    its arguments)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []  # [name, arguments text] of each call opened
        self.depth = 0  # 1: in the array, 2: in a call's object, 3+: inside a field's value
        self.in_string = False
        self.escaped = False
        self.key: str | None = None  # the call field being read (None: its key comes next)
        self.raw = ""  # the key or name string being read, between its quotes
        self.name: str | None = None  # the current call's name, once complete
        self.early = ""  # its arguments read before its name

    def feed(self, piece: str) -> list[tuple[int, str | None, str]]:
        """What `piece` adds: (call index, name, "") for a call that opens, (index, None, text)
        for argument text."""
        out: list[tuple[int, str | None, str]] = []
        for ch in piece:
            self._char(ch, out)
        return out

    def _char(self, ch: str, out: list[tuple[int, str | None, str]]) -> None:
        depth = self.depth
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
            if depth == 2 and self.key in (None, "name"):  # a key, or the name
                if self.in_string:
                    self.raw += ch
                elif self.key is None:
                    self.key, self.raw = _string(self.raw), ""
                else:
                    self._named(_string(self.raw), out)
                    self.raw = ""
            elif self.key == "arguments":
                self._arguments(ch, out)
            return
        part = self.key == "arguments" and (depth > 2 or (ch not in ",:}" and not ch.isspace()))
        if ch == '"':
            self.in_string = True
        elif ch in "[{":
            self.depth += 1
        elif ch in "]}":
            self.depth -= 1
        if depth == 2 and ch in ",}":  # the field ends (and with "}", the call)
            self.key = None
            if ch == "}":
                self.name, self.early = None, ""
        if part:
            self._arguments(ch, out)

    def _named(self, name: str, out: list[tuple[int, str | None, str]]) -> None:
        self.name = name
        self.calls.append([name, self.early])
        out.append((len(self.calls) - 1, name, ""))
        if self.early:
            out.append((len(self.calls) - 1, None, self.early))

    def _arguments(self, ch: str, out: list[tuple[int, str | None, str]]) -> None:
        if self.name is None:
            self.early += ch
            return
        index = len(self.calls) - 1
        self.calls[index][1] += ch
        if out and out[-1][:2] == (index, None):
            out[-1] = (index, None, out[-1][2] + ch)
        else:
            out.append((index, None, ch))


@dataclass
class ToolStream:
    """One choice's stream as OpenAI's chat deltas: content as it comes, and each tool call as an
    opening delta ({index, id, type, function: {name, arguments: ""}}) then argument pieces.

    Named: the arguments stream as generated. Auto: content streams until `<tool_call>` (a
    suffix that may begin it, and trailing whitespace, wait); from there the text waits for the
    end and is parsed as the whole answer is, so the stream accumulates to the same message
    (a malformed call: the rest as content). Required: each call opens once its name is complete
    and its arguments follow as generated (CallArrayReader, which reads the whole answer too).
    """

    plan: ToolPlan
    text: list[str] = field(default_factory=list)
    pending: str = ""  # auto: text not sent yet (trailing whitespace, a tag's possible start)
    sent: int = 0  # characters of content sent
    opened: bool = False  # named: its call's opening delta sent
    held: bool = False  # auto: a <tool_call> was seen; the rest waits for the end
    reader: CallArrayReader = field(default_factory=CallArrayReader)  # required: the array

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The deltas a new piece of the answer lets out now."""
        self.text.append(piece)
        if self.plan.mode == "named":
            deltas = [] if self.opened else [self._open(0, self.plan.name)]  # type: ignore[arg-type]
            self.opened = True
            return deltas + ([_args(0, piece)] if piece else [])
        if self.plan.mode == "required":
            return [
                self._open(i, name) if name is not None else _args(i, text)
                for i, name, text in self.reader.feed(piece)
            ]
        if self.plan.mode != "auto" or self.held:
            return []
        self.pending += piece
        cut = self.pending.find(TOOL_CALL_OPEN)
        if cut >= 0:
            self.held = True
            ready = self.pending[:cut].rstrip()
        else:
            ready = self.pending.rstrip()
            for k in range(len(TOOL_CALL_OPEN) - 1, 0, -1):  # a suffix that may begin the tag
                if ready.endswith(TOOL_CALL_OPEN[:k]):
                    ready = ready[:-k].rstrip()
                    break
        self.pending = self.pending[len(ready) :]
        self.sent += len(ready)
        return [{"content": ready}] if ready else []

    def end(self, reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The deltas still to send once the answer is complete, and its finish_reason."""
        content, calls = self.plan.calls("".join(self.text))
        if self.plan.mode == "named":
            deltas = [] if self.opened else [self._open(0, self.plan.name)]  # type: ignore[arg-type]
            return deltas, self.plan.finish_reason(calls, reason)
        if self.plan.mode == "required":  # every call and argument went out as it came
            return [], self.plan.finish_reason(calls, reason)
        rest = (content or "")[self.sent :]  # what was sent is a prefix of the content
        deltas = [{"content": rest}] if rest else []
        for i, (name, arguments) in enumerate(calls):
            deltas += [self._open(i, name), _args(i, arguments)]
        return deltas, self.plan.finish_reason(calls, reason)

    @staticmethod
    def _open(index: int, name: str) -> dict[str, Any]:
        call = {"index": index, "id": call_id(), "type": "function",
                "function": {"name": name, "arguments": ""}}  # fmt: skip
        return {"tool_calls": [call]}


def _args(index: int, piece: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
