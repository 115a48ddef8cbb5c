"""Chat templates: render a conversation exactly as transformers does, and find the assistant tokens.

lmforge's tokenizers carry a ChatML template whose assistant turns sit inside `{% generation %}`
blocks, the marker transformers' `apply_chat_template(return_assistant_tokens_mask=True)` reads.
Templates are compiled in the same sandboxed Jinja setup transformers uses (trim_blocks,
lstrip_blocks, loop controls, its `tojson`), so a rendered string is byte-identical to
`apply_chat_template(tokenize=False)`. `encode_chat` returns the ids with the loss mask a
fine-tuning stage needs: 1 on the tokens of each assistant reply (content + end-of-turn marker).
Templates without generation blocks (imported tokenizers) fall back to prefix differences, which
works for any template that renders a conversation by appending turns.
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lmforge.errors import InputError

Message = dict[str, Any]
Span = tuple[int, int]

# ChatML with generation markers around what the assistant says. It renders, for example:
#   <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n
# and the generation span (loss mask) is "Hello!<|im_end|>".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # the special tokens CHATML_TEMPLATE spells
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Per render: (blocks rendered so far, generation spans found). A context variable keeps
# concurrent renders of one cached template apart.
_TRACKER: contextvars.ContextVar[tuple[list[str], list[Span]] | None] = contextvars.ContextVar(
    "lmforge_chat_tracker", default=None
)


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> Any:
    """Compiles a chat template in the sandboxed Jinja environment transformers uses."""
    import jinja2
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body, records where it landed."""

        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            call = self.call_method("_track", [], [], None, None)
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _track(self, caller: Any) -> str:
            text = caller()
            state = _TRACKER.get()
            if state is not None:
                start = sum(len(block) for block in state[0])
                state[1].append((start, start + len(text)))
            return text

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, **kw: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTracker, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise InputError(f"the chat template does not compile: {exc}") from None


@lru_cache(maxsize=32)
def template_reads_tools(template: str) -> bool:
    """Whether a chat template reads the `tools` variable (renders tool definitions itself)."""
    from jinja2 import meta

    compiled = compile_chat_template(template)
    return "tools" in meta.find_undeclared_variables(compiled.environment.parse(template))


def render_chat(
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    *,
    template: str = CHATML_TEMPLATE,
    **special_tokens: str,
) -> str:
    """The conversation as text, exactly as `apply_chat_template(tokenize=False)` renders it.

    special_tokens are the template's variables bos_token, eos_token, ... (transformers passes
    the tokenizer's special_tokens_map the same way).
    """
    return render_chat_spans(messages, add_generation_prompt, template=template, **special_tokens)[
        0
    ]


def render_chat_spans(
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    *,
    template: str = CHATML_TEMPLATE,
    **special_tokens: str,
) -> tuple[str, list[Span]]:
    """(rendered text, character spans of the assistant replies).

    Spans come from the template's `{% generation %}` blocks when it has them, else from
    rendering each prefix (`text(up to reply) - text(before reply + generation prompt)`).
    """
    compiled = compile_chat_template(template)
    blocks: list[str] = []
    spans: list[Span] = []
    token = _TRACKER.set((blocks, spans))
    try:
        for block in compiled.generate(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **special_tokens
        ):
            blocks.append(block)
    finally:
        _TRACKER.reset(token)
    text = "".join(blocks)
    if not GENERATION_TAG.search(template):
        spans = _prefix_spans(messages, template, special_tokens)
    return text, spans


def _prefix_spans(
    messages: Sequence[Message], template: str, special_tokens: dict[str, str]
) -> list[Span]:
    """Assistant spans of a template without generation blocks, from prefix renders."""
    compiled = compile_chat_template(template)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = compiled.render(
            messages=list(messages[:i]), add_generation_prompt=True, **special_tokens
        )
        upto = compiled.render(
            messages=list(messages[: i + 1]), add_generation_prompt=False, **special_tokens
        )
        if not upto.startswith(before):
            raise InputError(
                "the chat template renders a conversation prefix differently from the whole "
                "conversation, so assistant tokens cannot be located; add {% generation %} "
                "blocks around assistant replies or use an append-only template"
            )
        spans.append((len(before), len(upto)))
    return spans


_PROBE = "lmforge-turn-end-probe"  # an assistant reply no template rewrites


def turn_end(template: str, tokens: Sequence[str], **special_tokens: str) -> str | None:
    """The token the template writes right after an assistant reply, if it is one of tokens.

    tokens are the tokenizer's added tokens (its atomic ones); the reply's end is found by
    rendering a probe reply, so any template works: ChatML's <|im_end|>, Llama 3's <|eot_id|>,
    Llama 2's " </s>" (whitespace before the token is skipped). None when the reply is followed by
    plain text or nothing (such a template ends a turn only with the document). InputError when
    the template refuses a plain user/assistant exchange.
    """
    from jinja2.exceptions import TemplateError

    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = render_chat(messages, template=template, **special_tokens)
    except TemplateError as exc:  # e.g. a template that insists on a system message
        raise InputError(
            f"the chat template cannot render a user/assistant exchange: {exc}"
        ) from None
    if _PROBE not in text:
        return None
    after = text[text.index(_PROBE) + len(_PROBE) :].lstrip()
    return max((t for t in tokens if t and after.startswith(t)), key=len, default=None)


@dataclass
class ChatEncoding:
    """A rendered conversation: text, token ids, and which tokens are assistant output."""

    text: str
    ids: list[int]
    assistant_mask: list[int]  # 1 where the token belongs to an assistant reply (loss on it)
    spans: list[Span]  # character spans of the replies in text


def tokens_in_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[int]:
    """1 for each token from the one holding a span's first character to the one holding its last.

    The same rule transformers applies (char_to_token of both ends), so masks agree with
    `apply_chat_template(return_assistant_tokens_mask=True)`.
    """
    mask = [0] * len(offsets)
    for lo, hi in spans:
        if hi <= lo:
            continue
        inside = [i for i, (s, e) in enumerate(offsets) if s < hi and e > lo]
        if inside:
            for i in range(inside[0], inside[-1] + 1):
                mask[i] = 1
    return mask


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    *,
    template: str = CHATML_TEMPLATE,
    **special_tokens: str,
) -> ChatEncoding:
    """Renders and encodes a conversation with a `tokenizers.Tokenizer`; see ChatEncoding."""
    text, spans = render_chat_spans(
        messages, add_generation_prompt, template=template, **special_tokens
    )
    enc = tokenizer.encode(text, add_special_tokens=False)
    return ChatEncoding(text, list(enc.ids), tokens_in_spans(enc.offsets, spans), spans)
