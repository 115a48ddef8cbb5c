"""vLLM's runtime LoRA routes, served only when the server allows them (--allow-runtime-lora-
updating, as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING): POST /v1/load_lora_adapter reads an
adapter and serves it on its base while requests run (Engine.load_adapter installs it between
two steps), POST /v1/unload_lora_adapter stops serving one (refused while its requests wait or
run) and drops its /metrics series. Both answer a line of text on success, as vLLM; a bad
adapter is a 400 naming it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from lmforge.errors import ConfigError, InputError
from lmforge.serve.protocol import APIError, parse_request
from lmforge.serve.routes import request_json
from lmforge.serve.state import ServeState, load_adapter, unload_adapter


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    base_model_name: str | None = None  # the base it attaches to, when it cannot tell


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's clients may send it; names identify adapters here


def add_lora_routes(app: FastAPI, state: ServeState) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> PlainTextResponse:
        req = parse_request(LoadLoraRequest, await request_json(request))
        if not Path(req.lora_path).is_dir():
            raise APIError(400, f"lora_path {req.lora_path} is not a directory (a PEFT adapter)",
                           param="lora_path")  # fmt: skip
        try:
            await asyncio.to_thread(
                load_adapter, state, req.lora_name, Path(req.lora_path), req.base_model_name
            )
        except (InputError, ConfigError) as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> PlainTextResponse:
        req = parse_request(UnloadLoraRequest, await request_json(request))
        try:
            await asyncio.to_thread(unload_adapter, state, req.lora_name)
        except KeyError:
            raise APIError(404, f"no LoRA adapter {req.lora_name!r} is served",
                           param="lora_name", code="lora_not_found") from None  # fmt: skip
        except InputError as exc:
            raise APIError(400, str(exc), param="lora_name") from None
        state.metrics.forget_model(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
