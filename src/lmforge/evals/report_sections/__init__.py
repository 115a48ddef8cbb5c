"""Stage-specific parts of the run report, one builder per stage kind (see report.SECTIONS).

Each builder reads only what its stage left on disk and tells that stage's part of the story in
a sentence, a table and a plot, one module per area: data (data, tokenizer, tokens, tasks),
training (pretrain, finetune), align, tune, compress, dialogue; common holds the tolerant readers
and formatting they share. The eval stage's part is evals/report_eval.py.

Builders are tolerant: a missing or differently shaped file yields a short note, never a crash,
because a report of a half-finished run is still worth reading. Importing this package registers
every builder.
"""

from lmforge.evals.report_sections import (  # noqa: F401  (imported to register their sections)
    align,
    compress,
    data,
    dialogue,
    training,
    tune,
)
