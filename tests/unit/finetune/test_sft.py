"""SFT data: template rendering as transformers does, the assistant-only mask, truncation, packing."""

import json
import shutil

import numpy as np
import pytest

from lmforge.errors import InputError
from lmforge.finetune.sft import (
    build_sft_rows,
    encode_chat,
    example_ids,
    load_chat_tokenizer,
    truncate,
)

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital is Paris."},
    {"role": "user", "content": "And absolute value?"},
    {"role": "assistant", "content": "Return the absolute value."},
]


def test_render_matches_transformers_apply_chat_template(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    tok = load_chat_tokenizer(tokenizer_dir)
    for gen in (False, True):
        ours = tok.render_chat(CONV[:2], add_generation_prompt=gen)
        assert ours == hf.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=gen)


def test_loss_mask_is_exactly_the_assistant_turns(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    ids, mask = encode_chat(tok, CONV)
    assert len(ids) == len(mask)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    context = [i for i, m in zip(ids, mask, strict=True) if not m]
    raw = tok.tokenizer.decode
    assert raw(trained, skip_special_tokens=False) == (
        "The capital is Paris.<|im_end|>\nReturn the absolute value.<|im_end|>\n"
    )
    assert raw(context, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of "
        "France?<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\nAnd absolute value?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    # two contiguous trained runs, one per assistant turn
    runs = np.flatnonzero(np.diff(np.r_[0, mask, 0]) == 1)
    assert len(runs) == 2


def test_truncation_policies():
    ids, mask = list(range(10)), [0] * 5 + [1] * 5
    assert truncate(ids, mask, 4, "right") == ([0, 1, 2, 3], [0, 0, 0, 0])
    assert truncate(ids, mask, 4, "left") == ([6, 7, 8, 9], [1, 1, 1, 1])
    assert truncate(ids, mask, 4, "drop") is None
    assert truncate(ids, mask, 10, "drop") == (ids, mask)


def test_rows_pack_examples_with_boundaries_and_count_truncation(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    short = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Paris."},
            ]
        }
    ]
    long = [{"messages": CONV}]
    n_short = len(encode_chat(tok, short[0]["messages"])[0])
    seq_len = 3 * n_short + 2
    rows, stats = build_sft_rows(tok, short * 6 + long, seq_len, truncation="drop")
    assert stats["dropped"] == 1 and stats["rows"] == 2
    assert rows["doc_ids"][0].max() == 2  # three examples share a row
    # no label crosses an example boundary: the last token of each example predicts nothing
    for r in range(rows["input_ids"].shape[0]):
        d = rows["doc_ids"][r]
        boundary = np.flatnonzero(d[:-1] != d[1:])
        assert (rows["labels"][r, boundary] == -100).all()
    _, left = build_sft_rows(tok, long, 20, truncation="left")
    assert left["truncated"] == 1 and left["rows"] == 1
    _, unpacked = build_sft_rows(tok, short * 6, seq_len, packing=False)
    assert unpacked["rows"] == 6


def test_nothing_fits_is_an_input_error(tokenizer_dir):
    tok = load_chat_tokenizer(tokenizer_dir)
    with pytest.raises(InputError, match="seq_len"):
        build_sft_rows(tok, [{"messages": CONV}], 8, truncation="drop")


# A template that reads `tools` (Qwen 2.5's layout, shorter): tools in the system turn, calls in
# <tool_call> blocks, consecutive results in one user turn; the assistant turns (calls included)
# in generation blocks, so transformers can say which tokens are the assistant's.
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}# Tools
<tools>{% for t in tools %}
{{ t | tojson }}{% endfor %}
</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' %}<|im_start|>user
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{% generation %}{{ m.content or '' }}{% for c in m.tool_calls or [] %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>{% endgeneration %}
{% elif m.role == 'tool' %}{% if loop.previtem.role != 'tool' %}<|im_start|>user{% endif %}
<tool_response>
{{ m.content }}
</tool_response>{% if loop.last or loop.nextitem.role != 'tool' %}<|im_end|>
{% endif %}{% endif %}
{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}},
]  # fmt: skip
CALLS = [
    {"id": "a", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    {"id": "b", "type": "function", "function": {"name": "get_weather",
                                                 "arguments": '{"city": "Oslo"}'}},
]  # fmt: skip
RESULTS = [
    {"role": "tool", "tool_call_id": "a", "content": "12:00"},
    {"role": "tool", "tool_call_id": "b", "content": "rain"},
]
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Time and weather?"}]
ANSWER = {"role": "assistant", "content": "12:00, rain."}


def tool_example(tmp_path, results):
    """The finetune example of the tool conversation record (results in the order given)."""
    from lmforge.finetune.formats import read_file

    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": CALLS}, *results, ANSWER]
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps({"messages": messages, "tools": TOOLS}) + "\n")
    (example,) = read_file(data)[1]
    return example


# the same conversation as the server hands it to the template (and vLLM to transformers):
# arguments as JSON objects, results in the order of their calls
PARSED = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
          for c in CALLS]  # fmt: skip
SERVED = [*ASK, {"role": "assistant", "content": "", "tool_calls": PARSED}, *RESULTS, ANSWER]
TRAINED = (
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><tool_call>\n'
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
    "12:00, rain.<|im_end|>"
)


def tools_model(tokenizer_dir, tmp_path, template):
    """A copy of the tiny tokenizer with `template` as its chat template, and transformers' view."""
    transformers = pytest.importorskip("transformers")
    model = tmp_path / "model"
    shutil.copytree(tokenizer_dir, model)
    (model / "chat_template.jinja").write_text(template)
    return load_chat_tokenizer(model), transformers.PreTrainedTokenizerFast.from_pretrained(model)


@pytest.mark.parametrize("results", [RESULTS, RESULTS[::-1]], ids=["in-order", "reversed"])
def test_a_tool_conversation_is_trained_through_a_template_that_reads_tools(
    tokenizer_dir, tmp_path, results
):
    tok, hf = tools_model(tokenizer_dir, tmp_path, TOOLS_TEMPLATE)
    ids, mask = example_ids(tok, tool_example(tmp_path, results))
    ref = hf.apply_chat_template(SERVED, tools=TOOLS, return_dict=True,
                                 return_assistant_tokens_mask=True)  # fmt: skip
    assert ids == list(ref["input_ids"])
    assert mask == list(ref["assistant_masks"])
    assert hf.decode([i for i, m in zip(ids, mask, strict=True) if m]) == TRAINED


def test_a_tool_conversation_is_prompted_for_its_answer_as_it_is_served(tokenizer_dir, tmp_path):
    from lmforge.finetune.evaluate import answer_prompt

    tok, hf = tools_model(tokenizer_dir, tmp_path, TOOLS_TEMPLATE)
    prompt = answer_prompt(tok, tool_example(tmp_path, RESULTS[::-1]))
    assert prompt == hf.apply_chat_template(SERVED[:-1], tools=TOOLS, tokenize=False,
                                            add_generation_prompt=True)  # fmt: skip


def test_a_tools_template_without_generation_blocks_masks_by_prefix_renders(
    tokenizer_dir, tmp_path
):
    template = TOOLS_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    tok, hf = tools_model(tokenizer_dir, tmp_path, template)
    ids, mask = example_ids(tok, tool_example(tmp_path, RESULTS))
    assert ids == list(hf.apply_chat_template(SERVED, tools=TOOLS, return_dict=True)["input_ids"])
    trained = hf.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == TRAINED.replace("<|im_end|>", "<|im_end|>\n")  # each turn's whole text
    runs = np.flatnonzero(np.diff(np.r_[0, mask, 0]) == 1)
    assert len(runs) == 2  # one per assistant turn


def test_a_tool_conversation_is_hermes_turns_for_a_template_without_tools(tokenizer_dir, tmp_path):
    from lmforge.tokenizer.hermes_tools import hermes_messages

    tok = load_chat_tokenizer(tokenizer_dir)
    example = tool_example(tmp_path, RESULTS[::-1])
    turns = hermes_messages([*ASK, {"role": "assistant", "content": "", "tool_calls": CALLS},
                             *RESULTS, ANSWER], TOOLS)  # fmt: skip
    assert example["messages"] == turns
    assert example_ids(tok, example) == encode_chat(tok, turns)
    assert "<tool_response>\n12:00\n</tool_response>" in tok.render_chat(turns)
