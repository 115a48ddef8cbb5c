"""The recipe's serving stages: knowledge-base (kb/ + its index) and serve-config (serve.yaml)."""

from __future__ import annotations

import json

import pytest

from lmforge.artifacts import run_stage
from lmforge.config import load_yaml
from lmforge.errors import ConfigError
from lmforge.serve.recipe_config import KnowledgeBaseStage, ServeConfigStage, build, build_kb
from lmforge.serve.retrieval import KnowledgeBase
from lmforge.serve.retrieval_spec import RetrievalSpec

FUNCTIONS = [
    {"qualname": "os.path.join", "module": "os.path", "signature": "(a, *p)",
     "docstring": "Join two or more pathname components.\n\nMore detail that stays out."},
    {"qualname": "json.dumps", "module": "json", "signature": "(obj, **kw)",
     "docstring": "Serialize obj to a JSON formatted str."},
    {"qualname": "json.JSONDecoder.decode", "module": "json", "signature": "(self, s)",
     "docstring": "Return the Python representation of s."},
    {"qualname": "os.undocumented", "module": "os", "signature": "()", "docstring": "  "},
]  # fmt: skip


@pytest.fixture
def kb_dir(tmp_path, monkeypatch):
    import lmforge.data.stdlib_docs as stdlib_docs

    monkeypatch.setattr(stdlib_docs, "iter_functions", lambda: iter(FUNCTIONS))
    return run_stage("knowledge-base", KnowledgeBaseStage(out=tmp_path / "kb"), build_kb).out


def test_knowledge_base_stage_writes_a_passage_per_function(kb_dir):
    manifest = json.loads((kb_dir / "manifest.json").read_text())
    assert manifest["metrics"] == {"kb_functions": 3, "kb_files": 2, "kb_passages": 3}
    assert sorted(p.name for p in (kb_dir / "kb").iterdir()) == ["json.jsonl", "os.path.jsonl"]
    record = json.loads((kb_dir / "kb" / "os.path.jsonl").read_text())
    assert record == {"id": "os.path.join",
                      "text": "os.path.join(a, *p)\nJoin two or more pathname components."}  # fmt: skip
    kb = KnowledgeBase.open(kb_dir / "kb.db")
    try:  # a passage's source names its function
        assert kb.search("What is the signature of json.dumps?", 1)[0].source == "json.dumps"
        assert kb.search("which module is decode in", 1)[0].source == "json.JSONDecoder.decode"
    finally:
        kb.close()
    assert not list(kb_dir.glob(".*tmp*"))  # nothing half-written left beside them


def test_serve_config_points_at_the_kb_and_refuses_a_rag_model_without_one(
    kb_dir, tmp_path, serve_model_dir
):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(serve_model_dir, model)
    out = run_stage("serve-config", ServeConfigStage(out=tmp_path / "sc", model=model,
                                                      kb=kb_dir), build).out  # fmt: skip
    settings = load_yaml(out / "serve.yaml")
    assert settings["kb"] == str((kb_dir / "kb").resolve())
    plain = run_stage("serve-config", ServeConfigStage(out=tmp_path / "sc2", model=model), build)
    assert load_yaml(plain.out / "serve.yaml")["kb"] is None
    RetrievalSpec(passages=2, source_tokens=47).save(model)
    with pytest.raises(ConfigError, match=r"trained on knowledge-base passages.*kb: \"@kb\""):
        run_stage("serve-config", ServeConfigStage(out=tmp_path / "sc3", model=model), build)
