"""The stage commands that train weights: pretrain, finetune, align, and tune (a search over
any stage's config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lmforge.cli.options import ConfigOpt, ForceOpt, SetOpt, run_stage_command


def pretrain_cmd(
    tokens: Annotated[
        Path | None, typer.Option(help="Token shard directory (lmforge tokenizer encode).")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer directory the shards were made with.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Stage directory: final/, checkpoints/, metrics.")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Model preset (micro, tiny, small, gpt2-124m, llama-1b, bert-tiny, ...)."
        ),
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option(help="clm (next token, decoders) | mlm (masked tokens, bert-* presets)."),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Pretrain a Transformer on token shards (resumes a killed run from its checkpoints).

    Example: lmforge pretrain --tokens runs/x/tokens --tokenizer runs/x/tokenizer --out runs/x/pretrain --set train.max_steps=200
    Masked LM (the tokenizer needs a mask token: tokenizer train --set special_tokens.mask='[MASK]'):
    lmforge pretrain --objective mlm --preset bert-tiny --tokens runs/x/tokens --tokenizer runs/x/tokenizer --out runs/x/mlm
    Distributed: torchrun --nproc-per-node 2 -m lmforge.cli pretrain ... --set train.distributed=ddp
    """
    values: dict[str, Any] = {"tokens": tokens, "tokenizer": tokenizer, "out": out}
    values["objective"] = objective
    if preset is not None:
        values["model"] = {"preset": preset}
    run_stage_command("pretrain", values, config, sets, force)


def finetune_cmd(
    model: Annotated[
        Path | None, typer.Option(help="Model directory (HF layout + tokenizer files).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Data: .jsonl/.parquet file, directory or HF dataset.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Stage directory: final/, adapter/, metrics.")
    ] = None,
    method: Annotated[str | None, typer.Option(help="full | lora")] = None,
    task: Annotated[
        str | None,
        typer.Option(help="sft | classify | multitask | tag (encoders) | seq2seq (BART/T5)"),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Fine-tune a model: chat SFT, classification, tagging or seq2seq, full or LoRA (resumes).

    Example: lmforge finetune --model runs/x/pretrain/final --data runs/x/tasks/explain_train.jsonl --out runs/x/sft --method lora --set train.max_steps=200
    Token tagging on an encoder ({"tokens": [...], "tags": [...]} JSONL):
    lmforge finetune --model runs/mlm/pretrain --data ner.jsonl --task tag --out runs/mlm/ner
    Sentence pairs ({"text", "text_pair", "label"}) on an encoder, mean-pooled (not exportable):
    lmforge finetune --model runs/mlm/pretrain --data pairs.jsonl --task classify --out runs/mlm/nli --set pooling=mean
    An encoder-decoder on {"source", "target"} JSONL, from a BART/T5 dir or from scratch:
    lmforge finetune --model TOKENIZER_DIR --data pairs.jsonl --task seq2seq --out runs/s2s --set from_scratch=bart-micro
    """
    values: dict[str, Any] = {"model": model, "data": data, "out": out}
    values.update({k: v for k, v in (("method", method), ("task", task)) if v is not None})
    run_stage_command("finetune", values, config, sets, force)


def align_cmd(
    model: Annotated[
        Path | None, typer.Option(help="Model directory (HF layout + tokenizer), e.g. the SFT one.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Preference pairs: prompt/chosen/rejected or ranked JSONL (kto: also unpaired "
            "prompt/completion/label), a feedback-export directory, or the serving feedback "
            "store (.db) itself."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Stage directory: final/, metrics.")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="reward (reward model) | dpo (policy from pairs against a reference) | simpo, "
            "orpo (policy from pairs, no reference) | ppo (policy from a reward model) | kto "
            "(policy from unpaired thumbs up/down against a reference) | grpo (policy from "
            "verifiable rewards of groups of its own answers)"
        ),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Align a model on preference pairs: a reward model, or a policy by DPO / IPO, SimPO, ORPO,
    PPO, KTO (unpaired feedback) or GRPO (verifiable rewards).

    Example: lmforge align --model runs/quickstart/sft --data runs/align/prefs/prefs_train.jsonl --out runs/x/dpo --method dpo --set dpo.beta=0.1
    KTO straight from the serving feedback store (rated answers, thumbs up/down, choices unpaired):
    lmforge align --model runs/quickstart/sft --data runs/serve/feedback.db --out runs/x/kto --method kto --set kto.desirable_min_rating=4
    GRPO on a ROUGE-L reward against each prompt's reference, with a length term:
    lmforge align --model runs/quickstart/sft --data runs/align/prefs/prefs_train.jsonl --out runs/x/grpo --method grpo --set tuning=lora --set 'grpo.rewards=[{kind: rouge_l}, {kind: length, max_tokens: 24, weight: 0.02}]'
    """
    values: dict[str, Any] = {"model": model, "data": data, "out": out}
    if method is not None:
        values["method"] = method
    run_stage_command("align", values, config, sets, force)


def tune_cmd(
    out: Annotated[
        Path | None,
        typer.Option(help="Stage directory: trials/ (runs, study.db), trials.csv, best.yaml."),
    ] = None,
    trials: Annotated[
        int | None, typer.Option(min=1, help="Trials to finish, over all workers of the study.")
    ] = None,
    sampler: Annotated[str | None, typer.Option(help="grid | random | tpe")] = None,
    pruner: Annotated[str | None, typer.Option(help="none | median | halving")] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna database URL shared by workers (default: OUT/trials/study.db)."),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Search hyperparameters of any stage with Optuna; each trial is a stage run in trials/<n>/.

    The YAML names the stage, its base config and the space of dotted keys, e.g.
    stage: pretrain, base: {tokens: ..., tokenizer: ...}, space: {train.lr: {low: 1e-4, high: 3e-2, log: true}}.
    Start the same command on more machines with one --storage URL to share the study.

    Example: lmforge tune --config tune.yaml --trials 20 --out runs/x/tune
    """
    values = {
        "out": out, "trials": trials, "sampler": sampler, "pruner": pruner, "storage": storage,
    }  # fmt: skip
    run_stage_command("tune", values, config, sets, force)
