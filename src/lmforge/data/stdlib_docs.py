"""`stdlib-docs`: the built-in corpus, made from the running Python's standard-library documentation.

Real English text that is present on every machine with no download: pydoc topics
(pydoc_data.topics), docstrings of importable stdlib modules, classes and functions (inherited
docstrings make many exact and near duplicates, a real test for dedup), and module pages rendered
by pydoc.HTMLDoc (so the HTML extractor runs on real pages). About 2 MB of text, in a
deterministic order.

Importing arbitrary modules can print, open windows or hang, so the collection runs in a child
process (stdlib_collect.py, by path under `python -S`) whose stdout/stderr go to /dev/null, with a
per-module alarm and a skip list; records come back as JSON lines on a private pipe.

The text must not depend on the machine or the run (a newcomer's corpus is byte-identical to
ours, and the model does not learn noise): the child gets a fixed environment (pydoc prints
os.environ), no site-packages and a sys.path of the stdlib alone (an installed lmforge, a
checkout, a venv and its base interpreter differ there), and object addresses, this
interpreter's paths and the home directory become stand-ins, in data values before pydoc
truncates them and in the rendered text (stdlib_portable).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.data.document import Document
from lmforge.errors import InputError

NAME = "stdlib-docs"
# The version of the records the collector yields (read_stdlib_docs' documents, iter_functions'
# records): bump it in the commit that changes them (stdlib_collect, stdlib_portable's stand-ins,
# the child's command or environment), so that every stage built from them misses its cache
# (corpus_versions() is their input_versions(); their file input, corpus_marker(), is the
# Python's own). 2: the child runs under -S (a venv and its base interpreter agree). 3: module
# pages leave out __warningregistry__ (runtime state: what warned before the page was rendered).
CORPUS_FORMAT = 3
COLLECTOR = Path(__file__).with_name("stdlib_collect.py")
# The child's whole environment: pydoc's pages of os and posix print it.
_CHILD_ENV = {
    "PYTHONHASHSEED": "0",
    "PYTHONWARNINGS": "ignore",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONNOUSERSITE": "1",
    "PYTHONUTF8": "1",
    "PATH": os.defpath,
}


def collect(
    what: str, python: str | None = None, only: tuple[str, ...] = ()
) -> Iterator[dict[str, Any]]:
    """The collector's records ("docs" or "functions"), from `python` (default: this one).

    The collector imports only the standard library, so any interpreter of this Python version
    can run it, a venv's or its base's (only: these modules alone, no topics).
    """
    cmd = [python or sys.executable, "-S", str(COLLECTOR), what, *only]
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=_CHILD_ENV,
        cwd=COLLECTOR.parent,
        text=True,
        encoding="utf-8",
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                yield json.loads(line)
        except BaseException:  # GeneratorExit too: the reader stopped early (islice, an error)
            # else the child imports every module left, its writes to the closed pipe failing
            # quietly, while Popen's exit waits for it
            proc.kill()
            raise
        if proc.wait() != 0:
            raise InputError(
                f"{NAME}: collecting the standard-library docs failed (exit {proc.returncode}; "
                f"the child's error, if any, is above): `{' '.join(cmd)}` runs with only "
                f"{sorted(_CHILD_ENV)} set and no site-packages, so it needs a complete standard "
                "library for this interpreter (or use another source)"
            )


def corpus_marker() -> Path:
    """A file whose content changes with the Python docs (pydoc topics): the corpus' cache input."""
    import pydoc_data.topics

    return Path(pydoc_data.topics.__file__)


def corpus_versions() -> dict[str, str]:
    """CORPUS_FORMAT as the input_versions() of a stage built from the collector's records."""
    return {f"{NAME} corpus format": str(CORPUS_FORMAT)}


def read_stdlib_docs(source: str = NAME) -> Iterator[Document]:
    """The built-in corpus as Documents (qualified name, module and kind in meta)."""
    for rec in collect("docs"):
        doc_id, text = rec.pop("id"), rec.pop("text")
        yield Document(doc_id, text, source, rec)


def iter_functions() -> Iterator[dict[str, Any]]:
    """Stdlib functions and methods: {qualname, signature, module, docstring}, deterministic order.

    For tasks like "explain this function" (the finetune stage builds them from these records).
    """
    yield from collect("functions")
