"""Language identification with langid.py, whose model ships inside the package (no download).

Keeps documents whose top language is in the allowed list with a normalized probability at or
above the threshold; the language and its score go into the document's metadata.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmforge.data.document import Document

# langid's speed is linear in text length; the first few thousand characters decide it.
_MAX_CHARS = 2000


@functools.lru_cache(maxsize=1)
def _model() -> tuple[Any, np.ndarray]:
    """langid's identifier and its weights as float64, loaded once per process (~2 s to decode)."""
    from langid.langid import LanguageIdentifier, model

    identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return identifier, np.ascontiguousarray(identifier.nb_ptc, dtype=np.float64)


@dataclass
class LanguageStep:
    """Keep listed languages (ISO 639-1) above a confidence threshold; empty list keeps all."""

    languages: list[str] = field(default_factory=lambda: ["en"])
    threshold: float = 0.5
    name: str = "language"

    def identify(self, text: str) -> tuple[str, float]:
        """(language, normalized probability), as langid.classify with norm_probs.

        langid multiplies a dense 7,480-feature vector by its whole weight matrix; a document
        only has a few hundred non-zero features, so using just those rows is ~20x faster with
        the same result.
        """
        li, ptc = _model()
        fv = li.instance2fv(text[:_MAX_CHARS])
        nz = np.flatnonzero(fv)
        pd = fv[nz].astype(np.float64) @ ptc[nz] + li.nb_pc
        with np.errstate(over="ignore"):
            probs = 1 / np.exp(pd[None, :] - pd[:, None]).sum(1)
        best = int(np.argmax(probs))
        return str(li.nb_classes[best]), float(probs[best])

    def __call__(self, doc: Document) -> str | None:
        lang, prob = self.identify(doc.text)
        doc.meta["language"], doc.meta["language_score"] = lang, round(prob, 4)
        if self.languages and lang not in self.languages:
            return f"language_{lang}"
        if prob < self.threshold:
            return "language_low_confidence"
        return None
