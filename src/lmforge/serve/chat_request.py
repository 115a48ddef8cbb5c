"""OpenAI's chat request: messages (with earlier tool calls and tool results), tools and
tool_choice (-> ChatRequest.tool_plan), as pydantic models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmforge.constrain import ConstraintError
from lmforge.constrain.json_schema import schema_grammar
from lmforge.errors import InputError
from lmforge.serve.api_error import APIError
from lmforge.serve.request_models import MAX_TOP_LOGPROBS_CHAT, BaseRequest
from lmforge.serve.tools import ToolPlan
from lmforge.tokenizer.hermes_tools import matched_tool_results


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


class ChatRequest(BaseRequest):
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
        an assistant message's tool_calls and a tool message's tool_call_id, tool results in the
        order of their calls (matched by id: hermes_tools.matched_tool_results); a result that
        answers no call of the assistant message before it is a 400 naming its index and id."""
        out: list[dict[str, Any]] = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            message: dict[str, Any] = {"role": role, "content": m.text()}
            if m.tool_calls:
                message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            out.append(message)
        try:
            return matched_tool_results(out)
        except InputError as exc:
            raise APIError(400, str(exc), param="messages") from None

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
