"""Greedy ROUGE-L of held-out prompts against their reference answers, for the align headline:
the trained policy's beside its reference's (dpo.reference, else the starting model) or the
starting model's, scored before training by the methods that train its own weights.

Each prompt is rendered as training renders it (encode.reply_example: a tool conversation
through a template that reads `tools`), and answers stop where final/ will stop.
"""

from __future__ import annotations

from typing import Any

from lmforge.align.config import AlignConfig
from lmforge.align.encode import reply_example
from lmforge.finetune.evaluate import rouge_eval
from lmforge.finetune.export import tuned_generation_config
from lmforge.tokenizer.generation import eos_ids


def rouge_beside_reference(
    cfg: AlignConfig, tok: Any, policy: Any, records: list, reply: str = "chosen"
) -> dict:
    """Greedy ROUGE-L against the `reply` answers of held-out prompts (pairs' chosen, KTO's
    desirable completions): policy and reference (the start or dpo.reference, loaded again:
    training held only the policy)."""
    from lmforge.model.convert import load_pretrained, resolve_model_dir

    examples = rouge_examples(cfg, records, reply)
    if not examples:
        return {}
    explicit = cfg.dpo.reference if cfg.method == "dpo" else None  # kto: the start
    where = resolve_model_dir(explicit) if explicit else cfg.model_dir()
    reference = load_pretrained(where, quantized="dequantize").to(next(policy.parameters()).device)
    return rouge_from_start(cfg, tok, reference, examples)(policy)


def rouge_from_start(cfg: AlignConfig, tok: Any, lm: Any, examples: list[dict]) -> Any:
    """Scores lm's greedy ROUGE-L on examples now (the starting model of the methods that train
    its own weights, or a loaded reference); returns what adds the trained model's beside it
    (lm's as ref_rouge_l) to the headline."""
    if not examples:
        return lambda model: {}
    start = greedy_rouge_l(cfg, tok, lm, examples)
    return lambda model: {"rouge_l": greedy_rouge_l(cfg, tok, model, examples),
                          "ref_rouge_l": start, "rouge_examples": len(examples)}  # fmt: skip


def rouge_examples(cfg: AlignConfig, records: list, reply: str = "chosen") -> list[dict]:
    """Up to eval.rouge_examples held-out prompts (each once) with their `reply` answers, as
    chat examples rendered as training renders them (encode.reply_example: a tool conversation
    through a template that reads `tools`)."""
    seen, examples = set(), []
    for r in records:
        key = str(r["prompt"])
        if key not in seen and len(examples) < cfg.eval.rouge_examples:
            seen.add(key)
            examples.append(reply_example(r["prompt"], r[reply], r.get("tool_conversation")))
    return examples


def greedy_rouge_l(cfg: AlignConfig, tok: Any, model: Any, examples: list[dict]) -> float:
    """Greedy ROUGE-L of model's answers to examples, stopping where final/ will stop."""
    stops = eos_ids(tuned_generation_config(cfg.model_dir(), tok))
    score, _ = rouge_eval(model, tok, examples, stops, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    return round(score, 4)
