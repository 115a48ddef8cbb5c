"""lmforge.data: raw sources -> a clean, deduplicated, decontaminated, split corpus.

`prepare(cfg)` runs the data stage (see stage.py for the flow, config.py for every key);
readers, steps and dedup are usable on their own.
"""

from lmforge.data.config import DataConfig, SourceSpec
from lmforge.data.document import Document, Reject
from lmforge.data.stage import build, prepare

__all__ = ["DataConfig", "Document", "Reject", "SourceSpec", "build", "prepare"]
