"""The OpenAI request and response shapes the server speaks, as pydantic models.

Requests accept unknown fields and ignore them, as OpenAI does, so clients written for newer API
versions still work; a known field of the wrong type or range is a 400 that names the field.
Responses are plain dicts built by the helpers here so that the JSON matches OpenAI's byte for
byte in field names (the openai client parses them into its own types).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmforge.constrain import ConstraintError, Guide, compiler_for, spec_text
from lmforge.constrain.json_schema import schema_grammar
from lmforge.serve.sampling import MAX_LOGIT_BIAS
from lmforge.serve.tools import ToolPlan

# OpenAI caps top_logprobs at 20 for chat and logprobs at 5 for completions.
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
MAX_N = 16


class APIError(Exception):
    """An error the client gets as OpenAI's body: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema: the schema the answer must validate against."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=64)
    schema_: dict[str, Any] | bool = Field(True, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON under a schema."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object (name, schema)")
        return self


class _Request(BaseModel):
    """Fields completions and chat share; vLLM-style extras (top_k, repetition_penalty, ignore_eos,
    min_tokens) are honoured; the fields left unset take the model's generation_config where it
    sets them (serve/request_defaults.py). logit_bias changes which token is drawn, never the
    logprobs reported: those stay the raw model's, as vLLM reports them."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)  # vLLM's extra; 1 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    ignore_eos: bool = False
    min_tokens: int | None = Field(None, ge=0)  # vLLM's extra: stop tokens masked until then
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (a string) -> [-100, 100]
    user: str | None = None
    # structured outputs (lmforge/constrain): OpenAI's response_format, or one of vLLM's extras
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's: a JSON schema (or its text)
    guided_regex: str | None = Field(None, min_length=1)  # vLLM's: the answer fullmatches it
    guided_choice: list[str] | None = Field(None, min_length=1)  # vLLM's: exactly one of these

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (digit strings), got {key!r}")
            if not abs(bias) <= MAX_LOGIT_BIAS:  # NaN too
                raise ValueError(
                    f"biases must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                    f"got {bias} for token {key}"
                )
        if value and len({int(k) for k in value}) < len(value):  # "5" and "05": one token
            raise ValueError("keys must name each token id once")
        return value

    def guide(self, files: Any, warm_seconds: float = 0.0) -> Guide | None:
        """The structured-output constraint asked for, compiled over the tokenizer `files`
        (GuideCompiler.compile: warm_seconds); None for free text. Two constraints at once, or
        one that cannot compile, is a 400."""
        asked = self._constraint()
        if asked is None:
            return None
        param, kind, value = asked
        try:
            return compiler_for(files).compile(kind, spec_text(kind, value), warm_seconds)
        except ConstraintError as exc:
            if kind != "json_schema":
                raise APIError(400, str(exc), param=param) from None
            fmt = self.response_format
            where = param
            if param == "response_format" and fmt is not None and fmt.json_schema is not None:
                where = f"response_format '{fmt.json_schema.name}'"
            raise APIError(  # OpenAI's body for a schema it cannot use
                400, f"Invalid schema for {where}: {exc}", param=param, code="invalid_json_schema"
            ) from None

    @property
    def asks_constraint(self) -> bool:
        """Whether the request asks for a structured output (two at once: a 400)."""
        return self._constraint() is not None

    def _constraint(self) -> tuple[str, str, Any] | None:
        """(param, kind, value): kind is json_object, json_schema, regex or choice."""
        fmt = self.response_format
        asked = {
            "response_format": None if fmt is None or fmt.type == "text" else fmt,
            "guided_json": self.guided_json,
            "guided_regex": self.guided_regex,
            "guided_choice": self.guided_choice,
        }
        given = [name for name, value in asked.items() if value is not None]
        if len(given) > 1:
            raise APIError(
                400, f"give one structured-output constraint, got {' and '.join(given)}",
                param=given[1],
            )  # fmt: skip
        if not given:
            return None
        param = given[0]
        if fmt is not None and param == "response_format":
            if fmt.type == "json_object":
                return param, "json_object", None
            return param, "json_schema", fmt.json_schema.schema_  # type: ignore[union-attr]
        if self.guided_regex is not None:
            return param, "regex", self.guided_regex
        if self.guided_choice is not None:
            return param, "choice", self.guided_choice
        schema = self.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise APIError(400, f"guided_json is not valid JSON: {exc}", param=param) from None
        return param, "json_schema", schema

    @property
    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as SamplingParams takes it: (token id, bias) pairs."""
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS_COMPLETION)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    kb: bool | None = None  # lmforge extra: passages for a model trained with them (as chat)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and (
            not value or any(isinstance(v, list | str) and not v for v in value)
        ):
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list: one string or one token list per prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(..., min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call in an earlier assistant message of the conversation."""

    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class NamedToolChoice(BaseModel):
    """tool_choice {"type": "function", "function": {"name": ...}}: call this function."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: NamedFunction


class FunctionDef(NamedFunction):
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: the function takes none
    strict: bool | None = None


class Tool(NamedToolChoice):
    """A tool of the request: a function with its definition (only functions, as OpenAI)."""

    function: FunctionDef


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages: the calls it made
    tool_call_id: str | None = None  # tool messages: the call this is the result of

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls are for assistant messages, not {self.role!r} ones")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        """The message's text; content parts other than text are refused (no vision here)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400,
                    f"content part type {part.type!r} is not supported; send text parts",
                    param="messages",
                )
            texts.append(part.text)
        return "".join(texts)


class ChatRequest(_Request):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS_CHAT)
    max_completion_tokens: int | None = Field(None, ge=1)
    kb: bool | None = None  # lmforge extra: use the knowledge base (default: on when there is one)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must contain at least one message")
        return value

    @property
    def token_limit(self) -> int | None:
        """max_completion_tokens (the newer name) wins over max_tokens."""
        return self.max_completion_tokens or self.max_tokens

    def plain_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template takes them ("developer" is OpenAI's new "system"), with
        an assistant message's tool_calls and a tool message's tool_call_id."""
        out: list[dict[str, Any]] = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            message: dict[str, Any] = {"role": role, "content": m.text()}
            if m.tool_calls:
                message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            out.append(message)
        return out

    def tool_plan(self) -> ToolPlan | None:
        """What tools and tool_choice ask (serve/tools.py), None without tools; a 400 for a
        tool_choice without tools, one naming no tool, two tools of one name, or a tool choice
        that may call a tool beside a structured-output constraint."""
        choice, tools = self.tool_choice, self.tools or []
        if not tools:
            if choice is not None:
                raise APIError(400, "tool_choice is only allowed when tools are given",
                               param="tool_choice")  # fmt: skip
            return None
        names = [t.function.name for t in tools]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise APIError(400, f"tools name the function(s) {twice} more than once", param="tools")
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if name is not None and name not in names:
            raise APIError(
                400, f"tool_choice names the function {name!r}, which is not among the tools "
                f"({', '.join(names)})", param="tool_choice",
            )  # fmt: skip
        mode = "named" if name is not None else choice or "auto"
        if mode != "none" and super()._constraint() is not None:
            raise APIError(
                400, "tools cannot be combined with response_format or a guided_* constraint "
                "(tool calls are guided by the tools' schemas); drop one, or set tool_choice "
                "'none' for a structured answer", param="tools",
            )  # fmt: skip
        dumped = tuple(t.model_dump(exclude_none=True) for t in tools)
        return ToolPlan(mode, dumped, name, self.parallel_tool_calls)

    def _constraint(self) -> tuple[str, str, Any] | None:
        """A named or required tool_choice is guided by the tools' schemas (ToolPlan.schema),
        each checked first so that a bad one is OpenAI's schema error naming its function."""
        plan = self.tool_plan()
        if plan is None or not plan.guided_functions:
            return super()._constraint()
        for name in plan.guided_functions:
            try:
                schema_grammar(plan.parameters(name))
            except ConstraintError as exc:
                raise APIError(
                    400, f"Invalid schema for function '{name}': {exc}", param="tools",
                    code="invalid_json_schema",
                ) from None  # fmt: skip
        return "tools", "json_schema", plan.schema()


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    response_id: str | None = None
    rating: int | None = None
    comment: str | None = None
    chosen_id: str | None = None
    rejected_id: str | None = None
    prompt: str | None = None


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validates a decoded JSON body; the first error becomes a 400 that names its field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "list["))]
        # pydantic names union branches in loc (e.g. "str", "list[int]"); drop them
        param = ".".join(p for p in loc if p not in {"str", "int", "float", "bool"}) or None
        if err["type"] == "missing":
            msg = f"missing required parameter {param!r}"
        else:
            msg = f"invalid value for {param!r}: {err['msg']}"
        raise APIError(400, msg, param=param, code="invalid_value") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class LogprobsBuilder:
    """Accumulates per-token logprobs into the completions or the chat layout.

    Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; chat:
    {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.
    """

    def __init__(self, chat: bool, text_offset: int = 0) -> None:
        self.chat = chat
        self.offset = text_offset
        self.tokens: list[str] = []
        self.logprobs: list[float | None] = []
        self.tops: list[dict[str, float] | None] = []
        self.offsets: list[int] = []

    def add(self, token: str, logprob: float | None, top: dict[str, float] | None) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.tops.append(top)
        self.offsets.append(self.offset)
        self.offset += len(token)

    def build(self, start: int = 0) -> dict[str, Any]:
        """The layout for tokens[start:] (a stream chunk sends only its new tokens)."""
        rows = range(start, len(self.tokens))
        if self.chat:
            return {
                "content": [
                    {
                        "token": self.tokens[i],
                        "logprob": self.logprobs[i],
                        "bytes": list(self.tokens[i].encode("utf-8")),
                        "top_logprobs": [
                            {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                            for t, lp in (self.tops[i] or {}).items()
                        ],
                    }
                    for i in rows
                ]
            }
        return {
            "tokens": [self.tokens[i] for i in rows],
            "token_logprobs": [self.logprobs[i] for i in rows],
            "top_logprobs": [self.tops[i] or {} for i in rows],
            "text_offset": [self.offsets[i] for i in rows],
        }
