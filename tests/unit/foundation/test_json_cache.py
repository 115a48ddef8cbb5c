"""common.json_cache.read_json: a parse is kept only while the file's stat data says it is the
same file, unchanged, and handed out as a copy."""

from __future__ import annotations

import io
import os
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from lmforge.common import json_cache
from lmforge.common.json_cache import read_json, read_json_object
from lmforge.errors import InputError

SETTLED = 0.05  # SETTLE_S for these tests, so that they need not wait 2 s for a file to settle


@pytest.fixture
def reads(monkeypatch, tmp_path) -> Counter[str]:
    """Text-mode reads of files under tmp_path from now on, by file name; SETTLE_S shortened."""
    monkeypatch.setattr(json_cache, "SETTLE_S", SETTLED)
    counts: Counter[str] = Counter()
    real = io.open

    def counted(file, mode="r", *args, **kwargs):
        if mode in ("r", "rt") and str(file).startswith(str(tmp_path)):
            counts[os.path.basename(str(file))] += 1
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", counted)  # pathlib's read_text opens through io.open
    return counts


def _settle() -> None:
    time.sleep(2 * SETTLED)


def test_a_kept_parse_is_handed_out_as_a_copy_and_a_rewrite_read_again(tmp_path, reads):
    path = tmp_path / "config.json"
    path.write_text('{"n_layer": 2, "eos": [1]}')
    _settle()
    first = read_json(path)
    first["n_layer"], first["eos"][0] = 9, 9  # a copy: the kept parse is not changed through it
    assert read_json(path) == {"n_layer": 2, "eos": [1]}
    assert reads["config.json"] == 1  # the second answer came from the kept parse
    path.write_text('{"n_layer": 3, "eos": [1]}')  # same size, changed now
    assert read_json(path) == {"n_layer": 3, "eos": [1]}


def test_a_copy_that_puts_back_the_size_and_modification_time_is_read_again(tmp_path, reads):
    # cp -p / rsync -t / shutil.copy2 over the file: same inode (or a reused one), same size and
    # mtime; only the status change time tells the versions apart
    path = tmp_path / "config.json"
    path.write_text('{"eos_token_id": 2}')
    old = time.time_ns() - 60 * 10**9
    os.utime(path, ns=(old, old))
    _settle()
    assert read_json(path) == {"eos_token_id": 2}
    path.write_text('{"eos_token_id": 3}')
    os.utime(path, ns=(old, old))
    _settle()  # settled again: the kept parse's key must tell it apart
    assert read_json(path) == {"eos_token_id": 3}
    assert reads["config.json"] == 2


def test_a_recent_change_is_read_afresh_when_the_stat_data_cannot_show_it(tmp_path, monkeypatch):
    # a rewrite in place inside one timestamp tick: every stat field the same for both versions
    path = tmp_path / "config.json"
    path.write_text('{"n_layer": 2}')
    ns = time.time_ns() - 10**9  # changed a second ago: not settled
    fields = list(path.stat())
    fields[7:10] = [ns // 10**9] * 3
    frozen = os.stat_result(fields, {"st_mtime_ns": ns, "st_ctime_ns": ns})
    real_stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda p, **kw: frozen if p == path else real_stat(p, **kw))
    assert read_json(path) == {"n_layer": 2}
    path.write_text('{"n_layer": 3}')
    assert read_json(path) == {"n_layer": 3}


def test_a_file_that_is_no_json_object_is_an_input_error_saying_where_and_what_to_do(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text('{\n  "eos_token": "</s>",\n  bos_token: "<s>"\n}', encoding="utf-8")
    where = re.escape(f"{path} is not valid JSON (line 3 column 3: Expecting property name")
    with pytest.raises(InputError, match=f"^{where}.*; rewrite it$"):
        read_json_object(path, "rewrite it")
    path.write_bytes(b'{"eos_token": "\xff"}')
    with pytest.raises(InputError, match=r"is not UTF-8 text \(byte 15\); mend it"):
        read_json_object(path)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(InputError, match=r"must hold a JSON object, not a list; mend it"):
        read_json_object(path)
    path.write_text('{"eos_token": "</s>"}', encoding="utf-8")
    assert read_json_object(path) == {"eos_token": "</s>"}
