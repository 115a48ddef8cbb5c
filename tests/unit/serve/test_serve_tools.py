"""Tool calling end to end: a real uvicorn on 127.0.0.1, the official openai client, a tiny random
model. A named tool_choice gives one call whose arguments validate against the function's schema
(several seeds, n=2, streamed and not: the stream accumulates to the same calls), "required"
gives calls of the given tools (streamed as they arrive, to the same message), a tool result renders into the prompt exactly, the feedback store
keeps the calls, and bad tool requests are 400s that say why. Auto's Hermes parsing and its
stream are checked on strings."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

import jsonschema
import openai

from lmforge.serve.feedback import FeedbackStore
from lmforge.serve.tools import ToolPlan, ToolStream
from lmforge.tokenizer.chat import CHATML_TEMPLATE, render_chat
from lmforge.tokenizer.hermes_tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    hermes_messages,
    parse_tool_calls,
    template_turns,
)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer"},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"$ref": "#/$defs/zone"}},
    "required": ["zone"],
    "additionalProperties": False,
    "$defs": {"zone": {"enum": ["UTC", "CET"]}},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
CHAT = [{"role": "user", "content": "Weather in Oslo?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


TAUGHT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
TAUGHT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def micro_chat_model(tmp_path_factory, name, teach=None, special_tags=False):
    """A micro chat model dir with room for the tool prompt (about 600-1,000 byte-level tokens);
    with `teach` (messages, tools, answer), trained until it writes that answer greedily; with
    special_tags, its tokenizer has <tool_call> and </tool_call> as added special tokens (as
    Hermes 2 Pro's and Qwen 2.5's)."""
    import torch

    from lmforge.model.config import preset_config
    from lmforge.model.convert import save_pretrained
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.files import TokenizerFiles, copy_tokenizer_files
    from unit.finetune.helpers import make_tokenizer_dir

    tok = make_tokenizer_dir(tmp_path_factory.mktemp(f"{name}-tok"))
    if special_tags:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok / "tokenizer.json"))
        tokenizer.add_special_tokens([TOOL_CALL_OPEN, TOOL_CALL_CLOSE])
        tokenizer.save(str(tok / "tokenizer.json"))
    out = tmp_path_factory.mktemp(name)
    files = TokenizerFiles.load(tok)
    torch.manual_seed(0)
    init = 0.02 if teach else 0.2  # peaky random weights vary the answers; training wants calm
    config = preset_config("micro", vocab_size=files.vocab_size, init_std=init, block_size=2048)
    model = Transformer(config)
    if teach is not None:
        messages, tools, answer = teach
        prompt = files.encode(files.render_chat(messages, True, tools=tools))
        ids = torch.tensor([prompt + files.encode(answer + "<|im_end|>")])
        labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
        labels[:, : len(prompt) - 1] = -100  # the loss on the answer only
        opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
        for _ in range(90):  # loss ~0.02: the answer is the greedy one
            opt.zero_grad()
            model(ids, labels=labels).backward()
            opt.step()
    save_pretrained(model.eval(), out)
    copy_tokenizer_files(tok, out)
    return out


@pytest.fixture(scope="module")
def special_dir(tmp_path_factory):
    """The taught model over a tokenizer whose tool-call tags are special tokens."""
    return micro_chat_model(tmp_path_factory, "special", (CHAT, TAUGHT_TOOLS, TAUGHT), True)


# a chat template that renders tools, calls and results itself (as Qwen 2.5's does, shorter)
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>tool "
    "{{ m.tool_call_id }}\n{{ m.content }}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n"
    "{{ m.content or '' }}{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} "
    "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tools_template_dir(tmp_path_factory):
    out = micro_chat_model(tmp_path_factory, "tools-template")
    (out / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory, openai_server, special_dir, tools_template_dir):
    db = tmp_path_factory.mktemp("tools") / "f.db"
    taught = micro_chat_model(tmp_path_factory, "taught", (CHAT, TAUGHT_TOOLS, TAUGHT))
    models = [{"name": "m", "path": micro_chat_model(tmp_path_factory, "random")},
              {"name": "taught", "path": taught}, {"name": "special", "path": special_dir},
              {"name": "tools-template", "path": tools_template_dir}]  # fmt: skip
    return openai_server(models, feedback_db=db), db


@pytest.fixture(scope="module")
def client(served):
    return served[0]


def check_calls(calls, names):
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def streamed(client, **ask):
    """The openai client's own accumulation of a stream (ChatCompletionStreamState)."""
    with client.chat.completions.stream(**ask) as stream:
        try:
            return stream.get_final_completion()
        except openai.LengthFinishReasonError as exc:  # it refuses to parse a choice cut short
            return exc.completion


def calls_of(choice):
    return [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_named_tool_choice_gives_one_valid_call_streamed_and_not(client, seed):
    ask = dict(model="m", messages=CHAT, tools=TOOLS, tool_choice=NAMED, max_tokens=60, n=2,
               seed=seed, temperature=1.0)  # fmt: skip
    whole = client.chat.completions.create(**ask)
    for choice in whole.choices:  # a forced call ends "stop", as OpenAI's and vLLM's do
        assert choice.finish_reason == "stop" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls, ["get_weather"])
    final = streamed(client, **ask)
    assert [calls_of(c) for c in final.choices] == [calls_of(c) for c in whole.choices]
    assert [c.finish_reason for c in final.choices] == ["stop"] * 2
    assert [c.message.content for c in final.choices] == [None, None]
    for choice in final.choices:
        check_calls(choice.message.tool_calls, ["get_weather"])


def test_named_arguments_stream_as_pieces_after_the_opening(client):
    ask = dict(model="m", messages=CHAT, tools=TOOLS, tool_choice=NAMED, max_tokens=60, seed=4)
    chunks = [c.model_dump() for c in client.chat.completions.create(**ask, stream=True)]
    # OpenAI's shapes: the role (no content: the answer is a call), the call's opening, then its
    # argument pieces; the forced call's finish_reason on the last (as vLLM, not on an extra {})
    role = chunks[0]["choices"][0]
    assert (role["delta"]["role"], role["delta"]["content"], role["delta"]["tool_calls"]) == (
        "assistant", None, None,
    )  # fmt: skip
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons == [None] * (len(chunks) - 1) + ["stop"]
    deltas = [d for c in chunks for d in c["choices"][0]["delta"]["tool_calls"] or []]
    assert all(c["choices"][0]["delta"]["content"] is None for c in chunks[1:])
    opening, pieces = deltas[0], deltas[1:]
    assert (opening["index"], opening["type"], opening["function"]) == (
        0, "function", {"name": "get_weather", "arguments": ""},
    )  # fmt: skip
    assert opening["id"].startswith("call_") and len(opening["id"]) == 29
    assert all(p["index"] == 0 and (p["id"], p["type"], p["function"]["name"]) == (None,) * 3
               for p in pieces)  # fmt: skip
    assert len(pieces) > 1  # token by token, not one piece at the end
    jsonschema.validate(json.loads("".join(p["function"]["arguments"] for p in pieces)), WEATHER)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gives_calls_of_the_tools(client, parallel):
    names, cut = set(), 0
    for seed in range(3):
        ask = dict(model="m", messages=CHAT, tools=TOOLS, tool_choice="required", n=2,
                   max_tokens=300, seed=seed, parallel_tool_calls=parallel)  # fmt: skip
        whole = client.chat.completions.create(**ask)
        for choice in whole.choices:
            if choice.finish_reason == "length":  # a random model may ramble in a string
                cut += 1
                continue
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            calls = choice.message.tool_calls
            assert len(calls) >= 1 and (parallel or len(calls) == 1)
            check_calls(calls, SCHEMAS)
            names |= {c.function.name for c in calls}
        final = streamed(client, **ask)  # the same seeds: the same answers, as they streamed
        assert [calls_of(c) for c in final.choices] == [calls_of(c) for c in whole.choices]
        assert [(c.message.content, c.finish_reason) for c in final.choices] == [
            (c.message.content, c.finish_reason) for c in whole.choices
        ]
    assert cut <= 1 and names <= set(SCHEMAS)
    assert len(names) == 2 or not parallel  # both tools called (seeds 1 and 2 do)


def test_required_calls_stream_before_the_end(client):
    ask = dict(model="m", messages=CHAT, tools=TOOLS, tool_choice="required", max_tokens=300,
               seed=1, stream=True)  # fmt: skip
    chunks = [c.model_dump()["choices"] for c in client.chat.completions.create(**ask)]
    deltas = [(i, d) for i, c in enumerate(chunks) if c for d in c[0]["delta"]["tool_calls"] or []]
    opening = deltas[0][1]
    assert (opening["index"], opening["type"], opening["function"]) == (
        0, "function", {"name": opening["function"]["name"], "arguments": ""},
    )  # fmt: skip
    assert opening["function"]["name"] in SCHEMAS and opening["id"].startswith("call_")
    pieces = [i for i, d in deltas if d["id"] is None]
    assert deltas[0][0] < len(chunks) - 2 and len(set(pieces)) > 2  # not all at the end
    assert [c[0]["finish_reason"] for c in chunks if c][-1] in ("tool_calls", "length")


def test_auto_and_none_answer_in_text_here(client):
    # the random model writes no <tool_call>: both give content, no calls (auto parses them out)
    for choice in ("auto", "none"):
        out = client.chat.completions.create(
            model="m",
            messages=CHAT,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=8,
            seed=0,
            extra_body={"ignore_eos": True},
        )
        assert out.choices[0].message.tool_calls is None
        assert out.choices[0].message.content and out.choices[0].finish_reason == "length"


def test_auto_reads_the_calls_a_model_writes_streamed_and_not(client):
    ask = dict(model="taught", messages=CHAT, tools=TAUGHT_TOOLS, max_tokens=120, temperature=0)
    whole = client.chat.completions.create(**ask).choices[0]
    assert (whole.finish_reason, whole.message.content) == ("tool_calls", "Let me check.")
    assert calls_of(whole) == [("get_weather", '{"city": "Oslo"}')]
    content, deltas = "", []
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            deltas += choice.delta.tool_calls or []
            assert "<" not in (choice.delta.content or "")  # the tag never leaks as content
    assert content == "Let me check." and [d.function.name for d in deltas] == ["get_weather", None]
    final = streamed(client, **ask).choices[0]
    assert (final.finish_reason, final.message.content) == ("tool_calls", "Let me check.")
    assert calls_of(final) == calls_of(whole)
    plain = client.chat.completions.create(**ask, tool_choice="none").choices[0]
    assert (plain.finish_reason, plain.message.content) == ("stop", TAUGHT)  # no parsing


def test_auto_reads_calls_whose_tags_are_special_tokens(client, special_dir):
    # the tags are single special ids here, which the text drops unless auto keeps them
    from lmforge.tokenizer.files import TokenizerFiles

    files = TokenizerFiles.load(special_dir)
    added = files.tokenizer.get_added_tokens_decoder()
    assert {t.content for t in added.values() if t.special} >= {TOOL_CALL_OPEN, TOOL_CALL_CLOSE}
    assert len(files.encode(TOOL_CALL_OPEN)) == 1
    ask = dict(model="special", messages=CHAT, tools=TAUGHT_TOOLS, max_tokens=120, temperature=0)
    whole = client.chat.completions.create(**ask).choices[0]
    assert (whole.finish_reason, whole.message.content) == ("tool_calls", "Let me check.")
    assert calls_of(whole) == [("get_weather", '{"city": "Oslo"}')]
    final = streamed(client, **ask).choices[0]
    assert (final.finish_reason, final.message.content) == ("tool_calls", "Let me check.")
    assert calls_of(final) == calls_of(whole)
    plain = client.chat.completions.create(**ask, tool_choice="none").choices[0]  # tags dropped
    untagged = TAUGHT.replace(TOOL_CALL_OPEN, "").replace(TOOL_CALL_CLOSE, "")
    assert (plain.finish_reason, plain.message.content) == ("stop", untagged)


def test_greedy_cached_answers_get_new_call_ids(client):
    ask = dict(model="m", messages=CHAT, tools=TOOLS, tool_choice=NAMED, max_tokens=60,
               temperature=0)  # fmt: skip
    first, again = (client.chat.completions.create(**ask).choices[0] for _ in range(2))
    assert calls_of(first) == calls_of(again)
    assert first.message.tool_calls[0].id != again.message.tool_calls[0].id
    plain = client.chat.completions.create(**{**ask, "tool_choice": "none"}).choices[0]
    assert plain.message.tool_calls is None  # "none" is cached apart from the named choice


def test_the_feedback_store_keeps_the_calls_in_openai_form(served):
    client, db = served
    out = client.chat.completions.create(
        model="m", messages=CHAT, tools=TOOLS, tool_choice=NAMED, max_tokens=60, seed=9
    )
    call = out.choices[0].message.tool_calls[0]
    with FeedbackStore(db) as store:
        row = store.response(out.id)
    args = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    assert (
        row["text"] == f'<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>'
    )
    assert row["messages"] == CHAT and row["params"]["messages_form"] == "openai"
    assert row["params"]["tools"] == TOOLS and row["params"]["tool_choice"] == "named"
    # for a template without tools, the Hermes turns made of the kept conversation (as finetune
    # makes them of the exported row) render to the served prompt exactly, tool results included
    out = client.chat.completions.create(model="m", messages=SECOND_TURN, tools=TOOLS, max_tokens=2)
    with FeedbackStore(db) as store:
        row = store.response(out.id)
    assert row["messages"] == [m if m["content"] else {**m, "content": ""} for m in SECOND_TURN]
    assert render_chat(hermes_messages(row["messages"], TOOLS), True) == row["prompt"]


def test_exported_tool_rows_render_through_the_models_template_to_the_served_prompt(
    served, tools_template_dir
):
    from lmforge.finetune.formats import read_file
    from lmforge.serve.feedback_export import FeedbackExportConfig, collect

    transformers = pytest.importorskip("transformers")
    client, db = served
    two = {"role": "assistant", "content": "Both.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "get_weather",
                                                     "arguments": '{"city": "Oslo"}'}}]}  # fmt: skip
    results = [
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
        {"role": "tool", "tool_call_id": "a", "content": "12:00"},
    ]  # the calls' reverse
    asked = [*SECOND_TURN, {"role": "assistant", "content": "3 C."}, {"role": "user", "content": "And?"},
             two, *results, {"role": "user", "content": "Again?"}]  # fmt: skip
    out = client.chat.completions.create(model="tools-template", messages=asked, tools=TOOLS,
                                         tool_choice=NAMED, max_tokens=60, seed=9)  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    with FeedbackStore(db) as store:
        served_prompt = store.response(out.id)["prompt"]
        store.add_rating(out.id, 5)
    assert served_prompt.index("tool a\n12:00") < served_prompt.index("tool b\nrain")
    sft, _, _, _ = collect(FeedbackExportConfig(db=db, out=db.parent / "export-tools"))
    (row,) = [r for r in sft if r["response_id"] == out.id]
    tok = transformers.AutoTokenizer.from_pretrained(tools_template_dir)
    prompt = tok.apply_chat_template(row["messages"][:-1], tools=row["tools"], tokenize=False,
                                     add_generation_prompt=True)  # fmt: skip
    assert prompt == served_prompt
    arguments = json.loads(out.choices[0].message.tool_calls[0].function.arguments)
    arguments = json.dumps(arguments, ensure_ascii=False)
    answer = f"<tool_call>get_weather {arguments}</tool_call><|im_end|>\n"
    assert tok.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False) == (
        prompt + answer
    )
    # and finetune reads the row: Hermes turns for a ChatML model, and for this model, whose
    # template reads tools, the OpenAI form its validation prompt renders to the served prompt
    from lmforge.finetune.evaluate import answer_prompt
    from lmforge.finetune.sft import load_chat_tokenizer

    data = db.parent / "sft-row.jsonl"
    data.write_text(json.dumps(row) + "\n")
    (example,) = read_file(data)[1]
    assert example["messages"][-1]["content"] == (
        f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>'
    )
    assert answer_prompt(load_chat_tokenizer(tools_template_dir), example) == served_prompt


def test_a_streamed_tool_answer_is_stored_and_exported_as_a_whole_one(served):
    from lmforge.serve.feedback_export import FeedbackExportConfig, collect

    client, db = served
    ask = dict(model="taught", messages=CHAT, tools=TAUGHT_TOOLS, max_tokens=120, temperature=0)
    final = streamed(client, **ask)
    assert final.choices[0].finish_reason == "tool_calls"
    with FeedbackStore(db) as store:
        row = store.response(final.id)
        store.add_rating(final.id, 5)
    assert row["text"] == TAUGHT and row["params"]["messages_form"] == "openai"
    assert row["messages"] == CHAT and row["params"]["finish_reason"] == "tool_calls"
    sft = collect(FeedbackExportConfig(db=db, out=db.parent / "export-streamed"))[0]
    (exported,) = [r for r in sft if r["response_id"] == final.id]
    assert exported["tools"] == TAUGHT_TOOLS and exported["messages"][-1] == {
        "role": "assistant", "content": "Let me check.",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                         "arguments": {"city": "Oslo"}}}],
    }  # fmt: skip


SECOND_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
]  # fmt: skip


def test_a_call_cut_by_max_tokens_is_no_training_data(served):
    from lmforge.serve.feedback_export import FeedbackExportConfig, collect

    client, db = served
    named = dict(model="m", messages=CHAT, tools=TOOLS, tool_choice=NAMED, seed=3)
    whole = client.chat.completions.create(**named, max_tokens=60)
    cut = client.chat.completions.create(**named, max_tokens=4)
    required = client.chat.completions.create(**{**named, "tool_choice": "required"}, max_tokens=40)
    plain = client.chat.completions.create(**{**named, "tool_choice": "none"}, max_tokens=4)
    assert [r.choices[0].finish_reason for r in (whole, cut, required, plain)] == [
        "stop", "length", "length", "length",
    ]  # fmt: skip
    assert cut.choices[0].message.tool_calls and required.choices[0].message.tool_calls
    with FeedbackStore(db) as store:
        assert store.response(cut.id)["params"]["finish_reason"] == "length"
        for r in (whole, cut, required, plain):
            store.add_rating(r.id, 5)
        store.add_choice(cut.id, plain.id)  # a cut call on either side: no pair
        store.add_choice(plain.id, required.id)
        store.add_choice(whole.id, plain.id)
    sft, pairs, kto, counts = collect(FeedbackExportConfig(db=db, out=db.parent / "export"))
    ids = {whole.id, cut.id, required.id, plain.id}  # (the store is the module's: other rows)
    assert {r["response_id"] for r in sft} & ids == {whole.id, plain.id}  # the cut plain stays
    assert [(p["chosen_id"], p["rejected_id"], p["kind"]) for p in pairs] == [
        (whole.id, plain.id, "choice")
    ]
    assert [(r["response_id"], r["label"]) for r in kto if r["response_id"] in ids] == [  # no cut
        (whole.id, True), (plain.id, True), (plain.id, False),  # the last from the choice
    ]  # fmt: skip
    assert counts["skipped_cut_calls"] == 2


def test_a_tool_result_renders_into_the_chatml_prompt_exactly():
    tools_line = "\n".join(json.dumps(t) for t in TOOLS)
    expected = (
        "<|im_start|>system\nBe brief.\n\nYou are a function calling AI model. You are provided "
        "with function signatures within <tools></tools> XML tags. You may call one or more "
        "functions to assist with the user query. Don't make assumptions about what values to "
        f"plug into functions. Here are the available tools:\n<tools>\n{tools_line}\n</tools>\n"
        "For each function call, return a json object with the function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Oslo", "unit": "c"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 3}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    messages, extra = template_turns(SECOND_TURN, TOOLS, CHATML_TEMPLATE)
    assert extra == {} and render_chat(messages, True) == expected
    assert hermes_messages(SECOND_TURN, TOOLS) == messages


def test_hermes_turns_are_ones_finetune_reads():
    from lmforge.finetune.formats import ROLES

    two = {
        "role": "assistant",
        "content": "Both.",
        "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        ],
    }
    chat = [*SECOND_TURN, {"role": "assistant", "content": "3 C."}, {"role": "user", "content": "And?"},
            two, {"role": "tool", "tool_call_id": "a", "content": "12:00"},
            {"role": "tool", "tool_call_id": "b", "content": "rain"}]  # fmt: skip
    turns = hermes_messages(chat, None)
    assert {t["role"] for t in turns} <= set(ROLES) and len(turns) == len(chat) - 1
    assert turns[-2]["content"] == (
        'Both.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    )  # an empty arguments string is no arguments
    assert turns[-1] == {"role": "user", "content": (
        "<tool_response>\n12:00\n</tool_response>\n<tool_response>\nrain\n</tool_response>")}  # fmt: skip


def test_a_template_that_reads_tools_gets_them_as_transformers_passes_them():
    template = (
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}:"
        "{% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments | tojson }}"
        "{% endfor %}{{ m.content or '' }};{% endfor %}"
    )
    messages, extra = template_turns(SECOND_TURN, TOOLS, template)
    text = render_chat(messages, template=template, **extra)
    assert text == (
        '[get_weather][get_time]system:Be brief.;user:Weather in Oslo?;'
        'assistant:get_weather{"city": "Oslo", "unit": "c"};tool:{"temp": 3};'
    )  # fmt: skip


def test_the_second_turn_is_served(client):
    out = client.chat.completions.create(
        model="m", messages=SECOND_TURN, tools=TOOLS, max_tokens=4, seed=0
    )
    assert out.usage.prompt_tokens > 100  # the tools and the result are in the prompt


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("The weather is fine.", "The weather is fine.", []),
        ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
         "</tool_call>", "Let me look.", [("get_weather", '{"city": "Oslo"}')]),
        ('<tool_call>{"name": "a", "arguments": {"x": [1, 2]}}</tool_call>\n'
         '<tool_call>{"name": "b"}</tool_call>', None, [("a", '{"x": [1, 2]}'), ("b", "{}")]),
        ('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call><tool_call>{"name": "b", '
         '"argu', None, None),  # the second cut off: everything is content
        ("Hm <tool_call>{name: a}</tool_call>", None, None),  # malformed JSON
        ('<tool_call>["a", {}]</tool_call>', None, None),  # not an object with a name
        ('<tool_call>{"name": "a", "arguments": {}}', None, [("a", "{}")]),  # unclosed, whole
    ],
)  # fmt: skip
def test_auto_parses_hermes_calls(text, content, calls):
    if calls is None:  # as vLLM: a malformed call leaves the whole text as content
        assert parse_tool_calls(text) == (text, [])
    else:
        assert parse_tool_calls(text) == (content, calls)


@pytest.mark.parametrize(
    "text",
    [
        "Plain words <tool but no call>, then more.  ",
        'Sure.\n\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}\n'
        "</tool_call>",
        'Oops <tool_call>{"name": "get_time", "arguments": {"zone"</tool_call> tail',
    ],
)
@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_auto_stream_deltas_accumulate_to_the_whole_message(text, size):
    plan = ToolPlan("auto", tuple(TOOLS))
    whole, reason = plan.message(text, "stop")
    stream, deltas = ToolStream(plan), []
    for i in range(0, len(text), size):
        deltas += stream.feed(text[i : i + size])
    more, streamed_reason = stream.end("stop")
    content, calls = accumulate(deltas + more)
    assert streamed_reason == reason == ("tool_calls" if "tool_calls" in whole else "stop")
    assert (content or None) == whole["content"]
    assert calls == [c["function"] for c in whole.get("tool_calls", [])]
    assert not any(d.get("content", "").endswith("<") for d in deltas if "<tool" in text)


def accumulate(deltas):
    """(content, [{name, arguments}] by index) as a client accumulates chat deltas."""
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"name": None, "arguments": ""})
            entry["name"] = call["function"].get("name", entry["name"])
            entry["arguments"] += call["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


def test_auto_stream_holds_back_only_a_possible_tag_however_the_text_is_cut():
    # random mixes of tag pieces, whitespace (unicode too) and multi-byte text, cut anywhere: the
    # stream adds up to the whole answer, and until a whole <tool_call> arrives, what it has not
    # sent yet is whitespace around at most a beginning of the tag (nothing waits for the end)
    pieces = ["a", " ", "\n", "<", "<tool", "_call>", "<tool_call>", "</tool_call>", "{", "}",
              '{"name": "f", "arguments": {"x": "é"}}', "é", "日本", "\u3000", "\xa0", "tool_call>"]  # fmt: skip
    rnd = random.Random(0)
    for _ in range(1500):
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 12)))
        plan = ToolPlan("auto", (), parallel=rnd.random() < 0.5)
        whole, reason = plan.message(text, "stop")
        stream, deltas, i = ToolStream(plan), [], 0
        while i < len(text):
            cut = i + rnd.randint(1, 5)
            deltas += stream.feed(text[i:cut])
            i = cut
            unsent = text[:i][len(accumulate(deltas)[0]) :]
            if TOOL_CALL_OPEN not in text[:i]:
                assert TOOL_CALL_OPEN.startswith(unsent.strip()), (text, unsent)
        more, streamed_reason = stream.end("stop")
        expected = (whole["content"] or "", [c["function"] for c in whole.get("tool_calls", [])])
        assert (*accumulate(deltas + more), streamed_reason) == (*expected, reason), text


@pytest.mark.parametrize(
    ("ask", "param", "says"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         "names the function 'nope', which is not among the tools (get_weather, get_time)"),
        ({"tools": [{"type": "function", "function": {"description": "x"}}]},
         "tools.0.function.name", "missing required parameter 'tools.0.function.name'"),
        ({"tools": None, "tool_choice": "auto"}, "tool_choice",
         "tool_choice is only allowed when tools are given"),
        ({"response_format": {"type": "json_object"}}, "tools",
         "tools cannot be combined with response_format"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools", "more than once"),
        ({"messages": [{"role": "tool", "content": "3"}]}, "messages.0",
         "needs the tool_call_id"),
        ({"messages": [*SECOND_TURN[:2], {**SECOND_TURN[2], "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]},
         "messages", "messages[2].tool_calls[0]: the arguments are not JSON"),
        ({"messages": [*SECOND_TURN, {**SECOND_TURN[3], "tool_call_id": "call_9"}]}, "messages",
         "messages[4]: tool_call_id 'call_9' names no tool call of the assistant message it "
         "answers (messages[2], calls 'call_1')"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400s_that_say_why(client, ask, param, says):
    body = {"model": "m", "messages": CHAT, "tools": TOOLS, "max_tokens": 5, **ask}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body)
    assert says in err.value.body["message"] and err.value.body["param"] == param


def test_an_unusable_parameters_schema_gets_openais_schema_error(client):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "^a$"}}}}}]  # fmt: skip
    for choice in ({"type": "function", "function": {"name": "f"}}, "required"):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="m", messages=CHAT, tools=bad, tool_choice=choice, max_tokens=5
            )
        body = err.value.body
        assert body["message"].startswith("Invalid schema for function 'f': unsupported JSON")
        assert (body["param"], body["code"]) == ("tools", "invalid_json_schema")
    out = client.chat.completions.create(  # auto does not compile the schema: it is only shown
        model="m", messages=CHAT, tools=bad, max_tokens=3, seed=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].message.content and out.choices[0].finish_reason == "length"


def test_a_tool_set_compiles_once(serve_model_dir):
    from lmforge.serve.protocol import ChatRequest, parse_request
    from lmforge.tokenizer.files import TokenizerFiles

    files = TokenizerFiles.load(serve_model_dir)

    def guide(messages, tools, choice="required"):
        body = {"model": "m", "messages": messages, "tools": tools, "tool_choice": choice}
        return parse_request(ChatRequest, body).guide(files)

    first = guide(CHAT, TOOLS)
    assert first.kind == "json_schema" and json.loads(first.spec)["items"]["anyOf"]
    assert guide(SECOND_TURN, TOOLS).tokens is first.tokens  # same tools: the compiled guide
    assert guide(CHAT, TOOLS[:1]).tokens is not first.tokens
    assert json.loads(guide(CHAT, TOOLS, NAMED).spec) == WEATHER
    assert guide(CHAT, TOOLS, "auto") is None and guide(CHAT, TOOLS, "none") is None


def test_the_guiding_schemas():
    bare = {"type": "function", "function": {"name": "ping"}}
    named = ToolPlan("named", (bare,), "ping")
    assert named.schema() == {"type": "object", "properties": {}, "additionalProperties": False}
    one = ToolPlan("required", (TOOLS[1], bare), parallel=False).schema()
    assert (one["type"], one["minItems"], one["maxItems"]) == ("array", 1, 1)
    time_call, ping_call = one["items"]["anyOf"]
    assert time_call["properties"]["name"] == {"const": "get_time"}
    assert time_call["properties"]["arguments"]["properties"]["zone"] == {"$ref": "#/$defs/t0.zone"}
    assert "$defs" not in time_call["properties"]["arguments"]
    assert one["$defs"] == {"t0.zone": {"enum": ["UTC", "CET"]}}
    assert ping_call["required"] == ["name", "arguments"]
    jsonschema.validate([{"name": "get_time", "arguments": {"zone": "CET"}}], one)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {"zone": "PST"}}], one)
    assert "maxItems" not in ToolPlan("required", (bare,)).schema()


def random_call_array(rnd):
    """A "required" answer as a guide may let a model write it: any key order and JSON spacing,
    strings with escapes and multi-byte characters, nested values."""
    values = ["Oslo", 'a "quoted" }], word', "é日本\\n", 3, -1.5e3, True, None, [1, {"k": []}], {}]
    calls = []
    for _ in range(rnd.randint(1, 3)):
        args = {f"k{i}": rnd.choice(values) for i in range(rnd.randint(0, 3))}
        call = {"name": rnd.choice(["get_weather", 'odd "name"', "f\u00e9"]), "arguments": args}
        calls.append(dict(reversed(call.items())) if rnd.random() < 0.3 else call)
    seps = rnd.choice([(", ", ": "), (",", ":"), (" ,\n ", " :  ")])
    text = json.dumps(
        calls, separators=seps, indent=rnd.choice([None, 2]), ensure_ascii=rnd.random() < 0.5
    )
    return (" " if rnd.random() < 0.5 else "") + text, calls


def test_required_calls_stream_as_they_arrive_however_the_array_is_cut():
    # the stream's deltas (a call's opening once its name is complete, then its argument pieces)
    # accumulate, at every cut, to the calls the whole answer's message gives for that prefix, and
    # at the end to the array's calls, each call's arguments its text as generated
    plan, rnd = ToolPlan("required", tuple(TOOLS)), random.Random(0)
    for _ in range(400):
        text, calls = random_call_array(rnd)
        stream, deltas, i = ToolStream(plan), [], 0
        while i < len(text):
            cut = i + rnd.randint(1, 6)
            deltas += stream.feed(text[i:cut])
            i = cut
            message, _ = plan.message(text[:i], "length")
            so_far = [c["function"] for c in message.get("tool_calls", [])]
            assert accumulate(deltas) == ("", so_far), text[:i]
        more, reason = stream.end("stop")
        assert more == [] and reason == "tool_calls"
        got = accumulate(deltas)[1]
        assert [(c["name"], json.loads(c["arguments"])) for c in got] == [
            (c["name"], c["arguments"]) for c in calls
        ]
        opens = [d["tool_calls"][0] for d in deltas if "id" in d["tool_calls"][0]]
        assert [o["index"] for o in opens] == list(range(len(calls)))  # each opens once


def test_a_cut_required_array_gives_the_calls_begun():
    plan = ToolPlan("required", tuple(TOOLS))
    text = '[{"name": "get_time", "arguments": {"zone": "UTC"}}, {"name": "get_weather", "argu'
    message, reason = plan.message(text, "length")
    assert reason == "length" and message["content"] is None
    assert [c["function"] for c in message["tool_calls"]] == [
        {"name": "get_time", "arguments": '{"zone": "UTC"}'},
        {"name": "get_weather", "arguments": ""},
    ]
    message, reason = plan.message('[{"name": "get_ti', "length")
    assert (message, reason) == ({"role": "assistant", "content": None}, "length")


def test_one_call_at_most_without_parallel_tool_calls():
    text = '<tool_call>{"name": "a"}</tool_call><tool_call>{"name": "b"}</tool_call>'
    message, reason = ToolPlan("auto", (), parallel=False).message(text, "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["a"]
    assert reason == "tool_calls" and message["content"] is None
    message, reason = ToolPlan("auto", ()).message(text, "length")
    assert len(message["tool_calls"]) == 2 and reason == "length"  # cut: the reason stays


def test_only_a_call_the_model_chose_ends_tool_calls():
    # OpenAI and vLLM: auto and required calls end "tool_calls", a forced named call "stop"
    call = '{"city": "Oslo", "unit": "c"}'
    named = ToolPlan("named", tuple(TOOLS), "get_weather")
    assert named.message(call, "stop")[1] == "stop"
    stream = ToolStream(named)
    stream.feed(call)
    assert stream.end("stop")[1] == "stop"
    required = ToolPlan("required", tuple(TOOLS))
    assert required.message(f'[{{"name": "get_weather", "arguments": {call}}}]', "stop")[1] == (
        "tool_calls"
    )
    assert named.message(call[:5], "length")[1] == "length"
