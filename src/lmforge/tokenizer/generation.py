"""generation_config.json: the tokens a model directory's generations stop at, kept in one place.

transformers' generate() stops only at generation_config.eos_token_id, and without the file it
falls back to config.json's single eos (the document end), so a chat model talks on past the
end of its reply. Every causal LM directory lmforge writes therefore carries the file, listing
the document end and the chat template's end-of-turn token, with bos and pad as transformers-saved
chat models have them; and everything in lmforge that generates from a directory (EvalModel, so
`lmforge generate` and the eval stage) takes its stop set from load_generation_config(), so
lmforge and transformers stop at the same tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.common.json_cache import read_json_object
from lmforge.errors import InputError
from lmforge.tokenizer.files import TokenizerFiles

GENERATION_CONFIG = "generation_config.json"
SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def generation_config(files: TokenizerFiles, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The generation_config.json of a model that uses this tokenizer.

    base is the configuration inherited, e.g. the base model's when fine-tuning; its other keys
    (sampling defaults) are kept. eos_token_id lists base's eos ids, then the tokenizer's eos and
    the chat template's end-of-turn token (files.stop_ids()); bos and pad come from base, else
    from the tokenizer.
    """
    gen = dict(base or {})
    gen["eos_token_id"] = list(dict.fromkeys([*eos_ids(gen), *files.stop_ids()]))
    for key, value in (("bos_token_id", files.bos_id), ("pad_token_id", files.pad_id)):
        if gen.get(key) is None and value is not None:
            gen[key] = value
    return {k: v for k, v in gen.items() if v is not None}


def load_generation_config(
    model_dir: Path | str, files: TokenizerFiles | None = None
) -> dict[str, Any]:
    """What a model directory generates with: its generation_config.json.

    A directory without one (exported before lmforge wrote it, or by a tool that does not) gets
    what lmforge would write for it: generation_config() of its tokenizer over config.json's
    special ids. files: the directory's tokenizer, when already loaded.
    """
    model_dir = Path(model_dir)
    path = model_dir / GENERATION_CONFIG
    if path.is_file():
        gen = read_json_object(path)
        eos_ids(gen, path)  # a malformed eos_token_id is an error here, not mid-generation
        return gen
    config = (
        read_json_object(model_dir / "config.json") if (model_dir / "config.json").is_file() else {}
    )
    base = {k: config[k] for k in SPECIAL_KEYS if config.get(k) is not None}
    return generation_config(files or TokenizerFiles.load(model_dir), base)


def eos_ids(gen: dict[str, Any], path: Path | None = None) -> list[int]:
    """eos_token_id of a generation config as a list (transformers allows one id or a list)."""
    eos = gen.get("eos_token_id")
    ids = [] if eos is None else [eos] if type(eos) is int else eos
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        where = path or GENERATION_CONFIG
        raise InputError(
            f"{where}: eos_token_id must be a token id or a list of ids, got {eos!r}; fix or "
            "delete the file (lmforge then derives it from the tokenizer)"
        )
    return list(ids)
