"""A model directory's small JSON files (config.json, generation_config.json), parsed once per
version of the file.

Loading a model consults config.json from several places that each take only the directory
(the family, the loader, special ids, the checkpoint's decoding defaults, the embedder's
settings), so `lmforge serve` and `lmforge generate` read it several times a load. read_json
keeps each file's parsed value under its path, device, inode, size, modification and status
change times (stat data as git's index compares it), and hands out a copy (callers may change
what they get). The change time catches what the modification time alone misses: a copy that
puts back the old one (cp -p, rsync -t, shutil.copy2), into the same or a reused inode. A file
changed (either time) less than SETTLE_S ago is read afresh each time: a rewrite in place within
the file system's timestamp granularity (FAT's is 2 s) could leave all of them the same.

read_json_object (and read_json_value, for a file holding a list) is the reader for such a file a
person supplies (a model or tokenizer directory from anywhere): malformed JSON is an InputError
naming the file, line and column and what to do.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lmforge.errors import InputError

SETTLE_S = 2.0  # seconds since its last change after which a file's parse is kept
MAX_FILES = 64  # parsed files kept, least recently read dropped first

_parsed: OrderedDict[tuple[str, int, int, int, int, int], Any] = OrderedDict()
_lock = threading.Lock()  # serve starts engines and embedders from worker threads too


def read_json(path: Path | str) -> Any:
    """path's JSON value (json.JSONDecodeError as json.loads raises it), parsed once while the
    file stays as it is; a copy each call."""
    path = Path(path)
    st = path.stat()
    key = (str(path.absolute()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _lock:
        if key in _parsed:
            _parsed.move_to_end(key)
            return copy.deepcopy(_parsed[key])
    value = json.loads(path.read_text(encoding="utf-8"))
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLE_S * 1e9:
        with _lock:
            _parsed[key] = value
            while len(_parsed) > MAX_FILES:
                _parsed.popitem(last=False)
        return copy.deepcopy(value)
    return value


REWRITE_HINT = "mend it, or write the directory again with the tool that made it"


def read_json_value(path: Path | str, fix: str = REWRITE_HINT) -> Any:
    """path's JSON value (read_json: parsed once while the file is unchanged); an InputError
    naming the file, where it breaks and `fix` (what to do) when it is not JSON in UTF-8."""
    try:
        return read_json(path)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno} column {err.colno}"
        raise InputError(f"{path} is not valid JSON ({where}: {err.msg}); {fix}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text (byte {err.start}); {fix}") from None


def read_json_object(path: Path | str, fix: str = REWRITE_HINT) -> dict[str, Any]:
    """The JSON object in path (read_json_value), an InputError naming the file and `fix` when
    it holds another value (a list, a string)."""
    data = read_json_value(path, fix)
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object, not a {type(data).__name__}; {fix}")
    return data
