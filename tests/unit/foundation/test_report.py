"""The report is derived from manifests: every stage, its time, metrics and plots, self-contained."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.errors import InputError
from lmforge.evals.report import write_report
from lmforge.runner import run_recipe

from . import toy_stages  # noqa: F401


def test_report_lists_stages_in_order_with_metrics_and_embedded_plots(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("abc abc")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: toy\ndescription: a toy run\nstages:\n  letters:\n    text: {tmp_path / 't.txt'}\n"
        "  shout:\n    counts: '@letters'\n"
    )
    out = tmp_path / "run"
    run_recipe(recipe, out=out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([1, 2, 3])
    plt.savefig(out / "letters" / "curve.png")
    html_path = write_report(out)
    page = html_path.read_text()
    assert page.index("letters (letters)") < page.index("shout (shout)")
    assert "a toy run" in page and "<script" not in page
    assert "data:image/png;base64," in page and 'alt="curve"' in page
    assert "<td>letters</td><td>6</td>" in page  # headline metric from the manifest
    md = (out / "report.md").read_text()
    assert "| parts | 2 |" in md and "![curve](letters/curve.png)" in md


def test_report_on_empty_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no completed stage"):
        write_report(tmp_path)
