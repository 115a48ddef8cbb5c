"""tiktoken as an exact stand-in for lmforge's byte-level BPE, when (and only when) it can be one.

tiktoken cuts text with one regex and merges each piece's bytes lowest rank first, where a rank
belongs to the merged token; HF tokenizers cuts with its pre-tokenizer and merges by the
priority of the pair (merge order). The two give the same ids when the tokenizer is exactly
what lmforge's `bpe` kind trains: no normalizer, Digits (optional) then the GPT-2 or GPT-4
split, a BPE model with nothing beyond plain byte-level merges, and every multi-byte token made
by exactly one merge with ids rising in merge order (so rank order is merge order).
`tiktoken_encoding` checks all of that on tokenizer.json and raises NotExact naming the first
thing that differs; anything else (imported, WordPiece, Unigram, char, normalized) stays on HF.

Special tokens are left out of the ranks: the tokens stage encodes document text as text
(HF `encode_special_tokens = True`), which tiktoken's `encode_ordinary` does too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.tokenizer.train import GPT4_PATTERN

# GPT-2's split (HF ByteLevel use_regex=True, and tiktoken's gpt2).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# After Digits(individual_digits) every digit is a piece of its own and the split runs on the
# text between digits, so in one regex over the whole text: numbers match one digit at a time,
# and whitespace that ends at a digit is one piece (it ended its stretch: `\s+(?!\S)` took it).
_SPACE_RUN = r"|\s+(?!\S)|"
_DIGIT_SPACE = r"|\s+(?=\p{N})|\s+(?!\S)|"
PATTERNS = {  # (split, split_digits) -> the tiktoken regex
    ("gpt2", False): GPT2_PATTERN,
    ("gpt2", True): GPT2_PATTERN.replace(r" ?\p{N}+", r"\p{N}").replace(_SPACE_RUN, _DIGIT_SPACE),
    ("gpt4", False): GPT4_PATTERN,
    ("gpt4", True): GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}").replace(_SPACE_RUN, _DIGIT_SPACE),
}
_DIGITS = {"type": "Digits", "individual_digits": True}
_IGNORED = {"trim_offsets"}  # offsets only, never ids


class NotExact(Exception):
    """The tokenizer is not one that tiktoken encodes to exactly HF's ids (the message says why)."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies spell)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _is(part: Any, **required: Any) -> bool:
    """part is a component dict with exactly these settings (offset-only keys aside)."""
    if not isinstance(part, dict):
        return False
    return {k: v for k, v in part.items() if k not in _IGNORED} == required


def split_pattern(spec: dict[str, Any]) -> str:
    """The tiktoken regex equal to spec's normalizer + pre-tokenizer, or NotExact."""
    if spec.get("normalizer") is not None:
        raise NotExact("it has a normalizer")
    pre = spec.get("pre_tokenizer")
    parts = (
        pre.get("pretokenizers")
        if isinstance(pre, dict) and pre.get("type") == "Sequence"
        else None
    )
    if not parts:
        raise NotExact(f"pre-tokenizer {json.dumps(pre)[:200]} is not lmforge's bpe split")
    digits = parts[0] == _DIGITS
    parts = parts[1:] if digits else parts
    byte_level = {"type": "ByteLevel", "add_prefix_space": False}
    if len(parts) == 1 and _is(parts[0], **byte_level, use_regex=True):
        return PATTERNS["gpt2", digits]
    gpt4_split = {
        "type": "Split",
        "pattern": {"Regex": GPT4_PATTERN},
        "behavior": "Isolated",
        "invert": False,
    }
    if (
        len(parts) == 2
        and _is(parts[0], **gpt4_split)
        and _is(parts[1], **byte_level, use_regex=False)
    ):
        return PATTERNS["gpt4", digits]
    raise NotExact(f"pre-tokenizer {json.dumps(pre)[:200]} is not lmforge's bpe split")


def _check_model(spec: dict[str, Any]) -> None:
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise NotExact(f"model is {model.get('type')}, not BPE")
    plain = {
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "byte_fallback": False,
        "ignore_merges": False,
    }
    for key, value in plain.items():
        if model.get(key, value) != value:
            raise NotExact(f"BPE {key} is {model[key]!r}, not {value!r}")
    for key in ("truncation", "padding"):
        if spec.get(key) is not None:
            raise NotExact(f"it sets {key}")
    post = spec.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":  # ByteLevel changes offsets only
        raise NotExact(f"post-processor {post.get('type')} may add ids")
    for added in spec.get("added_tokens", []):
        if not added.get("special"):  # matched in text even with encode_special_tokens
            raise NotExact(f"added token {added['content']!r} is not special")


def mergeable_ranks(spec: dict[str, Any]) -> dict[bytes, int]:
    """{token bytes: id} of the model's vocabulary minus special tokens, after checking that
    all 256 bytes are tokens and each multi-byte token comes from one merge, ids in merge order."""
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for piece, token_id in vocab.items():
        if specials.get(piece) == token_id:
            continue
        try:
            ranks[bytes(char_to_byte[c] for c in piece)] = token_id
        except KeyError:
            raise NotExact(f"vocabulary entry {piece!r} is not byte-level") from None
    if missing := [b for b in range(256) if bytes([b]) not in ranks]:
        raise NotExact(f"{len(missing)} single bytes are not tokens (first: {missing[0]})")
    merges = model.get("merges", [])
    previous = -1
    for i, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = vocab.get(left + right)
        if token_id is None or token_id <= previous or specials.get(left + right) == token_id:
            raise NotExact(
                f"merge {i} ({left!r} + {right!r}) makes id {token_id}, out of merge order"
            )
        previous = token_id
    multi = sum(len(token) > 1 for token in ranks)
    if multi != len(merges):
        raise NotExact(f"{multi} multi-byte tokens but {len(merges)} merges")
    return ranks


def tiktoken_encoding(spec: dict[str, Any] | str | Path) -> Any:
    """A tiktoken.Encoding giving the same ids as HF tokenizers on document text (special
    tokens as text), for a tokenizer.json dict or path; NotExact when it cannot be one."""
    if not isinstance(spec, dict):
        spec = json.loads(Path(spec).read_text(encoding="utf-8"))
    _check_model(spec)
    pattern = split_pattern(spec)
    ranks = mergeable_ranks(spec)
    import tiktoken

    return tiktoken.Encoding(
        name="lmforge-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
    )
