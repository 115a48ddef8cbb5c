"""Tiny synthetic English corpora for the data tests (no downloads)."""

from __future__ import annotations

import random

NOUNS = (
    "river house garden teacher market window village doctor letter morning harbour engine library "
    "student forest bridge kitchen painter castle island farmer soldier mountain valley station "
    "merchant sailor factory chapel meadow orchard captain widow clerk lantern carriage fortress "
    "cottage tower quarry workshop monastery vineyard lighthouse courtyard pilgrim shepherd "
    "blacksmith weaver tailor baker miller priest judge scholar poet dancer singer hunter"
).split()
ADJS = (
    "quiet bright narrow ancient gentle heavy careful distant simple famous silent crowded "
    "golden broken hidden lonely proud restless sudden tired wealthy humble frozen patient"
).split()
VERBS = (
    "visit repair describe follow explain carry welcome measure remember study protect "
    "abandon discover paint guard rebuild question praise warn invite"
).split()
TEMPLATES = (
    "The {a} {n} of the {n} was {a}, and the {n} had to {v} it before the {n} closed.",
    "Yesterday a {a} {n} decided to {v} the {n} near the old {n}.",
    "Nobody in the {n} could {v} why the {n} seemed so {a} that year.",
    "When the {n} arrived, every {n} went out to {v} the {a} {n} together.",
    "Her {n} never wanted to {v} a {n}, although the {n} was {a} and {a}.",
    "Because the {n} is {a}, people often {v} their {n} in the {n} instead.",
)


def sentence(rng: random.Random) -> str:
    out = rng.choice(TEMPLATES)
    while "{" in out:
        out = (
            out.replace("{n}", rng.choice(NOUNS), 1)
            .replace("{a}", rng.choice(ADJS), 1)
            .replace("{v}", rng.choice(VERBS), 1)
        )
    return out


def prose(seed: int, sentences: int = 12) -> str:
    """A paragraph-structured English document that passes the paper-default filters."""
    rng = random.Random(seed)
    paras = [" ".join(sentence(rng) for _ in range(3)) for _ in range(max(sentences // 3, 1))]
    return "\n\n".join(paras)


def near_duplicate(text: str, seed: int, changes: int = 2) -> str:
    """The text with a few words replaced (Jaccard of 5-gram shingles stays high)."""
    rng = random.Random(seed)
    words = text.split(" ")
    for _ in range(changes):
        words[rng.randrange(len(words))] = rng.choice(NOUNS)
    return " ".join(words)
