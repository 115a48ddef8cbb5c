"""Text of pydoc output with nothing of the machine or the run in it, for the stdlib-docs corpus.

Object addresses, ctypes handles, this interpreter's paths, the checkout or install of lmforge and
the home directory become stand-ins (<python>, <python-prefix>, <lmforge>, <stdlib>, ~...), in
pydoc's data values before it truncates them (PortableHTMLDoc) and in the rendered text (clean);
a module's runtime state (its __warningregistry__) is left off its page.
"""

from __future__ import annotations

import os
import pydoc
import re
import sys
import sysconfig
from functools import cache
from pathlib import Path
from typing import Any

# An object's address (pydoc's stripid removes " at 0x..." the same way), also in HTML where the
# space is &nbsp;, and ctypes' "handle 7f..." of a loaded library.
_SPACE = r"(?:\s|&nbsp;)"
_ADDR = re.compile(
    rf"{_SPACE}at{_SPACE}0x[0-9a-fA-F]{{6,}}|,?{_SPACE}handle{_SPACE}(?:0x)?[0-9a-fA-F]{{6,}}\b"
)
# Another install's stdlib directory, from the start of a path (not ~/.local/lib/python3.x/).
_PATH = re.compile(r"(?<![\w.~>-])/[^\s\"'<>]*?/lib/python3\.\d+/")
# Prefixes shared by every Debian-like system Python; docstrings also use them as examples.
_SYSTEM_PREFIXES = {"/", "/usr", "/usr/local"}
PREFIX = "<python-prefix>"


def prefixes() -> list[str]:
    """This interpreter's prefixes: a venv's own and its base interpreter's."""
    return [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix]


@cache
def own_paths() -> tuple[tuple[str, str], ...]:
    """This run's paths that pydoc prints, with their stand-ins, the longest (most specific) first.

    Defaults such as platform.architecture(executable=sys.executable) print the interpreter into
    signatures; sys.path, sys.prefix, module reprs and site.PREFIXES print the install, the
    checkout and the home directory into the pages of sys and site. A venv's prefix and its
    base's are both <python-prefix> (a venv and its base interpreter give the same corpus); a
    prefix in text only when it is not a shared system prefix such as /usr, which also occurs in
    ordinary docstrings (PortableRepr replaces a data value that is a prefix). A sys.path entry
    under none of these (a .pth file's, such as an editable install's source folder) becomes
    <sys.path>.
    """
    pairs = [
        (sys.executable, "<python>"),
        (str(Path(__file__).resolve().parents[2]), "<lmforge>"),  # the collector's folder's root
        (sysconfig.get_path("stdlib"), "<stdlib>"),
        (os.path.expanduser("~"), "~"),
    ]
    pairs += [(prefix, PREFIX) for prefix in prefixes()]
    stand_ins: dict[str, str] = {}
    for path, stand_in in pairs:  # the first stand-in of a path wins (the interpreter's)
        if path and path not in _SYSTEM_PREFIXES:
            stand_ins.setdefault(path, stand_in)
    for entry in sys.path:
        if entry and not any(entry == p or entry.startswith(p + os.sep) for p in stand_ins):
            stand_ins[entry] = "<sys.path>"
    return tuple(sorted(stand_ins.items(), key=lambda pair: -len(pair[0])))


@cache
def own_paths_pattern() -> re.Pattern[str]:
    """Any of own_paths as a whole path (not the start of a longer name such as /rootfs)."""
    alternatives = "|".join(re.escape(path) for path, _ in own_paths())
    return re.compile(rf"(?:{alternatives})(?![\w.-])")


@cache
def own_stand_ins() -> dict[str, str]:
    """own_paths by path, built once like the pattern that finds them (they must agree)."""
    return dict(own_paths())


def clean(text: str) -> str:
    """Removes what differs between runs and machines: object addresses and install paths."""
    stand_ins = own_stand_ins()
    text = own_paths_pattern().sub(lambda m: stand_ins[m.group()], text)
    return _PATH.sub("<stdlib>/", _ADDR.sub("", text))


class PortableRepr(pydoc.HTMLRepr):
    """pydoc's repr of data values (sys.path, sys.modules...) cleaned before it truncates them.

    Truncation ("/root/.pyenv/versions/3...dynload") would hide a path from clean afterwards.
    """

    def repr1(self, x: Any, level: int) -> str:
        if type(x) is str:  # not a str subclass such as a StrEnum member: pydoc shows its repr
            return self.repr_string(PREFIX if x in prefixes() else clean(x), level)
        if hasattr(self, "repr_" + "_".join(type(x).__name__.split())):
            return super().repr1(x, level)  # containers: their items come back here
        return self.escape(pydoc.cram(pydoc.stripid(clean(repr(x))), self.maxother))


# Module attributes that are runtime state, not documentation: warnings.warn records in the
# warning's module which warnings it has shown, so the page would differ by what ran before.
RUNTIME_STATE = ("__warningregistry__",)


class PortableHTMLDoc(pydoc.HTMLDoc):
    """pydoc.HTMLDoc whose data values go through PortableRepr, without runtime state."""

    _repr_instance = PortableRepr()
    repr = _repr_instance.repr

    def docmodule(self, module: Any, *args: Any, **kwargs: Any) -> str:
        """The module's page with RUNTIME_STATE out of its namespace while pydoc reads it."""
        namespace = vars(module)
        hidden = {name: namespace.pop(name) for name in RUNTIME_STATE if name in namespace}
        try:
            return super().docmodule(module, *args, **kwargs)
        finally:
            namespace.update(hidden)
