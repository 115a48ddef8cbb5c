"""The chat page's files: everything it loads is one of its own files (it works offline, with no
CDN), and the app script is valid JavaScript (checked with node when it is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parents[3] / "src" / "lmforge" / "serve" / "web"


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_the_page_loads_only_its_own_files() -> None:
    parser = _Refs()
    parser.feed((WEB / "index.html").read_text())
    local = [r for r in parser.refs if not r.startswith("data:")]
    assert sorted(local) == ["app.js", "style.css"]
    assert all((WEB / r).is_file() for r in local)
    for name in ("app.js", "style.css"):
        text = (WEB / name).read_text()
        assert not re.search(r"https?://|@import|url\(", text), f"{name} fetches from elsewhere"


def test_app_js_parses() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the browser test runs the script anyway)")
    res = subprocess.run([node, "--check", str(WEB / "app.js")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
