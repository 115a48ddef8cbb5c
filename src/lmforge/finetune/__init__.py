"""lmforge.finetune: SFT, LoRA/QLoRA, freezing, classification, multi-task and k-fold.

Public API: `finetune(FinetuneConfig(...)) -> Path` (the stage), `make_tasks(TasksConfig(...))`
(built-in tasks on the stdlib docs), and the pieces in formats, lora, freeze, heads and sft.
Imports are lazy so `import lmforge.finetune` does not pull in torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FinetuneConfig", "finetune"]


def __getattr__(name: str) -> Any:
    if name in ("FinetuneConfig", "finetune"):
        from lmforge.finetune import stage

        return getattr(stage, name)
    raise AttributeError(f"module 'lmforge.finetune' has no attribute {name!r}")
