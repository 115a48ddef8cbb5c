"""The token masker: its trie walk equals a brute-force check of every token, tokens holding part
of a UTF-8 character are allowed exactly when the character can still complete, and the byte
view of a trained byte-level BPE round-trips every token."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmforge.constrain import Automaton, GuideCompiler, TokenGuide, Vocabulary
from lmforge.constrain.automaton import DEAD
from lmforge.constrain.json_grammar import json_object_grammar
from lmforge.constrain.json_schema import schema_grammar
from lmforge.constrain.regex import choice_grammar, regex_grammar

# a small vocabulary: single characters, words, JSON pieces, and the two halves of é (C3 A9), ü
# (C3 BC) and 日 (E6 97 A5), alone and glued to ASCII; surrogate (ED A0) and overlong (E0 80)
# starts that no character completes
VOCAB = [
    b"", b"{", b"}", b'"', b":", b",", b" ", b"\n", b"[", b"]", b"a", b"b", b"ab", b'{"', b'":',
    b'",', b'"}', b"1", b"0", b"-", b".", b"5", b"e", b"12", b"true", b"null", b"\\", b"\\n",
    b"\xc3", b"\xa9", b"\xbc", b"\xc3\xa9", b"a\xc3", b"\xa9b", b"\xe6", b"\xe6\x97", b"\xa5",
    b"\x97\xa5", b"\xff", b"\x80", b"\xed", b"\xed\xa0", b"\xed\x9f", b"\xbf", b"\xe0\x80", b"  ", b"yes", b"no", b"y", b"es", b"\t", b"x", b"{}",
]  # fmt: skip


def viable(auto: Automaton, data: bytes, state: int | None = None, by_range=False) -> bool:
    """Brute force: `data` (a whole answer so far, or what follows automaton `state`) can still
    be extended to a match: its complete characters step the automaton, and an unfinished last
    character has at least one completion (every continuation byte tried; `by_range`: every
    next byte tried, the bytes after it as a range) it can read."""
    split = complete_part(auto, data, auto.start if state is None else state)
    if split is None:
        return False
    state, tail = split
    if not tail:
        return True
    if by_range:
        return completes_in_range(auto, state, tail)
    return any(completes(auto, state, tail + bytes([b])) for b in range(0x80, 0xC0))


def completes_in_range(auto: Automaton, state: int, tail: bytes) -> bool:
    """Whether some character that starts with `tail` can be read: for each next byte, the
    characters it starts are one range of code points, from its completion by 0x80 bytes to its
    completion by 0xBF bytes, as Python's decoder reads them (neither decodes when the next byte
    makes an overlong, a surrogate or a code point past U+10FFFF). 64 decodes, not 64**3."""
    for rest in range(4 - len(tail)):
        for b in range(0x80, 0xC0):
            try:
                lo = (tail + bytes([b]) + b"\x80" * rest).decode("utf-8")
                hi = (tail + bytes([b]) + b"\xbf" * rest).decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(lo) == len(hi) == 1 and auto.meets(state, ord(lo), ord(hi)):
                return True
    return False


def complete_part(auto: Automaton, data: bytes, state: int) -> tuple[int, bytes] | None:
    """The automaton state after `data`'s complete characters, and the bytes of its unfinished
    last character; None when they are not UTF-8 or the automaton refuses them."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            text = data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        break
    else:
        return None
    for ch in text:
        state = auto.step(state, ch)
        if state == DEAD:
            return None
    return state, data[cut:]


def completes(auto: Automaton, state: int, data: bytes) -> bool:
    try:
        ch = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # still unfinished, or invalid
        if exc.reason == "unexpected end of data" and len(data) < 4:
            return any(completes(auto, state, data + bytes([b])) for b in range(0x80, 0xC0))
        return False
    return auto.step(state, ch) != DEAD


GRAMMARS = {
    "json_object": json_object_grammar(),
    "schema": schema_grammar({"type": "object", "properties": {"a": {"type": "string"},
                              "b": {"type": "array", "items": {"type": "integer"}}}}),
    "regex": regex_grammar(r"(ab|é|日)+\d?"),
    "choice": choice_grammar(["yes", "no", "é"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(GRAMMARS))
def test_mask_equals_brute_force_along_random_walks(name):
    auto = Automaton(GRAMMARS[name])
    guide = TokenGuide(auto, Vocabulary(VOCAB))
    rng = random.Random(0)
    checked = 0
    for _ in range(20):
        state, answer = guide.start, b""
        for _ in range(12):
            expected = sorted(i for i, t in enumerate(VOCAB) if t and viable(auto, answer + t))
            assert sorted(guide.allowed_ids(state)) == expected, answer
            mask = guide.allowed(state)
            assert mask.nonzero().flatten().tolist() == expected
            accepts = not viable_partial(answer) and auto.matches(answer.decode("utf-8"))
            assert guide.accepts(state) == accepts
            checked += 1
            if not expected:
                break
            token = rng.choice(expected)
            state, answer = guide.advance(state, token), answer + VOCAB[token]
            assert state is not None
    assert checked > 30
    assert guide.advance(guide.start, VOCAB.index(b"\xff")) is None  # never valid UTF-8


def viable_partial(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_partial_characters_need_a_completion_the_grammar_allows():
    guide = TokenGuide(Automaton(regex_grammar("é+")), Vocabulary(VOCAB))
    allowed = {VOCAB[i] for i in guide.allowed_ids(guide.start)}
    assert allowed == {b"\xc3", b"\xc3\xa9"}  # not 日's lead byte, not a continuation byte
    half = guide.advance(guide.start, VOCAB.index(b"\xc3"))
    assert not guide.accepts(half)  # the answer may not end inside a character
    assert {VOCAB[i] for i in guide.allowed_ids(half)} == {b"\xa9"}  # not "\xa9b": é then b
    whole = guide.advance(half, VOCAB.index(b"\xa9"))
    assert guide.accepts(whole)
    assert guide.advance(half, VOCAB.index(b"\xbc")) is None  # ü, not é


def test_masks_are_cached_per_state_and_reused():
    guide = TokenGuide(Automaton(json_object_grammar()), Vocabulary(VOCAB))
    state = guide.advance(guide.advance(guide.start, VOCAB.index(b'{"')), VOCAB.index(b"a"))
    again = guide.advance(state, VOCAB.index(b"a"))  # inside a string: the same state
    assert again == state
    assert guide.allowed(state) is guide.allowed(again)


def test_warm_computes_the_masks_answers_reach_first():
    guide = TokenGuide(Automaton(GRAMMARS["schema"]), Vocabulary(VOCAB))
    assert guide.warm(seconds=0.0) == 0
    assert guide.warm(seconds=30.0) == len(guide._masks) > 10
    state = guide.start
    for token in (b'{"', b"a", b'":', b'"', b"\xc3", b"\xa9", b'",'):  # each step finds its mask
        assert guide.has_mask(state), token
        state = guide.advance(state, VOCAB.index(token))
    cold = TokenGuide(guide.automaton, guide.vocab)  # the masks a walk on demand computes
    assert not cold.has_mask(guide.start)
    for state, mask in list(guide._masks.items()):
        assert torch.equal(mask, cold.allowed(state))


def test_warm_follows_tokens_taken_by_the_whole_subtree_shortcut():
    """ "xa" and "xaa" are taken whole below "x" (every byte after it keeps the a* state), and no
    token ends at "x": warm still reaches the state they lead to, and the one after its "b"."""
    guide = TokenGuide(Automaton(regex_grammar("xa*b")), Vocabulary([b"", b"xa", b"xaa", b"b"]))
    assert guide.warm(seconds=30.0) == 3
    looping = guide.advance(guide.start, 1)
    assert all(map(guide.has_mask, (guide.start, looping, guide.advance(looping, 3))))


def test_trained_byte_level_vocabulary_round_trips(tmp_path):
    from lmforge.tokenizer.files import TokenizerFiles
    from unit.finetune.helpers import make_tokenizer_dir

    files = TokenizerFiles.load(make_tokenizer_dir(tmp_path))
    compiler = GuideCompiler(files.tokenizer)
    tokens = compiler.vocab.tokens
    assert all(tokens[i] == b"" for i in files.special_ids())
    assert sum(bool(t) for t in tokens) == files.vocab_size - len(files.special_ids())
    for text in ['{"naïve": "日本語", "n": -0.5e3}', "Hello there, wörld 🙂", "a\n\tb"]:
        ids = files.encode(text)
        assert b"".join(tokens[i] for i in ids).decode("utf-8") == files.decode(ids) == text
    # one compiled guide per (kind, spec), shared by the requests that ask for it
    g1 = compiler.compile("choice", json.dumps(["yes", "no"]))
    g2 = compiler.compile("choice", json.dumps(["yes", "no"]))
    assert g1 == g2 and g1.tokens is g2.tokens


def test_a_cached_guide_grown_past_its_state_bound_is_compiled_afresh(tmp_path, monkeypatch):
    from lmforge.constrain import guide as guide_module
    from lmforge.tokenizer.files import TokenizerFiles
    from unit.finetune.helpers import make_tokenizer_dir

    compiler = GuideCompiler(TokenizerFiles.load(make_tokenizer_dir(tmp_path)).tokenizer)
    first = compiler.compile("json_object", "").tokens
    monkeypatch.setattr(guide_module, "MAX_GUIDE_STATES", first.automaton.size + 2)
    assert compiler.compile("json_object", "").tokens is first  # within the bound: shared
    assert first.automaton.matches('{"a":' + "[" * 5 + "]" * 5 + "}")  # each depth a new state
    assert first.automaton.size > guide_module.MAX_GUIDE_STATES
    fresh = compiler.compile("json_object", "").tokens
    assert fresh is not first and fresh.automaton.size < first.automaton.size
    assert compiler.compile("json_object", "").tokens is fresh


def test_sentencepiece_style_vocabulary_bytes_keep_word_spaces():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = ['Hello world, a test of the tokenizer: naïve café, {"a": [1, 2]}'] * 20
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=80, special_tokens=["<unk>", "<eos>"], unk_token="<unk>"
    )
    tok.train_from_iterator(corpus, trainer)
    tokens = GuideCompiler(tok).vocab.tokens
    assert tokens[tok.token_to_id("<eos>")] == b"" and tokens[tok.token_to_id("<unk>")] == b""
    for text in ["Hello world, naïve café", '{"a": [1, 2]} test']:
        ids = tok.encode(text).ids
        joined = b"".join(tokens[i] for i in ids).decode("utf-8")
        # "▁" is a space wherever the token comes; decoding drops the one a text starts with
        assert joined == " " + tok.decode(ids) == " " + text


LEVEL_WALK_SPECS = [
    ("json_object", ""),
    ("regex", r"[A-Z][a-z]{2,12}( [A-Z][a-z]{2,12})*, \d{1,3} (years|days)\."),
    ("choice", json.dumps(["positive", "negative", "neutral", "mixed feelings"])),
    ("json_schema", json.dumps({
        "type": "object",
        "properties": {"a": {"type": "string", "maxLength": 6}, "e": {"type": "number"},
                       "ae": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["a"]})),
]  # fmt: skip


def dense_vocabulary(hostile: bool = False) -> list[bytes]:
    """1,500 random strings of 1-4 bytes over JSON's punctuation, a few letters and digits, and
    the two bytes of é (JSON's alphabet, for the JSON grammars): tokens that share prefixes and
    whose subtrees mix bytes that keep a state with bytes that end it, in every combination the
    whole-subtree shortcut must get right. `hostile` adds bytes no UTF-8 text holds (FF, C0, a
    lone continuation), a surrogate's lead (ED A0), 日's and 🙂's bytes (three and four), an id
    whose bytes repeat another's and empty tokens among them."""
    alphabet = [*b'a e1.-,:{}[]" \\', 0xC3, 0xA9]
    if hostile:
        alphabet += [0xFF, 0xC0, 0x80, 0xED, 0xA0, 0xE6, 0x97, 0xA5, 0xF0, 0x9F, 0x99, 0x82]
    rng = random.Random(0)
    tokens = [
        b"",
        *sorted({bytes(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(1500)}),
    ]
    if hostile:
        tokens[100:100] = [b"", tokens[50], "日🙂".encode()]
    return tokens


def oracle_ids(auto: Automaton, vocab: Vocabulary, state: int, tail: bytes) -> list[int]:
    """The ids whose bytes, after an answer at automaton `state` with `tail` bytes of an
    unfinished character, leave it viable: brute force, no trie, no byte table."""
    return [i for i, t in enumerate(vocab.tokens) if t and viable(auto, tail + t, state, True)]


@pytest.mark.parametrize(
    "vocabulary,kind,spec",
    [("trained", kind, spec) for kind, spec in LEVEL_WALK_SPECS]
    + [(v, kind, spec) for v in ("dense", "hostile") for kind, spec in LEVEL_WALK_SPECS
       if kind.startswith("json")],
)  # fmt: skip
def test_level_walk_masks_equal_each_tokens_own_advance(tmp_path, kind, spec, vocabulary):
    """The level-at-a-time walk (whole subtrees taken by range, gathers from the byte table)
    allows exactly the tokens a brute-force check of their bytes finds viable, and `advance`
    steps exactly those to the state the check reaches, at the states of random walks (half of
    them nesting brackets, so json_object's byte table grows past its first 64 rows) over a
    trained byte-level BPE and dense vocabularies of short byte strings."""
    from lmforge.constrain.guide import GRAMMARS
    from lmforge.constrain.json_grammar import NumberDigits
    from lmforge.tokenizer.files import TokenizerFiles
    from unit.finetune.helpers import make_tokenizer_dir

    if vocabulary == "trained":
        files = TokenizerFiles.load(make_tokenizer_dir(tmp_path, vocab_size=400))
        vocab = GuideCompiler(files.tokenizer).vocab
    else:
        vocab = Vocabulary(dense_vocabulary(hostile=vocabulary == "hostile"))
    auto = Automaton(GRAMMARS[kind](spec, NumberDigits()))
    guide = TokenGuide(auto, vocab)
    nesting = [vocab.tokens.index(bytes([c])) for c in b'{"a":' + b"[" * 20]
    rng = random.Random(1)
    checked = 0
    for walk in range(6):
        state, at = guide.start, (auto.start, b"")
        for step in range(25):
            expected = oracle_ids(auto, vocab, *at)
            assert guide.allowed_ids(state) == expected
            stepped = [i for i in range(vocab.size) if guide.advance(state, i) is not None]
            assert stepped == expected
            checked += 1
            if not expected:
                break
            deeper = walk % 2 and nesting[step] in expected  # json_object: `{"a":[[[...`
            token = nesting[step] if deeper else rng.choice(expected)
            state, at = (
                guide.advance(state, token),
                complete_part(auto, at[1] + vocab.tokens[token], at[0]),
            )
            assert state == at
    assert checked > 40
    if kind == "json_object" and vocabulary != "trained":
        assert len(guide._states) > 64  # the table grew (it starts with 64 rows)


DIGIT_VOCAB = [
    b"", b"{", b"}", b'"', b":", b",", b" ", b"-", b".", b"e", b"E", b"+", b'{"n":', b'"i":',
    b'"k":', b"n", b"i", b"k", *(bytes([c]) for c in b"0123456789"), b"12", b"345", b"6789", b"00000", b"99999999",
    b"1.5", b".25", b"e+10", b"123456789", b"9,",
]  # fmt: skip


def test_a_digit_hungry_walk_stops_at_the_digit_caps_and_its_answer_validates(tmp_path):
    """A 'model' that draws a token with digits whenever the mask allows one still closes the
    object: each number part stops at its cap (the enum's longer number is written as given),
    the integer stays within its bounds, and every answer validates against the schema."""
    import re

    import jsonschema

    from lmforge.constrain.json_grammar import NumberDigits
    from lmforge.tokenizer.files import TokenizerFiles
    from unit.finetune.helpers import make_tokenizer_dir

    caps = NumberDigits(integer=4, fraction=3, exponent=2)
    compiler = GuideCompiler(TokenizerFiles.load(make_tokenizer_dir(tmp_path)).tokenizer, caps)
    capped = compiler.compile("json_object", "").tokens.automaton  # the compiler's caps apply
    assert capped.matches('{"a":1234}') and not capped.matches('{"a":12345}')
    schema = {"type": "object", "properties": {"n": {"type": "number"}, "i": {"type": "integer", "minimum": -50, "maximum": 1234},
              "k": {"enum": [123456789]}}, "required": ["n", "i", "k"]}  # fmt: skip
    guide = TokenGuide(Automaton(schema_grammar(schema, caps)), Vocabulary(DIGIT_VOCAB))
    digits = [i for i, t in enumerate(DIGIT_VOCAB) if any(48 <= b <= 57 for b in t)]
    for seed in range(10):
        rng, state, answer = random.Random(seed), guide.start, b""
        for _ in range(60):
            allowed = guide.allowed_ids(state)
            if not allowed:
                break
            hungry = sorted(set(allowed) & set(digits))
            token = rng.choice(hungry if hungry and rng.random() < 0.9 else allowed)
            state, answer = guide.advance(state, token), answer + DIGIT_VOCAB[token]
        assert guide.accepts(state) and not guide.allowed_ids(state), answer
        text = answer.decode("utf-8")
        jsonschema.validate(json.loads(text), schema)
        compact = re.sub(r"\s", "", text)  # no string here holds whitespace
        n, i = re.fullmatch(r'\{"n":(.+?),"i":(.+?),"k":123456789\}', compact).groups()
        number = re.fullmatch(r"-?(\d+)(?:\.(\d+))?(?:[eE][+-]?(\d+))?", n)
        whole, fraction, exponent = (part or "" for part in number.groups())
        assert len(whole) <= 4 and len(fraction) <= 3 and len(exponent) <= 2, text
        assert len(i.lstrip("-")) <= 4, text
