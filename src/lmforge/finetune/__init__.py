"""lmforge.finetune: SFT, LoRA/QLoRA, freezing, classification, multi-task and k-fold.

Public API: `finetune(FinetuneConfig(...)) -> Path` (the finetune stage) and
`make_tasks(TasksConfig(...)) -> Path` (the built-in stdlib tasks), plus the pieces in formats,
lora, freeze, heads, sft, evaluate and kfold. Imports are lazy so `import lmforge.finetune`
does not pull in torch.
"""

from __future__ import annotations

from lmforge.common.lazy import lazy_getattr

_EXPORTS = {
    "FinetuneConfig": "lmforge.finetune.config",
    "finetune": "lmforge.finetune.stage",
    "TasksConfig": "lmforge.finetune.builtin_tasks",
    "make_tasks": "lmforge.finetune.builtin_tasks",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
