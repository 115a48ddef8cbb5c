"""Held-out ROUGE-L answers: batched, left-padded generation gives the one-at-a-time answers."""

from __future__ import annotations

import torch

from lmforge.finetune.evaluate import generate_answers, rouge_eval, rouge_l
from lmforge.model.config import preset_config
from lmforge.model.generate import generate
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.files import TokenizerFiles

QUESTIONS = [
    "What is the capital of France?",
    "Return",
    "def f(x): return x + 1",
    "Return the absolute value of a number. os.path.join joins paths. What is the capital?",
    "user",
    "os.path.join joins paths.",
    "What is the capital of France? The capital is Paris. Return the absolute value.",
]


def examples() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Paris"}]}
        for q in QUESTIONS
    ]


def one_at_a_time(
    model, tok: TokenizerFiles, rows: list[dict], max_new_tokens: int
) -> tuple[list[str], list[int]]:
    """The reference: each prompt generated alone, as generate_answers did before batching.

    Also returns how many tokens each row generated.
    """
    stops, answers, n_new = tok.stop_ids(), [], []
    for row in rows:
        prompt = tok.encode(tok.render_chat(row["messages"][:-1], add_generation_prompt=True))
        out = generate(
            model, torch.tensor([prompt]), max_new_tokens, greedy=True, stop_tokens=stops
        )
        answers.append(tok.decode([t for t in out[0, len(prompt) :].tolist() if t not in stops]))
        n_new.append(out.size(1) - len(prompt))
    return [a.strip() for a in answers], n_new


def model_that_sometimes_stops(tok: TokenizerFiles) -> Transformer:
    """A random micro model whose end-of-turn token wins wherever one common token would."""
    torch.manual_seed(0)
    cfg = preset_config("micro", vocab_size=tok.vocab_size, init_std=0.2, tie_embeddings=False)
    model = Transformer(cfg).eval()
    prompt = tok.encode(tok.render_chat(examples()[0]["messages"][:-1], add_generation_prompt=True))
    common = int(generate(model, torch.tensor([prompt]), 8, greedy=True)[0, -5])
    with torch.no_grad():
        model.lm_head.weight[tok.stop_ids()[0]] = 1.05 * model.lm_head.weight[common]
    return model


def test_batched_answers_equal_one_at_a_time(tokenizer_dir):
    tok = TokenizerFiles.load(tokenizer_dir)
    model = model_that_sometimes_stops(tok)
    rows = examples()
    reference, n_new = one_at_a_time(model, tok, rows, 12)
    assert min(n_new) < 12 and max(n_new) == 12  # some rows stop early, some run on
    for batch_size in (1, 3, 16):
        answers = generate_answers(model, tok, rows, tok.stop_ids(), 12, batch_size=batch_size)
        assert answers == reference
    score, per_row = rouge_eval(model, tok, rows, tok.stop_ids(), 12, batch_size=4)
    assert [r["prediction"] for r in per_row] == reference
    assert score == sum(rouge_l(a, "Paris") for a in reference) / len(rows)
