"""The funnel table printed by `lmforge data stats`."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from lmforge.data.stats import funnel_table, load_stats
from lmforge.errors import InputError

STATS = {
    "python": "3.11.7",
    "documents_in": 1200,
    "documents_out": 700,
    "rejects": 3,
    "splits": {"train": 500, "val": 100, "test": 100},
    "pii": {"email": 4},
    "steps": {
        "clean": {
            "docs_in": 1200,
            "chars_in": 5_000_000,
            "docs_out": 1200,
            "chars_out": 4_900_000,
            "dropped": {},
        },
        "gopher_quality": {
            "docs_in": 1200,
            "chars_in": 4_900_000,
            "docs_out": 800,
            "chars_out": 4_000_000,
            "dropped": {
                "gopher_min_words": 300,
                "gopher_stop_words": 60,
                "gopher_alpha_words": 30,
                "gopher_bullet_lines": 10,
            },
        },
        "exact_dedup": {
            "docs_in": 800,
            "chars_in": 4_000_000,
            "docs_out": 700,
            "chars_out": 3_500_000,
            "dropped": {"exact_duplicate": 100},
        },
    },
}


def test_funnel_table_shows_steps_reasons_and_totals(tmp_path):
    (tmp_path / "stats.json").write_text(json.dumps(STATS))
    console = Console(width=100, record=True)
    console.print(funnel_table(load_stats(tmp_path)))
    text = console.export_text()
    assert "gopher_quality" in text and "66.7%" in text and "4.00M" in text
    assert (
        "- gopher_min_words" in text
        and "-300" in text
        and "1 more reasons" in text
        and "-10" in text
    )
    assert "documents in 1,200 -> out 700" in text and "email 4" in text


def test_missing_stats_is_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match="lmforge data prepare"):
        load_stats(tmp_path)
