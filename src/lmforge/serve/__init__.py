"""Serving: an OpenAI-compatible server over a continuous-batching engine, with its stores.

Nothing heavy is imported here, so `import lmforge.serve.cache` stays cheap for the CLI and the
data tools that read the feedback store. The engine's names (engine.py: Engine, SamplingParams,
RequestHandle, collect; it knows nothing of HTTP) are exported lazily: `lmforge.serve.Engine`
imports torch on first use only.
"""

from __future__ import annotations

from lmforge.common.lazy import lazy_getattr

_EXPORTS = {
    "Engine": "lmforge.serve.engine",
    "EngineClosed": "lmforge.serve.engine_types",
    "EngineStats": "lmforge.serve.engine_types",
    "QueueFull": "lmforge.serve.engine_types",
    "SamplingParams": "lmforge.serve.sampling",
    "RequestHandle": "lmforge.serve.handle",
    "TokenEvent": "lmforge.serve.handle",
    "Completion": "lmforge.serve.handle",
    "collect": "lmforge.serve.handle",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
