"""Runs an lmforge model's GGUF export in llama.cpp itself and compares it with lmforge.

For each file type (f32, f16, q8_0) the model directory (llama- or GPT-2-style) is exported with
lmforge.compress.gguf_export (and read back by check_gguf), loaded by llama.cpp through
llama-cpp-python, and compared with lmforge on three things:
  - tokenization: llama.cpp's tokenizer, built from the GGUF's tokenizer.ggml.* metadata, must give
    tokenizer.json's ids (TokenizerFiles.encode) on texts with digits, odd spacing, contractions,
    non-ASCII and the chat markers, and decode them back to the same text;
  - logits: max |difference| over every position of a few prompts (limit per file type: rounding
    the weights to f16 or q8_0 moves logits more than f32 arithmetic does);
  - greedy decoding: --new-tokens tokens from llama.cpp's greedy sampler against lmforge's
    generate(greedy=True), and the text of `lmforge generate` (EvalModel.generate_batch) against
    llama.cpp's completion API on the same prompt. Rounded weights may pick another token at a
    near tie, so the check prints how many leading tokens agree and requires all of them (and
    equal texts) for f32 only.

Every text goes in as lmforge feeds a raw text, a document start (BOS first, EOS when there is no
BOS); the export's add_bos_token makes llama.cpp do the same.

  PYTHONPATH=src:LLAMA_CPP_SITE_PACKAGES python benchmarks/check_gguf_llamacpp.py MODEL_DIR \\
      [--types f32,f16,q8_0] [--new-tokens 32] [--out result.json]

Needs llama_cpp importable (pip install 'lmforge[gguf-check]' compiles llama.cpp from source).
Prints a markdown table; exits 1 when a check misses its limit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.compress.files import special_ids
from lmforge.compress.gguf_export import check_gguf, export_gguf, gguf_arch
from lmforge.evals.lm import EvalModel, GenerationSettings
from lmforge.model.generate import generate

# max |logit difference| llama.cpp vs lmforge allowed per file type
LOGIT_LIMITS = {"f32": 1e-3, "f16": 5e-2, "q8_0": 0.5}
# added for gpt2: llama.cpp's CPU GELU reads a float16 table (input and output rounded to f16);
# on a micro GPT-2 that moved f32 logits by 1.5e-3, and by 1.4e-6 once lmforge rounded the same way
GELU_TABLE_SLACK = 5e-3
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "In 2024 there were 366 days; pi is 3.14159 and 1e-5 is small.",
    "  two leading spaces,\ttabs\tand\n\n\nblank lines   then trailing  ",
    "Unicode: café, naïve, Straße, 東京, emoji 🙂 and ½ ⅔ ².",
    "don't, I'll, we've, 'quoted' and \"double\" -- x=[1,2]; y={'k': v}",
    "<|im_start|>user\nWhat does print do?<|im_end|>\n<|im_start|>assistant\n",
    "",
]
PROMPTS = [
    "def add(a, b):\n",
    "The quick brown fox",
    "for i in range(10):\n    print(i * i)\n",
    "<|im_start|>user\nExplain len.<|im_end|>\n<|im_start|>assistant\n",
]


def load_llama(path: Path, n_ctx: int) -> Any:
    """llama.cpp's model, one thread, logits kept for every position of a batch, and a float32
    KV cache: llama.cpp's default f16 cache alone moves f32 logits by about 2e-3, which would
    hide what the export itself does."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False, seed=0,
    )  # fmt: skip


def tokenizer_report(llm: Any, lm: EvalModel) -> dict[str, Any]:
    """Texts whose llama.cpp ids or decoded text differ from lmforge's (with both id lists).

    lmforge feeds a raw text as a document start (EvalModel.start: BOS first); llama.cpp's
    tokenize with add_bos=True adds the GGUF's bos when its add_bos_token says so."""
    mismatches = []
    for text in TEXTS:
        ours = lm.start(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        decoded = llm.detokenize(lm.encode(text)).decode("utf-8", errors="replace")
        if ours != theirs or decoded != lm.decode(lm.encode(text)):
            mismatches.append({"text": text, "lmforge": ours, "llama_cpp": theirs,
                               "lmforge_text": lm.decode(lm.encode(text)),
                               "llama_cpp_text": decoded})  # fmt: skip
    return {"texts": len(TEXTS), "tokenize_equal": len(TEXTS) - len(mismatches),
            "mismatches": mismatches}  # fmt: skip


def logits_diff(llm: Any, model: torch.nn.Module, ids: list[int]) -> float:
    """max |logit difference| over every position of ids."""
    llm.reset()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].float().numpy()
    return float(np.abs(theirs - ours).max())


def within_positions(block_size: int) -> Any:
    """A stopping criterion that ends a completion before it evaluates a position the model
    lacks. llama-cpp-python keeps sampling past max_tokens while its text ends inside a UTF-8
    character, and llama.cpp pads the context to 256 tokens, so a GPT-2 of a 64-token block
    reached position 64 and llama.cpp aborted the process (an untrained micro-gpt2)."""
    import llama_cpp

    return llama_cpp.StoppingCriteriaList([lambda ids, logits: len(ids) >= block_size])


def greedy_agreement(llm: Any, lm: EvalModel, prompt: str, n: int) -> dict[str, Any]:
    """n greedy tokens (fewer where the prompt leaves less room in the model's context) after the
    prompt's document-start ids from each, how many leading tokens agree, and whether the texts
    `lmforge generate` and llama.cpp's completion API make of the prompt are equal (both stop at
    the model's stop tokens)."""
    ids = lm.start(prompt)
    n = min(n, lm.block_size - len(ids))
    ours = generate(lm.model, torch.tensor([ids]), n, greedy=True)[0, len(ids) :].tolist()
    theirs = []
    for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        theirs.append(int(token))
        if len(theirs) == n:
            break
    agree = 0
    while agree < min(len(ours), len(theirs)) and ours[agree] == theirs[agree]:
        agree += 1
    our_text = lm.generate_batch([prompt], GenerationSettings(max_new_tokens=n))[0]
    their_text = llm.create_completion(
        prompt, max_tokens=n, temperature=0.0, stopping_criteria=within_positions(lm.block_size)
    )["choices"][0]["text"]
    return {"lmforge": ours, "llama_cpp": theirs, "agree": agree, "n": n,
            "text_equal": our_text == their_text, "lmforge_text": our_text,
            "llama_cpp_text": their_text}  # fmt: skip


def check_type(model_dir: Path, file_type: str, out_dir: Path, new_tokens: int) -> dict[str, Any]:
    """Export model_dir as file_type, load it in llama.cpp, run every comparison."""
    lm = EvalModel.load(model_dir, quantized="dequantize")  # as `compress export` loads it
    model, special = lm.model.eval(), special_ids(model_dir)
    path = out_dir / f"model-{file_type}.gguf"
    export_gguf(model, model_dir, path, special, file_type)
    check_gguf(path, model, model_dir, special, file_type)
    llm = load_llama(path, lm.block_size)
    try:
        greedy = [greedy_agreement(llm, lm, prompt, new_tokens) for prompt in PROMPTS]
        tokenizer = tokenizer_report(llm, lm)
        max_diff = max(logits_diff(llm, model, lm.start(p)) for p in PROMPTS)
    finally:
        llm.close()
    arch = gguf_arch(model.config)
    result = {
        "file_type": file_type,
        "arch": arch,
        "bytes": path.stat().st_size,
        **tokenizer,
        "max_abs_logit_diff": max_diff,
        "logit_limit": LOGIT_LIMITS[file_type] + (GELU_TABLE_SLACK if arch == "gpt2" else 0.0),
        "greedy_agree": [f"{g['agree']}/{g['n']}" for g in greedy],
        "texts_equal": sum(g["text_equal"] for g in greedy),
        "greedy": greedy,
    }
    result["ok"] = (
        result["tokenize_equal"] == result["texts"]
        and result["max_abs_logit_diff"] <= result["logit_limit"]
        and (file_type != "f32" or all(g["agree"] == g["n"] and g["text_equal"] for g in greedy))
    )
    return result


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per file type."""
    lines = [
        "| file type | bytes | token ids equal | max abs logit diff (limit) "
        "| greedy tokens agreeing | completion texts equal |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['file_type']} | {r['bytes']:,} | {r['tokenize_equal']}/{r['texts']} | "
            f"{r['max_abs_logit_diff']:.2e} ({r['logit_limit']:g}) | "
            f"{', '.join(r['greedy_agree'])} | {r['texts_equal']}/{len(r['greedy'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="an lmforge model directory")
    parser.add_argument("--types", default="f32,f16,q8_0", help="comma list of GGUF file types")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared")
    parser.add_argument("--out", type=Path, help="write every result as JSON here")
    args = parser.parse_args(argv)
    import llama_cpp

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            check_type(args.model_dir, t, Path(tmp), args.new_tokens) for t in args.types.split(",")
        ]
    print(f"llama-cpp-python {llama_cpp.__version__}, {args.model_dir} ({results[0]['arch']})")
    print(table(results))
    for r in results:
        for m in r["mismatches"]:
            print(f"{r['file_type']}: tokenization differs on {m['text']!r}: {json.dumps(m)}")
    if args.out:
        args.out.write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__,
                                        "results": results}, indent=1))  # fmt: skip
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
