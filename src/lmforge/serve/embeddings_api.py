"""/v1/embeddings as OpenAI's API: the request, its checks, and the response, over an Embedder.

`input` is a string, a list of strings, a list of token ids or a list of such lists. A text is
tokenized as transformers' tokenizer(text) does (an encoder's [CLS] ... [SEP]); token ids are the
model's input as sent (no specials added). Every input must fit the model's context: a longer one
is a 400 naming its index and length (vLLM's behaviour), unless `truncate_prompt_tokens` (vLLM's
extra parameter; -1: the context) cuts it to k tokens as vLLM does for an embedding model: a text
keeps its first k tokens with its specials (transformers' truncation=True on the right, the side
vLLM's tokenizer cuts for pooling models, and sentence-transformers' cut); a token-id input keeps
its last k (vLLM's cut of token prompts, with no specials to keep).
An empty input is a 400 (as OpenAI's). `encoding_format` "float" (lists of numbers) or "base64"
(little-endian float32 bytes, as OpenAI sends them); `dimensions` as the model's own size, or,
for a Matryoshka model only (its config.json's matryoshka_dimensions / is_matryoshka, as vLLM
reads them), a smaller one: the vector's first `dimensions` values, L2-normalised again when the
model's vectors are (vLLM's order: cut, then normalise); `user` is accepted and ignored.
Embeddings go around the response cache and the feedback store: a vector is cheap to recompute
and not something to rate.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from lmforge.errors import ConfigError
from lmforge.serve.api_error import model_not_found
from lmforge.serve.engine_types import EngineClosed, QueueFull
from lmforge.serve.protocol import APIError

Input = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request (+ vLLM's truncate_prompt_tokens)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    model: str
    input: Input
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)

    def inputs(self) -> list[str | list[int]]:
        """The input field as a list: one string or one token list per input."""
        x = self.input
        one = isinstance(x, str) or (x and isinstance(x[0], int))  # a text, or one token list
        return [x] if one else list(x)  # type: ignore[list-item, arg-type]


def embedder_for(state: Any, model: str) -> Any:
    """The Embedder serving `model`: a 400 for a model that generates only, 404 if unknown."""
    embedder = state.embedders.get(model)
    if embedder is not None:
        return embedder
    if model in state.adapters:
        raise APIError(
            400, f"{model!r} is a LoRA adapter: it serves completions and chat; embeddings come "
            f"from its base, {state.adapters[model].base.name!r}", param="model",
        )  # fmt: skip
    if model in state.engines:
        raise APIError(
            400, f"the model {model!r} is an encoder-decoder (generation) model and does not "
            "serve embeddings; send it completions or chat", param="model",
        )  # fmt: skip
    raise model_not_found(model, state.max_context())


def input_rows(embedder: Any, req: EmbeddingRequest) -> list[list[int]]:
    """Each input's token ids, checked: non-empty, inside the vocabulary, within the context
    (or cut by truncate_prompt_tokens); a 400 naming the input's index otherwise."""
    _check_dimensions(embedder, req)
    inputs, context = req.inputs(), embedder.max_context
    if not inputs:
        raise APIError(400, "input is empty: send a string, a list of strings or token ids",
                       param="input")  # fmt: skip
    cut = req.truncate_prompt_tokens
    if cut is not None and not 1 <= (cut := context if cut == -1 else cut) <= context:
        raise APIError(400, f"truncate_prompt_tokens={req.truncate_prompt_tokens} must be from "
                       f"1 to the model's context of {context} tokens (or -1: the context)",
                       param="truncate_prompt_tokens")  # fmt: skip
    rows = []
    for i, x in enumerate(inputs):
        if not x:
            raise APIError(400, f"input[{i}] is empty", param="input")
        if isinstance(x, str):
            ids = _tokenized(embedder, x, cut, i)
        else:
            if any(t < 0 or t >= embedder.vocab_size for t in x):
                raise APIError(400, f"input[{i}] has token ids outside the vocabulary of "
                               f"{embedder.vocab_size}", param="input")  # fmt: skip
            ids = list(x[-cut:] if cut is not None else x)  # vLLM: the last k token ids
        if not ids:  # a tokenizer that drops the whole text (no specials added)
            raise APIError(400, f"input[{i}] has no tokens once tokenized", param="input")
        if len(ids) > context:
            raise APIError(
                400, f"input[{i}] is {len(ids)} tokens, more than {req.model}'s context of "
                f"{context} tokens; shorten it, or send truncate_prompt_tokens to cut it",
                param="input", code="context_length_exceeded",
            )  # fmt: skip
        rows.append(ids)
    return rows


def _check_dimensions(embedder: Any, req: EmbeddingRequest) -> None:
    """A 400 unless `dimensions` is unset, the model's size, or a size a Matryoshka model's
    config allows."""
    d, dim = req.dimensions, embedder.dim
    if d is None or d == dim:
        return
    sizes = embedder.matryoshka
    if sizes is None:
        raise APIError(
            400, f"dimensions={d}: {req.model} makes {dim}-dimensional embeddings and is not a "
            f"Matryoshka model, so it does not shorten them; leave dimensions out or send {dim}",
            param="dimensions",
        )  # fmt: skip
    allowed = [s for s in sizes if s <= dim] if sizes else None
    if d > dim or (allowed is not None and d not in allowed):
        valid = ", ".join(map(str, allowed)) if allowed is not None else f"1 to {dim}"
        raise APIError(400, f"dimensions={d}: {req.model} gives vectors of {valid} dimensions",
                       param="dimensions")  # fmt: skip


def shorten(vectors: list[np.ndarray], dimensions: int | None, normalize: bool) -> list[np.ndarray]:
    """Matryoshka vectors cut to their first `dimensions` values, L2-normalised again when the
    model normalises (as vLLM: cut, then normalise); unchanged without `dimensions`."""
    if dimensions is None:
        return vectors
    cut = [v[:dimensions] for v in vectors]
    return [v / max(float(np.linalg.norm(v)), 1e-12) for v in cut] if normalize else cut


def _tokenized(embedder: Any, text: str, cut: int | None, i: int) -> list[int]:
    """input[i]'s token ids, cut to `cut`; a cut too short for the specials is a 400."""
    try:
        return embedder.tokenize(text, max_len=cut)
    except ConfigError:  # encode_input: max_len below the specials it adds
        raise APIError(400, f"input[{i}]: truncate_prompt_tokens={cut} leaves no room for the "
                       "text's special tokens; send a larger value",
                       param="truncate_prompt_tokens") from None  # fmt: skip


async def embed_rows(embedder: Any, rows: list[list[int]], timeout: float) -> list[np.ndarray]:
    """The rows' vectors (float32) from the embedder's batcher; 429 when its queue is full, 503
    when it is shut down, 504 past `timeout` seconds (the inputs not started are cancelled)."""
    futures = []
    try:  # the request's inputs queue together or not at all
        futures = [asyncio.wrap_future(f) for f in embedder.submit_many(rows)]
        vectors = await asyncio.wait_for(asyncio.gather(*futures), timeout)
    except QueueFull:
        raise APIError(429, "the server is busy (embedding queue full); retry shortly",
                       type="rate_limit_error", code="queue_full") from None  # fmt: skip
    except EngineClosed:
        raise APIError(503, "the server is shutting down", type="server_error",
                       code="closed") from None  # fmt: skip
    except TimeoutError:
        raise APIError(504, f"the request took longer than {timeout}s", type="timeout",
                       code="timeout") from None  # fmt: skip
    finally:
        for f in futures:
            f.cancel()  # no-op for the finished; frees the queue of the rest
    return [v.numpy() for v in vectors]


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: a list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def embedding_response(
    model: str, vectors: list[np.ndarray], encoding_format: str, prompt_tokens: int
) -> dict[str, Any]:
    """OpenAI's embeddings response body."""
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(vectors)]  # fmt: skip
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


async def create_embeddings(state: Any, req: EmbeddingRequest) -> dict[str, Any]:
    """The response to one request: checked, tokenized, embedded, counted in /metrics."""
    embedder = embedder_for(state, req.model)
    rows = await asyncio.to_thread(input_rows, embedder, req)
    tokens = sum(len(r) for r in rows)
    vectors = await embed_rows(embedder, rows, state.settings.request_timeout_s)
    vectors = shorten(vectors, req.dimensions, embedder.normalize)
    state.metrics.count_embeddings(req.model, len(rows), tokens)
    return embedding_response(req.model, vectors, req.encoding_format, tokens)
