"""HTTP plumbing of an answer: a streamed response that ends with its last write and always
closes its generator, and a non-streamed one cancelled when its client goes away."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from lmforge.serve.completions import SSE_DONE
from lmforge.serve.protocol import APIError


class ClosingStreamingResponse(StreamingResponse):
    """Closes its generator however the response ends, so a client that goes away mid-stream
    aborts its engine requests now, not whenever the generator is garbage-collected. The
    stream's last write (ending with [DONE]) ends the response: the HTTP end of body leaves
    with it (the same socket send under httptools) rather than in an empty message after it."""

    async def stream_response(self, send: Any) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        async for write in self.body_iterator:
            last = write.endswith(SSE_DONE)
            body = write.encode(self.charset)
            await send({"type": "http.response.body", "body": body, "more_body": not last})
            if last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def unless_disconnected(request: Request, work: Any) -> Any:
    """Awaits work, cancelling it (so its engine requests are aborted) if the client goes away
    first: a non-streamed answer nobody will read should not keep its batch slot."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise APIError(499, "the client closed the request", code="client_closed")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
