"""`stdlib-docs`: the built-in corpus, made from the running Python's standard-library documentation.

Real English text that is present on every machine with no download: pydoc topics
(pydoc_data.topics), docstrings of importable stdlib modules, classes and functions (inherited
docstrings make many exact and near duplicates, a real test for dedup), and module pages rendered
by pydoc.HTMLDoc (so the HTML extractor runs on real pages). About 2 MB of text, in a
deterministic order.

Importing arbitrary modules can print, open windows or hang, so the collection runs in a child
process (`python -m lmforge.data.stdlib_docs`) whose stdout/stderr go to /dev/null, with a
per-module alarm and a skip list; records come back as JSON lines on a private pipe.

The text must not depend on the machine or the run (a newcomer's corpus is byte-identical to
ours, and the model does not learn noise): the child gets a fixed environment (pydoc prints
os.environ) and a sys.path of the stdlib alone (an installed lmforge and a checkout differ there),
and object addresses, this interpreter's paths and the home directory become
stand-ins, in data values before pydoc truncates them and in the rendered text.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pydoc
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.data.document import Document
from lmforge.data.stdlib_portable import PortableHTMLDoc, clean, own_paths
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
# The child's whole environment: pydoc's pages of os and posix print it.
_CHILD_ENV = {
    "PYTHONHASHSEED": "0",
    "PYTHONWARNINGS": "ignore",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONNOUSERSITE": "1",
    "PYTHONUTF8": "1",
    "PATH": os.defpath,
}


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
                "signature": clean(_signature(fn)),
                "docstring": clean(doc),
            }


def _doc_records(mod: Any, html: bool) -> Iterator[dict[str, Any]]:
    """Module, class and function docstrings of one module, then its HTMLDoc page."""
    name = mod.__name__
    if doc := inspect.getdoc(mod):
        yield {
            "id": f"stdlib:{name}",
            "text": clean(doc),
            "kind": "module",
            "module": name,
            "qualname": name,
        }
    for cname, obj in _public_members(mod):
        if inspect.isclass(obj) and (doc := inspect.getdoc(obj)):
            yield {
                "id": f"stdlib:{name}.{cname}",
                "text": clean(doc),
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
        html_doc = PortableHTMLDoc()
        try:
            page = html_doc.page(pydoc.describe(mod), html_doc.document(mod, name))
        except Exception:  # pydoc fails on a few odd modules; the docstrings remain
            return
        yield {
            "id": f"stdlib-html:{name}",
            "text": clean(page),
            "kind": "html_page",
            "module": name,
            "qualname": name,
            "content_type": "text/html",
        }


def _stdlib_path(entries: list[str]) -> list[str]:
    """The entries of sys.path that hold the standard library (its zip, its directory and
    lib-dynload), for the child once lmforge is imported.

    The rest differs between installs (the checkout's src/ or site-packages as the cwd, an
    editable install's .pth entry, PYTHONPATH) and pydoc's page of sys prints sys.path; with
    the stdlib alone there, nothing installed beside it can shadow a stdlib module either.
    """
    stdlib = {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}
    stdlib_zip = f"python{sys.version_info.major}{sys.version_info.minor}.zip"
    return [
        entry
        for entry in entries
        if os.path.basename(entry) == stdlib_zip
        or (
            any(entry == d or entry.startswith(d + os.sep) for d in stdlib)
            and not {"site-packages", "dist-packages"} & set(Path(entry).parts)
        )
    ]


def _child_main(what: str) -> None:
    """Runs in the child: silences stdout/stderr, writes JSON lines to the saved real stdout."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdin = open(os.devnull)  # nothing may wait for input
    own_paths()  # its stand-ins from the whole sys.path, fixed before an import can change it
    sys.path[:] = _stdlib_path(sys.path)
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
    # The child imports this checkout's lmforge from its cwd (sys.path[0] under -m), so it needs
    # no PYTHONPATH from this process' environment.
    cmd = [sys.executable, "-m", "lmforge.data.stdlib_docs", what]
    src_root = Path(__file__).resolve().parents[2]
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=_CHILD_ENV,
        cwd=src_root,
        text=True,
        encoding="utf-8",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            yield json.loads(line)
        if proc.wait() != 0:
            raise InputError(
                f"{NAME}: collecting the standard-library docs failed (exit {proc.returncode}; "
                f"the child's error, if any, is above): `{' '.join(cmd)}` runs in {src_root} "
                f"with only {sorted(_CHILD_ENV)} set, so lmforge and its dependencies must import "
                "there without PYTHONPATH (install them into this interpreter, or use another "
                "source)"
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
