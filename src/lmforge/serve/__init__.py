"""lmforge.serve: an OpenAI-compatible server over a continuous-batching engine, with its stores.

The engine (engine.py: Engine, SamplingParams, RequestHandle, collect) knows nothing of HTTP.
Imports are lazy so `import lmforge.serve` (or lmforge.serve.cache, for the data tools that read
the feedback store) pulls in neither torch nor FastAPI.
"""

from __future__ import annotations

from lmforge.common.lazy import lazy_getattr

_EXPORTS = {
    "Engine": "lmforge.serve.engine",
    "EngineClosed": "lmforge.serve.engine",
    "EngineStats": "lmforge.serve.engine",
    "QueueFull": "lmforge.serve.engine",
    "SamplingParams": "lmforge.serve.sampling",
    "RequestHandle": "lmforge.serve.handle",
    "TokenEvent": "lmforge.serve.handle",
    "Completion": "lmforge.serve.handle",
    "collect": "lmforge.serve.handle",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
