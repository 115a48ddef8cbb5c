"""torch's intra-op thread count for the serving engines: process-wide, so set once.

An engine given `threads` (from `lmforge serve --threads`, or ServeSettings.torch_threads) sets
it; one given none applies lmforge's default once per process (common/threads.py: usable CPUs,
or OMP_NUM_THREADS) and leaves a count set before it alone.
"""

from __future__ import annotations

import torch

from lmforge.errors import InputError

_threads_configured = False


def configure_threads(threads: int | None) -> None:
    """torch's intra-op threads (process-wide): `threads` when given, else lmforge's default
    (usable CPUs, or OMP_NUM_THREADS), set once. On a small shared CPU fewer threads than cores
    can serve faster: the HTTP event loop needs a core too (see `lmforge serve --threads`)."""
    global _threads_configured
    if threads is not None:
        if threads < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        _threads_configured = True
    elif not _threads_configured:
        from lmforge.common.threads import configure_torch_threads

        configure_torch_threads()
        _threads_configured = True
