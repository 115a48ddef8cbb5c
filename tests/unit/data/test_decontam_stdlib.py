"""Decontamination by 13-gram overlap, and the built-in stdlib-docs corpus."""

from __future__ import annotations

import enum
import json
import os
import pydoc
import re
import sys
import sysconfig
import types
import warnings
from pathlib import Path

import pytest

from lmforge.data.decontam import Decontaminator
from lmforge.data.stdlib_collect import _module_names, _stdlib_path
from lmforge.data.stdlib_docs import collect, iter_functions, read_stdlib_docs
from lmforge.data.stdlib_portable import PortableHTMLDoc, PortableRepr
from lmforge.data.stdlib_portable import clean as _clean
from lmforge.errors import InputError

from .corpus import prose


def test_decontaminator_finds_shared_13grams_from_jsonl_and_text(tmp_path):
    question = prose(11, 6)
    (tmp_path / "eval.jsonl").write_text(json.dumps({"question": question, "answer": "yes"}) + "\n")
    (tmp_path / "eval.txt").write_text(prose(12, 6))
    dc = Decontaminator.from_files([tmp_path / "eval.jsonl", tmp_path / "eval.txt"], ngram=13)
    words = question.split()
    leaked = prose(13, 6) + " " + " ".join(words[5:25]) + " " + prose(14, 3)
    assert dc.overlap(leaked) >= 1
    assert dc.overlap(prose(13, 6)) == 0
    assert dc.overlap(" ".join(words[5:17])) == 0  # 12 words: below the n-gram length
    with pytest.raises(InputError, match="eval_sets"):
        Decontaminator.from_files([tmp_path / "missing.jsonl"])


# Set in the collecting process: the corpus must not show it (pydoc prints os.environ).
ENV_MARKER = ("LMFORGE_TEST_ENV_MARKER", "/marker/of/this/run")


@pytest.fixture(scope="module")
def stdlib_docs():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(*ENV_MARKER)
        return list(read_stdlib_docs())


def test_stdlib_docs_corpus_is_real_text_with_duplicates(stdlib_docs):
    kinds = {d.meta["kind"] for d in stdlib_docs}
    assert kinds == {"topic", "module", "class", "function", "html_page"}
    by_id = {d.id: d for d in stdlib_docs}
    assert "stdlib:json.dumps" in by_id and by_id["stdlib:json.dumps"].meta["module"] == "json"
    assert "Serialize" in by_id["stdlib:json.dumps"].text
    assert not any(
        d.meta["module"].split(".")[0] in ("tkinter", "idlelib", "antigravity", "this", "test")
        for d in stdlib_docs
    )
    text_chars = sum(len(d.text) for d in stdlib_docs if d.meta["kind"] != "html_page")
    assert 1_000_000 < text_chars < 5_000_000
    texts = [d.text for d in stdlib_docs]
    assert len(texts) - len(set(texts)) > 500  # inherited docstrings: many exact duplicates
    assert " at 0x" not in "".join(d.text for d in stdlib_docs if d.meta["kind"] == "html_page")


def test_stdlib_module_order_is_deterministic():
    names = _module_names()
    assert names == sorted(names) and names == _module_names()
    assert "json" in names and "email.mime.text" in names and "tkinter" not in names


def test_iter_functions_records():
    recs = list(iter_functions())
    assert len(recs) > 1000
    dumps = next(r for r in recs if r["qualname"] == "json.dumps")
    assert dumps["module"] == "json" and dumps["signature"].startswith("(obj, *, skipkeys=False")
    assert dumps["docstring"].startswith("Serialize")


def test_stdlib_text_does_not_depend_on_where_python_is_installed():
    signature = f"(executable='{sys.executable}', bits='', linkage='')"
    assert _clean(signature) == "(executable='<python>', bits='', linkage='')"
    if sys.prefix != sys.base_prefix:  # inside a venv (as tests and the quickstart run)
        assert _clean(f"site: {sys.prefix}/share") == "site: <python-prefix>/share"
    assert _clean("see /usr/bin/env and 0x1F") == "see /usr/bin/env and 0x1F"


def test_stdlib_text_has_no_addresses_in_html_or_ctypes_handles():
    page = "timeout=&amp;lt;object&nbsp;at&nbsp;0x7fe8433a4b40&amp;gt;, pythonapi = <PyDLL 'None', handle 7fe843d782e0>"
    assert _clean(page) == "timeout=&amp;lt;object&amp;gt;, pythonapi = <PyDLL 'None'>"
    assert (
        _clean("0xdeadbeef, 0x10ffff, at 0x1F") == "0xdeadbeef, 0x10ffff, at 0x1F"
    )  # examples stay


def test_stdlib_text_replaces_home_and_install_paths_as_whole_paths():
    home = os.path.expanduser("~")
    if home not in ("", "/"):
        user_site = f"{home}/.local/lib/python3.11/site-packages"
        assert (
            _clean(f"USER_SITE = '{user_site}'")
            == "USER_SITE = '~/.local/lib/python3.11/site-packages'"
        )
        assert _clean(f"{home}fs") == f"{home}fs"  # only a whole path component is the home
    src_root = str(Path(__file__).resolve().parents[3] / "src")
    if Path(src_root, "lmforge").is_dir():
        assert _clean(f"argv = ['{src_root}/lmforge/x.py']") == "argv = ['<lmforge>/lmforge/x.py']"
    assert _clean("/usr/lib/python3.9/os.py") == "<stdlib>/os.py"  # another install's stdlib


def test_stdlib_data_values_are_cleaned_before_pydoc_truncates_them():
    deep = os.path.join(sys.executable, "d" * 300)
    shown = PortableRepr().repr([deep, {"k": deep}])
    assert sys.executable not in shown and shown.startswith("['&lt;python&gt;/ddd")
    member = enum.Enum("Method", {"GET": "GET"}, type=str).GET  # a str, shown as pydoc shows it
    assert (
        PortableRepr().repr(member) == pydoc.HTMLRepr().repr(member) == "&lt;Method.GET: 'GET'&gt;"
    )


def test_stdlib_corpus_does_not_depend_on_the_machine_or_the_run(stdlib_docs):
    """No address, install path, checkout, home or environment of this run in any document."""
    run_specific = {sys.executable, os.getcwd(), str(Path(__file__).resolve().parents[3])}
    run_specific |= {ENV_MARKER[0], ENV_MARKER[1]}
    if sys.prefix != sys.base_prefix:
        run_specific.add(sys.prefix)
    home = os.path.expanduser("~")
    if home not in ("", "/"):
        run_specific.add(home + "/")
    address = re.compile(r"(?:\s|&nbsp;)at(?:\s|&nbsp;)0x[0-9a-fA-F]{6,}|handle [0-9a-f]{6,}")
    for doc in stdlib_docs:
        assert not address.search(doc.text), doc.id
        assert "__warningregistry__" not in doc.text, doc.id  # what warned before (aifc...)
        found = [s for s in run_specific if s in doc.text]
        assert not found, (doc.id, found)
    pages = {d.id: d.text for d in stdlib_docs}
    assert "environ({'PYTHONHASHSEED': '0'" in pages["stdlib-html:os"]  # the fixed child env
    assert "&lt;python&gt;" in pages["stdlib-html:sys"]  # sys.executable, shown as its stand-in
    # sys.path: the stdlib only, the same for a checkout (src/ as the cwd) and an installed copy
    sys_path = re.search(r"<strong>path</strong> = (.*?)<br>", pages["stdlib-html:sys"]).group(1)
    assert "&lt;stdlib&gt;" in sys_path
    assert not re.search(r"lmforge|sys\.path|site-packages|dist-packages", sys_path), sys_path


def test_a_venv_and_its_base_interpreter_collect_the_same_pages():
    """sys, site and sysconfig print the prefix, the interpreter, sys.path and what site
    imported; the collector (stdlib only, under -S) gives the same pages in both."""
    base = getattr(sys, "_base_executable", sys.executable)
    if sys.prefix == sys.base_prefix or base == sys.executable:
        pytest.skip("needs a venv (tests run in one) to compare with its base interpreter")
    pages = ("sys", "site", "sysconfig")
    ours, theirs = list(collect("docs", only=pages)), list(collect("docs", python=base, only=pages))
    assert ours == theirs  # their docstrings and pages
    html = {r["id"]: r["text"] for r in ours if r["kind"] == "html_page"}
    assert list(html) == [f"stdlib-html:{page}" for page in pages]
    sys_page = html["stdlib-html:sys"]
    for name in ("prefix", "exec_prefix", "base_prefix"):
        assert f"<strong>{name}</strong> = '&lt;python-prefix&gt;'" in sys_page
    assert "<strong>executable</strong> = '&lt;python&gt;'" in sys_page
    assert "_distutils_hack" not in sys_page  # a finder a venv's .pth adds (setuptools)


def test_a_module_page_leaves_out_its_warning_registry_and_keeps_it_in_the_module():
    module = types.ModuleType("warned", "A module that has warned.")
    exec("import warnings\nLIMIT = 3\ndef old():\n    warnings.warn('old')", vars(module))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in the collector (PYTHONWARNINGS): still recorded
        module.old()
    registry = module.__warningregistry__
    assert registry  # the runtime state a plain pydoc page shows
    assert "__warningregistry__" in pydoc.HTMLDoc().docmodule(module)
    page = PortableHTMLDoc().docmodule(module)
    assert "__warningregistry__" not in page and "<strong>LIMIT</strong> = 3" in page
    assert module.__warningregistry__ is registry  # only hidden while the page was rendered


def test_a_prefix_shown_as_a_value_is_a_stand_in_even_a_system_one(monkeypatch):
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    assert PortableRepr().repr(["/usr", "/usr/x"]) == "['&lt;python-prefix&gt;', '/usr/x']"
    assert _clean("installed under /usr") == "installed under /usr"  # prose keeps it


def test_child_sys_path_keeps_only_the_standard_library():
    stdlib = sysconfig.get_path("stdlib")
    zip_name = f"python{sys.version_info.major}{sys.version_info.minor}.zip"
    kept = [os.path.join(os.path.dirname(stdlib), zip_name), stdlib, f"{stdlib}/lib-dynload"]
    others = ["/checkout/src", f"{stdlib}/site-packages", "/venv/lib/site-packages", f"{stdlib}x"]
    assert _stdlib_path([others[0], *kept, *others[1:]]) == kept


def test_a_failing_collector_says_what_it_ran_and_what_to_do(monkeypatch):
    monkeypatch.setattr(sys, "executable", "false")  # exits 1, like a child that cannot import
    with pytest.raises(
        InputError, match=r"exit 1.*`false -S \S*stdlib_collect.py docs`.*standard library"
    ):
        list(read_stdlib_docs())


def test_a_reader_that_stops_early_ends_the_collector(monkeypatch):
    """Closing the records after the first module's ends the child at once; it used to import
    every module left while the close waited for it (9.7 s of a 10.6 s collection, loaded VM)."""
    import signal
    import subprocess

    from lmforge.data import stdlib_docs

    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(stdlib_docs.subprocess, "Popen", Recorded)
    records = collect("docs")
    assert next(r for r in records if r["kind"] != "topic")["kind"] == "module"
    records.close()
    assert started[0].returncode == -signal.SIGKILL  # not 1, its exit after every module


def test_no_module_beside_the_collector_shadows_a_stdlib_module():
    """The child runs stdlib_collect.py by path, so its folder is sys.path[0] while pydoc,
    json and the rest import: a data/html.py there would replace the standard library's."""
    from lmforge.data import stdlib_collect

    folder = Path(stdlib_collect.__file__).parent
    names = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if p.is_dir()}
    assert not names & set(sys.stdlib_module_names)
