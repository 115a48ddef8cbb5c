"""A checkpoint's generation_config as the defaults of the request fields a request leaves unset.

vLLM's `--generation-config auto`, for the fields lmforge serves: max_tokens from
max_new_tokens (an encoder-decoder's max_length - 1; without max_new_tokens, a decoder's max_length
minus the prompt's tokens, transformers' precedence), repetition_penalty, and the logits rules
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

from lmforge.errors import InputError
from lmforge.model.generation_defaults import read_generation_defaults, sampling_defaults
from lmforge.model.logits_rules import NO_RULES, LogitsRules


@dataclass(frozen=True)
class RequestDefaults:
    """What an unset request field becomes (None: the server's own default)."""

    max_tokens: int | None = None
    max_length: int | None = None  # a decoder's, the prompt included; max_tokens wins over it
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

    def max_tokens_for(self, prompt_len: int) -> int | None:
        """The max_tokens of a request that sets none for a prompt_len-token prompt: the
        checkpoint's max_new_tokens, else its max_length minus the prompt (as lmforge generate and
        transformers), else None (the server's own default). InputError when the prompt leaves
        no room under max_length, as transformers' ValueError."""
        if self.max_tokens is not None or self.max_length is None:
            return self.max_tokens
        if prompt_len >= self.max_length:
            raise InputError(
                f"the {prompt_len}-token prompt leaves no room under the checkpoint's max_length "
                f"{self.max_length} (generation_config.json; it counts the prompt); set max_tokens"
            )
        return self.max_length - prompt_len


NO_DEFAULTS = RequestDefaults()  # --generation-config none, or a checkpoint that sets nothing


def read_request_defaults(model_dir: Path | str, is_encoder_decoder: bool) -> RequestDefaults:
    """model_dir's checkpoint generation settings as request defaults (see the module)."""
    found = read_generation_defaults(model_dir, is_encoder_decoder)
    return RequestDefaults(
        max_tokens=found.get("max_new_tokens"),
        max_length=found.get("max_length"),  # a decoder's (read_generation_defaults)
        repetition_penalty=found.get("repetition_penalty"),
        rules=LogitsRules.from_keys(found),
        **sampling_defaults(model_dir),
    )
