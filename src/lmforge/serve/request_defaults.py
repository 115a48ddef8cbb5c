"""A checkpoint's generation_config as the defaults of the request fields a request leaves unset.

vLLM's `--generation-config auto`, for the fields lmforge serves: max_tokens from
max_new_tokens (an encoder-decoder's max_length - 1), repetition_penalty, and the logits rules
(no_repeat_ngram_size, min_length, min_new_tokens, forced BOS/EOS: model/logits_rules.py), all
read by model/generation_defaults.py, the reader `lmforge generate` and eval use, so a greedy
request decodes as `lmforge generate` does. The sampling keys (temperature, top_k, top_p) count
as transformers counts them: only when the checkpoint sets do_sample true; otherwise they are
settings its generate() never uses, and a request keeps OpenAI's defaults. A field the request
sets always wins. Beam settings (num_beams, length_penalty, early_stopping) are not served: the
engine does not decode beams. Our own exports write none of these keys: nothing changes for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.model.generation_defaults import read_generation_defaults, sampling_defaults
from lmforge.model.logits_rules import NO_RULES, LogitsRules


@dataclass(frozen=True)
class RequestDefaults:
    """What an unset request field becomes (None: the server's own default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    rules: LogitsRules = field(default=NO_RULES)

    def pick(self, name: str, asked: Any, fallback: Any) -> Any:
        """The request's value when it set one, else this checkpoint's, else `fallback`."""
        if asked is not None:
            return asked
        mine = getattr(self, name)
        return fallback if mine is None else mine


NO_DEFAULTS = RequestDefaults()  # --generation-config none, or a checkpoint that sets nothing


def read_request_defaults(model_dir: Path | str, is_encoder_decoder: bool) -> RequestDefaults:
    """model_dir's checkpoint generation settings as request defaults (see the module)."""
    found = read_generation_defaults(model_dir, is_encoder_decoder)
    return RequestDefaults(
        max_tokens=found.get("max_new_tokens"),
        repetition_penalty=found.get("repetition_penalty"),
        rules=LogitsRules.from_keys(found),
        **sampling_defaults(model_dir),
    )
