import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lmforge.errors import InputError
from lmforge.serve.feedback import SCHEMA_VERSION, FeedbackStore

SRC = str(Path(__file__).resolve().parents[3] / "src")
MESSAGES = [{"role": "user", "content": "hi"}]


def test_records_ratings_choices_and_reads_them_back(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as store:
        store.record_response("chatcmpl-a", "sft", "<p>hi", MESSAGES, "hello!", {"temperature": 0})
        store.record_response("chatcmpl-b", "sft", "<p>hi", MESSAGES, "go away", {"seed": 1})
        store.record_response("cmpl-c", "base", "def f(", None, "x): pass")
        assert store.add_rating("chatcmpl-a", 1) == 1
        store.add_rating("chatcmpl-a", 4, comment="fine")
        store.add_rating("chatcmpl-b", -1)
        store.add_rating("cmpl-c", 1, scale="stars")
        assert store.add_choice("chatcmpl-a", "chatcmpl-b") == 1
        assert store.counts() == {"responses": 3, "ratings": 4, "choices": 1}

        rated = {r["id"]: r for r in store.iter_rated()}
        assert rated["chatcmpl-a"]["stars"] == pytest.approx(4.5)  # thumbs up = 5, and a 4
        assert rated["chatcmpl-a"]["n_ratings"] == 2
        assert rated["chatcmpl-a"]["messages"] == MESSAGES
        assert rated["chatcmpl-a"]["params"] == {"temperature": 0}
        assert rated["chatcmpl-b"]["stars"] == 1.0 and rated["cmpl-c"]["stars"] == 1.0
        assert [r["id"] for r in store.iter_rated(min_stars=4)] == ["chatcmpl-a"]
        (choice,) = store.iter_choices()
        assert (choice["chosen"]["text"], choice["rejected"]["text"]) == ("hello!", "go away")
        assert choice["created_at"].endswith("Z")


def test_unknown_ids_bad_ratings_and_duplicates_are_input_errors(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    store.record_response("r1", "m", "p", None, "t")
    with pytest.raises(InputError, match="unknown response id 'nope'"):
        store.add_rating("nope", 1)
    with pytest.raises(InputError, match="unknown response id 'nope'"):
        store.add_choice("r1", "nope")
    with pytest.raises(InputError, match="same response"):
        store.add_choice("r1", "r1")
    for bad in (0, 6, -2, 2.5, True):
        with pytest.raises(InputError, match="rating"):
            store.add_rating("r1", bad)
    with pytest.raises(InputError, match="not valid on the thumbs scale"):
        store.add_rating("r1", 3, scale="thumbs")
    with pytest.raises(InputError, match="UNIQUE"):
        store.record_response("r1", "m", "p", None, "t")
    assert store.counts() == {"responses": 1, "ratings": 0, "choices": 0}
    store.close()


def test_schema_is_versioned_and_wal_is_on(tmp_path):
    path = tmp_path / "fb.db"
    FeedbackStore(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert int(version) == SCHEMA_VERSION
    conn.execute("UPDATE meta SET value = ? WHERE key='schema_version'", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(InputError, match="newer than this lmforge"):
        FeedbackStore(path)
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(InputError, match="is not a feedback store"):
        FeedbackStore(tmp_path / "junk.db")


def test_threads_write_concurrently_through_their_own_connections(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    errors = []

    def worker(t):
        try:
            for i in range(40):
                store.record_response(f"t{t}-{i}", "m", "p", None, "x")
                store.add_rating(f"t{t}-{i}", 1)
        except Exception as err:  # pragma: no cover - reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert store.counts() == {"responses": 160, "ratings": 160, "choices": 0}
    assert len(store._connections) == 5  # the main thread's plus one per worker
    store.close()


WRITER = """
import sys
from lmforge.serve.feedback import FeedbackStore
store = FeedbackStore(sys.argv[1])
i = 0
while True:
    store.record_response(f"r{i}", "m", "prompt %d" % i, None, "text " * 50)
    store.add_rating(f"r{i}", 1)
    print(i, flush=True)  # acknowledged only after both commits returned
    i += 1
"""


def test_sigkill_mid_stream_keeps_every_committed_row_and_a_sound_db(tmp_path):
    path = tmp_path / "fb.db"
    FeedbackStore(path).close()
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    acked = -1
    try:
        while acked < 150:
            line = proc.stdout.readline()
            assert line, "writer died early"
            acked = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = {r[0] for r in conn.execute("SELECT id FROM responses")}
    assert {f"r{i}" for i in range(acked + 1)} <= ids
    n = len(ids)
    assert ids == {f"r{i}" for i in range(n)}  # no holes: rows land whole, in order
    rated = conn.execute("SELECT COUNT(DISTINCT response_id) FROM ratings").fetchone()[0]
    assert rated in (n - 1, n)  # at most the last response's rating was cut off
    conn.close()
    # and the store opens and takes writes again
    with FeedbackStore(path) as store:
        store.add_rating(f"r{acked}", -1)
        assert store.counts()["responses"] == n


CONCURRENT = """
import sys
from lmforge.serve.feedback import FeedbackStore
store = FeedbackStore(sys.argv[1], busy_timeout_ms=30_000)
for i in range(1000):
    store.record_response(f"{sys.argv[2]}-{i}", "m", "p", None, "t")
    store.add_rating(f"{sys.argv[2]}-{i}", 1)
"""


def test_worker_processes_write_one_store_without_lock_errors(tmp_path):
    """Several server workers behind one port share the store: the busy timeout serializes
    their writes instead of failing with 'database is locked'."""
    path = tmp_path / "fb.db"
    FeedbackStore(path).close()
    env = dict(os.environ, PYTHONPATH=SRC)
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, str(path), f"w{w}"], env=env,
                         stderr=subprocess.PIPE, text=True)
        for w in range(3)
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    with FeedbackStore(path) as store:
        assert store.counts() == {"responses": 3000, "ratings": 3000, "choices": 0}


def _store_with_choices(path, n):
    with FeedbackStore(path) as store:
        for i in range(n):
            store.record_response(f"a{i}", "sft", f"p{i}", MESSAGES, f"good {i}", {"seed": i})
            store.record_response(f"b{i}", "sft", f"p{i}", None, f"bad {i}")
            store.add_choice(f"a{i}", f"b{i}", prompt=f"note {i}")


def test_iter_choices_reads_every_choice_in_one_query(tmp_path):
    _store_with_choices(tmp_path / "fb.db", 5)
    with FeedbackStore(tmp_path / "fb.db") as store:
        statements = []
        store._conn().set_trace_callback(statements.append)
        choices = list(store.iter_choices())
    assert len(statements) == 1 and statements[0].startswith("SELECT")
    assert [c["prompt"] for c in choices] == [f"note {i}" for i in range(5)]
    assert choices[3]["chosen"] | {"created_at": None} == {
        "id": "a3", "model": "sft", "prompt": "p3", "messages": MESSAGES, "text": "good 3",
        "params": {"seed": 3}, "created_at": None,
    }  # fmt: skip
    assert choices[3]["rejected"]["messages"] is None and choices[3]["rejected"]["text"] == "bad 3"


def test_read_only_store_reads_while_a_writer_holds_the_lock(tmp_path):
    path = tmp_path / "fb.db"
    _store_with_choices(path, 2)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a server mid-write: the write lock is taken
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            FeedbackStore(path, busy_timeout_ms=50)  # a writer's open waits, then gives up
        with FeedbackStore(path, read_only=True, busy_timeout_ms=50) as store:
            assert store.counts() == {"responses": 4, "ratings": 0, "choices": 2}
            assert len(list(store.iter_choices())) == 2
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                store.record_response("c", "m", "p", None, "t")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    with pytest.raises(InputError, match="cannot open a feedback store"):
        FeedbackStore(tmp_path / "missing.db", read_only=True)
    assert not (tmp_path / "missing.db").exists()


def test_old_hermes_rows_and_openai_rows_of_one_conversation_export_alike(tmp_path):
    import json

    from lmforge.finetune.formats import read_file
    from lmforge.serve.feedback_export import FeedbackExportConfig, collect
    from lmforge.tokenizer.hermes_tools import hermes_messages

    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
    conversation = [
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    answer = '<tool_call>\n{"name": "add", "arguments": {"a": 3}}\n</tool_call>'
    params = {"tools": tools, "tool_choice": "auto", "finish_reason": "stop"}
    with FeedbackStore(tmp_path / "f.db") as store:  # the old server kept Hermes turns
        store.record_response("old", "m", "p", hermes_messages(conversation, tools), answer, params)
        store.record_response("new", "m", "p", conversation, answer + "\nmore", {
            **params, "messages_form": "openai"})  # fmt: skip
        store.add_rating("old", 5)
        store.add_rating("new", 2)
    sft, pairs, _, _ = collect(FeedbackExportConfig(db=tmp_path / "f.db", out=tmp_path / "x"))
    (old,) = sft
    assert old["messages"] == [
        *hermes_messages(conversation, tools), {"role": "assistant", "content": answer}
    ] and "tools" not in old  # fmt: skip
    # the two forms are one prompt: a rating pair, its prompt the Hermes turns align reads
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [("old", "new")]
    assert pairs[0]["prompt"] == hermes_messages(conversation, tools)
    with FeedbackStore(tmp_path / "f.db") as store:
        store.add_rating("new", 5)
        store.add_rating("new", 5)  # a mean of 4
    sft, _, _, _ = collect(FeedbackExportConfig(db=tmp_path / "f.db", out=tmp_path / "x"))
    new = next(r for r in sft if r["response_id"] == "new")
    assert new["tools"] == tools and new["messages"][-1] == {
        "role": "assistant", "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 3}}}],
    }  # fmt: skip
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in sft))
    (a, b) = read_file(rows)[1]  # finetune makes the same Hermes turns of both
    assert a["messages"][:-1] == b["messages"][:-1] and a["messages"][-1] == old["messages"][-1]


def test_a_served_tool_conversation_reaches_finetune_and_align_through_every_export(tmp_path):
    """A tool request as the server stores it (plain_messages, ToolPlan.record: parallel calls
    of one function, results sent out of order, a user turn after them) read by every consumer:
    sft.jsonl by finetune, preferences.jsonl and kto.jsonl by align, and the store by align."""
    from lmforge.align.prefs import load_pairs
    from lmforge.align.unpaired import load_unpaired_groups
    from lmforge.finetune.formats import load_examples
    from lmforge.serve.chat_request import ChatRequest
    from lmforge.serve.feedback_export import FeedbackExportConfig, export_feedback
    from lmforge.tokenizer.hermes_tools import hermes_messages

    def call(cid, city):
        args = f'{{"city": "{city}"}}'
        return {"id": cid, "type": "function", "function": {"name": "weather", "arguments": args}}

    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    req = ChatRequest(model="m", tools=[tool], messages=[
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call("b", "Oslo"), call("a", "Rome")]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "snow"},
        {"role": "user", "content": "And in Bergen?"},
    ])  # fmt: skip
    messages, params = req.plain_messages(), {"finish_reason": "stop", **req.tool_plan().record()}
    good = '<tool_call>\n{"name": "weather", "arguments": {"city": "Bergen"}}\n</tool_call>'
    db = tmp_path / "f.db"
    with FeedbackStore(db) as store:
        store.record_response("good", "m", "p", messages, good, params)
        store.record_response("bad", "m", "p", messages, "I cannot tell.", params)
        store.add_rating("good", 5)
        store.add_rating("bad", -1)  # thumbs down
        store.add_choice("good", "bad")
    out = export_feedback(FeedbackExportConfig(db=db, out=tmp_path / "export"))

    fmt, examples = load_examples(out / "sft.jsonl")  # finetune: the Hermes turns serve renders
    (example,) = examples
    prompt = hermes_messages(messages, [tool])
    assert fmt == "openai" and example["messages"] == [
        *prompt,
        {"role": "assistant", "content": good},
    ]
    assert "snow\n</tool_response>\n<tool_response>\nsunny" in prompt[3]["content"]  # call order
    assert prompt[-1] == {"role": "user", "content": "And in Bergen?"}

    for source in (out / "preferences.jsonl", db):  # align dpo: the export, or the store itself
        pairs = load_pairs(source)
        assert pairs and all(p["prompt"] == prompt for p in pairs)
        assert {(p["chosen"], p["rejected"]) for p in pairs} == {(good, "I cannot tell.")}
    for source in (out / "kto.jsonl", db):  # align kto
        examples = [e for group in load_unpaired_groups(source) for e in group]
        assert {(e["completion"], e["desirable"]) for e in examples} == {
            (good, True),
            ("I cannot tell.", False),
        } and all(e["prompt"] == prompt for e in examples)


def test_a_stored_tool_conversation_the_server_would_refuse_names_its_row(tmp_path):
    from lmforge.serve.feedback_export import FeedbackExportConfig, collect

    call = {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    stray = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "zz", "content": "1"}]  # fmt: skip
    with FeedbackStore(tmp_path / "f.db") as store:
        store.record_response("r1", "m", "p", stray, "ok", {"messages_form": "openai"})
        store.add_rating("r1", 5)
    with pytest.raises(
        InputError, match=r"feedback store row 'r1': messages\[2\]: tool_call_id 'zz'"
    ):
        collect(FeedbackExportConfig(db=tmp_path / "f.db", out=tmp_path / "x"))
