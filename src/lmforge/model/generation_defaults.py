"""A checkpoint's own generation defaults: what transformers' generate() would use unasked.

Hugging Face checkpoints carry decoding settings in generation_config.json (older ones: the same
keys in config.json, which transformers reads only when the file is absent), e.g. a summarizer's
num_beams 4, length_penalty 2.0, no_repeat_ngram_size 3, min_length 56, max_length 142 and its
forced bos/eos tokens. read_generation_defaults() returns the ones lmforge applies, under the
names GenerationSettings uses (transformers' own); settings the user gave win over them
(evals.lm.EvalModel.settings_for). Models lmforge builds write no such keys, so nothing changes
for them; one tuned from an imported checkpoint carries its base's (finetune.export). Sampling
keys (do_sample, temperature, top_k, top_p) are read apart (checkpoint_sampling): `lmforge
generate` samples as transformers would, while the eval stage decodes as its settings say and
records them as ignored (unapplied_keys). Other keys that change transformers' greedy or beam
outputs (NOT_APPLIED: suppressed or banned tokens, beam groups, ...) are not applied; a
checkpoint that sets one gets a warning (warn_not_applied).
"""

from __future__ import annotations

import logging
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from lmforge.common.json_cache import read_json_object
from lmforge.tokenizer.generation import GENERATION_CONFIG

log = logging.getLogger(__name__)

# the keys read, under transformers' names (GenerationSettings uses the same)
DEFAULT_KEYS = (
    "max_new_tokens",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
)


# keys transformers' generate() also reads that change greedy or beam outputs, with their
# defaults: lmforge does not apply them, so it warns when a checkpoint sets one
NOT_APPLIED = {
    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_decoder_ids": None, "sequence_bias": None, "encoder_no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0, "exponential_decay_length_penalty": None,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "renormalize_logits": False,
}  # fmt: skip


SAMPLING_KEYS = ("temperature", "top_k", "top_p")
# transformers' GenerationConfig values for the sampling keys a checkpoint leaves unset
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
# keys transformers' sampling also reads, with their defaults: lmforge's sampling does not apply
# them, so a checkpoint that samples with one set gets them named (unapplied_keys)
SAMPLING_NOT_APPLIED = {"typical_p": 1.0, "min_p": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def _checkpoint_source(model_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """(the file, its JSON object): generation_config.json, or config.json when there is no such
    file (as transformers does); (None, {}) when neither exists."""
    for path in (model_dir / GENERATION_CONFIG, model_dir / "config.json"):
        if path.is_file():
            return path, read_json_object(path)
    return None, {}


def checkpoint_generation_keys(model_dir: Path | str) -> dict[str, Any]:
    """The decoding keys (DEFAULT_KEYS and max_length) model_dir's checkpoint sets, as written:
    from generation_config.json, or from config.json when there is no such file (as transformers
    does). What an export of a model tuned from this checkpoint carries on, so it decodes alike."""
    _, source = _checkpoint_source(Path(model_dir))
    return {k: source[k] for k in (*DEFAULT_KEYS, "max_length") if source.get(k) is not None}


def sampling_defaults(model_dir: Path | str) -> dict[str, Any]:
    """temperature/top_k/top_p model_dir's checkpoint sets, only when it also sets do_sample
    true: transformers' generate() never samples otherwise, so they are no defaults then."""
    _, source = _checkpoint_source(Path(model_dir))
    if source.get("do_sample") is not True:
        return {}
    return {k: source[k] for k in SAMPLING_KEYS if source.get(k) is not None}


def checkpoint_sampling(model_dir: Path | str) -> dict[str, Any]:
    """The sampling transformers' generate() does unasked on model_dir's checkpoint, under
    GenerationSettings' names: {} unless it sets do_sample true; then its temperature, top_k and
    top_p, and transformers' defaults for those it leaves unset (HF_SAMPLING_DEFAULTS: top_k 50
    included; a top_k of 0, transformers' "off", becomes None)."""
    _, source = _checkpoint_source(Path(model_dir))
    if source.get("do_sample") is not True:
        return {}
    set_here = {k: source[k] for k in SAMPLING_KEYS if source.get(k) is not None}
    found = {**HF_SAMPLING_DEFAULTS, **set_here}  # serve's sampling_defaults, filled in
    return {**found, "top_k": found["top_k"] or None}


def unapplied_keys(model_dir: Path | str, *, sampling_applied: bool) -> dict[str, Any]:
    """The decoding keys model_dir's checkpoint sets that lmforge leaves out, as written:
    NOT_APPLIED's set away from their defaults and, unless sampling_applied (`lmforge generate`
    applies checkpoint_sampling, the eval stage does not), do_sample true with the sampling keys
    it sets; under do_sample true, SAMPLING_NOT_APPLIED's set away from their defaults too."""
    _, source = _checkpoint_source(Path(model_dir))
    samples = source.get("do_sample") is True
    unread = {**NOT_APPLIED, **(SAMPLING_NOT_APPLIED if samples else {})}
    keys = {
        k: source[k] for k, default in unread.items() if source.get(k) not in (None, [], default)
    }
    if not sampling_applied and samples:
        keys |= {k: source[k] for k in ("do_sample", *SAMPLING_KEYS) if source.get(k) is not None}
    return keys


def warn_not_applied(model_dir: Path | str) -> list[str]:
    """The keys of NOT_APPLIED model_dir's checkpoint sets away from their defaults, logged as a
    warning (its outputs may then differ from transformers' generate())."""
    keys = list(unapplied_keys(model_dir, sampling_applied=True))
    if keys:
        log.warning(
            "%s sets %s, which lmforge's decoding does not apply: its generations may differ "
            "from transformers' generate()", _checkpoint_source(Path(model_dir))[0],
            ", ".join(keys),
        )  # fmt: skip
    return keys


def read_generation_defaults(model_dir: Path | str, is_encoder_decoder: bool) -> dict[str, Any]:
    """The generation defaults model_dir's checkpoint sets, {} when it sets none.

    An encoder-decoder's max_length (the target, decoder start included) becomes
    max_new_tokens = max_length - 1 when max_new_tokens is not set; a decoder's stays
    max_length (its prompt included: each prompt's budget is max_length minus its length,
    GenerationSettings.max_length). A max_new_tokens set beside it wins, as in transformers.
    """
    found = checkpoint_generation_keys(model_dir)
    max_length = found.pop("max_length", None)
    if "max_new_tokens" in found or not isinstance(max_length, int):
        return found
    if is_encoder_decoder:
        found["max_new_tokens"] = max(max_length - 1, 1)
    else:
        found["max_length"] = max_length
    return found


def eval_leaves_out(defaults: dict[str, Any]) -> dict[str, Any]:
    """Pops from read_generation_defaults' result the key the eval stage does not apply and
    returns it ({} or {"max_length": n}): a decoder's max_length. Llama-2-style checkpoints set
    it to the whole context (4096), which would replace eval's own max_new_tokens with a budget
    of the context less the prompt; lm-evaluation-harness ignores it too. `lmforge generate` and
    serve follow it, as transformers does (an encoder-decoder's became max_new_tokens: kept)."""
    return {"max_length": defaults.pop("max_length")} if "max_length" in defaults else {}


def defaults_left_unset(
    model_dir: Path | str, given: AbstractSet[str], left_out: AbstractSet[str] = frozenset()
) -> dict[str, Any]:
    """The checkpoint's decoding keys (checkpoint_generation_keys) that settings giving the
    fields `given` leave to it, max_length counting as max_new_tokens: what a cache key must
    hold, since a field given at its default value hashes like one left unset. A superset of
    what settings_for applies (it also drops num_beams when sampling, min_length under
    min_new_tokens): an extra key costs a rerun, a missing one would reuse a stale result.
    Keys in left_out (eval_leaves_out's) are not applied: they are keyed as ignored instead."""
    found = checkpoint_generation_keys(model_dir)
    if "max_new_tokens" in given:
        found.pop("max_length", None)
    return {k: v for k, v in found.items() if k not in given and k not in left_out}
