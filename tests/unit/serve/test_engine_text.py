"""Streamed text: whole characters only, stop strings never sent, pieces add up to the decode,
special tokens dropped but for the ones a request keeps."""

from __future__ import annotations

import torch

from lmforge.serve.detok import REPLACEMENT, TextStream
from lmforge.serve.engine import Engine, SamplingParams, collect
from lmforge.tokenizer.files import TokenizerFiles

from .conftest import micro_model

UNICODE = "héllo wörld — 世界 🙂 ok"


def stream(
    tokenizer, ids: list[int], stop: tuple[str, ...] = (), keep: tuple[str, ...] = ()
) -> tuple[list[str], bool]:
    s = TextStream(tokenizer, stop, keep)
    pieces = []
    for t in ids:
        text, stopped = s.push(t)
        pieces.append(text)
        if stopped:
            return pieces, True
    return [*pieces, s.flush()], False


def test_multibyte_characters_stream_whole(engine):
    tok = engine.files.tokenizer
    ids = engine.files.encode(UNICODE)
    assert any(REPLACEMENT in tok.decode([t]) for t in ids)  # characters do span tokens here
    pieces, stopped = stream(tok, ids)
    assert not stopped
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == UNICODE
    assert "" in pieces  # some tokens had to wait for the rest of their character


def test_stop_strings_cut_the_text_and_no_part_of_them_is_sent(engine):
    tok = engine.files.tokenizer
    text = "What is the capital of France? The capital is Paris."
    ids = engine.files.encode(text)
    pieces, stopped = stream(tok, ids, stop=("Paris", "zzz"))
    assert stopped
    assert "".join(pieces) == "What is the capital of France? The capital is "
    sent = ""
    for p in pieces:  # at no point did the stream end in a prefix of "Paris"
        sent += p
        assert not any(sent.endswith("Paris"[:n]) for n in range(1, 6))
    pieces, stopped = stream(tok, ids, stop=("is P",))  # a stop string across tokens
    assert stopped and "".join(pieces) == "What is the capital of France? The capital "


def streamed(tok, ids: list[int], stops: tuple[str, ...], active_from: int) -> tuple[str, bool]:
    """The pieces a TextStream sends for ids, joined, with stop strings active from the
    active_from-th token on (min_tokens), and whether a stop string ended it."""
    s = TextStream(tok, stops)
    pieces, stopped = [], False
    for n, t in enumerate(ids, start=1):
        text, stopped = s.push(t, stops_active=n >= active_from)
        pieces.append(text)
        if stopped:
            return "".join(pieces), True
    return "".join(pieces) + s.flush(), False


def test_stop_strings_before_min_tokens_never_end_the_text(engine):
    tok = engine.files.tokenizer
    ids = engine.files.encode("The capital is Paris. The capital is Rome. The end.")
    for active_from, expected in [
        (0, "The "),  # "capital" from the first token on
        (4, "The capital is Paris. The "),  # the first "capital" was written before min_tokens
        (len(ids), "The capital is Paris. The capital is Rome. The end."),
    ]:
        assert streamed(tok, ids, ("capital",), active_from)[0] == expected, active_from


def test_a_stop_string_held_back_before_min_tokens_ends_the_text_if_it_ends_after(engine):
    tok = engine.files.tokenizer
    ids = engine.files.encode("The capital is Paris. The capital is Rome.")
    pa = next(n for n in range(len(ids)) if tok.decode(ids[: n + 1]).endswith("is Pa")) + 1
    for active_from, expected in [
        (pa, "The capital "),  # "is " written (held back) before min_tokens, "Pa" after: a stop
        (pa + 1, "The capital is Paris. The capital is Rome."),  # wholly before: sent after all
    ]:
        text, stopped = streamed(tok, ids, ("is Pa",), active_from)
        assert text == expected and stopped == (active_from == pa), active_from


def test_a_held_back_stop_prefix_is_sent_when_it_does_not_complete(engine):
    tok = engine.files.tokenizer
    ids = engine.files.encode("The capital is Pa")
    pieces, stopped = stream(tok, ids, stop=("Paris",))
    assert not stopped and "".join(pieces) == "The capital is Pa"
    assert pieces[-1].endswith("Pa")  # held until the end, then flushed


def test_engine_stop_strings_cut_generated_text(engine):
    ids = engine.files.encode("What is the capital of France?")
    ref = collect(
        engine.submit(ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), "ref")
    )
    stop = next(
        ref.text[i : i + 3] for i in range(6, len(ref.text) - 3) if ref.text[i : i + 3].strip()
    )
    cut = ref.text[: ref.text.index(stop)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,))
    events = list(engine.submit(ids, params, "stop-str"))
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == cut
    assert all(stop not in e.text for e in events)
    assert [e.token_id for e in events] == ref.token_ids[: len(events)]


def test_streamed_pieces_add_up_to_the_decode_of_sampled_tokens(engine):
    ids = engine.files.encode("héllo 世界")
    for seed in range(3):
        params = SamplingParams(max_tokens=30, temperature=1.5, seed=seed, ignore_eos=True)
        events = list(engine.submit(ids, params, f"sampled-{seed}"))
        tokens = [e.token_id for e in events]
        assert "".join(e.text for e in events) == engine.files.decode(tokens)


def test_engine_streams_forced_multibyte_output_intact(serve_model_dir, monkeypatch):
    files = TokenizerFiles.load(serve_model_dir)
    model = micro_model(files.vocab_size)
    target = files.encode(UNICODE)
    head = model.lm_head.forward
    step = {"n": 0}

    def forced(h):  # the model "wants" to write UNICODE, one token per call
        logits = head(h)
        forced_logits = torch.full_like(logits, -1e4)
        forced_logits[..., target[min(step["n"], len(target) - 1)]] = 0
        step["n"] += 1
        return forced_logits

    monkeypatch.setattr(model.lm_head, "forward", forced)
    eng = Engine(model, files, name="unicode")
    eng.start()
    try:
        params = SamplingParams(max_tokens=len(target), temperature=0, ignore_eos=True)
        events = list(eng.submit(files.encode("Say it:"), params, "uni"))
    finally:
        eng.shutdown()
    assert [e.token_id for e in events] == target
    assert all(REPLACEMENT not in e.text for e in events)
    assert "".join(e.text for e in events) == UNICODE


def test_only_the_kept_special_tokens_stay_in_the_text():
    from tiny_tokenizers import train_byte_bpe

    from lmforge.tokenizer.hermes_tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
    from unit.finetune.helpers import CORPUS, SPECIALS

    tok = train_byte_bpe(CORPUS, 300, [*SPECIALS, TOOL_CALL_OPEN, TOOL_CALL_CLOSE])
    call = f'{TOOL_CALL_OPEN}\n{{"city": "{UNICODE}"}}\n{TOOL_CALL_CLOSE}'
    ids = tok.encode(f"Let me check.<|im_start|>{call}<|pad|>").ids
    assert len(tok.encode(TOOL_CALL_OPEN).ids) == 1  # one special id each
    kept, stopped = stream(tok, ids, keep=(TOOL_CALL_OPEN, TOOL_CALL_CLOSE))
    assert not stopped and "".join(kept) == f"Let me check.{call}"
    dropped, _ = stream(tok, ids)  # the default: every special token dropped, as before
    plain = call.replace(TOOL_CALL_OPEN, "").replace(TOOL_CALL_CLOSE, "")
    assert "".join(dropped) == f"Let me check.{plain}" == tok.decode(ids)
    cut, stopped = stream(tok, ids, stop=(TOOL_CALL_CLOSE,), keep=(TOOL_CALL_OPEN, TOOL_CALL_CLOSE))
    assert stopped and "".join(cut) == f"Let me check.{call[: -len(TOOL_CALL_CLOSE)]}"


def test_kept_tags_next_to_split_characters_stream_as_the_whole_decode():
    # random mixes of multi-byte text, lone pieces of characters, kept tags and dropped special
    # tokens, both byte-level layouts: the pieces add up to the whole decode (a tag that cuts a
    # character leaves U+FFFD, as decoding it all does), and without a kept tag in the ids the
    # text is the one a request that keeps nothing gets
    import random

    from tiny_tokenizers import train_byte_bpe

    from lmforge.tokenizer.hermes_tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
    from unit.finetune.helpers import CORPUS, SPECIALS

    keep, texts = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE), ["é", "日本", "🙂", " a", '{"x": 1}', "\n"]
    rnd = random.Random(0)
    for prefix_space in (False, True):
        tok = train_byte_bpe(CORPUS, 300, [*SPECIALS, *keep], add_prefix_space=prefix_space)
        specials = [tok.token_to_id(s) for s in [*SPECIALS, *keep]]
        pieces = [i for i in range(tok.get_vocab_size()) if REPLACEMENT in tok.decode([i])]
        assert pieces  # byte tokens that are part of a character
        for _ in range(1500):
            ids = []
            for _ in range(rnd.randint(1, 10)):
                r = rnd.random()
                ids += (
                    [rnd.choice(specials)] if r < 0.3
                    else [rnd.choice(pieces)] if r < 0.4
                    else tok.encode(rnd.choice(texts)).ids
                )  # fmt: skip
            kept, _ = stream(tok, ids, keep=keep)
            kept_ids = [i for i in ids if tok.id_to_token(i) not in SPECIALS]
            assert "".join(kept) == tok.decode(kept_ids, skip_special_tokens=False), ids
            if not set(ids) & {tok.token_to_id(t) for t in keep}:
                assert kept == stream(tok, ids)[0], ids


def test_the_dropped_ids_are_read_once_per_tokenizer_and_kept_set():
    from tiny_tokenizers import train_byte_bpe

    from lmforge.tokenizer.hermes_tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
    from unit.finetune.helpers import CORPUS, SPECIALS

    class Counting:  # the tokenizer, counting how often its added tokens are read
        def __init__(self, tok):
            self.tok, self.reads = tok, 0

        def get_added_tokens_decoder(self):
            self.reads += 1
            return self.tok.get_added_tokens_decoder()

        def decode(self, ids, skip_special_tokens):
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    tok = Counting(train_byte_bpe(CORPUS, 300, [*SPECIALS, TOOL_CALL_OPEN, TOOL_CALL_CLOSE]))
    ids = tok.tok.encode(f"<|im_start|>{TOOL_CALL_OPEN}ok{TOOL_CALL_CLOSE}").ids
    tags = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
    for _ in range(3):
        assert "".join(stream(tok, ids, keep=tags)[0]) == f"{TOOL_CALL_OPEN}ok{TOOL_CALL_CLOSE}"
    assert "".join(stream(tok, ids, keep=tags[:1])[0]) == f"{TOOL_CALL_OPEN}ok"
    assert tok.reads == 2  # once per kept set
