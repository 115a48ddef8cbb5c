"""Readers: every format streams Documents, and every kind of bad input becomes a counted Reject."""

from __future__ import annotations

import gzip
import io
import json
import random

import pytest
import zstandard

from lmforge.data.config import SourceSpec
from lmforge.data.document import Document, Reject
from lmforge.data.pipeline import ExtractStep
from lmforge.data.sources import iter_source
from lmforge.errors import InputError

from .corpus import prose

PAGE = """<html><head><title>Rivers</title></head><body>
<nav><a href="/">Home</a> | <a href="/about">About us</a> | <a href="/shop">Shop</a></nav>
<div class="ad">Buy cheap watches now!</div>
<article><h1>On rivers</h1><p>{body}</p></article>
<footer>Copyright 2024. All rights reserved. Privacy policy.</footer></body></html>"""


def items(path, **kw):
    return list(iter_source(SourceSpec(path=str(path), **kw)))


def test_jsonl_plain_gz_zst_with_text_field(tmp_path):
    rows = [{"body": f"doc {i}", "id": f"r{i}", "lang": "en"} for i in range(3)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    got = items(tmp_path, text_field="body")
    assert [d.text for d in got] == ["doc 0", "doc 1", "doc 2"] * 3
    assert all(isinstance(d, Document) and d.meta["lang"] == "en" for d in got)
    assert got[0].id == "r0"


def test_bad_jsonl_lines_are_rejects_with_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "good one"}\n'
        b"{broken json\n"
        b'{"other": "no text field"}\n'
        b'{"text": "bad \xff\xfe bytes"}\n'
        b'{"text": "   "}\n'
        b"[1, 2]\n"
        b'{"text": 5}\n'
        b'{"text": "good two"}\n'
    )
    got = items(path)
    docs = [d.text for d in got if isinstance(d, Document)]
    rejects = {r.where.rsplit(":", 1)[1]: r.reason for r in got if isinstance(r, Reject)}
    assert docs == ["good one", "good two"]
    assert rejects == {
        "2": "bad_json",
        "3": "missing_field",
        "4": "undecodable",
        "5": "empty",
        "6": "not_object",
        "7": "bad_field",
    }


def test_huge_single_line_is_one_reject_and_reading_continues(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as fh:
        fh.write(b'{"text": "before"}\n{"text": "')
        chunk = b"x" * (1 << 20)
        for _ in range(50):  # a 50 MB single line
            fh.write(chunk)
        fh.write(b'"}\n{"text": "after"}\n')
    got = list(iter_source(SourceSpec(path=str(path)), max_bytes=1 << 20))
    assert [type(x).__name__ for x in got] == ["Document", "Reject", "Document"]
    assert got[1].reason == "too_large" and got[1].where.endswith(":2")
    assert got[2].text == "after"


def test_empty_files_and_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.jsonl").write_text("\n\n")
    (tmp_path / "d.txt").write_bytes(b"caf\xe9 latin-1")
    got = items(tmp_path)
    assert [(type(x).__name__, getattr(x, "reason", None)) for x in got] == [
        ("Document", None),
        ("Reject", "empty"),
        ("Reject", "empty"),
        ("Reject", "undecodable"),
    ]


def test_glob_is_sorted_and_unknown_extension_is_a_reject(tmp_path):
    for name in ("b.txt", "a.txt", "c.bin"):
        (tmp_path / name).write_text(name)
    got = items(tmp_path / "*")
    assert [x.text for x in got if isinstance(x, Document)] == ["a.txt", "b.txt"]
    assert [x.reason for x in got if isinstance(x, Reject)] == ["unknown_format"]


def test_missing_path_and_empty_glob_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        items(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="matches no files"):
        items(tmp_path / "*.parquet")


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"content": ["one", "two", None], "n": [1, 2, 3]}), tmp_path / "x.parquet"
    )
    got = items(tmp_path / "x.parquet", text_field="content")
    assert [x.text for x in got if isinstance(x, Document)] == ["one", "two"]
    assert got[0].meta["n"] == 1
    assert got[2].reason == "missing_field" and got[2].where.endswith("#2")


def test_html_extraction_keeps_article_drops_boilerplate(tmp_path):
    body = prose(1)
    (tmp_path / "page.html").write_text(PAGE.format(body=body))
    (tmp_path / "empty.html").write_text(
        "<html><body><nav><a href='/'>Home</a></nav></body></html>"
    )
    empty, page = items(tmp_path)  # sorted: empty.html, page.html
    step = ExtractStep()
    assert step(page) is None
    assert body[:200] in page.text
    assert "cheap watches" not in page.text and "About us" not in page.text
    assert "content_type" not in page.meta
    assert step(empty) == "html_no_content"


def test_warc_html_records(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = tmp_path / "crawl.warc.gz"
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for url, ctype, payload in [
            ("http://a.example/", "text/html", PAGE.format(body=prose(2)).encode()),
            ("http://b.example/x.png", "image/png", b"\x89PNG...."),
        ]:
            headers = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.0")
            writer.write_record(
                writer.create_warc_record(
                    url, "response", payload=io.BytesIO(payload), http_headers=headers
                )
            )
    got = items(path)
    assert isinstance(got[0], Document) and got[0].meta["url"] == "http://a.example/"
    assert ExtractStep()(got[0]) is None and prose(2)[:100] in got[0].text
    assert isinstance(got[1], Reject) and got[1].reason == "not_html"


def test_hf_dataset_saved_to_disk_and_local_json_dir(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["alpha", "beta", ""], "label": [0, 1, 0]}).save_to_disk(
        str(tmp_path / "ds")
    )
    got = items(tmp_path / "ds")
    assert [x.text for x in got if isinstance(x, Document)] == ["alpha", "beta"]
    assert got[1].meta["label"] == 1 and got[2].reason == "empty"
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "train.jsonl").write_text('{"text": "gamma"}\n')
    got = items(tmp_path / "raw", kind="hf")
    assert [x.text for x in got] == ["gamma"]
    with pytest.raises(InputError, match="cannot open as a Hugging Face dataset"):
        items(tmp_path / "missing_ds", kind="hf")


def test_truncated_archives_keep_what_was_read_and_reject_the_rest(tmp_path):
    rng = random.Random(0)
    lines = (json.dumps({"text": f"doc {i} {rng.random()} {rng.random()}"}) for i in range(2000))
    data = "".join(line + "\n" for line in lines).encode()
    cctx = zstandard.ZstdCompressor()
    two_frames = cctx.compress(data[:1000]) + cctx.compress(data[1000:])
    (tmp_path / "ok.jsonl.zst").write_bytes(two_frames)
    assert len(items(tmp_path / "ok.jsonl.zst")) == 2000  # multi-frame files read whole
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data)[:-400])
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data)[:-400])
    got = items(tmp_path)
    rejects = [x for x in got if isinstance(x, Reject)]
    assert [r.reason for r in rejects] == ["unreadable", "unreadable"]
    assert rejects[0].where == str(tmp_path / "a.jsonl.gz")
    assert rejects[1].where == str(tmp_path / "b.jsonl.zst") and "truncated" in rejects[1].detail
    assert sum(isinstance(x, Document) for x in got) > 1500  # gzip yields what precedes the cut
