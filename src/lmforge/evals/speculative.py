"""`lmforge generate --draft-model`: text prompts through model.speculative.

The target's answers are exactly its greedy ones (the same prompt ids, budget and stop set as
EvalModel.generate_batch); the draft must read the same tokenizer, so its guesses mean the same
tokens. Only greedy decoding is exact this way: sampling, beams, repetition penalties and logits
rules are refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import ConfigError, InputError
from lmforge.evals.lm import EvalModel, GenerationSettings, cut_at_stop
from lmforge.model.generate import batch_budget
from lmforge.model.speculative import DraftStats, check_draft, speculative_generate
from lmforge.tokenizer.files import tokenizer_hash


def check_draft_model(lm: EvalModel, draft: EvalModel) -> None:
    """ConfigError unless draft can speculate for lm: causal decoders over one tokenizer."""
    if lm.scorer.kind != "causal" or draft.scorer.kind != "causal":
        raise ConfigError(
            f"--draft-model needs two decoder-only models; {lm.path} is {lm.scorer.kind} and "
            f"{draft.path} is {draft.scorer.kind}"
        )
    if tokenizer_hash(lm.path) != tokenizer_hash(draft.path):
        raise ConfigError(
            f"the draft {draft.path} has another tokenizer than {lm.path} (tokenizer.json "
            "differs); a draft must share the target's tokenizer, e.g. a `lmforge compress "
            "--method distill` student of it"
        )
    check_draft(lm.model, draft.model)


def greedy_only(settings: GenerationSettings) -> None:
    """ConfigError naming the settings speculative decoding cannot keep exact."""
    asked = {
        "--temperature > 0": settings.temperature > 0,
        "--num-beams > 1": settings.num_beams > 1,
        "--repetition-penalty": settings.repetition_penalty != 1.0,
        "logits rules (no-repeat n-grams, minimum lengths, forced tokens)": (
            settings.logits_rules().active
        ),
    }
    given = [name for name, on in asked.items() if on]
    if given:
        raise ConfigError(
            f"--draft-model decodes greedily, without {', '.join(given)} (the model's "
            "generation_config may set some); drop --draft-model or those settings"
        )


def speculative_sample(
    lm: EvalModel,
    draft: EvalModel,
    prompts: list[str],
    settings: GenerationSettings,
    *,
    chat: bool = False,
    draft_tokens: int = 4,
    schedule: str = "constant",
    confidence: float | None = None,
    num_samples: int = 1,
) -> tuple[list[dict[str, Any]], DraftStats]:
    """evals.sample.sample's records for greedy answers, one prompt at a time, and the draft's
    acceptance over them (draft_tokens, schedule, confidence: model.speculative's)."""
    if not prompts:
        raise InputError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    if num_samples != 1:
        raise ConfigError(
            f"num_samples={num_samples} with --draft-model would repeat one greedy answer; "
            "drop --num-samples or --draft-model"
        )
    check_draft_model(lm, draft)
    settings = lm.settings_for(settings)
    greedy_only(settings)
    budget, rows, limit = lm.scorer.prompt_rows(prompts, settings, chat)
    stats, records = DraftStats(), []
    for prompt, ids in zip(prompts, rows, strict=True):
        res = speculative_generate(
            lm.model, draft.model, ids, batch_budget(budget, limit, len(ids)),
            draft_tokens=draft_tokens, schedule=schedule, confidence=confidence,
            stop_tokens=lm.stop_ids(),
        )  # fmt: skip
        stats.add(res.stats)
        text = cut_at_stop(lm.decode(res.tokens), settings.stop)
        records.append({"prompt": prompt, "sample": 0, "completion": text})
    return records, stats
