"""Tool calling as plain chat turns, in the Hermes format, for templates that know no tools.

A template that reads the `tools` variable (Qwen 2.5's, Llama 3.1's, ...) renders tool definitions,
assistant tool calls and tool results itself, as transformers' `apply_chat_template(tools=...)`
does. Our built-in ChatML template does not, so `hermes_messages` turns a tool conversation into
role/content turns any template renders, with the call and result blocks Hermes 2 Pro and Qwen 2.5
were fine-tuned on (and vLLM's `hermes` parser reads back); the tools prompt's wording is ours
(Hermes 2 Pro's opening, Qwen 2.5's call instructions), so it teaches a model lmforge fine-tunes
rather than matching either model's own template word for word:

- the tools go into the system turn (after its text, if there is one): TOOLS_PROMPT, then one
  `{"type": "function", "function": {...}}` JSON line per tool inside `<tools></tools>`;
- an assistant turn with tool calls gets, after its text, one block per call:
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
- a tool result is `<tool_response>\\n{content}\\n</tool_response>` in a `user` turn, the
  results of consecutive tool messages in one turn, a line apart (as Qwen 2.5's template does).

Tool results are matched to the calls they answer by tool_call_id (matched_tool_results) and
rendered in the order of the calls, for this format and for templates that read `tools` alike.

Only system, user and assistant turns come out, the roles `lmforge finetune` reads: finetune's
OpenAI records and feedback-export's prompts for align are made of them (the feedback store keeps
tool conversations in OpenAI's form; rows stored before that hold these turns).
`parse_tool_calls` reads the blocks back out of generated text. Both directions live here so
the server and fine-tuning data use one format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lmforge.errors import InputError
from lmforge.tokenizer.chat import template_reads_tools

Message = dict[str, Any]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOLS_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
    "Don't make assumptions about what values to plug into functions. Here are the available "
    "tools:\n<tools>\n{tools}\n</tools>\nFor each function call, return a json object with the "
    "function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
# a closed block, or an unclosed last one (generation stopped inside it), as vLLM's hermes parser
_CALLS = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def call_arguments(arguments: Any, where: str) -> Any:
    """A tool call's arguments as a JSON value: OpenAI sends them as a JSON string."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: the arguments are not JSON ({exc})") from None


def tool_call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it."""
    return f"{TOOL_CALL_OPEN}\n{_dumps({'name': name, 'arguments': arguments})}\n{TOOL_CALL_CLOSE}"


def assistant_text(content: str | None, calls: Sequence[tuple[str, Any]]) -> str:
    """An assistant turn's text: its content, then one block per (name, arguments) call."""
    return "\n".join(([content] if content else []) + [tool_call_text(*c) for c in calls])


def _call_ids(m: Message, i: int) -> list[str | None]:
    ids = [c.get("id") for c in m["tool_calls"]]
    twice = sorted({c for c in ids if c is not None and ids.count(c) > 1})
    if twice:
        raise InputError(f"messages[{i}].tool_calls: the id(s) {twice} are given more than once")
    return ids


def _answered_calls(run: list[int], messages: Sequence[Message], k: int) -> list[tuple[int, int]]:
    """(call index, message index) for each tool result in `run` (message indices), which follow
    the assistant message `k`: by tool_call_id, id-less results by order where that is
    unambiguous (one call left to answer, or as many results as calls left and those calls
    without ids, so that order is all there is)."""
    ids = _call_ids(messages[k], k)
    matched: dict[int, int] = {}  # call index -> result's message index
    idless = []
    for i in run:
        rid = messages[i].get("tool_call_id")
        if rid is None:
            idless.append(i)
            continue
        if rid not in ids:
            known = ", ".join(repr(c) for c in ids if c is not None) or "none with an id"
            raise InputError(
                f"messages[{i}]: tool_call_id {rid!r} names no tool call of the assistant "
                f"message it answers (messages[{k}], calls {known}); give the id of one of them"
            )
        j = ids.index(rid)
        if j in matched:
            raise InputError(
                f"messages[{i}]: tool_call_id {rid!r} was answered already by "
                f"messages[{matched[j]}]; send one result per call"
            )
        matched[j] = i
    left = [j for j in range(len(ids)) if j not in matched]
    if len(idless) > len(left):
        raise InputError(
            f"messages[{idless[len(left)]}]: a tool result without tool_call_id, but messages[{k}] "
            f"has {len(left)} call(s) left to answer for {len(idless)} such results; send one "
            "result per call"
        )
    if idless:
        by_order = len(idless) == len(left) and (
            len(left) == 1 or all(ids[j] is None for j in left)
        )
        if not by_order:
            raise InputError(
                f"messages[{idless[0]}]: a tool result without tool_call_id, and which of the "
                f"{len(left)} unanswered call(s) of messages[{k}] it answers is ambiguous; give "
                "each tool message the tool_call_id of its call"
            )
        matched.update(zip(left, idless, strict=True))
    return sorted(matched.items())


def matched_tool_results(messages: Sequence[Message]) -> list[Message]:
    """The conversation with each run of tool results matched to the calls of the assistant
    message before it by tool_call_id, as OpenAI defines it (see _answered_calls), and put in the
    order of those calls, each with its call's id: the order a model sees results in is the
    order it made the calls, whatever order the client sent them in. InputError names the message
    and the id of a result that answers no call, or answers one twice."""
    out: list[Message] = []
    i = 0
    while i < len(messages):
        if messages[i]["role"] != "tool":
            out.append(messages[i])
            i += 1
            continue
        k = i - 1
        run = list(range(i, next((j for j in range(i, len(messages))
                                  if messages[j]["role"] != "tool"), len(messages))))  # fmt: skip
        if k < 0 or messages[k]["role"] != "assistant" or not messages[k].get("tool_calls"):
            raise InputError(
                f"messages[{i}]: a tool result must follow the assistant message whose "
                "tool_calls it answers"
            )
        calls = messages[k]["tool_calls"]
        for j, r in _answered_calls(run, messages, k):
            cid = calls[j].get("id")
            out.append({**messages[r], "tool_call_id": cid} if cid else messages[r])
        i = run[-1] + 1
    return out


def hermes_messages(messages: Sequence[Message], tools: Sequence[Message] | None) -> list[Message]:
    """The conversation as role/content turns in the Hermes format (see the module docstring),
    tool results matched to their calls (matched_tool_results). InputError names the message
    whose tool call arguments are not JSON, or whose tool result answers no call."""
    messages = matched_tool_results(messages)
    out: list[Message] = []
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [
                (
                    c["function"]["name"],
                    call_arguments(c["function"]["arguments"], f"messages[{i}].tool_calls[{j}]"),
                )
                for j, c in enumerate(m["tool_calls"])
            ]
            content = assistant_text(content, calls)
        elif role == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
            if i and messages[i - 1]["role"] == "tool":  # one turn for consecutive results
                out[-1]["content"] += "\n" + content
                continue
            role = "user"
        out.append({"role": role, "content": content})
    if tools:
        block = TOOLS_PROMPT.format(tools="\n".join(_dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def parse_tool_calls(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, [(name, arguments JSON text)]) from generated text.

    The content is the text before the first `<tool_call>` (trailing whitespace dropped; None when
    nothing is left). As vLLM's hermes parser does, a block that is not a JSON object with a string
    `name` (malformed, or cut off by max_tokens) makes the whole text content and no calls; a
    call without `arguments` has `{}`.
    """
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return text, []
    calls = []
    for match in _CALLS.finditer(text):
        body = (match.group(1) if match.group(1) is not None else match.group(2)).strip()
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        calls.append((call["name"], _dumps(call.get("arguments", {}))))
    return text[:start].rstrip() or None, calls


def has_tool_turns(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a conversation holds tool calls or tool results (rendered with the tools path)."""
    return any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def template_turns(
    messages: Sequence[Message], tools: Sequence[Message] | None, template: str
) -> tuple[list[Message], dict[str, Any]]:
    """(messages, extra template variables) for rendering a conversation with `template`.

    A template that reads `tools` gets them as transformers passes them, with each call's
    arguments as a JSON object (as vLLM hands them over) and the tool results in the order of
    their calls (matched_tool_results); any other gets hermes_messages.
    A conversation without tools, tool calls or tool turns is returned as it is.
    """
    if not tools and not has_tool_turns(messages):
        return list(messages), {}
    if not template_reads_tools(template):
        return hermes_messages(messages, tools), {}
    return openai_turns(messages), {"tools": list(tools) if tools else None}


def openai_turns(messages: Sequence[Message]) -> list[Message]:
    """The conversation as a template that reads `tools` takes it, as transformers'
    apply_chat_template does: tool results matched to their calls (matched_tool_results), each
    call's arguments a JSON object (as vLLM hands them over) rather than OpenAI's JSON text."""
    out = []
    for i, m in enumerate(matched_tool_results(messages)):
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": call_arguments(
                    c["function"]["arguments"], f"messages[{i}].tool_calls[{j}]")}}
                for j, c in enumerate(m["tool_calls"])
            ]  # fmt: skip
        out.append(m)
    return out
