"""HTML and WARC: main-content extraction with trafilatura (navigation, ads, boilerplate out).

Readers here only find pages and hand the raw HTML on, marked with meta["content_type"] =
"text/html"; the extraction itself is the pipeline's first step (`extract_step`), so it runs in
the worker processes instead of serializing every page through the reader.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lmforge.data.document import Document, Reject
from lmforge.data.readers import DEFAULT_MAX_RECORD_BYTES, Item, open_binary
from lmforge.errors import InputError

HTML = "text/html"
# trafilatura falls back to any text it finds (a lone "Home" link); fewer words is not content.
MIN_CONTENT_WORDS = 5


def extract_html(html: str) -> str | None:
    """Main text of a page (trafilatura), or None when the page has no real content."""
    import trafilatura

    text = trafilatura.extract(
        html,
        include_comments=False,
        include_tables=True,
        deduplicate=False,
        favor_recall=True,
        fast=True,
    )
    return text if text and len(text.split()) >= MIN_CONTENT_WORDS else None


def read_html_file(
    path: Path, source: str, max_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[Item]:
    """One HTML file = one document (extracted later, in the workers)."""
    with open_binary(path) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        yield Reject(str(path), "too_large", f"file larger than {max_bytes} bytes")
        return
    if not data.strip():
        yield Reject(str(path), "empty", "file has no HTML")
        return
    html = data.decode("utf-8", errors="replace")  # pages declare odd charsets; keep what we can
    yield Document(str(path), html, source, {"path": str(path), "content_type": HTML})


def read_warc(path: Path, source: str, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Item]:
    """HTML responses of a WARC file; other response types are rejects, not silent drops."""
    try:
        from warcio.archiveiterator import ArchiveIterator
        from warcio.exceptions import ArchiveLoadFailed
    except ImportError as exc:  # pragma: no cover - warcio is in the data extra
        raise InputError("reading WARC needs warcio: pip install 'lmforge[data]'") from exc
    n = 0
    with open(path, "rb") as fh:
        try:
            for i, record in enumerate(ArchiveIterator(fh)):
                if record.rec_type != "response":
                    continue  # request/warcinfo/metadata records describe, they hold no page
                n += 1
                where = f"{path}#{i}"
                url = record.rec_headers.get_header("WARC-Target-URI") or ""
                ctype = (
                    (record.http_headers.get_header("Content-Type") or "")
                    if record.http_headers
                    else ""
                )
                if "html" not in ctype.lower():
                    yield Reject(where, "not_html", f"{url} is {ctype or 'untyped'}")
                    continue
                data = record.content_stream().read(max_bytes + 1)
                if len(data) > max_bytes:
                    yield Reject(where, "too_large", f"{url} larger than {max_bytes} bytes")
                    continue
                rid = record.rec_headers.get_header("WARC-Record-ID") or where
                html = data.decode("utf-8", errors="replace")
                yield Document(rid, html, source, {"url": url, "content_type": HTML})
        except ArchiveLoadFailed as exc:
            yield Reject(str(path), "bad_warc", str(exc).splitlines()[0][:200])
            return
    if n == 0:
        yield Reject(str(path), "empty", "WARC file has no response records")
