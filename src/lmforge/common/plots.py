"""matplotlib for writing image files: every plot in lmforge gets pyplot from here."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display needed), imported on first
    use so that importing a module that can plot does not import matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
