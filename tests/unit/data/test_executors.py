"""The local executor's worker pool: errors reach the parent once, in input order."""

from __future__ import annotations

import pytest

from lmforge.data.config import DataConfig
from lmforge.data.document import Document
from lmforge.data.executors import run_local
from lmforge.errors import InputError


def _cfg(tmp_path, **kw) -> dict:
    src = tmp_path / "corpus.txt"
    src.write_text("A small document about Python lists and dictionaries.\n")
    return DataConfig(out=tmp_path / "out", source=[str(src)], **kw).model_dump(mode="json")


def _batches(n: int) -> list[list[tuple[int, Document]]]:
    return [[(i, Document(text=f"Document number {i} is about sorting lists.", id=str(i)))]
            for i in range(n)]  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_that_cannot_start_fails_the_stage_once_instead_of_hanging(tmp_path, workers):
    missing = tmp_path / "no_such_eval_set.jsonl"
    cfg = _cfg(tmp_path, decontam={"eval_sets": [str(missing)]})
    with pytest.raises(InputError, match=r"no_such_eval_set\.jsonl is not a file"):
        list(run_local(_batches(6), cfg, workers))


@pytest.mark.timeout(120)
def test_a_pool_processes_every_batch_in_input_order(tmp_path):
    results = list(run_local(_batches(7), _cfg(tmp_path), 2))
    assert len(results) == 7
    kept = [r["records"][0]["id"] for r in results if r["records"]]
    assert kept == sorted(kept, key=int)
