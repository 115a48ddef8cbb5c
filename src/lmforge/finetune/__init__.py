"""lmforge.finetune: SFT, LoRA/QLoRA, freezing, classification, multi-task and k-fold.

Public API: `finetune(FinetuneConfig(...)) -> Path` (the finetune stage) and
`make_tasks(TasksConfig(...)) -> Path` (the built-in stdlib tasks), plus the pieces in formats,
lora, freeze, heads, sft, evaluate and kfold. Imports are lazy so `import lmforge.finetune`
does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FinetuneConfig": "lmforge.finetune.stage",
    "finetune": "lmforge.finetune.stage",
    "TasksConfig": "lmforge.finetune.builtin_tasks",
    "make_tasks": "lmforge.finetune.builtin_tasks",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.finetune' has no attribute {name!r}")
