"""The feedback store as training data (stage kind "feedback-export"): the next fine-tune,
DPO or KTO round learn from what people rated.

- `sft.jsonl`: well-rated responses (mean rating >= min_rating on the 1..5 scale; thumbs up = 5)
  as `{"messages": [...prompt..., {"role": "assistant", ...}]}`, the finetune stage's openai
  shape. A completion (no chat messages) becomes one user turn, as finetune reads
  prompt/completion records. A tool request's row keeps OpenAI's form: the assistant's
  `tool_calls` (arguments as JSON objects, as chat templates take them), `tool` results and
  `tools`, so the model's own template renders the prompt that was served (rows stored before
  the server kept this form hold Hermes turns and export as they are).
- `preferences.jsonl`: `{"prompt", "chosen", "rejected", "kind"}`, align.prefs' pair shape,
  from side-by-side choices (kind "choice"; both answers must come from the same conversation,
  or the same prompt text for completions) and from two responses to the same prompt whose
  mean ratings differ by at least min_rating_gap (kind "rating").
- `kto.jsonl`: `{"prompt", "completion", "label", "kind", "response_id"}`, TRL's unpaired KTO
  shape (align.unpaired): each rated response whose mean rating is at least desirable_min_rating
  (label true) or at most undesirable_max_rating (false), with its `rating` (kind "rating"), and
  both sides of each side-by-side choice that made a pair above, chosen true and rejected false
  (kind "choice"); a response takes each label once.

In both, a tool request's prompt keeps OpenAI's form as in sft.jsonl, with its `tools` beside it,
so that align renders it as it was served (through a template that reads `tools`, else as Hermes
turns); Hermes-form rows keep their turns. The answers are the stored texts: tool calls as the
`<tool_call>` blocks the model wrote.

A tool call cut by max_tokens (a tool request's answer with finish_reason "length" that holds a
`<tool_call>` block) is left out of all three, counted as skipped_cut_calls: the store keeps a cut
call's arguments as a JSON string fragment, which reads as a complete call with string arguments
and would teach that. A cut plain answer stays in: its text is what the rater saw, a true prefix
of what the model writes. (Rows stored before the finish_reason was recorded count as complete.)

The manifest (run_stage's, written last) carries the counts. `lmforge align --data` also takes
this directory, or the database itself (align.prefs exports it through the stage registry).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from lmforge.artifacts import StageContext, run_stage
from lmforge.common.io import write_jsonl
from lmforge.config import StageConfig
from lmforge.errors import InputError
from lmforge.serve.feedback import FeedbackStore
from lmforge.tokenizer.hermes_tools import (
    TOOL_CALL_OPEN,
    has_tool_turns,
    hermes_messages,
    openai_turns,
    parse_tool_calls,
)

__all__ = ["FeedbackExportConfig", "build", "export_feedback"]


class FeedbackExportConfig(StageConfig):
    """`lmforge data feedback-export --db FILE --out DIR [--min-rating N]`."""

    db: Path = Field(description="the feedback store (SQLite) the server wrote")
    min_rating: float = Field(
        4.0, ge=1, le=5, description="SFT keeps responses whose mean rating (1..5) is at least this"
    )
    min_rating_gap: float = Field(
        1.0, gt=0, le=4, description="rating pairs: the better response's mean exceeds by this"
    )
    rating_pairs: bool = Field(True, description="also pair differently-rated responses")
    desirable_min_rating: float = Field(
        4.0, ge=1, le=5, description="kto.jsonl: responses rated at least this are desirable"
    )
    undesirable_max_rating: float = Field(
        2.0, ge=1, le=5, description="kto.jsonl: responses rated at most this are undesirable"
    )

    @model_validator(mode="after")
    def _thresholds_apart(self) -> FeedbackExportConfig:
        if self.undesirable_max_rating >= self.desirable_min_rating:
            raise ValueError(
                f"undesirable_max_rating={self.undesirable_max_rating} must be below "
                f"desirable_min_rating={self.desirable_min_rating}: one rating is both"
            )
        return self

    def inputs(self) -> list[Path]:
        return [self.db]


def _openai_form(response: dict[str, Any]) -> bool:
    """Whether a row keeps a conversation in OpenAI's form (tool calls, tool results, the tools
    in its params), as the server stores tool requests now; older rows hold Hermes turns, and a
    completion none."""
    messages = response["messages"]
    return bool(messages) and (
        response["params"].get("messages_form") == "openai" or has_tool_turns(messages)
    )


def _tool_turns(response: dict[str, Any], make: Any, *args: Any) -> list[dict[str, Any]]:
    """make(messages, *args) of a row in OpenAI's form; a conversation it refuses (a tool result
    that answers no call, arguments that are not JSON) is an InputError naming the row."""
    try:
        return make(response["messages"], *args)
    except InputError as exc:
        raise InputError(
            f"feedback store row {response['id']!r}: {exc}; the server refuses such a "
            "conversation now: correct or delete that row"
        ) from None


def _openai_prompt(response: dict[str, Any]) -> dict[str, Any]:
    """A row in OpenAI's form: {"prompt": its messages as openai_turns gives them} with
    {"tools": [...]} when it had tools, so align renders the prompt that was served."""
    tools = response["params"].get("tools")
    return {"prompt": _tool_turns(response, openai_turns), **({"tools": tools} if tools else {})}


def _plain_prompt(response: dict[str, Any]) -> list[dict[str, Any]] | str:
    """Any other row's prompt: a Hermes-form row's role/content turns, else the raw text."""
    if response["messages"]:
        return [{"role": m["role"], "content": m["content"]} for m in response["messages"]]
    return response["prompt"]


def _prompt(response: dict[str, Any]) -> dict[str, Any]:
    """The prompt fields of align's records: {"prompt": the chat messages or the raw text},
    with the tools of a row in OpenAI's form."""
    return (
        _openai_prompt(response) if _openai_form(response) else {"prompt": _plain_prompt(response)}
    )


def _prompt_key(response: dict[str, Any]) -> str:
    """Prompts compare as the Hermes turns they render to, so that rows of one conversation
    stored in either form (older rows hold Hermes turns) are one prompt."""
    if _openai_form(response):
        tools = response["params"].get("tools")
        return json.dumps(_tool_turns(response, hermes_messages, tools), sort_keys=True)
    return json.dumps(_plain_prompt(response), sort_keys=True)


def _cut_call(response: dict[str, Any]) -> bool:
    """Whether a response is a tool request's answer cut by max_tokens inside its calls."""
    params = response["params"]
    return (
        bool(params.get("tools"))
        and params.get("finish_reason") == "length"
        and TOOL_CALL_OPEN in response["text"]
    )


def _answer(response: dict[str, Any]) -> dict[str, Any]:
    """The answer as an OpenAI assistant message: the calls the stored (Hermes) text holds, when
    the model was let call tools, with their arguments as JSON objects (as in openai_turns)."""
    text, params = response["text"], response["params"]
    content, calls = (text, []) if params.get("tool_choice") == "none" else parse_tool_calls(text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"type": "function", "function": {"name": name, "arguments": json.loads(arguments)}}
            for name, arguments in calls
        ]
    return message


def _sft_record(response: dict[str, Any]) -> dict[str, Any]:
    """The finetune stage's openai record: a row in OpenAI's form keeps it, with its tools, so
    that the model's own chat template, given `tools` (transformers' apply_chat_template, as TRL
    passes them), renders the prompt that was served. `lmforge finetune` reads it as the Hermes
    turns serve renders for a template without tools (ChatML), with any template; a Hermes-form
    row keeps its role/content turns."""
    meta = {"response_id": response["id"], "rating": round(response["stars"], 3)}
    if _openai_form(response):
        fields = _openai_prompt(response)
        return {"messages": [*fields.pop("prompt"), _answer(response)], **fields, **meta}
    prompt = _plain_prompt(response)
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {"messages": [*turns, {"role": "assistant", "content": response["text"]}], **meta}


def _pair(prompt: dict, chosen: dict, rejected: dict, kind: str) -> dict[str, Any] | None:
    if chosen["text"].strip() == rejected["text"].strip() or not chosen["text"].strip():
        return None  # nothing to prefer
    return {
        **prompt,
        "chosen": chosen["text"],
        "rejected": rejected["text"],
        "kind": kind,
        "chosen_id": chosen["id"],
        "rejected_id": rejected["id"],
    }


def _kto_record(prompt: dict, response: dict, label: bool, kind: str) -> dict[str, Any]:
    record = {**prompt, "completion": response["text"], "label": label, "kind": kind,
              "response_id": response["id"]}  # fmt: skip
    if kind == "rating":
        record["rating"] = round(response["stars"], 3)
    return record


def unpaired(cfg: FeedbackExportConfig, rated: list[dict], choices: list[dict]) -> list[dict]:
    """kto.jsonl's records: rated responses past either threshold, then both sides of the
    choices (those that made preference pairs); a response takes each label at most once."""
    records, seen = [], set()
    for r in rated:
        good, bad = r["stars"] >= cfg.desirable_min_rating, r["stars"] <= cfg.undesirable_max_rating
        if (good or bad) and r["text"].strip():
            seen.add((r["id"], good))
            records.append(_kto_record(_prompt(r), r, good, "rating"))
    for c in choices:
        for side, label in (("chosen", True), ("rejected", False)):
            response = c[side]
            if (response["id"], label) not in seen and response["text"].strip():
                seen.add((response["id"], label))
                records.append(_kto_record(_prompt(response), response, label, "choice"))
    return records


def collect(
    cfg: FeedbackExportConfig,
) -> tuple[list[dict], list[dict], list[dict], dict[str, int]]:
    """(sft records, preference pairs, kto records, counts) read from the store."""
    if not Path(cfg.db).is_file():
        raise InputError(
            f"feedback store {cfg.db} does not exist; pass the SQLite file `lmforge serve` wrote"
        )
    with FeedbackStore(cfg.db, read_only=True) as store:  # never waits on a writing server
        totals = store.counts()
        rated = list(store.iter_rated())
        choices = list(store.iter_choices())
    cut = {r["id"] for r in rated if _cut_call(r)} | {
        side["id"] for c in choices for side in (c["chosen"], c["rejected"]) if _cut_call(side)
    }
    rated = [r for r in rated if r["id"] not in cut]
    choices = [c for c in choices if not {c["chosen"]["id"], c["rejected"]["id"]} & cut]
    sft, seen = [], set()
    for r in rated:
        key = (_prompt_key(r), r["text"])
        if r["stars"] >= cfg.min_rating and r["text"].strip() and key not in seen:
            seen.add(key)
            sft.append(_sft_record(r))
    pairs, skipped, mismatched, paired_choices = [], 0, 0, []
    for c in choices:
        # the pair's prompt is the conversation the answers were generated from (the choice's
        # own optional prompt text is only a note); answers to different prompts are no pair
        if _prompt_key(c["chosen"]) != _prompt_key(c["rejected"]):
            mismatched += 1
            continue
        pair = _pair(_prompt(c["chosen"]), c["chosen"], c["rejected"], "choice")
        skipped += pair is None
        pairs.extend([pair] if pair else [])
        paired_choices.extend([c] if pair else [])
    n_choice_pairs = len(pairs)
    if cfg.rating_pairs:
        by_prompt: dict[str, list[dict]] = {}
        for r in rated:
            by_prompt.setdefault(_prompt_key(r), []).append(r)
        for group in by_prompt.values():
            for a, b in itertools.combinations(sorted(group, key=lambda r: -r["stars"]), 2):
                if a["stars"] - b["stars"] >= cfg.min_rating_gap:
                    pair = _pair(_prompt(a), a, b, "rating")
                    skipped += pair is None
                    pairs.extend([pair] if pair else [])
    kto = unpaired(cfg, rated, paired_choices)
    counts = {
        "sft": len(sft),
        "preferences": len(pairs),
        "choice_pairs": n_choice_pairs,
        "rating_pairs": len(pairs) - n_choice_pairs,
        "kto_desirable": sum(r["label"] for r in kto),
        "kto_undesirable": sum(not r["label"] for r in kto),
        "skipped_identical": skipped,
        "skipped_other_prompt": mismatched,
        "skipped_cut_calls": len(cut),
        "responses": totals["responses"],
        "ratings": totals["ratings"],
        "choices": totals["choices"],
    }
    return sft, pairs, kto, counts


def build(cfg: FeedbackExportConfig, ctx: StageContext) -> dict[str, Any]:
    """Writes sft.jsonl, preferences.jsonl and kto.jsonl (atomically); the counts are the
    headline."""
    sft, pairs, kto, counts = collect(cfg)
    write_jsonl(ctx.out / "sft.jsonl", sft)
    write_jsonl(ctx.out / "preferences.jsonl", pairs)
    write_jsonl(ctx.out / "kto.jsonl", kto)
    ctx.log.info("feedback export: %s", counts)
    return counts


def export_feedback(cfg: FeedbackExportConfig, force: bool = False) -> Path:
    """Runs (or reuses) the export; returns its directory."""
    return run_stage("feedback-export", cfg, build, force=force).out
