"""Per-document steps: clean, language id, Gopher/C4/FineWeb filters, PII, split and k-fold."""

from __future__ import annotations

import pytest

from lmforge.data.clean import CleanStep
from lmforge.data.config import DataConfig
from lmforge.data.document import Document
from lmforge.data.language import LanguageStep
from lmforge.data.pii import PiiStep, luhn_valid
from lmforge.data.pipeline import quality_steps
from lmforge.data.quality import C4Filter, FineWebFilter, GopherQuality, GopherRepetition, ProseOnly
from lmforge.data.split import assign_fold, assign_split, mixture_copies
from lmforge.errors import ConfigError

from .corpus import prose


def doc(text: str) -> Document:
    return Document("d", text)


def test_clean_repairs_unicode_markup_and_whitespace():
    d = doc(
        "The caf\u00c3\u00a9 \uff21\uff22\uff23  had\x00 <b>bold</b> &amp; tags\u200b.\r\n\n\n\nEnd   "
    )
    assert CleanStep()(d) is None
    assert d.text == "The café ABC had bold & tags.\n\nEnd"
    d = doc("MiXeD")
    CleanStep(lowercase=True)(d)
    assert d.text == "mixed"
    assert CleanStep()(doc("\x00\x01 <p></p> ")) == "empty_after_clean"


def test_language_id_keeps_listed_languages_and_records_meta():
    step = LanguageStep(["en"], threshold=0.5)
    en, de = (
        doc(prose(0)),
        doc("Der Hund läuft schnell über die Straße, weil er die Katze sieht und spielen möchte."),
    )
    assert step(en) is None and en.meta["language"] == "en" and en.meta["language_score"] > 0.9
    assert step(de) == "language_de" and de.meta["language"] == "de"
    assert LanguageStep([], threshold=0.0)(de) is None


def test_gopher_quality_rules_fire_at_paper_defaults():
    g = GopherQuality()
    assert g(doc(prose(0))) is None
    assert g(doc("too short a text")) == "gopher_min_words"
    assert g(doc(" ".join(["a b c d"] * 20))) == "gopher_min_avg_word_length"
    assert g(doc(prose(1) + " #tag" * 40)) == "gopher_symbol_word_ratio"
    assert (
        g(doc("\n".join(f"- {s}" for s in prose(3).replace("\n\n", " ").split(". "))))
        == "gopher_bullet_lines"
    )
    assert g(doc(prose(2).replace(". ", " ...\n"))) == "gopher_ellipsis_lines"
    assert g(doc(" ".join(["1234 5678 river"] * 30))) == "gopher_alpha_words"
    assert g(doc(" ".join(["quiet river garden window"] * 20))) == "gopher_stop_words"


def test_gopher_repetition_detects_duplicated_lines_and_ngrams():
    r = GopherRepetition()
    assert r(doc(prose(2))) is None
    assert r(doc("\n\n".join([prose(3)[:200]] * 5))) == "gopher_dup_para_frac"
    assert r(doc(" ".join(["the river runs to the sea"] * 30))) in (
        "gopher_top_2gram",
        "gopher_top_3gram",
        "gopher_dup_5gram",
    )


def test_c4_removes_boilerplate_lines_and_drops_code():
    c4 = C4Filter()
    d = doc(
        prose(4).replace("\n\n", "\n")
        + "\nClick here\nPlease enable javascript in your browser now.\nRead our privacy policy today."
    )
    assert c4(d) is None
    assert (
        "Click here" not in d.text and "javascript" not in d.text and "privacy policy" not in d.text
    )
    assert c4(doc(prose(5) + " function f() { return 1; }")) == "c4_curly_bracket"
    assert c4(doc(prose(6) + " Lorem ipsum dolor sit amet.")) == "c4_lorem_ipsum"
    assert c4(doc("One sentence only here.")) == "c4_min_sentences"


def test_fineweb_line_rules():
    fw = FineWebFilter()
    assert fw(doc(prose(7))) is None
    assert (
        fw(
            doc(
                "\n".join(
                    ["menu item", "about", "contact", "a much longer line that still has no ending"]
                    * 3
                )
            )
        )
        == "fineweb_line_punct_ratio"
    )
    assert fw(doc("\n".join(f"Short line {i}." for i in range(20)))) == "fineweb_short_lines"
    assert (
        fw(doc(prose(8) + "\n" + "This exact long sentence repeats itself in the text.\n" * 3))
        == "fineweb_char_dup_ratio"
    )


def test_prose_only_drops_code_and_tables():
    p = ProseOnly()
    assert p(doc(prose(9))) is None
    assert p(doc(">>> import json\n>>> json.dumps(1)\n'1'\nThis is prose.")) == "prose_only_code"
    assert p(doc("| a | b |\n| 1 | 2 |\n| 3 | 4 |\nCaption text here.")) == "prose_only_table"


def test_lenient_preset_relaxes_only_unset_keys_and_disables_c4_fineweb():
    cfg = DataConfig.model_validate(
        {
            "source": ["x"],
            "out": "o",
            "quality": {"preset": "lenient", "gopher_quality": {"min_words": 30}},
        }
    )
    steps = {s.name: s for s in quality_steps(cfg.quality)}
    assert set(steps) == {"gopher_quality", "gopher_repetition"}
    assert steps["gopher_quality"].min_words == 30  # explicit value wins
    assert steps["gopher_quality"].min_stop_words == 0  # lenient value
    paper = {
        s.name: s
        for s in quality_steps(DataConfig.model_validate({"source": ["x"], "out": "o"}).quality)
    }
    assert set(paper) == {"gopher_quality", "gopher_repetition", "c4", "fineweb"}
    assert paper["gopher_quality"].min_words == 50


def test_pii_typed_placeholders_and_counts():
    step = PiiStep()
    d = doc(
        "Mail bob.smith@example.com, call +1 415-555-0132. Card 4111 1111 1111 1111 but not 4111 1111 1111 1112. Host 192.168.1.20, loopback 127.0.0.1, version 3.11.7."
    )
    assert step(d) is None
    assert (
        d.text
        == "Mail <EMAIL>, call <PHONE>. Card <CARD_NUMBER> but not 4111 1111 1111 1112. Host <IP_ADDRESS>, loopback 127.0.0.1, version 3.11.7."
    )
    assert step.counts == {"email": 1, "phone": 1, "card": 1, "ip": 1}
    assert luhn_valid("79927398713") and not luhn_valid("79927398714")


def test_split_is_stable_when_documents_are_added():
    keys = [f"document number {i}" for i in range(3000)]
    first = {k: assign_split(k, (0.7, 0.15, 0.15), seed=3) for k in keys}
    more = {
        k: assign_split(k, (0.7, 0.15, 0.15), seed=3)
        for k in keys + [f"new {i}" for i in range(500)]
    }
    assert all(more[k] == v for k, v in first.items())
    frac = sum(v == "train" for v in first.values()) / len(first)
    assert abs(frac - 0.7) < 0.03
    assert (
        sum(assign_split(k, (0.7, 0.15, 0.15), seed=4) != first[k] for k in keys) > 500
    )  # seed matters


def test_kfold_and_mixture_copies():
    folds = [assign_fold(f"x{i}", 5) for i in range(2000)]
    assert set(folds) == set(range(5)) and all(
        abs(folds.count(f) / 2000 - 0.2) < 0.04 for f in range(5)
    )
    assert all(mixture_copies(f"x{i}", 2.0) == 2 for i in range(100))
    half = sum(mixture_copies(f"x{i}", 0.5) for i in range(2000)) / 2000
    assert abs(half - 0.5) < 0.05


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="bands\\*rows"):
        DataConfig.model_validate({"source": ["x"], "out": "o", "dedup": {"bands": 20, "rows": 8}})
    with pytest.raises(ConfigError, match="must be 1"):
        DataConfig.model_validate({"source": ["x"], "out": "o", "split": {"train": 0.9}})


def test_stdlib_source_cache_depends_on_the_python_docs(tmp_path):
    from lmforge.data.stdlib_docs import corpus_marker

    (tmp_path / "a.txt").write_text("x")
    cfg = DataConfig.model_validate(
        {"source": ["stdlib-docs", str(tmp_path / "*.txt")], "out": "o"}
    )
    assert cfg.inputs() == [corpus_marker(), tmp_path / "a.txt"]
    assert corpus_marker().name == "topics.py"


def test_a_changed_stdlib_corpus_format_misses_the_cache_and_other_sources_keep_theirs(
    tmp_path, monkeypatch
):
    from lmforge.artifacts import input_hashes, run_stage
    from lmforge.data import stdlib_docs

    (tmp_path / "a.txt").write_text("x")
    files = DataConfig.model_validate({"source": [str(tmp_path / "a.txt")], "out": tmp_path / "f"})
    # a stage without the built-in corpus: its key is its files' hashes, as before versions
    assert files.input_versions() == {}
    assert list(input_hashes(files)) == [str(tmp_path / "a.txt")]
    cfg = DataConfig.model_validate({"source": ["stdlib-docs"], "out": tmp_path / "s"})
    assert cfg.input_versions() == {"stdlib-docs corpus format": str(stdlib_docs.CORPUS_FORMAT)}

    def build(cfg, ctx):  # stands in for the data stage: the cache is what is under test
        ctx.atomic_write_text(ctx.out / "train.txt", "corpus")

    assert not run_stage("data", cfg, build).cached
    assert run_stage("data", cfg, build).cached
    monkeypatch.setattr(stdlib_docs, "CORPUS_FORMAT", stdlib_docs.CORPUS_FORMAT + 1)
    assert files.input_versions() == {}
    assert not run_stage("data", cfg, build).cached  # a newer builder: rebuilt without --force
    assert run_stage("data", cfg, build).cached


def test_every_stage_built_from_the_stdlib_collector_keys_on_its_format():
    from lmforge.data.stdlib_docs import corpus_versions
    from lmforge.finetune.builtin_tasks import TasksConfig
    from lmforge.finetune.dialogue_data import DialoguesConfig
    from lmforge.serve.recipe_config import KnowledgeBaseStage

    for config in (TasksConfig, DialoguesConfig, KnowledgeBaseStage):
        assert config(out="o").input_versions() == corpus_versions(), config.__name__
