"""Fine-tuning data formats: detection per file, normalization, errors naming file and line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.errors import InputError
from lmforge.finetune.formats import detect_format, load_examples, read_file


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_alpaca_input_joined_and_meta_kept(tmp_path):
    f = _jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Add", "input": "1 and 2", "output": "3", "category": "math"},
            {"instruction": "Say hi", "output": "hi"},
        ],
    )
    fmt, ex = read_file(f)
    assert fmt == "alpaca"
    assert ex[0]["messages"] == [
        {"role": "user", "content": "Add\n\n1 and 2"},
        {"role": "assistant", "content": "3"},
    ]
    assert ex[0]["meta"] == {"category": "math"}
    assert ex[1]["messages"][0]["content"] == "Say hi"


def test_sharegpt_openai_prompt_completion(tmp_path):
    sg = _jsonl(
        tmp_path / "s.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "be brief"},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                ]
            }
        ],
    )
    oa = _jsonl(
        tmp_path / "o.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    pc = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "completion": "a"}])
    assert read_file(sg)[1][0]["messages"][0] == {"role": "system", "content": "be brief"}
    assert [m["role"] for m in read_file(sg)[1][0]["messages"]] == ["system", "user", "assistant"]
    assert read_file(oa)[0] == "openai"
    assert read_file(pc)[1][0]["messages"][1] == {"role": "assistant", "content": "a"}


def test_classification_labels_become_strings(tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": "b"}])
    fmt, ex = read_file(f)
    assert fmt == "classification"
    assert ex == [{"text": "x", "label": "1"}, {"text": "y", "label": "b"}]


def test_classification_pairs_keep_text_pair_and_refuse_a_non_string(tmp_path):
    rows = [{"text": "a", "text_pair": "b", "label": "same"}, {"text": "c", "label": "x"}]
    fmt, ex = read_file(_jsonl(tmp_path / "p.jsonl", rows))
    assert fmt == "classification"
    assert ex == [{"text": "a", "text_pair": "b", "label": "same"}, {"text": "c", "label": "x"}]
    bad = _jsonl(tmp_path / "bad.jsonl", [rows[0], {"text": "c", "text_pair": 3, "label": "x"}])
    with pytest.raises(InputError, match=r"bad\.jsonl line 2: text_pair must be a string"):
        read_file(bad)


def test_unknown_record_names_file_and_line(tmp_path):
    f = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "a"}, {"foo": 1}])
    with pytest.raises(InputError, match=r"bad\.jsonl line 2: .*does not fit .*prompt_completion"):
        read_file(f)
    g = _jsonl(tmp_path / "none.jsonl", [{"foo": 1}])
    with pytest.raises(InputError, match=r"none\.jsonl line 1: .*fits no known format"):
        read_file(g)
    assert detect_format({"foo": 1}) is None


def test_bad_json_and_bad_role(tmp_path):
    f = tmp_path / "j.jsonl"
    f.write_text('{"prompt": "q", "completion": "a"}\n{not json\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"j\.jsonl line 2: not valid JSON"):
        read_file(f)
    g = _jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(InputError, match=r"r\.jsonl line 1: unknown role 'robot'"):
        read_file(g)


def test_parquet_and_hf_dataset_dir(tmp_path):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert read_file(tmp_path / "d.parquet")[1][1] == {"text": "b", "label": "y"}
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"instruction": "i", "input": "", "output": "o"}]).save_to_disk(
        str(tmp_path / "hf")
    )
    fmt, ex = load_examples(tmp_path / "hf")
    assert fmt == "alpaca" and ex[0]["messages"][1]["content"] == "o"


def test_directory_mixing_chat_and_labels_is_refused(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    _jsonl(d / "a.jsonl", [{"prompt": "q", "completion": "a"}])
    _jsonl(d / "b.jsonl", [{"text": "t", "label": "l"}])
    with pytest.raises(InputError, match="mixes chat and classification"):
        load_examples(d)


def test_openai_tool_calling_becomes_the_hermes_turns_serve_renders(tmp_path):
    from lmforge.tokenizer.hermes_tools import hermes_messages

    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
    messages = [
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "assistant", "content": "5."},
    ]
    rows = [{"messages": messages, "tools": tools}, {"messages": messages[:2]}]
    fmt, ex = read_file(_jsonl(tmp_path / "t.jsonl", rows))
    assert fmt == "openai" and ex[0]["messages"] == hermes_messages(messages, tools)
    assert [m["role"] for m in ex[0]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert ex[1]["messages"][1] == {  # the call is what the assistant turn teaches, not ""
        "role": "assistant",
        "content": '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>',
    }
    # the OpenAI form kept for a template that reads tools (finetune/sft.py renders it)
    kept = [{**m, "content": m["content"] or ""} for m in messages]
    assert ex[0]["tool_conversation"] == {"messages": kept, "tools": tools}
    assert ex[1]["tool_conversation"] == {"messages": kept[:2], "tools": None}
    plain = [{"messages": [messages[0], messages[3]]}]
    assert "tool_conversation" not in read_file(_jsonl(tmp_path / "p.jsonl", plain))[1][0]
    bad = {**call, "function": {"name": "add", "arguments": "{a"}}
    rows = [{"messages": [messages[0], {**messages[1], "tool_calls": [bad]}]}]
    with pytest.raises(
        InputError, match=r"b\.jsonl line 1: messages\[1\]\.tool_calls\[0\]: the arg"
    ):
        read_file(_jsonl(tmp_path / "b.jsonl", rows))


def test_openai_tool_results_are_matched_to_their_calls_by_id(tmp_path):
    calls = [{"id": i, "type": "function", "function": {"name": n, "arguments": "{}"}}
             for i, n in (("t", "get_time"), ("w", "get_weather"))]  # fmt: skip
    head = [{"role": "user", "content": "Time and weather?"},
            {"role": "assistant", "content": None, "tool_calls": calls}]  # fmt: skip
    results = [{"role": "tool", "tool_call_id": "t", "content": "12:00"},
               {"role": "tool", "tool_call_id": "w", "content": "rain"}]  # fmt: skip
    tail = [{"role": "assistant", "content": "Noon, rain."}]
    rows = [{"messages": head + results + tail}, {"messages": head + results[::-1] + tail}]
    _, ex = read_file(_jsonl(tmp_path / "t.jsonl", rows))
    assert ex[0]["messages"] == ex[1]["messages"]  # the same turns, as the server renders them
    assert ex[0]["messages"][2]["content"].index("12:00") < ex[0]["messages"][2]["content"].index(
        "rain"
    )
    idless = [{k: v for k, v in r.items() if k != "tool_call_id"} for r in results]
    rows = [{"messages": [*head, results[1], idless[0], *tail]}, {"messages": head + idless[:1]}]
    with pytest.raises(InputError, match=r"u\.jsonl line 2: messages\[2\]: a tool result "
                       "without tool_call_id"):  # fmt: skip
        read_file(_jsonl(tmp_path / "u.jsonl", rows))  # line 1 (one call left) reads
    rows = [{"messages": [*head, {**results[0], "tool_call_id": "x"}, *tail]}]
    with pytest.raises(InputError, match=r"v\.jsonl line 1: messages\[2\]: tool_call_id 'x' "
                       "names no tool call"):  # fmt: skip
        read_file(_jsonl(tmp_path / "v.jsonl", rows))


def test_an_openai_tool_call_without_a_content_key_reads(tmp_path):
    # OpenAI's fine-tuning examples write an assistant's call with no "content" at all
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    rows = [{"messages": [{"role": "user", "content": "go"},
                          {"role": "assistant", "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "c", "content": "done"},
                          {"role": "assistant", "content": "Done."}]}]  # fmt: skip
    fmt, (ex,) = read_file(_jsonl(tmp_path / "c.jsonl", rows))
    assert fmt == "openai" and ex["messages"][1] == {
        "role": "assistant", "content": '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    }  # fmt: skip
    no_content = [{"messages": [{"role": "user", "content": "go"}, {"role": "assistant"}]}]
    with pytest.raises(InputError, match=r"d\.jsonl"):  # a turn with neither is still no shape
        read_file(_jsonl(tmp_path / "d.jsonl", no_content))
