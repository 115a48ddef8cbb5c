"""DataConfig: every knob of the data stage, as typed sections with documented defaults.

Filter thresholds default to the published values. `quality.preset: lenient` relaxes the
thresholds a user did not set explicitly, for corpora like the built-in docstrings, which are
full of code-ish text that web-text heuristics would mostly drop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config import NOT_HASHED, STDLIB_DOCS_VERSIONS, Section, StageConfig
from lmforge.data.augment import AugmentConfig

SourceKind = Literal["auto", "text", "jsonl", "parquet", "html", "warc", "hf", "stdlib-docs"]


class SourceSpec(Section):
    """One input: a path, folder, glob, HF dataset or the built-in `stdlib-docs`."""

    path: str = Field(description="file, folder, glob, HF dataset name/dir, or 'stdlib-docs'")
    weight: float = Field(
        1.0, ge=0, description="mixture weight: copies per document (0.5 keeps half)"
    )
    text_field: str | None = Field(
        None, description="field holding the text (JSONL/Parquet/HF); default: top-level text_field"
    )
    kind: SourceKind = Field("auto", description="reader; auto picks by name and extension")
    split: str = Field("train", description="split to read from an HF dataset")


class CleanConfig(Section):
    enabled: bool = Field(True, description="run the clean step")
    ftfy: bool = Field(True, description="repair mojibake and broken unicode with ftfy")
    nfkc: bool = Field(True, description="NFKC normalization (full-width to half-width, ligatures)")
    control_chars: bool = Field(True, description="remove control and zero-width characters")
    strip_tags: bool = Field(True, description="remove leftover HTML tags and decode entities")
    whitespace: bool = Field(True, description="collapse runs of spaces and blank lines")
    lowercase: bool = Field(False, description="lowercase everything")


class LanguageConfig(Section):
    enabled: bool = Field(True, description="identify the language (langid) and filter by it")
    languages: list[str] = Field(["en"], description="ISO 639-1 codes to keep; [] keeps all")
    threshold: float = Field(0.5, ge=0, le=1, description="minimum langid probability")


class GopherQualityConfig(Section):
    enabled: bool = Field(True, description="Gopher quality rules")
    min_words: int = Field(50, description="minimum words per document")
    max_words: int = Field(100_000, description="maximum words per document")
    min_avg_word_length: float = Field(3.0, description="minimum mean word length")
    max_avg_word_length: float = Field(10.0, description="maximum mean word length")
    max_symbol_word_ratio: float = Field(0.1, description="max (# and ellipsis) per word")
    max_bullet_lines_ratio: float = Field(
        0.9, description="max fraction of lines starting with a bullet"
    )
    max_ellipsis_lines_ratio: float = Field(
        0.3, description="max fraction of lines ending in an ellipsis"
    )
    min_alpha_words_ratio: float = Field(0.8, description="min fraction of words with a letter")
    min_stop_words: int = Field(2, description="min distinct English stop words present")


class GopherRepetitionConfig(Section):
    enabled: bool = Field(True, description="Gopher repetition rules")
    max_dup_line_frac: float = Field(0.3, description="max fraction of duplicated lines")
    max_dup_para_frac: float = Field(0.3, description="max fraction of duplicated paragraphs")
    max_dup_line_char_frac: float = Field(0.2, description="max char fraction in duplicated lines")
    max_dup_para_char_frac: float = Field(
        0.2, description="max char fraction in duplicated paragraphs"
    )


class C4Config(Section):
    enabled: bool = Field(
        True, description="C4 rules (line filtering, curly brackets, lorem ipsum)"
    )
    min_words_per_line: int = Field(3, description="lines with fewer words are removed")
    min_sentences: int = Field(5, description="documents with fewer sentences are dropped")
    require_terminal_punct: bool = Field(True, description="remove lines not ending in punctuation")
    drop_curly_bracket: bool = Field(True, description="drop documents containing '{' (code)")


class FineWebConfig(Section):
    enabled: bool = Field(True, description="FineWeb line rules")
    min_line_punct_ratio: float = Field(
        0.12, description="min fraction of lines ending in punctuation"
    )
    max_short_line_ratio: float = Field(0.67, description="max fraction of lines <= 30 chars")
    max_char_dup_ratio: float = Field(0.01, description="max char fraction in duplicated lines")
    max_newline_word_ratio: float = Field(0.3, description="max newlines per word")


class QualityConfig(Section):
    preset: Literal["papers", "lenient"] = Field(
        "papers", description="papers = published thresholds; lenient = relaxed for code-ish docs"
    )
    prose_only: bool = Field(False, description="drop documents that are mostly code or tables")
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    c4: C4Config = C4Config()
    fineweb: FineWebConfig = FineWebConfig()


# Values the lenient preset uses for keys the user left at their default.
LENIENT: dict[str, dict[str, object]] = {
    "gopher_quality": {
        "min_words": 5,
        "max_symbol_word_ratio": 0.5,
        "min_alpha_words_ratio": 0.4,
        "min_stop_words": 0,
        "max_avg_word_length": 15.0,
        "min_avg_word_length": 2.0,
    },
    "gopher_repetition": {
        "max_dup_line_frac": 0.5,
        "max_dup_para_frac": 0.5,
        "max_dup_line_char_frac": 0.5,
        "max_dup_para_char_frac": 0.5,
    },
    "c4": {"enabled": False},
    "fineweb": {"enabled": False},
}


class PiiConfig(Section):
    enabled: bool = Field(True, description="replace PII with typed placeholders")
    email: bool = Field(True, description="emails -> <EMAIL>")
    phone: bool = Field(True, description="phone numbers -> <PHONE>")
    ip: bool = Field(True, description="IP addresses -> <IP_ADDRESS>")
    card: bool = Field(True, description="Luhn-valid card numbers -> <CARD_NUMBER>")
    names: bool = Field(
        False, description="person names (lexicons + cue phrases, data.names) -> <NAME>"
    )


class DedupConfig(Section):
    exact: bool = Field(True, description="drop documents whose normalized text repeats")
    fuzzy: bool = Field(True, description="drop near duplicates (MinHash LSH)")
    num_perm: int = Field(128, ge=8, description="MinHash permutations")
    bands: int = Field(16, ge=1, description="LSH bands")
    rows: int = Field(8, ge=1, description="rows per band (bands*rows <= num_perm)")
    ngram: int = Field(5, ge=1, description="word n-gram shingle size")
    threshold: float = Field(
        0.7, ge=0, le=1, description="estimated Jaccard to call a pair duplicates"
    )
    seed: int = Field(1, description="seed of the MinHash permutations")

    @model_validator(mode="after")
    def _bands_fit(self) -> DedupConfig:
        if self.bands * self.rows > self.num_perm:
            from lmforge.errors import ConfigError

            raise ConfigError(
                f"dedup: bands*rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}; lower bands or rows"
            )
        return self


class DecontamConfig(Section):
    enabled: bool = Field(True, description="check documents against eval sets (needs eval_sets)")
    eval_sets: list[Path] = Field([], description="eval set files (.jsonl or text)")
    ngram: int = Field(
        13, ge=1, description="shared word n-gram length that counts as contamination"
    )
    mode: Literal["drop", "report"] = Field(
        "drop", description="drop contaminated documents, or only count them"
    )


class SplitConfig(Section):
    train: float = Field(0.7, ge=0, le=1, description="fraction of documents in train")
    val: float = Field(0.15, ge=0, le=1, description="fraction in val")
    test: float = Field(0.15, ge=0, le=1, description="fraction in test")
    seed: int = Field(0, description="seed of the split hash")
    folds: int = Field(0, ge=0, description="k-fold: add a 'fold' field in [0, k) (0 = off)")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        if abs(self.train + self.val + self.test - 1) > 1e-6:
            from lmforge.errors import ConfigError

            raise ConfigError(
                f"split: train+val+test = {self.train + self.val + self.test:g}, must be 1"
            )
        return self


class BiasStatsConfig(Section):
    enabled: bool = Field(
        False, description="count demographic terms per split (stats.json 'bias')"
    )
    terms: Path | None = Field(None, description="term groups file (default: the built-in list)")
    groups: list[str] = Field([], description="only these groups ([] = all in the file)")
    label_field: str = Field("label", description="rows with this field are also counted per label")


class DataConfig(StageConfig):
    """The data stage: sources -> clean -> language -> quality -> pii -> dedup -> decontam -> split
    -> augment (train only)."""

    source: list[SourceSpec] = Field(
        description="sources: paths, globs, HF datasets or 'stdlib-docs'"
    )
    text_field: str = Field("text", description="default text field for JSONL/Parquet/HF sources")
    max_record_bytes: int = Field(8 * 1024 * 1024, description="larger records/lines are rejected")
    clean: CleanConfig = CleanConfig()
    language: LanguageConfig = LanguageConfig()
    quality: QualityConfig = QualityConfig()
    pii: PiiConfig = PiiConfig()
    dedup: DedupConfig = DedupConfig()
    decontam: DecontamConfig = DecontamConfig()
    split: SplitConfig = SplitConfig()
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="augmented copies of train rows (after split)"
    )
    bias: BiasStatsConfig = BiasStatsConfig()
    samples_per_reason: int = Field(
        20, ge=0, description="removed documents kept per reason in samples/"
    )
    workers: int = Field(
        0, ge=0, description="worker processes (0 = all cores)", json_schema_extra=NOT_HASHED
    )
    batch_size: int = Field(
        64, ge=1, description="documents per task sent to a worker", json_schema_extra=NOT_HASHED
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="local processes or a Ray cluster", json_schema_extra=NOT_HASHED
    )
    address: str | None = Field(
        None, description="Ray cluster address (executor: ray)", json_schema_extra=NOT_HASHED
    )

    @field_validator("source", mode="before")
    @classmethod
    def _strings_to_specs(cls, value: object) -> object:
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"path": str(v)} if isinstance(v, (str, Path)) else v for v in value]
        return value

    def inputs(self) -> list[Path]:
        """Source files and eval sets: their content decides the cache.

        Also the first check of every source, so a missing path fails before the stage starts.
        """
        from lmforge.data.sources import check_source, source_files
        from lmforge.data.stdlib_docs import NAME, corpus_marker

        paths: list[Path] = []
        for spec in self.source:
            check_source(spec)
            if spec.path == NAME or spec.kind == NAME:
                paths.append(corpus_marker())
            paths += [Path(spec.path)] if Path(spec.path).is_dir() else source_files(spec)
        terms = [self.bias.terms] if self.bias.enabled and self.bias.terms else []
        return paths + list(self.decontam.eval_sets) + self.augment.inputs() + terms

    version_sources = (STDLIB_DOCS_VERSIONS,)

    def input_versions(self) -> dict[str, str]:
        """The stdlib-docs corpus format when it is a source: a corpus built by older code
        misses the cache (its topics file, an input, is unchanged by lmforge's code)."""
        from lmforge.data.stdlib_docs import NAME

        stdlib = any(spec.path == NAME or spec.kind == NAME for spec in self.source)
        return super().input_versions() if stdlib else {}
