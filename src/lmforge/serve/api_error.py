"""OpenAI's error body and the request parsing that turns a pydantic error into one (a 400 that
names the field)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError


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


def model_not_found(model: str, served: Iterable[str]) -> APIError:
    """The 404 for a model this server does not serve, naming those it does (OpenAI's code)."""
    return APIError(
        404,
        f"the model {model!r} does not exist; this server serves: {', '.join(sorted(served))}",
        param="model",
        code="model_not_found",
    )


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
