"""The OpenAI request fields completions and chat share (sampling, stop, logit_bias, structured
outputs) and the completions and feedback requests, as pydantic models."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmforge.constrain import ConstraintError, Guide, compiler_for, spec_text
from lmforge.serve.api_error import APIError
from lmforge.serve.sampling import MAX_LOGIT_BIAS

# OpenAI caps top_logprobs at 20 for chat and logprobs at 5 for completions.
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
MAX_N = 16


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


class BaseRequest(BaseModel):
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
    # vLLM's: only requests with the same salt share prefix-cache blocks (serve/prefix_cache.py)
    cache_salt: str | None = Field(None, min_length=1)
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


class CompletionRequest(BaseRequest):
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


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    response_id: str | None = None
    rating: int | None = None
    comment: str | None = None
    chosen_id: str | None = None
    rejected_id: str | None = None
    prompt: str | None = None
