import random

import pytest

from lmforge.errors import ConfigError
from lmforge.serve.safety import SafetyPolicy, SafetyRule, StreamRedactor


def policy(*rules, **kw):
    return SafetyPolicy(rules=[SafetyRule(**r) for r in rules], **kw)


WORDS = {"name": "weapons", "words": ["bomb", "nerve agent"], "action": "refuse"}
SECRET = {"name": "secret", "words": ["hunter2"], "action": "redact", "replacement": "***"}


def test_words_are_case_insensitive_whole_words():
    p = policy(WORDS)
    assert p.check_prompt("How to make a BOMB?").action == "refuse"
    assert p.check_prompt("a Nerve\n agent").rules == ("weapons",)
    assert p.check_prompt("a bombastic speech about bombs").action == "allow"
    v = p.check_prompt("what is a bomb calorimeter")
    assert (v.action, v.text) == ("refuse", "what is a ")


def test_redaction_of_patterns_and_pii_on_prompts_and_outputs():
    p = policy(
        SECRET,
        {"name": "email", "pii": "email", "action": "redact", "apply_to": ["outputs"]},
        {"name": "card", "pii": "card", "action": "redact"},
        {"name": "ticket", "pattern": r"\bTCK-\d{4}\b", "action": "redact"},
    )
    v = p.check_prompt("pw hunter2, card 4111 1111 1111 1111, TCK-1234, a@b.org")
    assert v.action == "redact"
    assert v.text == "pw ***, card <CARD_NUMBER>, [REDACTED], a@b.org"  # email: outputs only
    assert v.rules == ("secret", "card", "ticket")
    # the card detector keeps the data stage's Luhn check: a non-card number survives
    assert p.check_prompt("order 4111 1111 1111 1112").action == "allow"
    out = p.redact_output("mail me at jane.doe@example.com")
    assert (out.action, out.text, out.rules) == ("redact", "mail me at <EMAIL>", ("email",))


def test_default_policy_loads_and_catches_keys_and_weapons():
    p = SafetyPolicy.default()
    assert p.check_prompt("how do I build a bomb").action == "refuse"
    v = p.check_prompt("use sk-proj-abcdefghijklmnopqrstuvwx123 and AKIAABCDEFGHIJKLMNOP")
    assert v.text == "use <API_KEY> and <API_KEY>" and v.rules == ("api_key",)
    assert p.check_prompt("explain os.path.join").action == "allow"
    assert p.refusal_message


def test_policy_file_typos_are_config_errors_naming_key_and_file(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text(
        "rules:\n  - name: x\n    words: [a]\n    action: refuse\n    aply_to: [prompts]\n"
    )
    with pytest.raises(ConfigError, match=r"policy\.yaml: unknown key 'rules\.aply_to'"):
        SafetyPolicy.from_file(f)
    f.write_text("rules:\n  - name: x\n    words: [a]\n    action: block\n")
    with pytest.raises(ConfigError, match=r"policy\.yaml: bad value for 'rules\.action'"):
        SafetyPolicy.from_file(f)
    f.write_text("rules:\n  - name: x\n    words: [a]\n    pattern: b\n    action: refuse\n")
    with pytest.raises(ConfigError, match="exactly one of words, pattern, pii"):
        SafetyPolicy.from_file(f)
    f.write_text("rules:\n  - name: x\n    pattern: '(unclosed'\n    action: refuse\n")
    with pytest.raises(ConfigError, match="bad regex"):
        SafetyPolicy.from_file(f)
    f.write_text("refusal_mesage: no\n")
    with pytest.raises(ConfigError, match="unknown key 'refusal_mesage'"):
        SafetyPolicy.from_file(f)


def test_stream_redacts_a_word_split_across_deltas_and_holds_back_only_a_possible_match():
    r = StreamRedactor(policy(SECRET))
    assert r.feed("the password is hun") == "the password is "  # "hun" may begin hunter2
    assert r.held == 3
    assert r.feed("ter") == ""
    assert r.feed("2 ok") == "*** ok"
    assert r.feed(" and hunting") == " and hunting"  # settled: "hunting" is not hunter2
    assert r.flush() == "" and r.verdict == "redact" and r.rules == ["secret"]
    # a match at the very end waits for the next character: "hunter2x" is not a whole word
    r = StreamRedactor(policy(SECRET))
    assert r.feed("hunter2") == ""
    assert r.feed("x.") == "hunter2x."


def test_stream_refusal_stops_the_output():
    r = StreamRedactor(policy(WORDS))
    assert r.feed("Sure. A bo") == "Sure. A "
    assert r.feed("mb is ") == ""
    assert r.refused and r.verdict == "refuse"
    assert r.feed("more text") == "" and r.flush() == ""


def stream_in_random_pieces(p: SafetyPolicy, text: str, rng: random.Random):
    """The redactor after feeding `text` in pieces of 1-7 characters, and all it emitted."""
    r, out, i = StreamRedactor(p), [], 0
    while i < len(text):
        step = rng.randint(1, 7)
        out.append(r.feed(text[i : i + step]))
        i += step
    out.append(r.flush())
    return r, "".join(out)


def test_stream_equals_whole_text_redaction_for_any_split():
    p = SafetyPolicy.default()
    text = (
        "Contact bob.smith@example.com or card 4111-1111-1111-1111; key "
        "ghp_" + "a" * 36 + " then AKIAABCDEFGHIJKLMNOP. Not a key: sk-short. "
        "Write to ann@x.io. Done, and we build a bomb later."
    )
    whole = p.redact_output(text)
    rng = random.Random(0)
    for _ in range(30):
        r, out = stream_in_random_pieces(p, text, rng)
        assert out == whole.text
        assert tuple(r.rules) == whole.rules and r.refused
    assert whole.text.endswith("Done, and we ") and "<EMAIL>" in whole.text


NAME = {"name": "person", "pii": "name", "action": "redact", "apply_to": ["outputs"]}


def test_name_rule_redacts_outputs_and_streams_equal_whole_text_redaction():
    p = policy(NAME, {"name": "email", "pii": "email", "action": "redact"})
    text = (
        "Hi, my name is Alice Smith (alice.smith@example.com). Will Return the value.\n"
        "Mr. Nowak met Will Smith and Dan Brown; self.Alice Smith stays.\nRegards,\nCarol White"
    )
    whole = p.redact_output(text)
    assert whole.text == (
        "Hi, my name is <NAME> (<EMAIL>). Will Return the value.\n"
        "Mr. <NAME> met <NAME> and <NAME>; self.Alice Smith stays.\nRegards,\n<NAME>"
    )
    assert whole.rules == ("person", "email")
    assert p.check_prompt("I am Alice Smith").action == "allow"  # outputs only
    rng = random.Random(1)
    for _ in range(20):
        r, out = stream_in_random_pieces(p, text, rng)
        assert out == whole.text and tuple(r.rules) == whole.rules


def test_stream_holds_a_name_until_it_is_settled():
    r = StreamRedactor(policy(NAME))
    assert r.feed("Sure. My name is ") == "Sure. My name is "  # the cue itself flows
    assert r.feed("Ali") == ""  # may be a name: held
    assert r.feed("ce Sm") == ""  # the surname may still grow
    assert r.feed("ith, and") == "<NAME>, and"
    assert r.flush() == "" and r.rules == ["person"]


def test_default_policy_leaves_names_alone():
    assert SafetyPolicy.default().redact_output("Written by Gerhard Häring.").action == "allow"
