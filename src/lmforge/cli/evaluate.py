"""Commands that read a trained model: `eval` (a stage: tasks, one comparison table) and
`generate` (answers on stdout, no stage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lmforge.cli.options import ConfigOpt, ForceOpt, SetOpt, run_stage_command
from lmforge.common.logging import console


def eval_cmd(
    model: Annotated[
        list[Path] | None,
        typer.Option("--model", help="Model directory (HF layout) or training stage; repeatable."),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(help="Comma-separated tasks: task YAML, JSONL examples or data directories."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Stage directory: eval.json, errors, plots.")
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Evaluate one or more models on tasks and compare them in one table.

    Example: lmforge eval --model runs/x/pretrain --model runs/x/finetune --tasks runs/x/data,my_task.yaml --out runs/x/eval
    """
    values: dict[str, Any] = {"out": out}
    if model:
        values["models"] = [str(m) for m in model]
    if tasks:
        values["tasks"] = [t.strip() for t in tasks.split(",") if t.strip()]
    run_stage_command("eval", values, config, sets, force)


def generate_cmd(
    model: Annotated[
        Path, typer.Option(help="Model directory (HF layout) or a training stage directory.")
    ],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help='File of prompts: one per line, or .jsonl with a "prompt" field.'),
    ] = None,
    chat: Annotated[
        bool, typer.Option(help="Send prompts as user turns through the chat template.")
    ] = False,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="Most new tokens per answer; default 64.")
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="0 = greedy; default: the checkpoint's when it samples (do_sample, whose "
            "top_k/top_p then apply too), else 0.",
        ),
    ] = None,
    greedy: Annotated[
        bool,
        typer.Option(
            "--greedy", help="Decode greedily even when the checkpoint's generation config samples."
        ),
    ] = False,
    top_k: Annotated[int | None, typer.Option(min=1, help="Sample among the k best.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="1 = off; default 1.")] = None,
    num_beams: Annotated[
        int | None,
        typer.Option(
            min=1, help="Beam search width (with temperature 0); 1 = no beams; default 1."
        ),
    ] = None,
    length_penalty: Annotated[
        float | None,
        typer.Option(
            help="Beams only (refused without them): score = sum(log p) / length ** this "
            "(> 0: longer); default 1."
        ),
    ] = None,
    no_repeat_ngram_size: Annotated[
        int | None, typer.Option(min=0, help="Never repeat an n-gram of this size; 0 = off.")
    ] = None,
    min_new_tokens: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="No stop token before this many new tokens; replaces the checkpoint's "
            "min_length (0 turns it off).",
        ),
    ] = None,
    min_length: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="No stop token before the sequence, prompt included, has this many tokens "
            "(transformers' min_length); replaces the checkpoint's; --min-new-tokens wins.",
        ),
    ] = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Cut answers at this string (repeatable).")
    ] = None,
    json_schema: Annotated[
        str | None,
        typer.Option(
            "--json-schema",
            help="Answers are JSON this schema validates: a file or the schema's JSON text "
            "(serve's JSON-schema subset).",
        ),
    ] = None,
    regex: Annotated[
        str | None, typer.Option(help="Answers fullmatch this regular expression.")
    ] = None,
    choice: Annotated[
        list[str] | None,
        typer.Option("--choice", help="Each answer is exactly one of these (repeatable)."),
    ] = None,
    num_samples: Annotated[int, typer.Option(min=1, help="Answers per prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 16,
    out: Annotated[Path | None, typer.Option(help="Also write the answers here as JSONL.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    compile: Annotated[
        str,
        typer.Option(help="torch.compile the decoding step: off | on | auto (on for CUDA only)."),
    ] = "off",
    draft_model: Annotated[
        Path | None,
        typer.Option(
            help="Speculative decoding: this smaller model (same tokenizer) proposes tokens the "
            "model verifies; greedy only, the same answers, one prompt at a time."
        ),
    ] = None,
    draft_tokens: Annotated[
        int, typer.Option(min=1, help="Tokens the draft proposes per target pass.")
    ] = 4,
    draft_schedule: Annotated[
        str,
        typer.Option(
            help="constant: --draft-tokens every pass | heuristic: +2 after a pass that accepts "
            "every guess, -1 (to 1) after a miss, from --draft-tokens for each prompt "
            "(transformers' heuristic_transient num_assistant_tokens_schedule) | "
            "backoff: heuristic, and a pass at 1 that keeps nothing pauses the draft for 1, 2, "
            "4, ... plain steps (a draft that never agrees then costs little)."
        ),
    ] = "constant",
    draft_confidence: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Stop a pass's drafting after a guess the draft gives less than this "
            "probability (transformers' assistant_confidence_threshold, fixed).",
        ),
    ] = None,
) -> None:
    """Generate text from a model: raw continuation, or chat answers with --chat.

    Options left unset take the checkpoint's own defaults where its generation_config.json
    (or, older, config.json) sets them, as transformers' generate() does: sampling (do_sample
    with its temperature, top_k, top_p; transformers' top_k 50 when it sets none), max new
    tokens (or max_length, the prompt included), beams, length and repetition penalties,
    no-repeat n-grams, minimum lengths, forced first/last tokens; the command prints those it
    took. Options given always win; --greedy turns the checkpoint's sampling off.
    --json-schema, --regex or --choice (one at most) constrain every answer, greedy or sampled,
    as the server's structured outputs do (not with --num-beams or --draft-model).

    Example: lmforge generate --model runs/quickstart/sft --chat -p "What does os.path.join do?"
    """
    from lmforge.common.io import read_prompts, write_jsonl
    from lmforge.config import validate
    from lmforge.errors import ConfigError
    from lmforge.evals.lm import EvalModel, GenerationSettings
    from lmforge.evals.sample import sample
    from lmforge.model.generation_defaults import checkpoint_sampling

    if greedy and temperature:
        raise ConfigError(f"--greedy with --temperature {temperature}: pick one")
    given = {
        "max_new_tokens": max_new_tokens, "temperature": 0.0 if greedy else temperature,
        "top_k": top_k, "compile": compile,
        "top_p": top_p, "repetition_penalty": repetition_penalty, "stop": stop or [],
        "seed": seed, "num_beams": num_beams, "length_penalty": length_penalty,
        "no_repeat_ngram_size": no_repeat_ngram_size, "min_new_tokens": min_new_tokens,
        "min_length": min_length,
        "json_schema": None if json_schema is None else read_schema_option(json_schema),
        "regex": regex, "choice": choice or None,
    }  # fmt: skip
    check_draft_options(draft_model, draft_schedule, draft_confidence)
    if draft_model is not None and (json_schema or regex is not None or choice):
        raise ConfigError(
            "--draft-model with --json-schema/--regex/--choice: speculative decoding does not "
            "follow output constraints; drop one"
        )
    texts = [*(prompt or []), *(read_prompts(prompts) if prompts else [])]
    lm = EvalModel.load(model, device=device)
    # the checkpoint's sampling unless asked not to sample (speculative decoding and beams given
    # on the command line do not sample: transformers' beam sampling is not implemented); a
    # temperature given replaces its temperature alone, as generate(temperature=...) does
    asked = greedy or temperature == 0 or draft_model is not None or (num_beams or 1) > 1
    sampling = {} if asked else checkpoint_sampling(lm.path)
    given = {**sampling, **{k: v for k, v in given.items() if v is not None}}
    # unset options stay unset: EvalModel.settings_for fills them from the checkpoint
    asked_settings = validate(GenerationSettings, given, where="generate")
    settings = lm.settings_for(asked_settings)  # once: its warnings print once
    lm.row_constraint(settings)  # a constraint that does not compile fails before any work
    print_checkpoint_settings(lm, asked_settings, settings, sampling)
    if draft_model is not None:
        from lmforge.evals.speculative import speculative_sample

        draft = EvalModel.load(draft_model, device=device)
        rows, stats = speculative_sample(
            lm, draft, texts, settings, chat=chat, draft_tokens=draft_tokens,
            schedule=draft_schedule, confidence=draft_confidence, num_samples=num_samples,
        )  # fmt: skip
        console().print(
            f"draft acceptance {stats.acceptance_rate:.0%} ({stats.accepted}/{stats.proposed}), "
            f"{stats.tokens} tokens in {stats.target_passes} target passes"
        )
    else:
        rows = sample(
            lm, texts, settings, chat=chat, num_samples=num_samples, batch_size=batch_size
        )
    for row in rows:  # the answers are this command's data: stdout, even under --quiet
        typer.echo(f"> {row['prompt']}\n{row['completion']}\n")
    if out is not None:
        write_jsonl(out, rows)
        console().print(f"[green]✓[/green] {len(rows)} answers: {out}")


def check_draft_options(draft_model: Path | None, schedule: str, confidence: float | None) -> None:
    """ConfigError naming the flag, before any model loads: an unknown --draft-schedule, or
    --draft-schedule/--draft-confidence without the --draft-model they steer."""
    from lmforge.errors import ConfigError
    from lmforge.model.speculative import SCHEDULES

    if schedule not in SCHEDULES:
        raise ConfigError(f"--draft-schedule {schedule!r}: pick one of {', '.join(SCHEDULES)}")
    if draft_model is None and (schedule != "constant" or confidence is not None):
        raise ConfigError(
            "--draft-schedule/--draft-confidence steer a draft model's guesses: add "
            "--draft-model DIR or drop them"
        )


def read_schema_option(value: str) -> dict[str, Any]:
    """--json-schema's value: the schema's JSON text (it starts with "{") or a JSON file's path,
    as a JSON object."""
    import json

    from lmforge.errors import InputError

    where, text = "--json-schema", value
    if not value.lstrip().startswith(("{", "[")):
        path = Path(value)
        if not path.is_file():
            raise InputError(
                f"--json-schema {value}: no such file; pass a schema file or the schema's JSON text"
            )
        where, text = f"--json-schema file {path}", path.read_text(encoding="utf-8")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(
            f"{where} is not JSON ({err}); pass a schema file or the schema's JSON text"
        ) from err
    if not isinstance(schema, dict):
        raise InputError(f"{where} must be a JSON object (a schema), got {type(schema).__name__}")
    return schema


def print_checkpoint_settings(lm: Any, asked: Any, settings: Any, sampling: dict[str, Any]) -> None:
    """One line naming the decoding settings taken from lm's checkpoint (sampling: those of
    generation_defaults.checkpoint_sampling that no option replaced), if any; and one when its
    num_beams goes unused because it samples (transformers' beam sampling, not implemented) or
    an output constraint is given. asked: the options given; settings: lm.settings_for(asked)."""
    from lmforge.model.generation_defaults import sampling_defaults

    written = sampling_defaults(lm.path)
    taken = [
        f"{k}={written[k]}" if k in written else f"{k}={v} (transformers' default)"
        for k, v in sampling.items()
        if getattr(settings, k) == v  # not replaced by an option
    ]
    record = lm.checkpoint_record(asked, settings, sampling_applied=True)
    taken += [f"{k}={v}" for k, v in record["used"].items()]
    if taken:
        hint = "; --greedy to decode greedily" if sampling else ""
        console().print(
            f"from the checkpoint's generation config: {', '.join(taken)} (options given win{hint})",
            soft_wrap=True,
        )
    beams = lm.generation_defaults.get("num_beams", 1)
    if (
        sampling
        and settings.temperature > 0
        and beams > 1
        and "num_beams" not in asked.model_fields_set
    ):
        console().print(
            f"the checkpoint's num_beams={beams} with do_sample is transformers' beam sampling, "
            "which lmforge does not implement: sampling without beams (--greedy for its beam "
            "search)",
            soft_wrap=True,
        )
    elif beams > 1 and "num_beams" not in asked.model_fields_set and asked.output_constraint():
        console().print(
            f"the checkpoint's num_beams={beams}: beam search does not follow output "
            "constraints, so this decodes without beams",
            soft_wrap=True,
        )
