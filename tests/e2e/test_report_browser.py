"""report.html renders in headless Chromium: a non-blank page and no console errors.

Uses Debian's `chromium` package (install: apt-get update && apt-get install -y chromium, or
`make browser`). Without it the test skips with that instruction, except in CI (CI=true), where a
missing browser is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from unit.evals.fake_run import write_run

from lmforge.evals.report import write_report

INSTALL = "apt-get update && apt-get install -y chromium (or: make browser)"


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"chromium is not installed in CI; install it: {INSTALL}")
    pytest.skip(f"chromium is not installed; install it to run this test: {INSTALL}")


def render(page: Path, shot: Path, workdir: Path) -> list[str]:
    """Screenshots page; returns the console messages Chromium logged while loading it."""
    cmd = [
        find_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--hide-scrollbars", f"--user-data-dir={workdir / 'profile'}",
        "--enable-logging=stderr", "--v=0", "--window-size=1200,2400",
        f"--screenshot={shot}", page.resolve().as_uri(),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), (
        f"chromium wrote no screenshot (exit {res.returncode}): {res.stderr[-2000:]}"
    )
    return [line for line in res.stderr.splitlines() if ":CONSOLE" in line]


def ink_fraction(shot: Path) -> float:
    """Fraction of pixels that are not (near-)white: 0 for a blank page."""
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    return float((pixels < 240).mean())


def test_report_renders_without_console_errors(tmp_path: Path) -> None:
    find_chromium()
    page = write_report(write_run(tmp_path))
    html = page.read_text()
    # self-contained: every image inline, nothing fetched from anywhere
    assert all(
        src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', html)
    )
    assert not re.search(r'(?:href|src)="(?:https?:)?//', html)
    console = render(page, tmp_path / "report.png", tmp_path)
    assert console == [], "console messages while rendering report.html:\n" + "\n".join(console)
    assert ink_fraction(tmp_path / "report.png") > 0.03


def test_the_check_catches_console_errors_and_blank_pages(tmp_path: Path) -> None:
    find_chromium()
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); missing();</script></body></html>")
    console = render(bad, tmp_path / "bad.png", tmp_path)
    assert any("boom" in line for line in console)
    assert any("missing is not defined" in line for line in console)
    assert ink_fraction(tmp_path / "bad.png") < 0.001
