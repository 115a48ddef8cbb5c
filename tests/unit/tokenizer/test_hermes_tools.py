"""Tool results are matched to the assistant's tool calls by tool_call_id, whatever their order,
for the Hermes turns and for templates that read `tools` alike."""

from __future__ import annotations

import pytest

from lmforge.errors import InputError
from lmforge.tokenizer.chat import render_chat
from lmforge.tokenizer.hermes_tools import hermes_messages, matched_tool_results, template_turns


def call(cid: str | None, name: str) -> dict:
    out = {"type": "function", "function": {"name": name, "arguments": "{}"}}
    return out if cid is None else {"id": cid, **out}


def result(cid: str | None, content: str) -> dict:
    return {"role": "tool", "content": content, **({} if cid is None else {"tool_call_id": cid})}


def chat(calls: list[dict], *results: dict) -> list[dict]:
    return [{"role": "user", "content": "Time and weather?"},
            {"role": "assistant", "content": None, "tool_calls": calls}, *results]  # fmt: skip


TWO = [call("a", "get_time"), call("b", "get_weather")]
IN_ORDER = chat(TWO, result("a", "12:00"), result("b", "rain"))


def test_results_in_any_order_render_in_the_order_of_their_calls():
    swapped = chat(TWO, result("b", "rain"), result("a", "12:00"))
    assert matched_tool_results(swapped) == IN_ORDER
    expected = hermes_messages(IN_ORDER, None)
    assert expected[-1]["content"] == (
        "<tool_response>\n12:00\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
    )
    assert hermes_messages(swapped, None) == expected
    template = (
        "{% for m in messages %}{{ m.role }}:{{ m.tool_call_id or '' }}={{ m.content or '' }};"
        "{% endfor %}{% for t in tools or [] %}{% endfor %}"
    )
    messages, extra = template_turns(swapped, [{"type": "function", "function": {}}], template)
    assert render_chat(messages, template=template, **extra).endswith("tool:a=12:00;tool:b=rain;")


def test_a_result_without_id_falls_back_to_order_only_where_unambiguous():
    one = chat([call("a", "get_time")], result(None, "12:00"))
    assert matched_tool_results(one)[-1] == result("a", "12:00")  # the only call: its id
    mixed = chat(TWO, result("b", "rain"), result(None, "12:00"))  # one call left for it
    assert matched_tool_results(mixed) == IN_ORDER
    no_ids = chat([call(None, "get_time"), call(None, "get_weather")],
                  result(None, "12:00"), result(None, "rain"))  # fmt: skip
    assert matched_tool_results(no_ids) == no_ids  # nothing but the order says which is which
    with pytest.raises(InputError, match=r"messages\[2\]: a tool result without tool_call_id.*2 "
                       r"unanswered call\(s\) of messages\[1\]"):  # fmt: skip
        matched_tool_results(chat(TWO, result(None, "12:00")))
    with pytest.raises(InputError, match=r"messages\[2\]: a tool result without tool_call_id"):
        matched_tool_results(chat(TWO, result(None, "12:00"), result(None, "rain")))  # calls' ids
    with pytest.raises(InputError, match=r"messages\[3\]: a tool result without tool_call_id"):
        matched_tool_results(chat([*TWO, call("c", "x")], result("a", "1"), result(None, "2")))


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        (chat(TWO, result("a", "1"), result("zz", "2")),
         r"messages\[3\]: tool_call_id 'zz' names no tool call of the assistant message it "
         r"answers \(messages\[1\], calls 'a', 'b'\)"),
        (chat(TWO, result("a", "1"), result("a", "2")),
         r"messages\[3\]: tool_call_id 'a' was answered already by messages\[2\]"),
        ([{"role": "user", "content": "hi"}, result("a", "1")],
         r"messages\[1\]: a tool result must follow the assistant message"),
        (chat(TWO, result("a", "1"), {"role": "user", "content": "and b?"}, result("b", "2")),
         r"messages\[4\]: a tool result must follow the assistant message"),  # a user turn between
        (chat([call("a", "f")], result("a", "1"), result(None, "2")),
         r"messages\[3\]: a tool result without tool_call_id, but messages\[1\] has 0 call\(s\) "
         r"left to answer for 1 such results"),
        (chat([call(None, "f"), call(None, "f")], *[result(None, str(n)) for n in range(3)]),
         r"messages\[4\]: a tool result without tool_call_id, but messages\[1\] has 2 call"),
        (chat([call("a", "f"), call("a", "g")], result("a", "1")),
         r"messages\[1\]\.tool_calls: the id\(s\) \['a'\] are given more than once"),
    ],
)  # fmt: skip
def test_a_result_that_answers_no_call_names_the_message_and_id(messages, says):
    with pytest.raises(InputError, match=says):
        hermes_messages(messages, None)
