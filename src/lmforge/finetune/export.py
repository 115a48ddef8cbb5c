"""Writes a trained model as the stage's outputs: adapter/ (LoRA) and final/ (HF layout).

Shared by every stage that trains a model from a model directory (finetune, align): the adapters
are saved in PEFT format and then merged, and final/ gets config.json + model.safetensors (a
*ForSequenceClassification when a classifier head is given; a mean-pooled head, which no
transformers class computes, goes beside the encoder as model.convert.MEAN_HEAD), the base's
tokenizer files and, for a causal LM, generation_config.json with the stops of the chat template
it was tuned on; the base's decoding keys come along, its forced eos moved to the token the tuned
model ends its answers with (tuned_decoding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.finetune.lora import lora_modules, merge, save_peft_adapter
from lmforge.model.generation_defaults import checkpoint_generation_keys
from lmforge.tokenizer.files import TokenizerFiles, copy_tokenizer_files
from lmforge.tokenizer.generation import (
    SPECIAL_KEYS,
    eos_ids,
    generation_config,
    load_generation_config,
)


def tuned_generation_config(model_dir: Path, tok: TokenizerFiles) -> dict[str, Any]:
    """final/'s generation_config.json: the base model's, with the stops of the chat template
    the model was tuned on (the base may have stopped at the document end only)."""
    return generation_config(tok, load_generation_config(model_dir, tok))


def tuned_decoding(model_dir: Path, tok: TokenizerFiles, end: int | None) -> dict[str, Any]:
    """The base's decoding keys (checkpoint_generation_keys: beams, n-grams, ...) for final/,
    with a forced_eos_token_id that named the base's end (its eos ids) now naming `end`, where
    the tuned model's answers end (a chat template's end of turn, an encoder-decoder's eos): the
    last token a length limit allows is then that one, in lmforge and transformers alike."""
    decoding = checkpoint_generation_keys(model_dir)
    forced = decoding.get("forced_eos_token_id")
    if forced is None or end is None:
        return decoding
    base_eos = set(eos_ids(load_generation_config(model_dir, tok)))
    if set(forced if isinstance(forced, list) else [forced]) <= base_eos:
        decoding["forced_eos_token_id"] = end
    return decoding


def answer_end(tok: TokenizerFiles) -> int | None:
    """The token a model tuned on tok's data ends its answers with: the chat template's end of
    turn, else eos."""
    turn = tok.turn_end_token()
    return tok.token_id(turn) if turn is not None else tok.eos_id


def export_model(
    ctx: Any,
    model_dir: Path,
    lm: nn.Module,
    tok: TokenizerFiles,
    *,
    classifier: Any = None,
    seq2seq_ids: dict[str, Any] | None = None,
    seq_len: int | None = None,
) -> None:
    """adapter/ when `lm` carries LoRA adapters (then merged into it) and final/.

    model_dir is the base the model started from (its special token ids and tokenizer files are
    carried over); tok is the tokenizer the data was encoded with: a classifier
    (model.convert.ClassifierHead) pools by its pad id, a causal LM stops at its chat template's
    end of turn. seq2seq_ids (an encoder-decoder's pad, eos, decoder start and bos) go into
    config.json and make up generation_config.json; model_dir then may hold only a tokenizer
    (a model trained from scratch). seq_len: the length a classifier's rows were cut at, which
    config.json records for eval to cut at (finetune.heads.SEQ_LEN_KEY) and
    tokenizer_config.json as model_max_length, where transformers' truncation=True cuts.
    """
    from lmforge.model.convert import save_pretrained

    if lora_modules(lm):
        head, task_type = _encoder_head(lm, classifier)
        with ctx.atomic_path(ctx.out / "adapter") as tmp:
            base = str(Path(model_dir).resolve())
            save_peft_adapter(lm, tmp, base_model=base, head=head, task_type=task_type)
        merge(lm)
    config_path = model_dir / "config.json"
    config_json = (
        json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    )
    special = {k: config_json[k] for k in SPECIAL_KEYS if config_json.get(k) is not None}
    generation, classifier_len = None, None
    if seq2seq_ids is not None:
        special.update(seq2seq_ids)
        eos = seq2seq_ids.get("eos_token_id")
        generation = {**tuned_decoding(model_dir, tok, eos), **seq2seq_ids}
    elif classifier is not None:  # a classifier generates nothing (transformers writes no file)
        special["pad_token_id"] = tok.pad_id
        if seq_len is not None:
            from lmforge.finetune.heads import SEQ_LEN_KEY

            special[SEQ_LEN_KEY] = classifier_len = seq_len
    else:
        decoding = tuned_decoding(model_dir, tok, answer_end(tok))  # over the base's own
        generation = {**tuned_generation_config(model_dir, tok), **decoding}
    with ctx.atomic_path(ctx.out / "final") as tmp:
        save_pretrained(
            lm, tmp, extra_config=special, classifier=classifier, generation_config=generation
        )
        copy_tokenizer_files(model_dir, tmp)
        if classifier_len is not None:
            record_max_length(tmp, classifier_len)


def record_max_length(tokenizer_dir: Path, seq_len: int) -> None:
    """Sets tokenizer_config.json's model_max_length to seq_len (the file made if absent), so
    transformers' truncation=True (a tokenizer call, pipeline("text-classification")) cuts a
    classifier's text where its fine-tune and lmforge eval do, not at the base's block size."""
    path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["model_max_length"] = seq_len
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _encoder_head(lm: nn.Module, classifier: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(an encoder classifier's head tensors under transformers' names, PEFT task type), which
    the adapter carries as modules_to_save; (None, None) for other models and a mean-pooled head
    (no transformers class holds it: final/ keeps it beside the encoder)."""
    from lmforge.model.hf_families import family_for

    if classifier is None or not classifier.encoder or classifier.pooling == "mean":
        return None, None
    task_type = "TOKEN_CLS" if classifier.per_token else "SEQ_CLS"
    return classifier.encoder_tensors(family_for(lm.config)), task_type
