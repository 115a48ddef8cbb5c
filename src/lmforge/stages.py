"""The registry of stage kinds: kind -> where its config class and build function live.

Imported lazily so `lmforge --help` and the data stage never pay for importing torch. A kind
whose module is not importable is simply not available (and not listed).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.config import StageConfig
from lmforge.errors import ConfigError

# kind -> "module:ConfigClass:build_function"
STAGES: dict[str, str] = {
    "tokenizer": "lmforge.tokenizer.train:TokenizerConfig:build",
    "tokens": "lmforge.tokenizer.encode:EncodeConfig:build",
    "pretrain": "lmforge.train.pretrain:PretrainConfig:build",
    "eval": "lmforge.evals.stage:EvalConfig:build",
    "finetune": "lmforge.finetune.stage:FinetuneConfig:build",
    "data": "lmforge.data.stage:DataConfig:build",
    "tasks": "lmforge.finetune.builtin_tasks:TasksConfig:build",
    "dialogues": "lmforge.finetune.dialogue_data:DialoguesConfig:build",
    "dialogue": "lmforge.finetune.dialogue:DialogueConfig:build",
    "tune": "lmforge.tune.stage:TuneConfig:build",
    "align": "lmforge.align.stage:AlignConfig:build",
    "preferences": "lmforge.align.synthetic:PreferencesConfig:build",
    "code_problems": "lmforge.align.code_synthetic:CodeProblemsConfig:build",
    "compress": "lmforge.compress.stage:CompressConfig:build",
    "feedback-export": "lmforge.serve.feedback_export:FeedbackExportConfig:build",
    "knowledge-base": "lmforge.serve.recipe_config:KnowledgeBaseStage:build_kb",
    "serve-config": "lmforge.serve.recipe_config:ServeConfigStage:build",
}

# Kinds whose build() joins a torchrun process group and works on every rank. Under torchrun,
# `lmforge run` runs every other kind on rank zero only while the other ranks wait for it.
DISTRIBUTED_KINDS = {"pretrain"}


@dataclass(frozen=True)
class StageKind:
    """A resolved registry entry."""

    kind: str
    config_cls: type[StageConfig]
    build: Callable[..., dict[str, Any] | None]


def register(kind: str, target: str) -> None:
    """Adds a stage kind ("module:ConfigClass:build"); tests use it for toy stages."""
    STAGES[kind] = target


def get_stage(kind: str) -> StageKind:
    """Imports and returns a stage kind; unknown kinds list the valid ones."""
    target = STAGES.get(kind)
    if target is None:
        valid = ", ".join(sorted(STAGES)) or "none"
        raise ConfigError(f"unknown stage kind '{kind}' (valid kinds: {valid})")
    module_name, cls_name, fn_name = target.split(":")
    module = importlib.import_module(module_name)
    return StageKind(kind, getattr(module, cls_name), getattr(module, fn_name))
