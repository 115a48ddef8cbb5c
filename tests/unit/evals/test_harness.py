"""The lm-evaluation-harness adapter batches generate_until requests by their settings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.evals.lm import GenerationSettings

pytest.importorskip("lm_eval", reason="lm_eval not installed: pip install 'lmforge[eval]'")


def test_generate_until_groups_settings_and_keeps_request_order(model_dir: Path) -> None:
    from lmforge.evals.harness import LmforgeLM

    lm = LmforgeLM(str(model_dir), batch_size=2)
    short, long = {"until": ["\n\n"], "max_gen_toks": 4}, {"until": "(", "max_gen_toks": 9}
    contexts = ["def add(a, b):", "import", "x", "The quick brown fox", "print(", ""]
    kwargs = [short, long, short, long, long, short]
    requests = [SimpleNamespace(args=(c, k)) for c, k in zip(contexts, kwargs, strict=True)]
    expected = [
        lm.lm.generate(c, GenerationSettings(max_new_tokens=k["max_gen_toks"], stop=[*k["until"]]))
        for c, k in zip(contexts, kwargs, strict=True)
    ]
    assert lm.generate_until(requests) == expected
