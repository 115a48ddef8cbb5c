"""Person-name detection from lexicons and cue phrases (no NER model): the `name` PII detector.

A name is found two ways:
- a full name: a given name, an optional second given name or middle initial, up to two surname
  particles (also "v.") and a surname of one or two surname-like words ("Alice Smith", "Alice
  B. Smith", "Mary Ann Smith", "Guido van Rossum", "Martin v. Löwis", "Luke Kenneth Casson
  Leighton"). Surname-like = a known surname, or a Title-case word that is not a common
  English word nor a Python module's name ("Alice Python" and "Raymond Hettinger Itertools"
  are no names, "Alice Kowalczyk" is); a second surname word is on the same line and no
  English-looking noun or adjective ("Mathematical"). The words
  may be wrapped onto the next line, not across a blank line;
- after a cue: "my name is", "I am", "I'm", "this is", "Dear", a sign-off line ("Regards,\\n"),
  a given name with an optional surname; after a title (Mr./Mrs./Ms./Dr./Prof.) also a lone
  surname ("Mr. van Rossum").
Given names that are also English words ("Will", "May", "Skip") count only after a cue, before a
known surname that is not a common word ("Will Smith", not "Will Return"), or, unless they are
everyday words (AMBIGUOUS_GIVEN: "Will", "Max", "Grant"), before a word that is no known name or
common word ("Skip Montanaro", not "Max Heap"). A word inside an identifier (`self.Alice`,
`Alice_Smith`, `AliceSmith`, `Alice(`) never matches, nor one after a letter and an apostrophe
("O'Reilly" is no "Reilly") but a Python string prefix (`u'Alice Smith'`) or an elided French or
Italian word ("l'<NAME>", "d'<NAME>", "dell'<NAME>", "qu'<NAME>"); a word with an O'/Mc/Mac
prefix right before a name goes with it ("O'Jean Paul Sartre" is one name), and surnames may
carry elided or Irish particles ("Dell'Acqua", "Mac Diarmada", "Ó Broin"). A possessive keeps
its "'s" ("<NAME>'s").

The lexicons (resources/names.json) come from the faker package's person providers (MIT; see the
file's `source` and `license`, rebuilt by scripts/extract_names.py); they are read and compiled
into trie-shaped regexes on first use, so importing this module costs nothing. The patterns are
plain `re` patterns (fixed-width lookbehinds), so the serving safety policy can recompile them
with `regex` for partial matching in streams.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

LEXICON = Path(__file__).parent / "resources" / "names.json"

# Given names that are also everyday or technical English words beyond the lexicon's
# `common_given` (those are the faker given names found lowercase in an English dictionary).
AMBIGUOUS_GIVEN = frozenset(
    "Will May Bill Grant Mark Rose Art Long Young Case Max Min Key Page Line Hope Joy Faith Grace "
    "June April August Summer Autumn Dawn Guy Ray Dean Chase Lane Reed Wade Price King Major "
    "Royal Sterling Golden Crystal Amber Ruby Pearl Jade Iris Violet Lily Ivy Holly Daisy Sky "
    "Rich Frank Jack Drew Pat Sue Rob Don Bob Eve Carol Dan Ben Tom Sam Al Ed Ted Kit Jay Lee "
    "Miles Norman Mason Hunter Carter Cooper Parker Taylor Tyler Walker Baker Else Per My Us "
    "Monty Von Van De Del Della La Le "  # "Monty Python", "Von Neumann": particles, not names
    "An Tab "  # "An\nObject", "Tab Nanny" (tabnanny's title) in the stdlib docs
    # technical words: "Server Authentication" (ssl's page), "Unknown Error", "Odd Function",
    # "Math Software" (stdlib sources) were names before an unknown word
    "Server Unknown Unnamed Odd Math Alpha Beta Delta Theta Eta Meta Echo Edit Valid Branch Link "
    "Lemma Nil Trace "
    # languages, places and products: "French Dataset", "Darija Translation", "Nile Valley",
    # "Mac Catalyst", "Marine License" (in installed packages' docs)
    "French Darija Nile Mac Marine "
    "Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec Mon Tue Wed Thu Fri Sat Sun".split()
)
# Title-case words that are never surname-like besides the lexicon's common words: the calendar
# ("Jan Feb", "Sep Oct" in date tables), the language the built-in corpus documents and company
# suffixes ("O'Reilly Media Inc").
NOT_SURNAMES = frozenset(
    "January February March April May June July August September October November December "
    "Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec Monday Tuesday Wednesday Thursday Friday "
    "Saturday Sunday Mon Tue Wed Thu Fri Sat Sun Python Inc Ltd Corp LLC GmbH".split()
)

# Endings of English nouns and adjectives, Title-case in headings and titles ("William Lowell
# Putnam Mathematical Competition"): a second surname word with one must be a known surname
# ("Fleming"). Not the first: "Stephen Merity", "Kristian Kersting".
WORD_ENDINGS = "ical ics tion sion ment ness ity ware ology able ible ous ing ive".split()

# Common words that are also frequent surnames: after an ambiguous given name they still make a
# full name ("Carol White").
WORD_SURNAMES = frozenset(
    "White Black Green Young Long West Little Price Church Field Wall".split()
)

# Title-case letters: ASCII, Latin-1, Latin Extended-A and -B and Latin Extended Additional
# (whose cases interleave: Romanian ș/ț, Vietnamese ầ/ư), and lowercase IPA letters (the
# Azerbaijani ə): every letter of the lexicon's names, which scripts/extract_names.py keeps.
_UP = "A-Z\u00c0-\u00d6\u00d8-\u00de\u0100-\u024f\u1e00-\u1eff"
_LOW = "a-z\u00df-\u00f6\u00f8-\u00ff\u0100-\u024f\u0250-\u02af\u1e00-\u1eff"
# a Title-case word, also "McAdam", "O'Brien", "d'Arc", "Dell'Acqua" (elided particles:
# "Forgeot d'Arc", "Giovanni Dell'Acqua")
_WORD = rf"(?:Ma?c|O['\u2019]|[dD](?:[ae]ll)?['\u2019])?[{_UP}][{_LOW}]+(?:-[{_UP}][{_LOW}]+)?"
# French and Italian articles and words elided before a name, which is no part of it:
# "l'Alice Smith", "d'Alice Smith", "dell'Alice Smith", "qu'Alice Smith"
ELIDED = "l d dell dall nell sull all qu jusqu lorsqu puisqu quoiqu".split()
# a name can start right after one (fixed-width lookbehinds, also capitalized: "L'", "Dell'")
_AFTER_ELISION = "|".join(rf"(?<=\b[{w[0]}{w[0].upper()}]{w[1:]}['\u2019])" for w in ELIDED)
# not inside a word or a name that starts with "O'" or "d'" ("O'Reilly" is no "Reilly"), but
# after an elided word or a Python string prefix (u'', b'', f'', r'', rb'', fr'': `u'Alice Smith'`)
_START = (
    r"(?<![\w.@/\\$#-])"
    r"(?:(?<!\w['\u2019])|(?<=\b[uUbBfFrR]')|(?<=\b[rR][bBfF]')|(?<=\b[bBfF][rR]')"
    rf"|{_AFTER_ELISION})"
)
# a word with an Irish or Scottish surname prefix right before a name is taken with it, so none
# of it is left in clear text: "O'Jean Paul Sartre", "McJean Paul Sartre" (alone it is a name
# only where a surname may be: "Conan O'Brien", not "MacArthur Foundation")
_GLUED = rf"(?:O['\u2019]|Ma?c)[{_UP}][{_LOW}]+"
# Not the start of an identifier or a dotted/hyphenated word: `Alice_x`, `Alice(`, `Alice.smith`.
_END = r"(?![\w(]|[.:/-]\w)"
# between the words of a name: spaces, or one line break (a name wrapped onto the next line)
_GAP = r"(?:[ \t]+|[ \t]*\r?\n[ \t]*)"
# surname particles, up to two ("Guido van Rossum", "Maria de la Cruz"), also abbreviated
# ("Martin v. Löwis") and the Irish ones ("Seán Mac Diarmada", "Eoin Ó Broin")
PARTICLES = (
    "van von de da del della der den di du dos das ter ten la le zu v. Mac Mc Ó Ní Nic Uí".split()
)
_PARTICLE = rf"(?:{'|'.join(map(re.escape, PARTICLES))})"
_CUES = (
    r"\b[Mm]y name is ",
    r"\bI am ",
    r"\bI'm ",
    "\\bI\u2019m ",
    r"\b[Tt]his is ",
    r"\bDear ",
    # a sign-off line, ended by \n or (Windows mail, pasted text) \r\n: lookbehinds are fixed-width
    *(
        rf"\b{word},{eol}"
        for word in ("[Rr]egards", "[Tt]hanks", "Sincerely", "Cheers", "Best")
        for eol in (r"\n", r"\r\n")
    ),
)
_TITLES = ("Mr. ", "Mrs. ", "Ms. ", "Dr. ", "Prof. ", "Mr ", "Mrs ", "Ms ", "Dr ")


@functools.cache
def lexicon() -> dict[str, frozenset[str]]:
    """The packaged lexicons: given, common_given (given names that are English words),
    surnames, common_words (capitalized)."""
    data = json.loads(LEXICON.read_text(encoding="utf-8"))
    common = frozenset(w.capitalize() for w in data["common_words"].split())
    return {
        "given": frozenset(data["given"].split()),
        "common_given": frozenset(data["common_given"].split()) | AMBIGUOUS_GIVEN | common,
        "surnames": frozenset(data["surnames"].split()),
        "common_words": common,
    }


def trie_regex(words: Iterable[str]) -> str:
    """One regex alternation of `words` shaped as a prefix trie, so matching a lexicon of
    thousands of words costs about one character comparison per letter."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        children = [(ch, sub) for ch, sub in sorted(node.items()) if ch]
        leaves = [re.escape(ch) for ch, sub in children if sub == {"": {}}]
        alts = [re.escape(ch) + emit(sub) for ch, sub in children if sub != {"": {}}]
        alts += ["[" + "".join(leaves) + "]"] if len(leaves) > 1 else leaves  # last letters
        if not alts:
            return ""
        if "" not in node:
            return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return "(?:" + "|".join(alts) + ")?"

    return emit(trie) or "(?!)"


# modules Python 3.12/3.13 removed (PEP 594, distutils...): still heading words of older docs, and
# one list on every Python keeps the detector's output the same whatever interpreter runs it
REMOVED_STDLIB_MODULES = frozenset({
    "aifc", "asynchat", "asyncore", "audioop", "cgi", "cgitb", "chunk", "crypt", "distutils",
    "imghdr", "imp", "lib2to3", "mailcap", "msilib", "nis", "nntplib", "ossaudiodev", "pipes",
    "smtpd", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib",
})  # fmt: skip


@functools.cache
def name_patterns() -> tuple[tuple[re.Pattern, Callable[[str], bool] | None], ...]:
    """The detectors as data.pii's (pattern, check of the matched text or None) pairs, longest
    first: given name(s) + a surname, one pattern for every name so the leftmost start wins (run
    separately, one took the tail of the other's name: "Greg <NAME>"), an ambiguous first given
    name checked by _surname_after_word; given name(s) + a surname after a cue, a title or, not
    starting with an ambiguous given name, anywhere (a name inside a rejected "Max Alice
    Kowalczyk"); a lone given name after a cue; a lone surname after a title.

    Every pattern with a surname requires it (no optional tail), so `regex`'s partial matching
    reports "my name is Alice Sm" as a full name in progress rather than settling on "Alice".
    The large given-name trie is in the first two patterns only, once in each (a repeat, not a
    second copy, for a second given name); the others check the lexicon."""
    lex = lexicon()
    given = lex["given"]
    ambiguous = trie_regex(given & lex["common_given"])
    # a Title-case word, unless it is a common word that is not also a known surname, or a
    # Python module's name that is no known name (heading words of the Python docs: "Raymond
    # Hettinger Itertools", "Greg Ward Distutils")
    stdlib = set(sys.stdlib_module_names) | REMOVED_STDLIB_MODULES
    modules = {m.capitalize() for m in stdlib if m.isalpha() and len(m) > 2}
    not_surname = (
        (lex["common_words"] - lex["surnames"]) | NOT_SURNAMES | (modules - lex["surnames"] - given)
    )
    surname_like = rf"(?!(?:{trie_regex(not_surname)}){_END}){_WORD}"
    # a known surname that is not a common word makes an ambiguous given name a name (in a
    # double-barrelled surname, either part: "Anna Smith-Jones")
    strict = lex["surnames"] - (lex["common_words"] - WORD_SURNAMES) - NOT_SURNAMES
    cue = "|".join(f"(?<={c})" for c in _CUES)
    title = "|".join(f"(?<=\\b{re.escape(t)})" for t in _TITLES)
    # after the given name(s) and a gap: an initial, up to two particles and a surname of one
    # word or two on one line ("Luke Kenneth Casson Leighton", not "Steve Purcell\nCopyright"),
    # whose second word does not look like an English noun or adjective (WORD_ENDINGS)
    ending = f"(?:{'|'.join(WORD_ENDINGS)}){_END}"
    known_with_ending = trie_regex(w for w in lex["surnames"] if re.search(ending, w))
    english = rf"(?!(?:{known_with_ending}){_END})[{_UP}][{_LOW}]{{2,}}{ending}"  # not "Ying"
    second = rf"(?:[ \t]+(?!{english}){surname_like})?"
    particles_surname = rf"(?:{_PARTICLE}{_GAP}){{0,2}}{surname_like}{second}"
    surname = rf"(?:[A-Z]\.{_GAP})?{particles_surname}"
    # a given name and the gap after it; once per pattern (the trie of ~13k names is most of the
    # compile time), as a repeat for "Mary Ann Smith" and "Jean Paul Sartre"
    given_gap = rf"(?:{trie_regex(given)}){_GAP}"
    # every name starts with a capital: testing that first skips the lookbehinds at most
    # positions (25x faster on the stdlib docs)
    cap = f"(?=[{_UP}])"
    cap_or_particle = f"(?=[{_UP}{''.join(sorted({p[0] for p in PARTICLES}))}])"  # "Mr. van Rossum"
    return (
        # every start in one scan, so neither "Jean Paul Sartre" (a word first) nor "Greg Ward
        # Distutils" (a word second) is cut to its tail
        (
            re.compile(rf"{cap}{_START}(?:{_GLUED}{_GAP})?(?:{given_gap}){{1,2}}{surname}{_END}"),
            functools.partial(
                _name_start, ambiguous=given & lex["common_given"], strict=strict, lex=lex
            ),
        ),
        (
            re.compile(
                rf"{cap}(?:{cue}|{title}|{_START}(?!(?:{ambiguous}){_END}))"
                rf"(?:{given_gap}){{1,2}}{surname}{_END}"
            ),
            None,
        ),
        (re.compile(rf"{cap}(?:{cue}|{title}){_WORD}{_END}"), given.__contains__),
        (
            re.compile(rf"{cap_or_particle}(?:{title}){particles_surname}{_END}"),
            None,
        ),
    )


def _name_start(
    text: str, ambiguous: frozenset[str], strict: frozenset[str], lex: dict[str, frozenset[str]]
) -> bool:
    """Whether a match of given name(s) + a surname is a name: always, unless its first given
    name is also a word; then as _surname_after_word says."""
    text = re.sub(rf"^{_GLUED}{_GAP}", "", text)  # the name proper after a glued word
    first = text.split(maxsplit=1)[0]
    return first not in ambiguous or _surname_after_word(text, strict, lex)


def _surname_after_word(text: str, strict: frozenset[str], lex: dict[str, frozenset[str]]) -> bool:
    """Whether a given name that is also a word starts a name: before a known surname that is not
    a common word ("Will Smith", "Mary Ann Smith"), or, unless the given name is on the stop list
    of everyday words (AMBIGUOUS_GIVEN, the lexicon's common words), before a word that is no
    known name at all ("Skip Montanaro"; "Max Heap", "Grant Access" stay text)."""
    words = text.split()
    # any word after it: the surname may be two words, the strict one first ("Mark Hammond
    # Windows" is no less a name than "Mark Hammond")
    if any(part in strict for word in words[1:] for part in word.split("-")):
        return True
    if words[0] in AMBIGUOUS_GIVEN or words[0] in lex["common_words"]:  # everyday words
        return False
    # the words after it but initials and particles: one unknown to the lexicon makes a name
    # ("Luke Kenneth Casson Leighton": Kenneth and Leighton are given names, Casson is none)
    rest = [w for w in words[1:] if w[0].isupper() and not w.endswith(".")]
    return any(not any(_known(p, lex) for p in w.split("-")) for w in rest)


def _known(word: str, lex: dict[str, frozenset[str]]) -> bool:
    return word in lex["surnames"] or word in lex["given"]
