"""Chat rendering and assistant masks, checked against transformers' apply_chat_template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.errors import InputError
from lmforge.tokenizer import TokenizerFiles
from lmforge.tokenizer.chat import (
    CHATML_TEMPLATE,
    encode_chat,
    render_chat,
    render_chat_spans,
    turn_end,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a token?"},
    {"role": "assistant", "content": "A piece of text."},
    {"role": "user", "content": "And 42?"},
    {"role": "assistant", "content": "A number, 4 and 2."},
]
# A template without generation blocks (like most imported ones); spans come from prefixes.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] | upper + ': ' + m['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### ASSISTANT: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def hf(bpe_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(bpe_dir))


def test_render_matches_transformers(bpe_dir: Path, hf) -> None:
    files = TokenizerFiles.load(bpe_dir)
    for messages in (CHAT, CHAT[:2], CHAT[1:3]):
        for gen in (False, True):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert files.render_chat(messages, add_generation_prompt=gen) == expected
            assert render_chat(messages, gen) == expected  # the default template is ChatML


def test_render_chatml_text() -> None:
    text = render_chat(CHAT[1:3], add_generation_prompt=False)
    assert text == (
        "<|im_start|>user\nWhat is a token?<|im_end|>\n"
        "<|im_start|>assistant\nA piece of text.<|im_end|>\n"
    )
    assert render_chat(CHAT[1:2], True).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_assistant_spans_cover_reply_and_end_marker() -> None:
    text, spans = render_chat_spans(CHAT)
    assert [text[a:b] for a, b in spans] == [
        "A piece of text.<|im_end|>",
        "A number, 4 and 2.<|im_end|>",
    ]


def test_assistant_mask_matches_transformers(bpe_dir: Path, hf) -> None:
    files = TokenizerFiles.load(bpe_dir)
    enc = files.encode_chat(CHAT)
    out = hf.apply_chat_template(
        CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert enc.ids == list(out["input_ids"])
    assert enc.assistant_mask == list(out["assistant_masks"])
    masked = [i for i, m in zip(enc.ids, enc.assistant_mask, strict=True) if m]
    assert files.decode(masked, skip_special_tokens=False) == (
        "A piece of text.<|im_end|>A number, 4 and 2.<|im_end|>"
    )


def test_prefix_spans_for_templates_without_generation_blocks(bpe_dir: Path) -> None:
    files = TokenizerFiles.load(bpe_dir)
    enc = encode_chat(
        files.tokenizer, CHAT[1:3], template=PLAIN_TEMPLATE, eos_token="<|endoftext|>"
    )
    assert (
        enc.text
        == "### USER: What is a token?<|endoftext|>### ASSISTANT: A piece of text.<|endoftext|>"
    )
    assert [enc.text[a:b] for a, b in enc.spans] == ["A piece of text.<|endoftext|>"]
    masked = [i for i, m in zip(enc.ids, enc.assistant_mask, strict=True) if m]
    assert (
        files.decode(masked, skip_special_tokens=False).strip() == "A piece of text.<|endoftext|>"
    )


def test_non_append_only_template_is_a_clear_error() -> None:
    reversed_template = "{% for m in messages | reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InputError, match="append-only template"):
        render_chat_spans(CHAT[1:3], template=reversed_template)


def test_template_from_imported_tokenizer_is_used(bpe_dir: Path, tmp_path: Path, hf) -> None:
    local = tmp_path / "tok"
    local.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (local / name).write_bytes((bpe_dir / name).read_bytes())
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = PLAIN_TEMPLATE
    (local / "tokenizer_config.json").write_text(json.dumps(config))
    files = TokenizerFiles.load(local)
    assert files.chat_template == PLAIN_TEMPLATE != CHATML_TEMPLATE
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(local))
    assert files.render_chat(CHAT, True) == theirs.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )


def test_missing_template_is_a_clear_error(bpe_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    with pytest.raises(InputError, match="has no chat template"):
        TokenizerFiles.load(tmp_path).encode_chat(CHAT)


# How well-known templates end an assistant reply (simplified to the part that matters here).
LLAMA3_TEMPLATE = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
    "+ m['content'] + '<|eot_id|>' }}{% endfor %}"
)
LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] "
    "+ ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
SYSTEM_FIRST = (
    "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
)
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<s>", "</s>"]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (CHATML_TEMPLATE, "<|im_end|>"),
        (LLAMA3_TEMPLATE, "<|eot_id|>"),
        (LLAMA2_TEMPLATE, "</s>"),  # " </s>": whitespace before the token is skipped
        (PLAIN_TEMPLATE, "<|endoftext|>"),  # eos_token as the template's variable
        ("{% for m in messages %}{{ m['content'] + '\n\n' }}{% endfor %}", None),
    ],
)
def test_turn_end_is_the_token_after_an_assistant_reply(template: str, expected) -> None:
    specials = {
        "bos_token": "<s>",
        "eos_token": "</s>" if "[INST]" in template else "<|endoftext|>",
    }
    assert turn_end(template, ADDED, **specials) == expected


def test_turn_end_of_a_template_that_refuses_the_probe_is_a_clear_error(bpe_dir: Path, tmp_path):
    with pytest.raises(InputError, match="cannot render a user/assistant exchange: system first"):
        turn_end(SYSTEM_FIRST, ADDED)
    files = TokenizerFiles.load(bpe_dir)
    files.chat_template = SYSTEM_FIRST
    assert files.turn_end_token() is None and files.stop_ids() == [files.eos_id]


def test_stop_ids_are_eos_then_the_templates_turn_end(bpe_dir: Path) -> None:
    files = TokenizerFiles.load(bpe_dir)
    assert files.turn_end_token() == "<|im_end|>"
    assert files.stop_ids() == [files.eos_id, files.token_id("<|im_end|>")] == [0, 4]
    files.chat_template = LLAMA3_TEMPLATE  # a turn end this vocab lacks: the document end only
    assert files.stop_ids() == [0]
    files.chat_template = None
    assert files.turn_end_token() is None and files.stop_ids() == [0]


# A tool-calling template in the style of Qwen 2.5's: it reads `tools` and renders tool calls and
# results itself, so TokenizerFiles.render_chat hands it transformers' tools= and the calls.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}"
    "{{ messages[0].content }}\n\n{% endif %}# Tools\n<tools>{% for tool in tools %}\n"
    "{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}"
    "<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'assistant' and not m.tool_calls) %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content or '' }}"
    '{% for tc in m.tool_calls %}<tool_call>\n{"name": "{{ tc.function.name }}", '
    '"arguments": {{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n'
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]  # fmt: skip


def tool_chat(arguments):
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]  # fmt: skip


def test_a_template_that_reads_tools_renders_as_transformers_does(bpe_dir: Path, tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    local = tmp_path / "tok"
    local.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (local / name).write_bytes((bpe_dir / name).read_bytes())
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    (local / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": TOOLS_TEMPLATE})
    )
    files = TokenizerFiles.load(local)
    theirs = transformers.AutoTokenizer.from_pretrained(str(local))
    expected = theirs.apply_chat_template(
        tool_chat({"a": 2, "b": 3}), tools=TOOLS, tokenize=False, add_generation_prompt=True
    )  # transformers wants the arguments as an object; OpenAI sends them as JSON text
    assert files.render_chat(tool_chat('{"a": 2, "b": 3}'), True, tools=TOOLS) == expected
    assert '"arguments": {"a": 2, "b": 3}' in expected and '"name": "add"' in expected
    plain = [{"role": "user", "content": "hi"}]  # no tools: as transformers, the plain turns
    assert files.render_chat(plain, True) == theirs.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=True
    )
