"""Builds src/lmforge/data/resources/names.json, the person-name lexicons of data/names.py.

The lists come from the `faker` package (MIT licence, Copyright (c) 2012 Daniele Faraglia): the
given names and surnames of every person-provider locale, kept when they are one Latin-script
word (the detector matches Title-case words), and faker's en_US lorem word list (common English
words: not surname-like). `common_given` lists the given names that are also lowercase words of
Webster's 2nd International (public domain; as the `english-words` package, MIT, ships it), such
as "Will", "May", "Bob": the detector takes those only after a cue or before a known surname.
Each list is one space-separated string (names have no spaces), to keep the file small. Both
packages are needed only to run this script, never at run time:

    pip install faker english-words
    python scripts/extract_names.py

The output records faker's version and licence; rerunning it with the same version gives the
same bytes.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import sys
import unicodedata
from importlib.metadata import files, version
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src/lmforge/data/resources/names.json"
GIVEN = ("first_names", "first_names_male", "first_names_female", "first_names_nonbinary")
SURNAME = ("last_names", "last_names_male", "last_names_female", "last_names_nonbinary")
WORD = re.compile(r"[A-Z][a-z]+(?:['-][A-Z]?[a-z]+)*")


def _latin_word(name: str) -> str | None:
    """The name in NFC when it is one Title-case Latin-script word (diacritics allowed)."""
    name = unicodedata.normalize("NFC", name.strip())
    if not all(c in "'-" or unicodedata.name(c, "").startswith("LATIN ") for c in name):
        return None  # Cyrillic, Greek, Arabic, CJK...: the detector matches Latin letters only
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return name if len(plain) >= 2 and WORD.fullmatch(plain) else None


def _collect(provider: type, attrs: tuple[str, ...]) -> set[str]:
    out: set[str] = set()
    for attr in attrs:
        value = getattr(provider, attr, None)
        if isinstance(value, (dict, list, tuple, set, frozenset)):  # some locales use properties
            out.update(n for n in map(_latin_word, value) if n)
    return out


def main() -> None:
    import faker.providers.person as person
    from english_words import get_english_words_set
    from faker.providers.lorem.en_US import Provider as Lorem

    given: set[str] = set()
    surnames: set[str] = set()
    locales = sorted(m.name for m in pkgutil.iter_modules(person.__path__))
    for locale in locales:
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        given |= _collect(provider, GIVEN)
        surnames |= _collect(provider, SURNAME)
    words = get_english_words_set(["web2"], alpha=True)
    english = {w for w in words if w.islower()}
    licence = next(f for f in files("faker") if f.name.startswith("LICENSE")).read_text()
    data = {
        "source": f"faker {version('faker')} (https://github.com/joke2k/faker): person providers "
        f"of {len(locales)} locales (Latin-script one-word names) and the en_US lorem word list; "
        f"common_given: english-words {version('english-words')} (Webster's 2nd, public domain)",
        "license": licence.strip(),
        "given": " ".join(sorted(given)),
        "common_given": " ".join(sorted(n for n in given if n.lower() in english)),
        "surnames": " ".join(sorted(surnames)),
        "common_words": " ".join(sorted({w.lower() for w in Lorem.word_list})),
    }
    OUT.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"{OUT}: {len(given)} given names, {len(surnames)} surnames", file=sys.stderr)


if __name__ == "__main__":
    main()
