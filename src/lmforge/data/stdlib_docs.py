"""`stdlib-docs`: the built-in corpus, made from the running Python's standard-library documentation.

Real English text that is present on every machine with no download: pydoc topics
(pydoc_data.topics), docstrings of importable stdlib modules, classes and functions (inherited
docstrings make many exact and near duplicates, a real test for dedup), and module pages rendered
by pydoc.HTMLDoc (so the HTML extractor runs on real pages). About 2 MB of text, in a
deterministic order.

Importing arbitrary modules can print, open windows or hang, so the collection runs in a child
process (`python -m lmforge.data.stdlib_docs`) whose stdout/stderr go to /dev/null, with a
per-module alarm and a skip list; records come back as JSON lines on a private pipe.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.data.document import Document
from lmforge.errors import InputError

NAME = "stdlib-docs"
# Unsafe (GUI, prints, opens a browser), slow, deprecated-noisy or test-only modules.
SKIP = {
    "antigravity",
    "this",
    "tkinter",
    "turtle",
    "turtledemo",
    "idlelib",
    "lib2to3",
    "test",
    "pydoc_data",
    "ensurepip",
    "venv",
    "xxlimited",
    "xxlimited_35",
    "xxsubtype",
    "msilib",
    "winreg",
    "winsound",
    "msvcrt",
    "_winapi",
    "nt",
    "__phello__",
    "_testcapi",
    "pty",
    "tty",
    "curses",
    "readline",
    "distutils",
    "imp",
    "asyncore",
    "asynchat",
    "smtpd",
    "crypt",
    "nntplib",
    "telnetlib",
    "cgi",
    "cgitb",
    "sndhdr",
    "imghdr",
    "audioop",
    "chunk",
    "mailcap",
    "pipes",
    "spwd",
    "sunau",
    "uu",
    "xdrlib",
    "nis",
    "ossaudiodev",
}
SKIP_PARTS = {"test", "tests", "idle_test", "__main__"}
IMPORT_TIMEOUT_S = 5
_ADDR = re.compile(r" at 0x[0-9a-fA-F]+")
_PATH = re.compile(r"/[^\s\"'<>]*?/lib/python3\.\d+/")


def _module_names() -> list[str]:
    """Public stdlib modules plus their public submodules, sorted."""
    import pkgutil

    names: list[str] = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP:
            continue
        names.append(top)
        spec = _find_spec(top)
        if spec is None or not spec.submodule_search_locations:
            continue
        for info in pkgutil.walk_packages(list(spec.submodule_search_locations), prefix=f"{top}."):
            parts = info.name.split(".")
            if any(p.startswith("_") or p in SKIP_PARTS for p in parts[1:]):
                continue
            names.append(info.name)
    return sorted(set(names))


def _find_spec(name: str) -> Any:
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _import(name: str) -> Any:
    """Imports one module under an alarm; None when it fails, hangs or is unavailable."""
    import importlib
    import signal

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(name)

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(IMPORT_TIMEOUT_S)
    try:
        return importlib.import_module(name)
    except BaseException:  # any failure (even SystemExit) just skips the module
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _own_paths() -> list[tuple[str, str]]:
    """This interpreter's location (a venv's path differs per checkout) and its stand-ins.

    Defaults such as platform.architecture(executable=sys.executable) print it into signatures
    and pydoc pages. sys.prefix is replaced only inside a venv, where it is a unique path; a
    system prefix such as /usr also occurs in ordinary docstrings.
    """
    pairs = [(sys.executable, "<python>")]
    if sys.prefix != sys.base_prefix:
        pairs.append((sys.prefix, "<venv>"))
    return [(path, stand_in) for path, stand_in in pairs if path]


def _clean(text: str) -> str:
    """Removes what differs between runs and machines: object addresses and install paths."""
    for path, stand_in in _own_paths():  # the executable first: it lies inside the venv
        text = text.replace(path, stand_in)
    return _PATH.sub("<stdlib>/", _ADDR.sub("", text))


def _public_members(mod: Any) -> list[tuple[str, Any]]:
    """Classes and functions defined in mod itself (not re-exported), by name."""
    out = []
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            out.append((name, obj))
    return out


def _signature(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _callables(mod: Any) -> Iterator[tuple[str, Any]]:
    """(qualified name within mod, object) for public functions and methods of public classes."""
    for name, obj in _public_members(mod):
        if not inspect.isclass(obj):
            yield name, obj
            continue
        for attr in sorted(vars(obj)):
            # getattr (not vars) resolves static/class methods, and getdoc on the result finds
            # the docstring a method inherits from its base class: the corpus' duplicates.
            member = getattr(obj, attr, None)
            if not attr.startswith("_") and callable(member) and not inspect.isclass(member):
                yield f"{name}.{attr}", member


def _function_records(mod: Any) -> Iterator[dict[str, Any]]:
    """Functions and methods with their signatures and (inherited) docstrings."""
    for qual, fn in _callables(mod):
        doc = inspect.getdoc(fn)
        if doc:
            yield {
                "qualname": f"{mod.__name__}.{qual}",
                "module": mod.__name__,
                "signature": _clean(_signature(fn)),
                "docstring": _clean(doc),
            }


def _doc_records(mod: Any, html: bool) -> Iterator[dict[str, Any]]:
    """Module, class and function docstrings of one module, then its HTMLDoc page."""
    name = mod.__name__
    if doc := inspect.getdoc(mod):
        yield {
            "id": f"stdlib:{name}",
            "text": _clean(doc),
            "kind": "module",
            "module": name,
            "qualname": name,
        }
    for cname, obj in _public_members(mod):
        if inspect.isclass(obj) and (doc := inspect.getdoc(obj)):
            yield {
                "id": f"stdlib:{name}.{cname}",
                "text": _clean(doc),
                "kind": "class",
                "module": name,
                "qualname": f"{name}.{cname}",
            }
    for rec in _function_records(mod):
        yield {
            "id": f"stdlib:{rec['qualname']}",
            "text": rec["docstring"],
            "kind": "function",
            "module": name,
            "qualname": rec["qualname"],
            "signature": rec["signature"],
        }
    if html and "." not in name:
        import pydoc

        try:
            page = pydoc.html.page(pydoc.describe(mod), pydoc.html.document(mod, name))
        except Exception:  # pydoc fails on a few odd modules; the docstrings remain
            return
        yield {
            "id": f"stdlib-html:{name}",
            "text": _clean(page),
            "kind": "html_page",
            "module": name,
            "qualname": name,
            "content_type": "text/html",
        }


def _child_main(what: str) -> None:
    """Runs in the child: silences stdout/stderr, writes JSON lines to the saved real stdout."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdin = open(os.devnull)  # nothing may wait for input
    if what == "docs":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            rec = {
                "id": f"stdlib-topic:{key}",
                "text": topics[key],
                "kind": "topic",
                "module": "",
                "qualname": key,
            }
            out.write(json.dumps(rec) + "\n")
    for name in _module_names():
        mod = _import(name)
        if mod is None:
            continue
        with contextlib.suppress(Exception):
            records = list(
                _doc_records(mod, html=True) if what == "docs" else _function_records(mod)
            )
            for rec in records:
                out.write(json.dumps(rec) + "\n")
    out.flush()


def _run_child(what: str) -> Iterator[dict[str, Any]]:
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONWARNINGS="ignore", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "lmforge.data.stdlib_docs", what]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            yield json.loads(line)
        if proc.wait() != 0:
            raise InputError(
                f"{NAME}: collecting the standard-library docs failed (exit {proc.returncode})"
            )


def corpus_marker() -> Path:
    """A file whose content changes with the Python docs (pydoc topics): the corpus' cache input."""
    import pydoc_data.topics

    return Path(pydoc_data.topics.__file__)


def read_stdlib_docs(source: str = NAME) -> Iterator[Document]:
    """The built-in corpus as Documents (qualified name, module and kind in meta)."""
    for rec in _run_child("docs"):
        doc_id, text = rec.pop("id"), rec.pop("text")
        yield Document(doc_id, text, source, rec)


def iter_functions() -> Iterator[dict[str, Any]]:
    """Stdlib functions and methods: {qualname, signature, module, docstring}, deterministic order.

    For tasks like "explain this function" (the finetune stage builds them from these records).
    """
    yield from _run_child("functions")


if __name__ == "__main__":
    _child_main(sys.argv[1] if len(sys.argv) > 1 else "docs")
