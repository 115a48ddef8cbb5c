"""The `tokenizer` stage: train (or import) a tokenizer and write it in Hugging Face layout.

Training uses Hugging Face `tokenizers` on the data stage's train split, streamed. Four kinds:
byte-level BPE (the default; lossless on any unicode string), WordPiece, Unigram, and
character-level; normalizers, the pre-tokenizer (GPT-2 or GPT-4 style split for BPE) and digit
splitting are config keys. Importing copies an HF tokenizer directory, or wraps a bare
tokenizer.json with metadata for the special tokens it has. Either way the output directory
loads with `transformers.AutoTokenizer.from_pretrained`, encodes and decodes exactly as lmforge
does, carries the ChatML chat template (chat.py) when its vocabulary has the markers, and gets
stats.json measured on the val split (tokenizer/stats.py).
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmforge.artifacts import StageContext, require_artifact, run_stage
from lmforge.common.io import read_jsonl
from lmforge.config import Section, StageConfig
from lmforge.errors import InputError
from lmforge.tokenizer.chat import CHAT_TOKENS, CHATML_TEMPLATE
from lmforge.tokenizer.files import TOKENIZER_FILES, TokenizerFiles
from lmforge.tokenizer.stats import tokenizer_stats

DATA_HINT = "lmforge data prepare --source stdlib-docs --out DIR"
# cl100k-style split: case-insensitive contractions, letters with one leading non-letter,
# numbers in groups of up to three, punctuation runs, newlines kept apart from other spaces.
GPT4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Which pre-tokenizers each kind accepts (its decoder must be able to undo the cut).
PRE_TOKENIZERS = {
    "bpe": ("auto", "gpt2", "gpt4"),
    "wordpiece": ("auto", "bert", "whitespace"),
    "unigram": ("auto",),
    "char": ("auto",),
}


class SpecialTokens(Section):
    """Special tokens added to the vocabulary (never split, never produced by merges).

    The ChatML markers <|im_start|> and <|im_end|> are always added: the chat template spells them.
    """

    bos: str = Field("<|endoftext|>", description="beginning-of-document token")
    eos: str = Field(
        "<|endoftext|>", description="end-of-document token, written between documents"
    )
    pad: str = Field("<|pad|>", description="padding token")
    unk: str = Field("<|unk|>", description="unknown token (wordpiece, unigram, char)")
    mask: str | None = Field(
        None, description="mask token for masked-LM pretraining (e.g. [MASK] or <mask>)"
    )
    extra: list[str] = Field(
        default_factory=list, description="more special tokens (e.g. tool-call markers)"
    )

    def additional(self) -> list[str]:
        """The chat markers and extras: tokenizer_config.json's additional_special_tokens."""
        named = {self.bos, self.eos, self.pad, self.unk, self.mask}
        return [t for t in dict.fromkeys([*CHAT_TOKENS, *self.extra]) if t not in named]

    def all(self) -> list[str]:
        """Every special token once, in a stable order (their ids come first in the vocab)."""
        named = [self.eos, self.bos, self.pad, self.unk, *([self.mask] if self.mask else [])]
        return list(dict.fromkeys([*named, *self.additional()]))


class TokenizerConfig(StageConfig):
    """`lmforge tokenizer train --data DIR --out DIR [--kind ...] [--vocab-size N]`."""

    data: Path | None = Field(
        None,
        description="data stage directory: train.jsonl.zst to train on, val.jsonl.zst to measure",
    )
    import_from: Path | None = Field(
        None,
        description="use an existing tokenizer.json or HF tokenizer directory instead of training",
    )
    kind: Literal["bpe", "wordpiece", "unigram", "char"] = Field(
        "bpe", description="tokenizer model"
    )
    vocab_size: int = Field(8192, ge=32, le=1 << 20, description="target vocabulary size")
    min_frequency: int = Field(
        2, ge=1, description="minimum pair/word frequency to enter the vocab"
    )
    normalization: list[Literal["nfc", "nfkc", "lowercase", "strip_accents"]] = Field(
        default_factory=list, description="normalizers applied before tokenization, in order"
    )
    pre_tokenizer: Literal["auto", "gpt2", "gpt4", "bert", "whitespace"] = Field(
        "auto",
        description="how text is cut before the model sees it: gpt2/gpt4 regexes (bpe), "
        "bert/whitespace (wordpiece); auto = gpt2 for bpe, bert for wordpiece, "
        "metaspace for unigram, one piece per character for char",
    )
    split_digits: bool = Field(True, description="split numbers into single digits")
    max_chars: int = Field(200_000_000, ge=1, description="train on at most this many characters")
    model_max_length: int = Field(2048, ge=1, description="max length recorded for transformers")
    special_tokens: SpecialTokens = Field(
        default_factory=SpecialTokens, description="special tokens"
    )
    template: Literal["none", "encoder"] = Field(
        "none",
        description="what transformers' tokenizer adds around a text: none (decoders) | encoder "
        "(bos text eos, pair: bos a eos b eos with token type 1 on b: BERT's [CLS]/[SEP] when "
        "bos is [CLS] and eos is [SEP])",
    )

    @model_validator(mode="after")
    def _check(self) -> TokenizerConfig:
        if self.data is None and self.import_from is None:
            raise ValueError(
                "give 'data' (a data stage directory to train on) or 'import_from' "
                "(an existing tokenizer; with 'data' too, its val split only measures it)"
            )
        valid = PRE_TOKENIZERS[self.kind]
        if self.pre_tokenizer not in valid:
            raise ValueError(
                f"pre_tokenizer '{self.pre_tokenizer}' does not fit kind '{self.kind}'; "
                f"valid: {', '.join(valid)}"
            )
        return self

    def inputs(self) -> list[Path]:
        return [p for p in (self.data, self.import_from) if p is not None]


def train_tokenizer(cfg: TokenizerConfig, force: bool = False) -> Path:
    """Runs (or reuses) the tokenizer stage; returns the tokenizer directory."""
    return run_stage("tokenizer", cfg, build, force=force).out


def iter_texts(data_dir: Path, split: str, max_chars: int | None = None) -> Iterator[str]:
    """Streams document texts of one split of a data stage directory."""
    path = Path(data_dir) / f"{split}.jsonl.zst"
    seen = 0
    for row in read_jsonl(path):
        text = row.get("text", "")
        yield text
        seen += len(text)
        if max_chars is not None and seen >= max_chars:
            return


def _advancing(texts: Iterator[str], bar: Any, every: int = 1000) -> Iterator[str]:
    """Passes texts through, moving a progress bar every `every` documents."""
    n = 0
    for n, text in enumerate(texts, start=1):
        yield text
        if n % every == 0:
            bar.advance(every)
    bar.advance(n % every)


def _normalizer(names: list[str]) -> Any:
    from tokenizers import normalizers

    table = {
        "nfc": normalizers.NFC,
        "nfkc": normalizers.NFKC,
        "lowercase": normalizers.Lowercase,
        "strip_accents": lambda: normalizers.Sequence(
            [normalizers.NFD(), normalizers.StripAccents()]
        ),
    }
    return normalizers.Sequence([table[n]() for n in names]) if names else None


def _char_vocab(texts: Iterator[str], cfg: TokenizerConfig) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    specials = cfg.special_tokens.all()
    vocab = {tok: i for i, tok in enumerate(specials)}
    for char, n in counts.most_common():
        if len(vocab) >= cfg.vocab_size:
            break
        if n >= cfg.min_frequency and char not in vocab:
            vocab[char] = len(vocab)
    return vocab


def build_tokenizer(cfg: TokenizerConfig, texts: Iterator[str]) -> Any:
    """Trains a `tokenizers.Tokenizer` of cfg.kind on texts."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = cfg.special_tokens.all()
    digits = [pre_tokenizers.Digits(individual_digits=True)] if cfg.split_digits else []
    if cfg.kind == "bpe":
        tok = Tokenizer(models.BPE())
        if cfg.pre_tokenizer == "gpt4":
            split = [
                pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        else:
            split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, *split])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif cfg.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=cfg.special_tokens.unk))
        words = (
            pre_tokenizers.Whitespace()
            if cfg.pre_tokenizer == "whitespace"
            else pre_tokenizers.BertPreTokenizer()
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, words])
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=specials,
            show_progress=False,
        )
    elif cfg.kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, pre_tokenizers.Metaspace()])
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=cfg.vocab_size,
            special_tokens=specials,
            unk_token=cfg.special_tokens.unk,
            show_progress=False,
        )
    else:  # char: one token per character, the most frequent vocab_size of them
        tok = Tokenizer(models.WordLevel(_char_vocab(texts, cfg), unk_token=cfg.special_tokens.unk))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = None
    if cfg.normalization:
        tok.normalizer = _normalizer(cfg.normalization)
    if trainer is not None:
        tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(specials)
    if cfg.template == "encoder":
        tok.post_processor = _encoder_template(tok, cfg.special_tokens, tok.post_processor)
    return tok


def _encoder_template(tok: Any, st: SpecialTokens, byte_level: Any) -> Any:
    """BERT's TemplateProcessing with bos as [CLS] and eos as [SEP] (after byte-level BPE's
    offset fix when there is one), so encoders see the inputs transformers' tokenizer makes."""
    from tokenizers import processors

    specials = [(t, tok.token_to_id(t)) for t in dict.fromkeys([st.bos, st.eos])]
    template = processors.TemplateProcessing(
        single=f"{st.bos} $A {st.eos}",
        pair=f"{st.bos} $A {st.eos} $B:1 {st.eos}:1",
        special_tokens=specials,
    )
    return template if byte_level is None else processors.Sequence([byte_level, template])


def special_tokens_map(cfg: TokenizerConfig, vocab: dict[str, int]) -> dict[str, Any]:
    """special_tokens_map.json: the configured special tokens that the vocabulary has."""
    st = cfg.special_tokens
    named = {"bos_token": st.bos, "eos_token": st.eos, "pad_token": st.pad, "unk_token": st.unk}
    if st.mask:
        named["mask_token"] = st.mask
    found: dict[str, Any] = {k: t for k, t in named.items() if t in vocab}
    found["additional_special_tokens"] = [t for t in st.additional() if t in vocab]
    return found


def write_metadata(
    cfg: TokenizerConfig, vocab: dict[str, int], out: Path, ctx: StageContext
) -> None:
    """tokenizer_config.json + special_tokens_map.json (+ chat_template.jinja when the vocab
    has the ChatML markers), as transformers' AutoTokenizer expects them."""
    specials = special_tokens_map(cfg, vocab)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": cfg.model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    if cfg.template == "encoder":  # BERT's names for the template's bos and eos
        config.update(cls_token=cfg.special_tokens.bos, sep_token=cfg.special_tokens.eos)
    if all(t in vocab for t in CHAT_TOKENS):
        config["chat_template"] = CHATML_TEMPLATE
        ctx.atomic_write_text(out / "chat_template.jinja", CHATML_TEMPLATE)
    ctx.atomic_write_json(out / "tokenizer_config.json", config)
    ctx.atomic_write_json(out / "special_tokens_map.json", specials)


def import_tokenizer(cfg: TokenizerConfig, out: Path, ctx: StageContext) -> None:
    """Copies an existing tokenizer: an HF tokenizer directory with its metadata as it is, or a
    bare tokenizer.json (any name) with metadata for the configured special tokens it has."""
    source = Path(cfg.import_from)  # type: ignore[arg-type]
    main = source if source.is_file() else source / "tokenizer.json"
    if not main.is_file():
        raise InputError(f"{source}: no tokenizer.json to import (give the file or its directory)")
    with ctx.atomic_path(out / "tokenizer.json") as tmp:
        shutil.copyfile(main, tmp)
    if main.name == "tokenizer.json":
        for name in TOKENIZER_FILES[1:]:
            if (main.parent / name).is_file():
                with ctx.atomic_path(out / name) as tmp:
                    shutil.copyfile(main.parent / name, tmp)
    if not (out / "tokenizer_config.json").is_file():
        from tokenizers import Tokenizer

        try:
            vocab = Tokenizer.from_file(str(main)).get_vocab(with_added_tokens=True)
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise InputError(f"{main} is not a tokenizers JSON file: {exc}") from None
        write_metadata(cfg, vocab, out, ctx)


def build(cfg: TokenizerConfig, ctx: StageContext) -> dict[str, Any]:
    """Trains or imports, then measures the tokenizer on the val split (when there is data)."""
    out = ctx.out
    if cfg.import_from is not None:
        import_tokenizer(cfg, out, ctx)
    else:
        require_artifact(cfg.data, ["train.jsonl.zst"], hint=DATA_HINT)
        if not any(text.strip() for text in iter_texts(cfg.data, "train", max_chars=1)):
            raise InputError(
                f"{cfg.data}/train.jsonl.zst has no text to train a tokenizer on; check the data "
                f"funnel (lmforge data stats {cfg.data}) and loosen the filters that removed it"
            )
        with ctx.progress("train tokenizer", unit="doc") as bar:
            texts = _advancing(iter_texts(cfg.data, "train", cfg.max_chars), bar)
            tok = build_tokenizer(cfg, texts)
        ctx.atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=False))
        write_metadata(cfg, tok.get_vocab(with_added_tokens=True), out, ctx)
    files = TokenizerFiles.load(out)
    stats: dict[str, Any] = {
        "kind": cfg.kind if cfg.import_from is None else "imported",
        "vocab_size": files.vocab_size,
    }
    if cfg.data is not None and (Path(cfg.data) / "val.jsonl.zst").exists():
        stats.update(tokenizer_stats(files, iter_texts(cfg.data, "val", 5_000_000)))
    ctx.atomic_write_json(out / "stats.json", stats)
    return {k: v for k, v in stats.items() if not isinstance(v, (list, dict))}
