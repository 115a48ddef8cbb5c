"""StageConfig.input_versions: built-in inputs' versions declared once (version_sources), cache
keys of default configs pinned to the values they had before that mechanism existed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import STDLIB_DOCS_VERSIONS, StageConfig, config_hash
from lmforge.data.config import DataConfig
from lmforge.data.stdlib_docs import corpus_versions
from lmforge.finetune.builtin_tasks import TasksConfig
from lmforge.finetune.dialogue_data import DialoguesConfig
from lmforge.serve.recipe_config import KnowledgeBaseStage
from lmforge.tune.stage import TuneConfig

STDLIB = {"stdlib-docs corpus format": "3"}  # stdlib_docs.CORPUS_FORMAT now

# (config_hash, input_versions) of each default config, computed at 733e5c3 (each stage's own
# input_versions body). A change here reruns every cached stage of that kind: on purpose only
# (e.g. a new CORPUS_FORMAT, which then updates STDLIB).
PINNED = {
    "stage": ("44136fa355b3678a", {}),
    "knowledge-base": ("6582a6bb8f8cf3a1", STDLIB),
    "dialogues": ("ee981c8cc77bf2c6", STDLIB),  # + small_talk_pii_copies (s7-chat): new data
    "tasks": ("90a8923c201fe177", STDLIB),
    "data-stdlib": ("d1855b1201081ec9", STDLIB),
    "data-file": ("7261d491ac556bfe", {}),
    "tune-dialogues": ("56833e89acc4a423", STDLIB),
}


def default_config(name: str, out: Path) -> StageConfig:
    configs = {
        "stage": lambda: StageConfig(out=out),
        "knowledge-base": lambda: KnowledgeBaseStage(out=out),
        "dialogues": lambda: DialoguesConfig(out=out),
        "tasks": lambda: TasksConfig(out=out),
        "data-stdlib": lambda: DataConfig(out=out, source=[{"path": "stdlib-docs"}]),
        "data-file": lambda: DataConfig(out=out, source=[{"path": "corpus.jsonl"}]),
        "tune-dialogues": lambda: TuneConfig(
            out=out, stage="dialogues", base={}, space={"seed": {"choices": [0, 1]}}
        ),
    }
    return configs[name]()


@pytest.mark.parametrize("name", PINNED)
def test_default_configs_keep_their_cache_keys(tmp_path: Path, name: str) -> None:
    cfg = default_config(name, tmp_path)
    assert (config_hash(cfg), cfg.input_versions()) == PINNED[name]


def test_the_pinned_corpus_version_is_the_corpus_own() -> None:
    assert corpus_versions() == STDLIB


def other_versions() -> dict[str, str]:
    return {"other builder": "7"}


def test_version_sources_are_merged_and_are_no_config_field(tmp_path: Path) -> None:
    class TwoSources(StageConfig):
        version_sources = (STDLIB_DOCS_VERSIONS, f"{__name__}:other_versions")

    assert TwoSources(out=tmp_path).input_versions() == {**STDLIB, "other builder": "7"}
    assert "version_sources" not in TwoSources.model_fields
    assert config_hash(TwoSources(out=tmp_path)) == config_hash(StageConfig(out=tmp_path))


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("lmforge.data.stdlib_docs.corpus_versions", "not of the form 'module:function'"),
        ("lmforge.data.stdlib_doc:corpus_versions", "No module named 'lmforge.data.stdlib_doc'"),
        ("lmforge.data.stdlib_docs:corpus_version", "has no attribute 'corpus_version'"),
    ],
)
def test_a_version_source_naming_nothing_says_which_config_and_entry(tmp_path, source, why):
    class Misnamed(StageConfig):
        version_sources = (source,)

    with pytest.raises(ImportError, match=rf"^Misnamed.version_sources: '{source}': .*{why}"):
        Misnamed(out=tmp_path).input_versions()
