"""The OpenAI request and response shapes the server speaks, as pydantic models.

Requests accept unknown fields and ignore them, as OpenAI does, so clients written for newer API
versions still work; a known field of the wrong type or range is a 400 that names the field.
Responses are plain dicts (response_shapes.py) so that the JSON matches OpenAI's byte for
byte in field names (the openai client parses them into its own types).

The models and helpers live in modules split by job; this one gathers them under the import path
the routes and tests use: request_models.py (fields completions and chat share, completions,
feedback), chat_request.py (chat messages, tools), api_error.py (the error body, parse_request),
response_shapes.py (ids, usage, the logprobs layouts).
"""

from lmforge.serve.api_error import APIError, parse_request
from lmforge.serve.chat_request import (
    ChatMessage,
    ChatRequest,
    ContentPart,
    FunctionCall,
    FunctionDef,
    NamedFunction,
    NamedToolChoice,
    Tool,
    ToolCall,
)
from lmforge.serve.request_models import (
    MAX_LOGPROBS_COMPLETION,
    MAX_N,
    MAX_TOP_LOGPROBS_CHAT,
    CompletionRequest,
    FeedbackRequest,
    JSONSchemaFormat,
    ResponseFormat,
    StreamOptions,
)
from lmforge.serve.response_shapes import LogprobsBuilder, new_id, now, usage

__all__ = [
    "MAX_LOGPROBS_COMPLETION",
    "MAX_N",
    "MAX_TOP_LOGPROBS_CHAT",
    "APIError",
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "ContentPart",
    "FeedbackRequest",
    "FunctionCall",
    "FunctionDef",
    "JSONSchemaFormat",
    "LogprobsBuilder",
    "NamedFunction",
    "NamedToolChoice",
    "ResponseFormat",
    "StreamOptions",
    "Tool",
    "ToolCall",
    "new_id",
    "now",
    "parse_request",
    "usage",
]
