"""The stdlib-docs collector: the child process that imports stdlib modules and writes their
docs as JSON lines (stdlib_docs.py starts it and reads them).

It runs by path under `python -S` (`python -S .../stdlib_collect.py docs|functions [module...]`):
no site-packages, no .pth files, so nothing installed beside the interpreter is imported, can
shadow a stdlib module or shows in a page (sys.modules, sys.meta_path), and a venv and its base
interpreter see the same modules. It therefore imports nothing but the standard library and its
sibling stdlib_portable; module names after the kind restrict the collection (for tests).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pydoc
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__:  # imported as part of lmforge (tests)
    from lmforge.data.stdlib_portable import PortableHTMLDoc, clean, own_paths
else:  # run by path in the child: this file's folder is sys.path[0]
    from stdlib_portable import PortableHTMLDoc, clean, own_paths

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


def _child_main(what: str, only: list[str]) -> None:
    """Runs in the child: silences stdout/stderr, writes JSON lines to the saved real stdout.

    With `only`, just those modules (and no pydoc topics)."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdin = open(os.devnull)  # nothing may wait for input
    own_paths()  # its stand-ins from the whole sys.path, fixed before an import can change it
    sys.path[:] = _stdlib_path(sys.path)
    if what == "docs" and not only:
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
    for name in only or _module_names():
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


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2:])
